"""Reader of ISC dhcpd's `dhcpd.conf`: its tokens and statements (`Token`, `Statement`), and
what they declare, in file order (`read_dhcpd_conf`): subnets, ranges, options, hosts, and a
`Finding` for each statement that is vnetd's own business or not understood."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from .records import Finding, MigrationError, RangeRecord, Statement, Token
from .text import _mac, _read_text


@dataclass(frozen=True)
class DhcpdSubnet:
    """`subnet ADDRESS netmask MASK { ... }`; the statements inside follow it."""

    net: ipaddress.IPv4Network
    file: str
    line: int
    text: str


@dataclass(frozen=True)
class DhcpdOption:
    """`option NAME ARGS...;` outside a host."""

    name: str  # lower case
    args: tuple[str, ...]
    file: str
    line: int
    text: str


@dataclass(frozen=True)
class DhcpdHost:
    """`host NAME { hardware ethernet MAC; fixed-address ADDRESS...; }`."""

    name: str
    mac: str | None
    ips: tuple[str, ...]  # as written: addresses, or names a reader cannot resolve
    file: str
    line: int
    text: str


DhcpdItem = DhcpdSubnet | DhcpdOption | DhcpdHost | RangeRecord | Finding

# statements that are vnetd's own choice when it writes dhcpd's configuration
_OWN = ("authoritative", "not", "ddns-update-style", "default-lease-time", "max-lease-time",
        "log-facility", "ddns-updates", "one-lease-per-client")


def _dhcpd_tokens(text: str, file: str) -> list[Token]:
    toks: list[Token] = []
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c in " \t\r":
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "{};,":
            toks.append(Token(c, c, line))
            i += 1
        elif c == '"':
            start_line, j, buf = line, i + 1, []
            while True:
                if j >= n:
                    raise MigrationError(file, start_line, 'unterminated string (").')
                if text[j] == "\\" and j + 1 < n:
                    buf.append(text[j + 1])
                    j += 2
                    continue
                if text[j] == '"':
                    break
                if text[j] == "\n":
                    line += 1
                buf.append(text[j])
                j += 1
            toks.append(Token("string", "".join(buf), start_line))
            i = j + 1
        else:
            j = i
            while j < n and text[j] not in " \t\r\n#{};,\"":
                j += 1
            toks.append(Token("word", text[i:j], line))
            i = j
    return toks


def _dhcpd_parse(toks: list[Token], file: str) -> list[Statement]:
    pos = 0

    def block(depth: int, opened: int) -> list[Statement]:
        nonlocal pos
        out: list[Statement] = []
        words: list[Token] = []
        while pos < len(toks):
            tk = toks[pos]
            pos += 1
            if tk.kind == ";":
                if words:
                    out.append(Statement(words, None, words[0].line))
                words = []
            elif tk.kind == "{":
                if not words:
                    raise MigrationError(file, tk.line, "a '{' block without a declaration "
                                         "before it.")
                inner = block(depth + 1, tk.line)
                out.append(Statement(words, inner, words[0].line))
                words = []
            elif tk.kind == "}":
                if depth == 0:
                    raise MigrationError(file, tk.line, "'}' without a matching '{'.")
                if words:
                    raise MigrationError(file, words[0].line, "statement not ended with ';' "
                                         "before '}'.")
                return out
            else:
                words.append(tk)
        if depth:
            raise MigrationError(file, opened, "the block opened here ('{') is never closed.")
        if words:
            raise MigrationError(file, words[0].line, "statement not ended with ';'.")
        return out

    return block(0, 0)


def read_dhcpd_conf(path: Path, file: str) -> list[DhcpdItem]:
    """What dhcpd.conf declares, in file order (a subnet before the statements inside it, a
    host's findings before the host). A file that does not parse, or a statement that is
    malformed, raises MigrationError naming the line."""
    lines = _read_text(path, file).splitlines()
    stmts = _dhcpd_parse(_dhcpd_tokens("\n".join(lines), file), file)

    def text_of(n: int) -> str:
        return lines[n - 1].strip() if 0 < n <= len(lines) else ""

    out: list[DhcpdItem] = []

    def note(line: int, reason: str) -> None:
        out.append(Finding(file, line, text_of(line), reason))

    def host(name: str, s: Statement) -> None:
        mac: str | None = None
        ips: list[str] = []
        for st in s.block or []:
            v = st.values
            if not v:
                raise MigrationError(file, st.line, "a statement of nothing but ','.")
            kw = v[0].lower()
            if st.block is not None:
                note(st.line, "a block inside a host is not carried over.")
            elif kw == "hardware" and len(v) == 3 and v[1].lower() == "ethernet":
                mac = _mac(v[2], file, st.line)
            elif kw == "hardware":
                raise MigrationError(file, st.line, "not a 'hardware ethernet MAC;' statement.")
            elif kw == "fixed-address" and len(v) >= 2:
                ips = v[1:]
            elif kw == "option" and len(v) == 3 and v[1].lower() == "host-name":
                note(st.line, f"the host is named '{name}' (its declaration); the host-name "
                     f"option '{v[2]}' is not carried over.")
            else:
                note(st.line, f"'{v[0]}' in host {name} is not carried over.")
        out.append(DhcpdHost(name, mac, tuple(ips), file, s.line, text_of(s.line)))

    def walk(stmts: list[Statement]) -> None:
        for s in stmts:
            v = s.values
            if not v:
                raise MigrationError(file, s.line, "a statement of nothing but ','.")
            kw = v[0].lower()
            text = text_of(s.line)
            if s.block is not None:
                if kw == "host":
                    if len(v) != 2:
                        raise MigrationError(file, s.line, "a host declaration needs one name: "
                                             "host NAME { ... }.")
                    host(v[1], s)
                elif kw == "subnet":
                    try:
                        if len(v) != 4 or v[2].lower() != "netmask":
                            raise ValueError
                        net = ipaddress.IPv4Network(f"{v[1]}/{v[3]}")
                    except ValueError:
                        raise MigrationError(file, s.line, "not a 'subnet ADDRESS netmask MASK "
                                             "{' declaration.") from None
                    out.append(DhcpdSubnet(net, file, s.line, text))
                    walk(s.block)
                elif kw in ("group", "shared-network", "pool"):
                    walk(s.block)
                else:
                    note(s.line, f"the '{v[0]}' block is not carried over.")
                continue
            if kw == "range":
                rest = [x for x in v[1:] if x.lower() != "dynamic-bootp"]
                try:
                    start = ipaddress.IPv4Address(rest[0])
                    end = ipaddress.IPv4Address(rest[1] if len(rest) > 1 else rest[0])
                except (ValueError, IndexError):
                    raise MigrationError(file, s.line, "not a 'range FIRST LAST;' "
                                         "statement.") from None
                out.append(RangeRecord(str(start), str(end), file, s.line, text))
            elif kw == "option" and len(v) >= 3:
                out.append(DhcpdOption(v[1].lower(), tuple(v[2:]), file, s.line, text))
            elif kw in _OWN:
                note(s.line, "vnetd writes its own dhcpd configuration "
                     f"('{v[0]}' is its own choice): not carried over.")
            else:
                note(s.line, f"the dhcpd statement '{v[0]}' is not carried over.")

    walk(stmts)
    return out
