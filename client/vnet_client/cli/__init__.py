"""vnet-client: the command line for qemu-vnet.

Two forms:
  vnet-client SUBCOMMAND ...             (list, show, define, start, stop, undefine, ...)
  vnet-client --br=vnet3 -n4 --start     (the original qemu-vlan's flags)

Exit codes: 0 ok, 1 failure, 2 usage, 4 not authorized, 130 Ctrl-C, 141 output pipe closed
(attach: 126/127, its COMMAND cannot run / is not found).

One module per noun (network, edit, attach, mac, host, forward, overlay, monitor, imports, compat:
the qemu-vlan form), each adding its subcommands to the parser with `set_defaults(func=...)`;
parser (exit codes, usage errors), output, accounts and session (the connection) are shared.
Every command talks to vnetd through the synchronous client (vnet_client.blocking).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Any

from .. import __version__
from ..base import BusUnreachable, Unsendable, VnetClientError
from . import attach, edit, forward, host, imports, mac, monitor, network, overlay
from .accounts import uid_of
from .attach import CannotRun, parse_attach, run_attach
from .compat import (
    build_compat_parser,
    compat_define_opts,
    compat_differences,
    compat_macaddr_count,
    compat_request,
    run_compat,
)
from .mac import read_mac_table, render_mac_table
from .network import define_opts, print_network
from .output import say_error
from .parser import (
    EXIT_AUTH,
    EXIT_FAIL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PIPE,
    EXIT_USAGE,
    Failure,
    Parser,
    RawDescriptionHelpFormatter,
    Usage,
    add_common,
    wants_json,
)

# What tests and other code use (and the names this module had before it was a package).
_define_opts, _uid_of = define_opts, uid_of
__all__ = [
    "EXIT_AUTH", "EXIT_FAIL", "EXIT_OK", "EXIT_USAGE", "Failure", "Usage", "build_compat_parser",
    "build_parser", "compat_define_opts", "compat_differences", "compat_macaddr_count",
    "compat_request", "hoist_global_options", "is_compat", "main", "parse_attach",
    "print_network", "read_mac_table", "render_mac_table",
]

EPILOG = """\
examples:
  vnet-client define vnet2 --mode=nat            # 172.16.12.0/24, gateway 172.16.12.1
  vnet-client define lab --subnet=10.7.0.0/24 --subnet6=fd00:7::/64 --mode=host-only
  vnet-client start vnet2
  vnet-client list --json
  vnet-client --br=vnet3 -n4 --start             # qemu-vlan style: define if needed, start
  vnet-client --br=vnet3 --stop

