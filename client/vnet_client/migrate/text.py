"""What every reader of qemu-vlan's files shares: the names of the files, the patterns of
their values, reading a file as text, and a MAC as the original wrote it.

The limits and the name patterns are vnetd's own (vnet_common.limits, vnet_common.names):
what is read is held to what vnetd would accept.
"""

from __future__ import annotations

import re
from pathlib import Path

from .records import MigrationError

_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}")
_WILD_MAC_RE = re.compile(r"([0-9A-Fa-f]{2}|\*)(:([0-9A-Fa-f]{2}|\*)){5}")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ETHER_KEY = re.compile(r"ether_(\d{1,4})")
_VDE_ETHER_KEY = re.compile(r"vde_switch_ether_(\d{1,4})")
_HOSTNAME_FIELD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_LEASE_FIELD = re.compile(r"(\d+[smhdw]?|infinite)", re.IGNORECASE)

TRUE_WORDS = {"yes", "y", "true", "1", "on"}
FALSE_WORDS = {"no", "n", "false", "0", "off", ""}

DNSMASQ_FILES = ("dnsmasq.conf",)
OPTS_FILE = "dhcp.conf"  # dnsmasq's dhcp-optsfile, written by the original
MACS_PER_TAP, MACS_PER_VDE_TAP = 8, 32  # what the original's --macaddr wrote per tap
HOSTS_FILE = "dhcp.host"
DHCPD_FILE = "dhcpd.conf"
ETHER_FILE = "ether.conf"


def _mac(text: str, file: str, line: int, what: str = "MAC address") -> str:
    """A unicast MAC in lower case with colons, or MigrationError naming the line."""
    t = text.strip()
    if not _MAC_RE.fullmatch(t):
        raise MigrationError(file, line, f"'{_short(t)}' is not a {what}: write six hex pairs "
                             "such as 52:54:00:12:34:56.")
    mac = t.lower().replace("-", ":")
    if int(mac[:2], 16) & 1:
        raise MigrationError(file, line, f"{mac} is a multicast address, not a {what}.")
    if mac == "00:00:00:00:00:00":
        raise MigrationError(file, line, "00:00:00:00:00:00 is not a usable MAC address.")
    return mac


def _short(text: str, n: int = 60) -> str:
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= n else text[: n - 3] + "..."


def _read_text(path: Path, shown: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MigrationError(shown, 0, f"cannot read it: {e.strerror or e}.") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MigrationError(shown, line, "not UTF-8 text (a binary file?).") from None
