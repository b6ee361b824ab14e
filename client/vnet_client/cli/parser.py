"""The parts every subcommand shares: exit codes, the two errors the command line raises
itself, the options every command takes, and argparse with short mistakes."""

from __future__ import annotations

import argparse
import gettext
import json
import os
import re
import sys
import textwrap
from typing import Any, NoReturn

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_AUTH = 0, 1, 2, 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C
EXIT_PIPE = 141  # 128 + SIGPIPE: the reader of our output went away


# --- argparse, cheaper to build ---------------------------------------------------------------
# Every command builds the whole parser (some 250 options in 35 commands) before it runs, and
# argparse pays at each option for two things whose answer cannot change while the command
# runs: a gettext lookup of its own words (some 8 stat calls for catalogues that do not
# exist), and the terminal's width (it imports shutil for that). Both are asked once here:
# a third of what building the parser cost, on every command.
_translated: dict[str, str] = {}


def _gettext(message: str) -> str:
    """gettext.gettext, once per message (argparse's words)."""
    out = _translated.get(message)
    if out is None:
        out = _translated[message] = gettext.gettext(message)
    return out


def _ngettext(singular: str, plural: str, n: int) -> str:
    return _gettext(singular) if n == 1 else _gettext(plural)


argparse._ = _gettext  # type: ignore[attr-defined]
argparse.ngettext = _ngettext  # type: ignore[attr-defined]

_width: int | None = None


def _help_width() -> int:
    """The width argparse wraps help to, found as it does (shutil.get_terminal_size: $COLUMNS,
    else the terminal on stdout, else 80; less 2), once."""
    global _width
    if _width is None:
        try:
            columns = int(os.environ.get("COLUMNS", "0"))
        except ValueError:
            columns = 0
        if columns <= 0:
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
            except (AttributeError, ValueError, OSError):
                columns = 0
        _width = (columns or 80) - 2
    return _width


class _Width:
    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,  # type: ignore[call-arg]
                         _help_width() if width is None else width)


class HelpFormatter(_Width, argparse.HelpFormatter):
    """argparse's, with the width found once."""


class RawDescriptionHelpFormatter(_Width, argparse.RawDescriptionHelpFormatter):
    """argparse's, with the width found once."""


class Usage(Exception):
    """A mistake in the command line: exit 2."""


class Failure(Exception):
    """Something the client itself found wrong (a file, a command): exit 1."""


def add_common(p: argparse.ArgumentParser, top: bool = False) -> None:
    """The options every command takes. On subcommands their defaults are suppressed, so that
    `vnet-client --json list` and `vnet-client list --json` mean the same."""
    d: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--json", action="store_true", help="print machine-readable JSON", **d)
    p.add_argument("--no-ask-password", action="store_true",
                   help="never prompt for a password; fail with exit code 4 instead", **d)
    p.add_argument("--bus-address", metavar="ADDR",
                   help="talk to a vnetd on this D-Bus address (default: the system bus, "
                   "or $VNET_BUS_ADDRESS)", **d)


def wants_json(argv: list[str]) -> bool:
    """--json among the command's own arguments (not those of attach's COMMAND)."""
    return "--json" in (argv[:argv.index("--")] if "--" in argv else argv)


class Parser(argparse.ArgumentParser):
    """argparse with short mistakes: the error, a suggestion for a near miss, and where help
    is, instead of the whole usage; with --json, the one JSON object every error is."""

    # Set by main() for a command line with --json: a subcommand's parser sees only its own
    # part of it (`vnet-client --json show` gives show's parser nothing).
    json_errors = False

    # A subcommand's parser reports the arguments it does not know itself, with its own usage
    # and a near miss among its own options (argparse would leave them to the top level,
    # which knows neither).
    subcommand = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", SubcommandParser)
        return super().add_subparsers(**kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        ns, extras = super().parse_known_args(args, namespace)
        if extras and self.subcommand:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras

    def error(self, message: str) -> NoReturn:
        hint = ""
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            import difflib

            close = difflib.get_close_matches(m.group(1), re.findall(r"'([^']*)'", m.group(2)),
                                              n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m and m.group(1).startswith("-"):
            import difflib

            flags = [o for a in self._actions for o in a.option_strings]
            close = difflib.get_close_matches(m.group(1).split("=")[0], flags, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
        if Parser.json_errors:
            self.exit(EXIT_USAGE, json.dumps({"error": "Usage", "message": f"{message}.{hint}"})
                      + "\n")
        lines = self.format_usage().strip().splitlines()
        usage = lines[0] + (" ..." if len(lines) > 1 else "")
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}.{hint}\n{usage}\n"
                              f"See '{self.prog} --help'.\n")


class SubcommandParser(Parser):
    """The parser of a subcommand (and of an action under one: `mac export`)."""

    subcommand = True


def add_examples(p: argparse.ArgumentParser, epilog: str) -> None:
    """A command's examples, printed as written after its options (RawDescriptionHelpFormatter,
    which prints the description as written too: so it is wrapped here)."""
    p.formatter_class = RawDescriptionHelpFormatter
    if p.description and "\n" not in p.description:
        p.description = textwrap.fill(p.description, 79)
    p.epilog = epilog
