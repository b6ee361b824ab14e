"""Shell completion for vnet-client, generated from its parser: bash and zsh by shtab, fish by
a small generator of its own here (shtab has no fish backend).

    python3 -m vnet_client.cli.completion bash > /usr/share/bash-completion/completions/vnet-client
    python3 -m vnet_client.cli.completion zsh > /usr/share/zsh/vendor-completions/_vnet-client
    python3 -m vnet_client.cli.completion fish \\
        > /usr/share/fish/vendor_completions.d/vnet-client.fish

Subcommands and options come from the parser itself; network names (for the commands that
take an existing network, and --br) and VM names (--vm, and the commands that take a VM) are
asked of vnetd as they are completed (`vnet-client list --names`, `vnet-client ports
--names`: what the user may see). shtab is imported only here, and only for bash and zsh:
vnet-client never needs it.

The fish script walks the command line with a generated function (__vnet_client_state: the
subcommand path so far, skipping options and their values, and how many positional words
follow it); every completion is conditioned on that path, and positionals on their index.
attach reads its own command line (parse_attach), so argparse knows only its common options:
the others come from its usage line, and after its `--` the QEMU command completes as itself.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator

# positional arguments that name a network that exists, by subcommand path
NETWORK_POSITIONALS = {"name", "network", "net"}
NEW_NAMES = {("define",)}  # a name that does not exist yet
VM_POSITIONALS = {"vm"}
COMMAND_AFTER_DASHDASH = {("attach",)}  # `-- COMMAND [ARGS...]`: completes as COMMAND itself

PREAMBLE = {
    "bash": """
_vnet_client_networks() {
  compgen -W "$(vnet-client --no-ask-password list --names 2>/dev/null)" -- "$1"
}
_vnet_client_vms() {
  compgen -W "$(vnet-client --no-ask-password ports --names 2>/dev/null)" -- "$1"
}
""",
    "zsh": """
_vnet_client_networks() {
  local -a nets; nets=(${(f)"$(vnet-client --no-ask-password list --names 2>/dev/null)"})
  compadd -a nets
}
_vnet_client_vms() {
  local -a vms; vms=(${(f)"$(vnet-client --no-ask-password ports --names 2>/dev/null)"})
  compadd -a vms
}
""",
}
NETWORKS = {"bash": "_vnet_client_networks", "zsh": "_vnet_client_networks"}
VMS = {"bash": "_vnet_client_vms", "zsh": "_vnet_client_vms"}


def _subparsers(p: argparse.ArgumentParser):
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            yield from a.choices.items()


def _kind(a: argparse.Action, path: tuple[str, ...]) -> str | None:
    """What an argument names: "network", "vm", "file", "dir", or None (nothing to offer)."""
    if a.option_strings:
        if "--br" in a.option_strings:
            return "network"
        if "--vm" in a.option_strings:
            return "vm"
        if "--from" in a.option_strings:
            return "file"
    elif a.dest in NETWORK_POSITIONALS and path not in NEW_NAMES:
        return "network"
    elif a.dest in VM_POSITIONALS:
        return "vm"
    elif a.dest == "dir":
        return "dir"
    return None


def annotate(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """Mark the arguments that take a network or a VM name (shtab's `complete`)."""
    import shtab

    marks = {"network": NETWORKS, "vm": VMS, "file": shtab.FILE, "dir": shtab.DIRECTORY}
    for a in p._actions:
        kind = _kind(a, path)
        if kind:
            a.complete = marks[kind]  # type: ignore[attr-defined]
    for name, sp in _subparsers(p):
        annotate(sp, (*path, name))
    return p


# fish (shtab has none): `complete -c vnet-client` lines, each conditioned on the subcommand
# path the generated __vnet_client_state reads off the command line

FISH_PREAMBLE = """\
# fish completion for vnet-client, generated from its parser:
#   python3 -m vnet_client.cli.completion fish > vendor_completions.d/vnet-client.fish

function __vnet_client_networks --description 'vnet-client: the networks you may see'
    vnet-client --no-ask-password list --names 2>/dev/null
end

function __vnet_client_vms --description "vnet-client: the VMs' names you may see"
    vnet-client --no-ask-password ports --names 2>/dev/null
end
"""

FISH_STATE = """
# The command line so far: its subcommand path (one line, the words joined by spaces; a "--"
# that ends the options is its last word), then how many positional words follow the path.
function __vnet_client_state
    set -l path
    set -l subs (__vnet_client_subcommands)
    set -l valued (__vnet_client_valued)
    set -l n 0
    set -l skip 0
    for w in (commandline -opc)[2..-1]
        if test $skip = 1
            set skip 0
        else if test "$w" = --
            set -a path --
            break
        else if string match -q -- '-?*' $w
            contains -- $w $valued; and set skip 1
        else if test $n = 0; and contains -- $w $subs
            set -a path $w
            set subs (__vnet_client_subcommands $path)
            set valued (__vnet_client_valued $path)
        else
            set n (math $n + 1)
        end
    end
    printf '%s\\n' "$path" $n
end

# PATH...: the command line is at this subcommand path
function __vnet_client_using
    set -l s (__vnet_client_state)
    test "$s[1]" = "$argv"
end

# N PATH...: the next word is positional N (N+: N or later) of this subcommand path
function __vnet_client_arg
    set -l s (__vnet_client_state)
    test "$s[1]" = "$argv[2..-1]"; or return
    if string match -q -- '*+' $argv[1]
        test $s[2] -ge (string trim -r -c + -- $argv[1])
    else
        test $s[2] -eq $argv[1]
    end
end

# after attach's --: the command, completed as that command
function __vnet_client_command
    set -l words (commandline -opc) (commandline -ct)
    set -l i (contains -i -- -- $words)
    __fish_complete_subcommand --commandline $words[(math $i + 1)..-1]
end
"""

FISH_FUNCTIONS = {"network": "__vnet_client_networks", "vm": "__vnet_client_vms",
                  "dir": "__fish_complete_directories"}
WORD = re.compile(r"[A-Za-z0-9-][A-Za-z0-9_.:-]*")
USAGE_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?:=([A-Z][A-Z0-9_]*))?")


