"""Reader of dnsmasq's files as qemu-vlan left them (`dnsmasq.conf`, `dhcp.host` and any
`--dhcp-hostsfile`, `dhcp.conf` and any `dhcp-optsfile`, `addn-hosts`) and of its
command-line options (`DNSMASQ_ARGS`): the lines that say something (`DnsmasqLine`), an
option and its value, and a `dhcp-host` value's fields (`DhcpHost`)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from .records import MigrationError
from .text import _HOSTNAME_FIELD, _LEASE_FIELD, _MAC_RE, _WILD_MAC_RE, _mac, _read_text, _short

# dnsmasq options vnetd sets itself for every network it runs.
_DNSMASQ_VNETD = {
    "interface", "bind-interfaces", "bind-dynamic", "except-interface", "listen-address",
    "dhcp-authoritative", "dhcp-leasefile", "pid-file", "keep-in-foreground", "no-daemon",
    "user", "group", "strict-order", "no-resolv", "no-hosts", "domain-needed", "bogus-priv",
    "expand-hosts", "port", "no-ping", "dhcp-no-override", "enable-ra", "conf-dir",
}
_DNSMASQ_NOARG = {
    "bind-interfaces", "bind-dynamic", "dhcp-authoritative", "keep-in-foreground",
    "no-daemon", "strict-order", "no-resolv", "no-hosts", "domain-needed", "bogus-priv",
    "expand-hosts", "no-ping", "dhcp-no-override", "enable-ra", "log-queries", "log-dhcp",
    "quiet-dhcp", "leasefile-ro", "localise-queries", "filterwin2k", "stop-dns-rebind",
    "rebind-localhost-ok", "no-negcache", "dhcp-sequential-ip", "dhcp-rapid-commit",
    "no-poll", "all-servers", "dhcp-broadcast", "read-ethers", "sequential-ip",
}
_DNSMASQ_SHORT = {
    "G": "dhcp-host", "F": "dhcp-range", "s": "domain", "i": "interface",
    "a": "listen-address", "I": "except-interface", "l": "dhcp-leasefile", "x": "pid-file",
    "C": "conf-file", "O": "dhcp-option", "S": "server", "A": "address", "u": "user",
    "g": "group", "p": "port", "H": "addn-hosts", "r": "resolv-file",
    "z": "bind-interfaces", "K": "dhcp-authoritative", "R": "no-resolv", "h": "no-hosts",
    "d": "no-daemon", "k": "keep-in-foreground", "q": "log-queries", "b": "bogus-priv",
    "D": "domain-needed", "E": "expand-hosts", "o": "strict-order", "n": "no-poll",
}


@dataclass(frozen=True)
class DnsmasqLine:
    """A line of a dnsmasq-style file that says something (not blank, not a comment)."""

    file: str
    line: int
    text: str  # stripped


@dataclass(frozen=True)
class DhcpHost:
    """The fields of a dhcp-host value, sorted by kind, in the order written."""

    macs: tuple[str, ...]  # lower case with colons
    wild: tuple[str, ...]  # MACs with '*'
    ips: tuple[ipaddress.IPv4Address, ...]
    names: tuple[str, ...]
    dropped: tuple[str, ...]  # client ids, tags, IPv6 addresses, lease times
    ignore: bool


def read_dnsmasq_lines(path: Path, file: str) -> list[DnsmasqLine]:
    """The lines of a dnsmasq-style file that say something; `file`: its name in findings."""
    out = []
    for n, raw in enumerate(_read_text(path, file).splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append(DnsmasqLine(file, n, line))
    return out


def split_dnsmasq_arg(toks: list[tuple[str, int]], i: int) -> tuple[str | None, str | None, int]:
    """The dnsmasq option at toks[i] of a command line (--name=value, --name value, -X value,
    -Xvalue): (its long name, its value, how many tokens it took); (None, None, 1) for a
    token that is no option."""
    tok = toks[i][0]
    nxt = toks[i + 1][0] if i + 1 < len(toks) else None
    if tok.startswith("--"):
        name, eq, value = tok[2:].partition("=")
        if eq:
            return name, value, 1
        if name in _DNSMASQ_NOARG or nxt is None or nxt.startswith("-"):
            return name, None, 1
        return name, nxt, 2
    if tok.startswith("-") and len(tok) >= 2:
        long = _DNSMASQ_SHORT.get(tok[1], f"-{tok[1]}")
        if len(tok) > 2:
            return long, tok[2:].lstrip("="), 1
        if long in _DNSMASQ_NOARG or nxt is None or nxt.startswith("-"):
            return long, None, 1
        return long, nxt, 2
    return None, None, 1


def parse_dhcp_host(value: str, file: str, line: int) -> DhcpHost:
    """dnsmasq's dhcp-host: [MAC...][,id:..][,set:..][,IPv4][,[IPv6]][,NAME][,LEASE]
    [,ignore], in any order (mac,ip,name and mac,name,ip alike). A field that is none of
    these raises MigrationError naming the line."""
    macs: list[str] = []
    wild: list[str] = []
    ips: list[ipaddress.IPv4Address] = []
    names: list[str] = []
    dropped: list[str] = []
    ignore = False
    for f in (x.strip() for x in value.split(",")):
        if not f:
            continue
        low = f.lower()
        if _MAC_RE.fullmatch(f):
            macs.append(_mac(f, file, line))
        elif "*" in f and _WILD_MAC_RE.fullmatch(f):
            wild.append(f)
        elif re.match(r"(id|set|tag|net):", low) or (f.startswith("[") and f.endswith("]")):
            dropped.append(f)
        elif low == "ignore":
            ignore = True
        elif re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", f):
            try:
                ips.append(ipaddress.IPv4Address(f))
            except ValueError:
                raise MigrationError(file, line, f"'{f}' is not an IPv4 address.") from None
        elif _LEASE_FIELD.fullmatch(f):
            dropped.append(f)
        elif _HOSTNAME_FIELD.fullmatch(f):
            names.append(f)
        else:
            raise MigrationError(file, line, f"'{_short(f, 40)}' in this dhcp-host is "
                                 "neither a MAC address, an IPv4 address, a host name nor a "
                                 "lease time.")
    return DhcpHost(tuple(macs), tuple(wild), tuple(ips), tuple(names), tuple(dropped), ignore)