Authorization: listing is open to everyone; defining, starting and stopping networks needs
the 'manage' right (an administrator's password by default). On a terminal a password prompt
appears when polkit asks for one; --no-ask-password turns that off.
Exit codes: 0 ok, 1 failure, 2 usage error, 4 not authorized, 130 interrupted (Ctrl-C),
141 the reader of the output went away (as for SIGPIPE); attach: 127 its COMMAND is not
found, 126 it cannot be run.
"""


class _Unbuilt:
    """What a command's module fills in place of a parser the command line does not invoke:
    it takes every call (add_argument, add_subparsers, set_defaults, ...) and keeps nothing.
    The command itself is still registered, so --help lists it and a typo is still named
    among the choices."""

    description = epilog = usage = formatter_class = None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line's parser; with `only`, the options of that command alone (a
    command builds only its own: some 250 options in 35 commands cost a few milliseconds)."""
    p = Parser(
        prog="vnet-client",
        description="Manage qemu-vnet virtual networks and attach QEMU VMs to them without "
        "root. Talks to the vnetd service over D-Bus; polkit decides who may do what.",
        epilog=EPILOG, formatter_class=RawDescriptionHelpFormatter,
    )
    add_common(p, top=True)
    p.add_argument("--version", action="version", version=f"vnet-client (qemu-vnet) {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    def cmd(name: str, help: str) -> Any:
        sp = sub.add_parser(name, help=help, description=help)
        if only is not None and name != only:
            return _Unbuilt()
        add_common(sp)
        return sp

    # in the order --help lists them
    network.add_commands(cmd)  # list, show, define, export
    imports.add_commands(cmd)  # import-qemu-vlan, import-bridge-conf
    network.add_lifecycle(cmd)  # start, stop, undefine, autostart, reload
    edit.add_commands(cmd)
    attach.add_commands(cmd)  # attach, ports, detach
    mac.add_mac(cmd)
    host.add_host(cmd)
    forward.add_commands(cmd)
    overlay.add_commands(cmd)
    monitor.add_commands(cmd)
    host.add_leases(cmd)
    mac.add_import_ether_conf(cmd)
    return p


def is_compat(argv: list[str]) -> bool:
    """The qemu-vlan form: --br given and no subcommand. Subcommands take --br too (attach,
    mac), so the first word that is neither an option nor an option's value decides."""
    if not any(a.startswith("--br") or (a.startswith("-b") and not a.startswith("--"))
               for a in argv):
        return False
    takes_value = {"-n", "--taps", "--num", "--mode", "--subnet", "--subnet6", "--mtu",
                   "--user", "-u", "--group", "-g", "--dhcp", "-d", "--dhcp-start",
                   "--dhcp-end", "--domain", "--bus-address", "--br", "-b", "--routed-with",
                   "--vde-ports", "--if", "-i", "--cf", "-c", "--vni", "--local", "--peer",
                   "--underlay-dev", "--vxlan-port", "--role", "--control", "--asn"}
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith("-"):
            skip = a in takes_value
            continue
        return a not in subcommands()
    return True


def subcommands() -> list[str]:
    sub = next(a for a in build_parser(only="")._actions if a.dest == "cmd")
    return list(sub.choices or ())


def invoked(argv: list[str]) -> str:
    """The command a command line names: its first word that is not a global option (or the
    value of one); "" when there is none."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("-"):
            return a
        i += global_option_words(a) or 1
    return ""


GLOBAL_FLAGS = ("--json", "--no-ask-password")
GLOBAL_OPTIONS = (*GLOBAL_FLAGS, "--bus-address")  # (the one that takes a value)


def _global_option(word: str) -> str | None:
    """The option every command takes that `word` names, as argparse reads it: by its whole
    name or any unambiguous beginning of it (`--bus`, `--js`); None for any other word."""
    name = word.partition("=")[0]
    if len(name) < 3 or not name.startswith("--"):
        return None
    known = [o for o in GLOBAL_OPTIONS if o.startswith(name)]
    return known[0] if len(known) == 1 else None


def global_option_words(word: str) -> int:
    """How many words an option every command takes spans when it starts with `word`: 1 for
    a flag or `--bus-address=ADDR`, 2 for `--bus-address ADDR`, 0 for any other word."""
    option = _global_option(word)
    if option is None:
        return 0
    if option in GLOBAL_FLAGS:
        return 0 if "=" in word else 1
    return 1 if "=" in word else 2


def hoist_global_options(argv: list[str]) -> list[str]:
    """`vnet-client --no-ask-password attach ...` as `vnet-client attach --no-ask-password
    ...`: attach has a parser of its own, so the options every command takes move behind it,
    by their whole names (attach's parser takes no shortened one)."""
    i, moved = 0, []
    while i < len(argv) and (n := global_option_words(argv[i])):
        _, eq, value = argv[i].partition("=")
        moved += [f"{_global_option(argv[i])}{eq}{value}", *argv[i + 1:i + n]]
        i += n
    if i and argv[i:i + 1] == ["attach"]:
        return ["attach", *moved, *argv[i + 1:]]
    return argv


# forward add's options that take a value (the next word, unless written --opt=value)
FORWARD_ADD_VALUES = ("--if", "--addr-of", "--rule", "--rule-means", "--bus-address")


def forward_add_options_last(argv: list[str]) -> list[str]:
    """`forward add NET -6 tcp 8080 [fd00::5]:80` as `forward add NET tcp 8080 [fd00::5]:80
    -6`: argparse gives its optional positionals (PROTO PORT TARGET may be left out for
    --rule) nothing once an option comes between them, so the options move behind them."""
    at = 0  # past the options every command takes
    while at < len(argv) and (n := global_option_words(argv[at])):
        at += n
    if argv[at:at + 2] != ["forward", "add"]:
        return argv
    head, tail = argv[:at + 2], argv[at + 2:]
    words: list[str] = []
    options: list[str] = []
    i = 0
    while i < len(tail):
        t = tail[i]
        if t.startswith("-") and len(t) > 1:
            options.append(t)
            if t in FORWARD_ADD_VALUES and i + 1 < len(tail):
                options.append(tail[i + 1])
                i += 1
        else:
            words.append(t)
        i += 1
    return head + words + options


def main(argv: list[str] | None = None) -> int:
    argv = hoist_global_options(sys.argv[1:] if argv is None else argv)
    argv = forward_add_options_last(argv)
    Parser.json_errors = wants_json(argv)  # argparse's usage errors as JSON too
    try:
        try:
            code = run(argv)
        finally:  # the output is written here, not at the interpreter's exit: its errors too
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        return output_closed()
    except OSError as e:
        if not is_write_error(e):  # an OSError no command caught: still one sentence
            where = f"{e.filename}: " if e.filename else ""
            return say_error(argv, "Failure", f"{where}{e.strerror or e}.", EXIT_FAIL)
        cannot_write(e)
        return EXIT_FAIL
    finally:
        Parser.json_errors = False
    return code


def run(argv: list[str]) -> int:
    """The command; an error it ends with as its sentence (or JSON object) and exit code."""
    try:
        if argv[:1] == ["attach"] and not {"-h", "--help"} & set(argv[1:argv.index("--")]
                                                                if "--" in argv else argv[1:]):
            groups, command, common = parse_attach(argv[1:])
            return run_attach(groups, command, common)
        if is_compat(argv):
            return run_compat(build_compat_parser().parse_args(argv))
        parser = build_parser(only=invoked(argv))
        args = parser.parse_args(argv)
        if not args.cmd:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return args.func(args)
    except Usage as e:
        return say_error(argv, "Usage", str(e), EXIT_USAGE)
    except Failure as e:
        return say_error(argv, "Failure", str(e), EXIT_FAIL)
    except CannotRun as e:
        return say_error(argv, "Failure", str(e), e.code)
    except Unsendable as e:  # found before anything was sent: the command line's mistake
        return say_error(argv, "Usage", e.message, EXIT_USAGE)
    except BusUnreachable as e:
        return say_error(argv, e.name, e.sentence(), EXIT_FAIL)
    except VnetClientError as e:
        return say_error(argv, e.name, e.message, EXIT_AUTH if e.is_auth else EXIT_FAIL)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


# what writing to a file or pipe that cannot take more fails with (EPIPE is a closed reader)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EBADF,
                          errno.EROFS, errno.ENXIO, errno.ECONNRESET})


def is_write_error(e: OSError) -> bool:
    """An OSError that writing our output raised (no file named: not an open() or a read)."""
    return e.filename is None and e.errno in WRITE_ERRNOS


def cannot_write(e: OSError) -> None:
    """The output cannot be written (`vnet-client list > /dev/full`): one sentence, and
    standard output pointed at /dev/null, so that the interpreter's last flush at exit does
    not fail again."""
    print(f"vnet-client: cannot write the output: {e.strerror or e}", file=sys.stderr)
    to_devnull()


def output_closed() -> int:
    """The reader of our output went away (`vnet-client list | head -1`): no traceback, and
    the status a shell reports for a command that SIGPIPE ended. What is still buffered goes
    nowhere, so the interpreter's last flush at exit cannot fail again."""
    to_devnull()
    return EXIT_PIPE


def to_devnull() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