def _quote(text: str) -> str:
    """Single-quoted for fish (which knows two escapes there, \\\\ and \\')."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fq(text: str) -> str:
    """A fish word: as it is when it is plain, else quoted."""
    return text if WORD.fullmatch(text) else _quote(text)


def _levels(p: argparse.ArgumentParser, path: tuple[str, ...] = ()
            ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser with its subcommand path, in the parser's own order."""
    yield path, p
    for name, sp in _subparsers(p):
        if not WORD.fullmatch(name):
            raise ValueError(f"subcommand {name!r} is not a plain word")
        yield from _levels(sp, (*path, name))


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """A parser's options (hidden ones too: their values are skipped, never offered); and
    those its usage line names that argparse does not have (attach: parse_attach reads
    them), `--opt=VALUE` taking a value."""
    opts = [a for a in p._actions if a.option_strings]
    known = {o for a in opts for o in a.option_strings}
    for opt, metavar in USAGE_OPTION.findall(p.usage or ""):
        if opt in known:
            continue
        known.add(opt)
        dest = opt[2:].replace("-", "_")
        opts.append(argparse._StoreAction([opt], dest, metavar=metavar) if metavar
                    else argparse._StoreTrueAction([opt], dest))
    return opts


def _help(p: argparse.ArgumentParser, a: argparse.Action) -> str:
    """An argument's help on one line, as --help prints it (%(default)s and such filled in)."""
    if not a.help:
        return ""
    return " ".join(p._get_formatter()._expand_help(a).split())


def _fish_kind(a: argparse.Action, path: tuple[str, ...]) -> str | None:
    """The rules of annotate(), and files for a FILE (bash offers files unasked; this script
    offers them only where they are asked for)."""
    return _kind(a, path) or ("file" if a.dest == "file" or a.metavar == "FILE" else None)


def _fish_values(a: argparse.Action, path: tuple[str, ...]) -> list[str]:
    """What completes an argument's value: `-a` words, `-F` for files, nothing otherwise."""
    kind = _fish_kind(a, path)
    if a.choices:
        return ["-a", _quote(" ".join(_fq(str(c)) for c in a.choices))]
    if kind == "file":
        return ["-F"]
    if kind:
        return ["-a", _quote(f"({FISH_FUNCTIONS[kind]})")]
    return []


