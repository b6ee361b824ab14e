"""edit: change a network's definition in an editor (as `virsh net-edit`), or from a file.

The definition comes from vnetd as TOML (what `export` prints), the user edits it, and vnetd
checks it as `define` checks one (options, subnets against the other networks and the host,
forwards, the caller's limits). A running network takes the live settings at once and
changes the ones that make its links only while it is stopped. Nothing is changed until the
new definition passes every check, and a file that fails is kept for the next try.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..base import VnetClientError
from .parser import EXIT_OK, Failure, RawDescriptionHelpFormatter
from .session import Session

EPILOG = """\
examples:
  vnet-client edit vnet2                   # opens $VISUAL / $EDITOR on its TOML
  vnet-client edit vnet2 --dry-run         # edit, check and say what it would do
  vnet-client export vnet2 > v2.toml; vi v2.toml; vnet-client edit vnet2 --from v2.toml

Live while it runs: dhcp, dhcp-start, dhcp-end, domain, hosts, forwards, allow-host,
routed-with, spoof-protection, overlay peers, autostart. The rest (mode, subnet, subnet6,
mtu, taps, tap-*, vde*, if, force, other overlay settings) changes only while the network is
stopped: vnet-client stop NET, edit, vnet-client start NET.
"""


def add_commands(cmd: Any) -> None:
    sp = cmd("edit", "change a network's definition in your editor, checked as define checks "
                     "one, and applied live where it can be")
    sp.epilog = EPILOG
    sp.formatter_class = RawDescriptionHelpFormatter
    sp.add_argument("name", help="the network")
    sp.add_argument("--from", dest="from_file", metavar="FILE",
                    help="take the new definition from a TOML file instead of an editor")
    sp.add_argument("--dry-run", action="store_true",
                    help="check the new definition and say what it would change; change "
                         "nothing")
    sp.set_defaults(func=run_edit)


def editor() -> list[str]:
    """$VISUAL, $EDITOR, else Debian's 'editor' alternative, else vi."""
    import shlex
    import shutil

    for var in ("VISUAL", "EDITOR"):
        if os.environ.get(var, "").strip():
            return shlex.split(os.environ[var])
    for name in ("editor", "vi"):
        if shutil.which(name):
            return [name]
    raise Failure("no editor found: set $EDITOR (for example EDITOR=nano), or give --from "
                  "FILE.")


def parse(text: str, name: str, where: str) -> dict[str, Any]:
    """The options of a definition's TOML text; its name, if given, must be the network's."""
    import tomllib

    try:
        opts = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise Failure(f"{where} is not valid TOML: {e}.") from None
    given = opts.pop("name", name)
    if given != name:
        raise Failure(f"{where} names the network '{given}': edit cannot rename '{name}' "
                      f"(export it, define the new name --from the file, undefine '{name}').")
    return opts


def diff(old: str, new: str, name: str) -> str:
    import difflib

    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                        f"{name} (in force)", f"{name} (new)"))


def ask_again(what: str) -> bool:
    """After a failed check in the editor: edit the same file again? (a terminal only)"""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    sys.stderr.write(f"{what}\nEdit again? [Y/n] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("", "y", "yes")


def run_edit(args: argparse.Namespace) -> int:
    import subprocess
    import tempfile

    with Session(args) as s:
        old = s.run(lambda c: c.export_definition(args.name))
        if args.from_file:
            try:
                with open(args.from_file, encoding="utf-8") as f:
                    new = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise Failure(f"cannot read {args.from_file}: {e}") from None
            return apply(s, args, old, new, args.from_file)
        argv = editor()  # before the file: no editor, no file left behind
        fd, path = tempfile.mkstemp(prefix=f"vnet-{args.name}-", suffix=".toml")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(old)
        while True:
            try:
                code = subprocess.call([*argv, path])
            except OSError as e:
                raise Failure(f"cannot run the editor {argv[0]}: {e.strerror or e}; "
                              f"the definition is in {path}.") from None
            if code != 0:
                raise Failure(f"the editor {argv[0]} exited with code {code}: nothing was "
                              f"changed (your text is in {path}).")
            with open(path, encoding="utf-8") as f:
                new = f.read()
            if new == old:
                os.unlink(path)
                if args.json:
                    print(json.dumps({"name": args.name, "dry-run": args.dry_run,
                                      "notes": [f"{args.name}: nothing changed."], "diff": "",
                                      "network": None}, indent=2))
                else:
                    print(f"No change to {args.name}: nothing was done.")
                return EXIT_OK
            try:
                rc = apply(s, args, old, new, path)
            except (Failure, VnetClientError) as e:
                if not getattr(e, "is_auth", False) and ask_again(f"vnet-client: {e}"):
                    continue
                raise
            if args.dry_run:  # the edit is kept for the real run: edit --from it
                print(f"Your text is kept in {path} (vnet-client edit {args.name} --from "
                      f"{path}).", file=sys.stderr)
            else:
                os.unlink(path)
            return rc


def apply(s: Session, args: argparse.Namespace, old: str, new: str, where: str) -> int:
    opts = parse(new, args.name, where)
    try:
        n, notes = s.run(lambda c: c.redefine(args.name, opts, dry_run=args.dry_run))
    except VnetClientError as e:
        if where != args.from_file:
            e.message = f"{e.message} Nothing was changed; your text is in {where}."
        raise
    change = diff(old, new, args.name)
    if args.json:
        print(json.dumps({"name": args.name, "dry-run": args.dry_run, "notes": notes,
                          "diff": change, "network": n}, indent=2))
        return EXIT_OK
    sys.stdout.write(change)
    for line in notes:
        print(line)
    print(f"Checked the new definition of {args.name}: nothing was changed (--dry-run)."
          if args.dry_run else f"Changed the definition of {args.name}.")
    return EXIT_OK
