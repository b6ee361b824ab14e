"""The network options, declared once: one row per key of a definition.

Each row says what a network definition may hold: its key (the TOML key in
/etc/qemu-vnet/networks/NAME.toml, the D-Bus Define option and the key of `export`), the type
of its value, its default, the `vnet-client define` flag that sets it, the help text, and the
modes it applies to. The definition files' keys (vnetd's `Network.KEYS`, the order `export`
writes them in), `define`'s flags and the option list in docs/cli.md are made from this table.

Data shape (all rows are `Option`, frozen):

    key      "tap-user"        the TOML key; in section "overlay" a key of the [overlay] table
    type     "uid"             one of TYPES (what the value is in TOML and over D-Bus)
    default  None              what vnetd takes when the key is absent; None: nothing, or a
                               value derived from other keys (the help says how)
    flag     "--user"          define's long flag, or None when only a definition file sets it
    help     "..."             one line, for --help and docs/cli.md
    modes    ("nat", ...)      the modes (MODES) the key applies to
    section  None              None: a top-level key; "overlay": a key of [overlay]
    metavar  "USER"            the flag's value in usage lines (None: a flag without a value)
    choices  ()                the values it takes, when they are a fixed few
    compat   ("-u",)           the qemu-vlan form's other spellings of the flag
    flag_value True            for a flag without a value: what giving it sets (False for a
                               --no-... flag); None for a flag with a value
    repeatable False           the flag may be given more than once (a list, one item each)

A flag's value reaches the option as typed, except type "uid" (a user name or a uid; the
client turns a name into the uid). Rows are in the order `export` writes the keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .limits import DEFAULT_ASN, DEFAULT_MTU, DEFAULT_VDE_PORTS, DEFAULT_VXLAN_PORT, MAX_VNI

MODES = ("nat", "host-only", "bridged")
ROUTED = ("nat", "host-only")  # the modes with a gateway address of vnetd's own
DHCP_KINDS = ("dnsmasq", "dhcpd", "none")
OVERLAY_ROLES = ("gateway", "member")
OVERLAY_CONTROLS = ("static", "evpn")

# What a value is. "table": a TOML table / D-Bus a{sv}; "tables": an array of tables
# (aa{sv}); "uid": a whole number, a uid (the client also takes a user name).
TYPES = ("str", "int", "bool", "cidr4", "cidr6", "ip", "ip4", "uid", "list[str]",
         "list[mac]", "list[ip]", "table", "tables")


@dataclass(frozen=True)
class Option:
    key: str
    type: str
    default: Any
    flag: str | None
    help: str
    modes: tuple[str, ...] = MODES
    section: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    compat: tuple[str, ...] = ()
    flag_value: bool | None = None
    repeatable: bool = False

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"{self.key}: unknown type {self.type!r}")
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ValueError(f"{self.key}: modes must be some of {MODES}")
        if self.flag is not None and (self.metavar is None) == (self.flag_value is None):
            raise ValueError(f"{self.key}: a flag takes either a value (metavar) or none "
                             "(flag_value)")

    @property
    def path(self) -> str:
        """The key with its section: 'overlay.vni', or 'mode'."""
        return f"{self.section}.{self.key}" if self.section else self.key

    @property
    def usage(self) -> str:
        """The flag as a usage line shows it: --mode=nat|host-only|bridged, --force."""
        if self.flag is None:
            return ""
        if self.flag_value is not None:
            return self.flag
        return f"{self.flag}={'|'.join(self.choices) if self.choices else self.metavar}"


OPTIONS: tuple[Option, ...] = (
    Option("mode", "str", "nat", "--mode",
           "nat (default), host-only, or bridged (with --if: guests on the physical network)",
           metavar="MODE", choices=MODES),
    Option("subnet", "cidr4", None, "--subnet",
           "IPv4 subnet (default only for the names vnetN and vmnetN: 172.16.(10+N).0/24)",
           metavar="CIDR"),
    Option("subnet6", "cidr6", None, "--subnet6", "an IPv6 prefix too, e.g. fd00:12::/64",
           metavar="CIDR"),
    Option("mtu", "int", DEFAULT_MTU, "--mtu",
           f"bridge and tap MTU (default {DEFAULT_MTU}; an overlay's: its underlay's less 50, "
           "70 over IPv6)", metavar="N"),
    Option("autostart", "bool", False, "--autostart", "start whenever vnetd starts",
           flag_value=True),
    Option("taps", "int", 0, "--taps",
           "pre-create COUNT persistent taps NAME_0..NAME_{COUNT-1} (qemu-vlan's -n)",
           metavar="COUNT", compat=("-n", "--num")),
    Option("tap-base", "int", 0, None,
           "the first pre-created tap's number: 0 (NAME_0.., as qemu-vlan), 1 (NAME_1.., "
           "definitions stored before)"),
    Option("tap-user", "uid", None, "--user", "owner of the pre-created taps (default: you)",
           metavar="USER", compat=("-u",)),
    Option("tap-group", "str", "vnet", "--group",
           "group of the pre-created taps (default vnet)", metavar="GROUP", compat=("-g",)),
    Option("dhcp", "str", "dnsmasq", "--dhcp",
           "DHCP server for the network (default dnsmasq; none for bridged)",
           metavar="SERVER", choices=DHCP_KINDS, compat=("-d",)),
    Option("dhcp-start", "ip4", None, "--dhcp-start", "first dynamic address (default .32)",
           modes=ROUTED, metavar="IP"),
    Option("dhcp-end", "ip4", None, "--dhcp-end", "last dynamic address (default .254)",
           modes=ROUTED, metavar="IP"),
    Option("domain", "str", None, "--domain",
           "DNS domain of the VMs' names (default: the network name)", modes=ROUTED,
           metavar="DOMAIN"),
    Option("hosts", "tables", (), None,
           "static hosts: tables of vm, mac, ip (vnet-client host add)", modes=ROUTED),
    Option("forwards", "tables", (), None,
           "port forwards: tables of proto, family, port, target, target-port, ext-addr, "
           "iface, addr-of (vnet-client forward add)", modes=ROUTED),
    Option("allow-host", "bool", False, "--allow-host",
           "host-only: guests may reach the host's services (not only DHCP/DNS)",
           modes=("host-only",), flag_value=True),
    Option("routed-with", "list[str]", (), "--routed-with",
           "let this network exchange traffic with NET (repeatable)", modes=ROUTED,
           metavar="NET", repeatable=True),
    Option("spoof-protection", "bool", True, "--no-spoof-protection",
           "let guests send from any MAC/IP (default: locked to their own)", flag_value=False),
    Option("vde", "bool", False, "--vde",
           "run a VDE switch on each tap (qemu-vlan's --vde; needs -n COUNT)",
           flag_value=True, compat=("-v",)),
    Option("vde-ports", "int", DEFAULT_VDE_PORTS, "--vde-ports",
           f"ports per VDE switch (default {DEFAULT_VDE_PORTS})", metavar="N"),
    Option("vde-switch-args", "list[str]", (), None,
           "extra vde_switch arguments: --hub, --fstp, --macaddr, --priority, --hashsize"),
    Option("vde-macs", "list[mac]", (), None,
           "one MAC per VDE switch, switch i is tap i's (qemu-vlan's vde_switch_ether_<i>)"),
    Option("if", "str", None, "--if",
           "bridged: the physical interface to put in the bridge (qemu-vlan's --if)",
           modes=("bridged",), metavar="NIC", compat=("-i",)),
    Option("force", "bool", False, "--force",
           "bridged: even if the NIC carries the host's default route", modes=("bridged",),
           flag_value=True),
    Option("overlay", "table", None, None,
           "VXLAN across hosts: the keys of section overlay (docs/overlay.md)", modes=ROUTED),
    # [overlay]: one LAN across hosts
    Option("vni", "int", None, "--vni",
           f"VXLAN network identifier, 1-{MAX_VNI} (turns the overlay on)", modes=ROUTED,
           section="overlay", metavar="VNI"),
    Option("local", "ip", None, "--local", "this host's underlay address", modes=ROUTED,
           section="overlay", metavar="IP"),
    Option("peers", "list[ip]", (), "--peer",
           "another host's underlay address (repeatable); with --control=evpn its BGP "
           "neighbour", modes=ROUTED, section="overlay", metavar="IP", repeatable=True),
    Option("dev", "str", None, "--underlay-dev", "the underlay interface (optional)",
           modes=ROUTED, section="overlay", metavar="IF"),
    Option("port", "int", DEFAULT_VXLAN_PORT, "--vxlan-port",
           f"UDP port (default {DEFAULT_VXLAN_PORT})", modes=ROUTED,
           section="overlay", metavar="PORT"),
    Option("role", "str", "gateway", "--role",
           "gateway (default): holds the gateway address, DHCP/DNS, NAT; member: only "
           "extends the LAN to this host", modes=ROUTED, section="overlay", metavar="ROLE",
           choices=OVERLAY_ROLES),
    Option("control", "str", "static", "--control",
           "static (default): flood to the listed peers; evpn: BGP EVPN through the system's "
           "FRR", modes=ROUTED, section="overlay", metavar="CONTROL",
           choices=OVERLAY_CONTROLS),
    Option("asn", "int", DEFAULT_ASN, "--asn", f"evpn: the iBGP AS (default {DEFAULT_ASN})",
           modes=ROUTED,
           section="overlay", metavar="AS"),
    Option("route-reflector", "bool", False, "--route-reflector",
           "evpn: this host reflects routes to its peers", modes=ROUTED, section="overlay",
           flag_value=True),
)


def options(section: str | None = None) -> tuple[Option, ...]:
    """The rows of one section: None for the top-level keys, "overlay" for [overlay]."""
    return tuple(o for o in OPTIONS if o.section == section)


def keys(section: str | None = None) -> tuple[str, ...]:
    """A section's keys, in the order `export` writes them."""
    return tuple(o.key for o in options(section))


