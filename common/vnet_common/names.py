"""Names and their validators: networks, VMs, interfaces, MACs, addresses, subnets, ports,
counts; and the MAC registry's key, "VM/NIC".

Each validator returns the value (normalized where it says so) or raises InvalidArgument with
a sentence for a person. vnetd checks everything a caller sends with these; the client and
the importer of qemu-vlan directories check with the same ones before sending.
"""

from __future__ import annotations

import ipaddress
import re

from .errors import InvalidArgument
from .limits import (
    IFNAMSIZ,
    MAX_DOMAIN,
    MAX_IFNAME,
    MAX_NIC,
    MAX_PORT,
    MAX_VM_NAME,
    MIN_PORT,
    SUBNET4_PREFIXES,
    SUBNET6_PREFIXES,
)

IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
VM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_TRAILING_DIGITS = re.compile(r"(\d+)$")
LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_NIC_RE = re.compile(r"0|[1-9][0-9]?")
GROUP_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")  # a group name vnetd accepts (tap-group)

# A network's name is also a directory under vnetd's runtime and state directories, so it may
# not be one of vnetd's own entries there (a network called "vde" would put its dnsmasq
# configuration where the VDE switches may write), nor a VXLAN device's name (vx<VNI>).
RESERVED_NAMES = frozenset({"vde", "ports", "intents", "last-good", "dhcpd"})
_RESERVED_RE = re.compile(r"vx[0-9]+|.*\.(json|conf|pid|toml|tmp|prev|bad)|bridged-.*|frr-.*")


def printable(value: object) -> str:
    """A value as it may be quoted in an error sentence: short and free of control bytes."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= 40 else text[:37] + "..."


def validate_ifname(name: object, what: str = "network name") -> str:
    """An interface name the kernel accepts and a shell cannot misread: 1-15 bytes of
    [A-Za-z0-9_.-], starting with a letter or digit (so never '.', '..' or an option)."""
    if not isinstance(name, str):
        raise InvalidArgument(f"The {what} must be a string, not {printable(name)}.")
    if not name:
        raise InvalidArgument(f"The {what} must not be empty.")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_IFNAME:
        raise InvalidArgument(
            f"The {what} '{printable(name)}' is too long: Linux interface names are at most "
            f"{MAX_IFNAME} bytes (IFNAMSIZ is {IFNAMSIZ} with the NUL)."
        )
    if not IFNAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"The {what} '{printable(name)}' is not allowed: use letters, digits, '_', '.' "
            "and '-', starting with a letter or digit."
        )
    return name


def validate_network_name(name: object) -> str:
    name = validate_ifname(name, "network name")
    if name in RESERVED_NAMES or _RESERVED_RE.fullmatch(name):
        raise InvalidArgument(f"'{name}' is reserved (vnetd uses the name for a file, a "
                              "directory or a VXLAN device of its own): choose another "
                              "network name.")
    return name


def validate_vm_name(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidArgument(f"The VM name must be a string, not {printable(name)}.")
    if not name:
        raise InvalidArgument("The VM name must not be empty.")
    if len(name) > MAX_VM_NAME:
        raise InvalidArgument(f"The VM name is too long: at most {MAX_VM_NAME} characters.")
    if not VM_RE.fullmatch(name):
        raise InvalidArgument(
            f"The VM name '{printable(name)}' is not allowed: use letters, digits, '_', '.' "
            "and '-', starting with a letter or digit."
        )
    return name


def validate_mac(mac: object) -> str:
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac.lower()):
        raise InvalidArgument(
            f"'{printable(mac)}' is not a MAC address: write six hex pairs such as "
            "52:54:00:12:34:56."
        )
    mac = mac.lower()
    if int(mac[:2], 16) & 1:
        raise InvalidArgument(f"The MAC address {mac} is a multicast address.")
    if mac == "00:00:00:00:00:00":
        raise InvalidArgument("The MAC address 00:00:00:00:00:00 is not usable.")
    return mac


def network_number(name: str) -> int | None:
    """The original qemu-vlan's network number: the trailing digits of the bridge name."""
    m = _TRAILING_DIGITS.search(name)
    return int(m.group(1)) if m else None