def fish_script() -> str:
    from . import build_parser

    parser = build_parser()
    prog = parser.prog
    levels = list(_levels(parser))
    out = [FISH_PREAMBLE]
    # the tables __vnet_client_state reads: subcommands and options with a value, by path
    for fn, table in (
            ("__vnet_client_subcommands", {path: [n for n, _ in _subparsers(p)]
                                           for path, p in levels}),
            ("__vnet_client_valued", {path: [o for a in _options(p) if a.nargs != 0
                                             for o in a.option_strings]
                                      for path, p in levels})):
        out.append(f"function {fn}\n    switch \"$argv\"")
        for path, words in table.items():
            if words:
                out.append(f"        case {_fq(' '.join(path))}\n"
                           f"            printf '%s\\n' {' '.join(_fq(w) for w in words)}")
        out.append("    end\nend\n")
    out.append(FISH_STATE)
    out.append(f"# no files, but where an argument is a file\ncomplete -c {prog} -f")
    for path, p in levels:
        where = " ".join(("__vnet_client_using", *path))
        out.append(f"\n# {' '.join((prog, *path))}")
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in a._choices_actions}
                for name in a.choices:
                    line = [f"complete -c {prog} -n {_fq(where)} -a {_fq(name)}"]
                    if helps.get(name):
                        line.append(f"-d {_fq(' '.join(str(helps[name]).split()))}")
                    out.append(" ".join(line))
        for a in _options(p):
            if a.help == argparse.SUPPRESS:
                continue
            line = ["complete", "-c", prog, "-n", _fq(where)]
            for o in a.option_strings:
                if o.startswith("--"):
                    line += ["-l", _fq(o[2:])]
                elif len(o) == 2:
                    line += ["-s", _fq(o[1:])]
                else:
                    line += ["-o", _fq(o[1:])]
            if a.nargs != 0:
                values = _fish_values(a, path)
                line += ["-r", *values] if values == ["-F"] else ["-x", *values]
            if _help(p, a):
                line += ["-d", _fq(_help(p, a))]
            out.append(" ".join(line))
        index = 0
        for a in p._actions:
            if a.option_strings or isinstance(a, argparse._SubParsersAction):
                continue
            many = a.nargs in ("*", "+", argparse.REMAINDER)
            values = _fish_values(a, path)
            if values:
                cond = " ".join(("__vnet_client_arg", f"{index}+" if many else str(index),
                                 *path))
                out.append(" ".join(["complete", "-c", prog, "-n", _fq(cond), *values]))
            if many:
                break
            index += 1
        if path in COMMAND_AFTER_DASHDASH:
            cond = " ".join(("__vnet_client_using", *path, "--"))
            out.append(f"complete -c {prog} -n {_fq(cond)} -x -a '(__vnet_client_command)'")
    return "\n".join(out) + "\n"


def script(shell: str) -> str:
    if shell == "fish":
        return fish_script()
    import shtab

    from . import build_parser

    text = shtab.complete(annotate(build_parser()), shell=shell, preamble=PREAMBLE[shell])
    if shell == "bash":
        # shtab 1.5 (Debian 12) reads a choices array as its first element only, so no
        # subcommand but the first would complete: read all of it
        # (one word a line: the completion splits them at newlines)
        text = text.replace('local current_action_choices_var="${current_action}_choices"',
                            'local current_action_choices_var="${current_action}_choices[@]"')
        text = text.replace('current_action_choices="${!current_action_choices_var}"',
                            'current_action_choices="$(printf \'%s\\n\' '
                            '"${!current_action_choices_var}")"')
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m vnet_client.cli.completion",
                                 description="Print vnet-client's completion script.")
    ap.add_argument("shell", choices=sorted({*PREAMBLE, "fish"}))
    args = ap.parse_args(argv)
    sys.stdout.write(script(args.shell))
    return 0


if __name__ == "__main__":
    sys.exit(main())
