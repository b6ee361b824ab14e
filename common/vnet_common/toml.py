"""The one TOML writer of definitions (tomllib reads; the standard library does not write).

vnetd's definition and forward files, `ExportDefinition` (`vnet-client export`) and the
definitions `import-qemu-vlan` makes are all written here: scalars and inline arrays first,
then arrays of tables ([[hosts]], [[forwards]]); a header as comment lines on top.
"""

from __future__ import annotations

import re
from typing import Any

from .options import order

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _string(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _string(k)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_key(str(k))} = {toml_value(x)}"
                                for k, x in v.items()) + " }"
    raise TypeError(f"cannot write a {type(v).__name__} to TOML")


def comment(text: str) -> str:
    """Text made safe for a comment line: control characters (but tab) become '?'."""
    return "".join(ch if ch == "\t" or (ord(ch) >= 0x20 and ord(ch) != 0x7F) else "?"
                   for ch in text)


def render_toml(data: dict[str, Any], header: str = "", gap: bool = False) -> str:
    """`data` as TOML: scalars and inline arrays first, then arrays of tables. `header`: the
    comment on top, a line of it per line ('# ' before each; control characters become '?');
    `gap`: a blank line between it and the keys."""
    rows = header.removesuffix("\n").split("\n") if header else []
    lines = [f"# {comment(line)}" if line else "#" for line in rows]
    if gap:
        lines.append("")
    tables: list[tuple[str, list[dict[str, Any]]]] = []
    for k, v in data.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.append((k, v))
        else:
            lines.append(f"{toml_key(k)} = {toml_value(v)}")
    for k, entries in tables:
        for row in entries:
            lines.append("")
            lines.append(f"[[{toml_key(k)}]]")
            lines.extend(f"{toml_key(str(rk))} = {toml_value(rv)}" for rk, rv in row.items())
    return "\n".join(lines) + "\n"


def render_definition(definition: dict[str, Any], header: str = "", gap: bool = False) -> str:
    """A network definition (the keys of vnet_common.options) as TOML, its keys in the
    options table's order."""
    return render_toml(order(definition), header, gap)