def by_key(key: str, section: str | None = None) -> Option:
    for o in OPTIONS:
        if o.key == key and o.section == section:
            return o
    raise KeyError(f"{section + '.' if section else ''}{key}")


NETWORK_KEYS = keys()
OVERLAY_KEYS = keys("overlay")


def order(definition: dict[str, Any], section: str | None = None) -> dict[str, Any]:
    """A definition's keys in the table's order ("name" and "owner" first), sub-tables in
    their section's order; keys the table does not know keep their place after the rest."""
    known = keys(section)
    head = [k for k in ("name", "owner") if section is None and k in definition]
    rank = {k: i for i, k in enumerate(known)}
    rest = sorted((k for k in definition if k not in head),
                  key=lambda k: rank.get(k, len(known)))
    out: dict[str, Any] = {}
    for k in head + rest:
        v = definition[k]
        out[k] = order(v, k) if isinstance(v, dict) and k in keys() else v
    return out


def markdown_table() -> str:
    """The option list of docs/cli.md: one row per key, made from OPTIONS."""
    rows = ["| key | `define` flag | type | default | modes | what |",
            "|---|---|---|---|---|---|"]
    for o in OPTIONS:
        flag = (f"`{o.usage}`" + "".join(f", `{c}`" for c in o.compat)).replace("|", "\\|") \
            if o.flag else "-"
        default = "-" if o.default in (None, ()) else f"`{_toml(o.default)}`"
        modes = "all" if o.modes == MODES else ", ".join(o.modes)
        rows.append(f"| `{o.path}` | {flag} | {o.type} | {default} | {modes} | "
                    f"{o.help.replace('|', '/')} |")
    return "\n".join(rows)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)
