"""What the readers of qemu-vlan's files return, and how they report.

Each reader turns one kind of file into typed, frozen records (the line each came from
included); the importer turns the records into a definition. `Finding` is something that was
not carried over, or a note; `MigrationError` a file that cannot be understood at all.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Finding:
    """Something that could not be carried over, or a note about what was changed.
    `line` is 1-based; 0 means the file as a whole."""

    file: str
    line: int
    text: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.reason}" + (f"\n    {self.text}" if self.text else "")


@dataclass
class Imported:
    """The network's name, its definition (the TOML keys of `define --from FILE`), the MACs to
    import (`<network>_<i>` from ether.conf; a static host's own VM name for a MAC that
    ether.conf does not hold) and the findings."""

    network: str
    definition: dict[str, Any]
    macs: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)


class MigrationError(Exception):
    """A file that cannot be understood; names the file and the line (0: the whole file)."""

    def __init__(self, file: str | Path, line: int, message: str):
        self.file = str(file)
        self.line = line
        self.message = message
        super().__init__(f"{self.file}:{line}: {message}" if line else f"{self.file}: {message}")



# --- records the readers return -------------------------------------------------------------
@dataclass(frozen=True)
class Assignment:
    key: str
    value: str
    line: int
    text: str
    problem: str | None  # set when the value needs what a file reader cannot know
    char_lines: list[int]  # the source line of each character of value

    def token_lines(self) -> list[tuple[str, int]]:
        """The value split the way the original used it (unquoted $VAR: on blanks), with
        the line each word came from."""
        return [(m.group(), self.char_lines[m.start()] if self.char_lines else self.line)
                for m in re.finditer(r"\S+", self.value)]


@dataclass(frozen=True)
class Token:
    kind: str  # "word", "string" or one of "{};,"
    value: str
    line: int


@dataclass(frozen=True)
class Statement:
    words: list[Token]
    block: list[Statement] | None
    line: int

    @property
    def values(self) -> list[str]:
        return [w.value for w in self.words if w.kind != ","]


@dataclass(frozen=True)
class HostRecord:
    mac: str
    ip: ipaddress.IPv4Address
    name: str | None
    file: str
    line: int
    text: str


@dataclass(frozen=True)
class RangeRecord:
    start: str
    end: str
    file: str
    line: int
    text: str