_QEMU_VLAN_NAME = re.compile(r"(?:vnet|vmnet)(\d+)")


def default_subnet(name: str) -> ipaddress.IPv4Network:
    """vnetN and vmnetN -> 172.16.(10+N).0/24, as qemu-vlan did; other names get no subnet
    from their digits (a network 'lab3' would otherwise take 172.16.13.0/24 unasked)."""
    m = _QEMU_VLAN_NAME.fullmatch(name)
    if m is None:
        raise InvalidArgument(
            f"A subnet comes from the name only for qemu-vlan's vnetN and vmnetN (vnet3 -> "
            f"172.16.13.0/24); '{name}' needs one: e.g. --subnet=172.16.50.0/24."
        )
    n = int(m.group(1))
    if n > 245:
        raise InvalidArgument(
            f"The network number {n} of '{name}' is too large for 172.16.(10+N).0/24 "
            "(N is at most 245): give a subnet, e.g. --subnet=10.20.30.0/24."
        )
    return ipaddress.IPv4Network(f"172.16.{10 + n}.0/24")


def parse_subnet4(text: object) -> ipaddress.IPv4Network:
    if not isinstance(text, str):
        raise InvalidArgument(f"The IPv4 subnet must be a string such as 172.16.12.0/24, "
                              f"not {printable(text)}.")
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise InvalidArgument(
            f"'{printable(text)}' is not an IPv4 subnet in CIDR form (e.g. 172.16.12.0/24): {e}."
        ) from None
    if "/" not in text:
        raise InvalidArgument(f"The subnet '{text}' needs a prefix length, e.g. {text}/24.")
    if not SUBNET4_PREFIXES[0] <= net.prefixlen <= SUBNET4_PREFIXES[1]:
        raise InvalidArgument(
            f"The subnet {net} has prefix length /{net.prefixlen}: use /8 to /30 so that it "
            "holds a gateway and guests."
        )
    if net.is_loopback or net.is_multicast or net.is_link_local or net.is_reserved or (
        net.network_address == ipaddress.IPv4Address("0.0.0.0")
    ):
        raise InvalidArgument(f"The subnet {net} is a special-purpose range; use a private one.")
    return net


def parse_subnet6(text: object) -> ipaddress.IPv6Network:
    if not isinstance(text, str):
        raise InvalidArgument(f"The IPv6 prefix must be a string such as fd00:12::/64, "
                              f"not {printable(text)}.")
    try:
        net = ipaddress.IPv6Network(text, strict=True)
    except ValueError as e:
        raise InvalidArgument(
            f"'{printable(text)}' is not an IPv6 prefix in CIDR form (e.g. fd00:12::/64): {e}."
        ) from None
    if "/" not in text:
        raise InvalidArgument(f"The IPv6 prefix '{text}' needs a length, e.g. {text}/64.")
    if not SUBNET6_PREFIXES[0] <= net.prefixlen <= SUBNET6_PREFIXES[1]:
        raise InvalidArgument(
            f"The IPv6 prefix {net} has length /{net.prefixlen}: use /48 to /120 (/64 for SLAAC)."
        )
    if (net.is_loopback or net.is_multicast or net.is_link_local or net.is_unspecified
            or net.is_reserved or net.network_address == ipaddress.IPv6Address("::")):
        raise InvalidArgument(f"The IPv6 prefix {net} is a special-purpose range.")
    return net


def int_in(value: object, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"The {what} must be a whole number from {lo} to {hi}, "
                              f"not {printable(value)}.")
    if not lo <= value <= hi:
        raise InvalidArgument(f"The {what} {value} is out of range: use {lo} to {hi}.")
    return value


