"""Shell completion for vnet-client, generated from its parser by shtab (bash, zsh).

    python3 -m vnet_client.cli.completion bash > /usr/share/bash-completion/completions/vnet-client
    python3 -m vnet_client.cli.completion zsh > /usr/share/zsh/vendor-completions/_vnet-client

Subcommands and options come from the parser itself; network names (for the commands that
take an existing network, and --br) and VM names (--vm, and the commands that take a VM) are
asked of vnetd as they are completed (`vnet-client list --names`, `vnet-client ports
--names`: what the user may see). shtab is imported only here: vnet-client never needs it.
"""

from __future__ import annotations

import argparse
import sys

# positional arguments that name a network that exists, by subcommand path
NETWORK_POSITIONALS = {"name", "network", "net"}
NEW_NAMES = {("define",)}  # a name that does not exist yet
VM_POSITIONALS = {"vm"}

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


def annotate(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """Mark the arguments that take a network or a VM name (shtab's `complete`)."""
    import shtab

    for a in p._actions:
        if a.option_strings:
            if "--br" in a.option_strings:
                a.complete = NETWORKS  # type: ignore[attr-defined]
            elif "--vm" in a.option_strings:
                a.complete = VMS  # type: ignore[attr-defined]
            elif "--from" in a.option_strings:
                a.complete = shtab.FILE  # type: ignore[attr-defined]
        elif a.dest in NETWORK_POSITIONALS and path not in NEW_NAMES:
            a.complete = NETWORKS  # type: ignore[attr-defined]
        elif a.dest in VM_POSITIONALS:
            a.complete = VMS  # type: ignore[attr-defined]
        elif a.dest == "dir":
            a.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    for name, sp in _subparsers(p):
        annotate(sp, (*path, name))
    return p


def script(shell: str) -> str:
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
    ap.add_argument("shell", choices=sorted(PREAMBLE))
    args = ap.parse_args(argv)
    sys.stdout.write(script(args.shell))
    return 0


if __name__ == "__main__":
    sys.exit(main())