def boolean(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"'{what}' must be true or false, not {printable(value)}.")
    return value


def validate_domain(domain: object) -> str:
    if not isinstance(domain, str) or not domain or len(domain) > MAX_DOMAIN:
        raise InvalidArgument(f"The DNS domain must be 1 to {MAX_DOMAIN} characters, e.g. vnet2 or "
                              "lab.example.")
    for label in domain.split("."):
        if not LABEL_RE.fullmatch(label):
            raise InvalidArgument(
                f"'{printable(domain)}' is not a DNS domain: labels of letters, digits and '-', "
                "separated by dots.")
    return domain.lower()


def validate_hostname(name: object) -> str:
    if not isinstance(name, str) or not LABEL_RE.fullmatch(name):
        raise InvalidArgument(
            f"'{printable(name)}' cannot be a DNS host name: use letters, digits and '-' "
            "(at most 63), not starting or ending with '-'.")
    return name.lower()


def parse_ip4(text: object, what: str) -> ipaddress.IPv4Address:
    try:
        if not isinstance(text, str):
            raise ValueError
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise InvalidArgument(f"The {what} '{printable(text)}' is not an IPv4 address.") from None


def parse_port(text: object, what: str) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str) and text.isdigit():
        value = int(text)
    else:
        raise InvalidArgument(f"The {what} '{printable(text)}' is not a port number "
                              f"({MIN_PORT}-{MAX_PORT}).")
    if not MIN_PORT <= value <= MAX_PORT:
        raise InvalidArgument(f"The {what} {value} is out of range: ports are {MIN_PORT} to "
                              f"{MAX_PORT}.")
    return value


def parse_port_range(text: object) -> tuple[int, int]:
    if isinstance(text, int) and not isinstance(text, bool):
        p = parse_port(text, "port")
        return p, p
    if not isinstance(text, str):
        raise InvalidArgument(f"'{printable(text)}' is not a port or a port range.")
    lo, sep, hi = text.partition("-")
    a = parse_port(lo, "port")
    b = parse_port(hi, "port") if sep else a
    if b < a:
        raise InvalidArgument(f"The port range {text} is reversed: write {b}-{a}.")
    return a, b



def validate_nic(nic: object) -> int:
    if isinstance(nic, bool) or not isinstance(nic, int) or not 0 <= nic <= MAX_NIC:
        raise InvalidArgument(f"The NIC index must be a whole number from 0 to {MAX_NIC}.")
    return nic


# --- the MAC registry's key ---------------------------------------------------------------
def key(vm: str, nic: int) -> str:
    """The MAC registry's key of a VM's NIC: 'web1/0'. ExportMacs and ImportMacs carry it."""
    return f"{vm}/{nic}"


def parse_key(text: object) -> tuple[str, int]:
    """A key as an import gives it, checked: 'VM' (NIC 0, as an ether.conf import has it) or
    'VM/NIC'; InvalidArgument for anything else."""
    if not isinstance(text, str):
        raise InvalidArgument(f"A MAC registry key must be 'VM' or 'VM/NIC', not "
                              f"{printable(text)}.")
    vm, sep, nic = text.partition("/")
    validate_vm_name(vm)
    if not sep:
        return vm, 0
    if not _NIC_RE.fullmatch(nic) or int(nic) > MAX_NIC:
        raise InvalidArgument(f"The key '{printable(text)}' does not end in a NIC index: "
                              f"write VM/NIC with NIC from 0 to {MAX_NIC}, e.g. web1/0.")
    return vm, int(nic)


def split_key(k: str) -> tuple[str, int]:
    """key()'s inverse: 'web1/0' -> ('web1', 0). A key without a NIC index ('web1', as an
    import from an ether.conf may give it) is the VM's NIC 0."""
    vm, sep, nic = k.rpartition("/")
    if not sep or not nic.isdigit():
        return k, 0
    return vm, int(nic)
