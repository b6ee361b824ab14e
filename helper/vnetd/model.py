"""Pure data and validation: names, subnets, MACs, network definitions. No I/O here.

Everything a caller can send reaches the engine only after passing through this module, so a
bad value is refused with a named error before any kernel object is made.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any

from vnet_common.limits import (
    DEFAULT_MTU,
    DEFAULT_VDE_PORTS,
    MAX_IFNAME,
    MAX_MTU,
    MAX_PORT,
    MAX_TAPS,
    MAX_UID,
    MAX_VDE_PORTS,
    MIN_MTU,
    MIN_VDE_PORTS,
)
from vnet_common.names import (
    GROUP_RE,
    default_subnet,
    parse_ip4,
    parse_port_range,
    parse_subnet4,
    parse_subnet6,
    validate_domain,
    validate_hostname,
    validate_ifname,
    validate_mac,
    validate_network_name,
    validate_vm_name,
)
from vnet_common.names import boolean as _bool
from vnet_common.names import int_in as _int_in
from vnet_common.names import parse_port as _port
from vnet_common.names import printable as _printable
from vnet_common.options import DHCP_KINDS, MODES, NETWORK_KEYS

from .errors import InvalidArgument
from .overlay import Overlay

ALIAS_PREFIX = "qemu-vnet:"


# Extra switch arguments a definition may carry (vde-switch-args): behaviour of the switch
# only. Anything that would change where it listens, who may connect, or break supervision
# (--daemon, --pidfile, --rcfile, --sock, --mgmt, --tap, ...) is refused.
_FLAGS = {"-x", "--hub", "-F", "--fstp"}
_WITH_VALUE = {"--macaddr": re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}"),
               "--priority": re.compile(r"\d{1,5}"), "--hashsize": re.compile(r"\d{1,6}")}


def _vde_macs(macs: object, net: Network) -> tuple[str, ...]:
    """One MAC per VDE switch (qemu-vlan's vde_switch_ether_<i>): switch i is tap i's."""
    if not net.vde:
        raise InvalidArgument("'vde-macs' goes with vde = true (the switches' MACs).")
    if not isinstance(macs, list | tuple):
        raise InvalidArgument("'vde-macs' must be a list of MAC addresses, one per tap.")
    if len(macs) != net.taps:
        raise InvalidArgument(f"'vde-macs' holds {len(macs)} MAC(s) for {net.taps} switch(es): "
                              "give one per tap.")
    out = tuple(validate_mac(m) for m in macs)
    if len(set(out)) != len(out):
        raise InvalidArgument("'vde-macs' names one MAC for two switches.")
    if "--macaddr" in net.vde_switch_args:
        raise InvalidArgument("Give the switches' MACs either in 'vde-macs' or as --macaddr in "
                              "'vde-switch-args', not both.")
    return out


def _vde_args(args: object) -> tuple[str, ...]:
    if not isinstance(args, list | tuple) or not all(isinstance(a, str) for a in args):
        raise InvalidArgument("'vde-switch-args' must be a list of strings.")
    out: list[str] = []
    it = iter(args)
    for a in it:
        flag, eq, val = a.partition("=")
        if a in _FLAGS:
            out.append(a)
        elif flag in _WITH_VALUE:
            val = val if eq else next(it, "")
            if not _WITH_VALUE[flag].fullmatch(val):
                raise InvalidArgument(f"'{flag}' needs a valid value, not '{val[:40]}'.")
            out += [flag, val]
        else:
            raise InvalidArgument(
                f"The vde_switch argument '{a[:40]}' is not allowed: only --hub, --fstp, "
                "--macaddr, --priority and --hashsize (vnetd sets sockets, ports, group and "
                "supervises the switch itself).")
    return tuple(out)


def _owner(options: dict[str, Any], stored: bool, why: str) -> int:
    """The 'owner' uid of a stored definition or forward (0 when absent). A caller cannot
    give one: vnetd takes it from the caller's credentials."""
    if "owner" not in options:
        return 0
    if not stored:
        raise InvalidArgument(f"The key 'owner' cannot be given: {why} (vnetd takes it from "
                              "the caller; remove the key).")
    return _int_in(options["owner"], 0, MAX_UID, "owner uid")


def bridge_mac(name: str) -> str:
    """A fixed, locally administered unicast MAC for a network's bridge, from its name."""
    digest = hashlib.sha256(b"qemu-vnet-bridge:" + name.encode()).digest()
    first = (digest[0] & 0xFC) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in bytes([first]) + digest[1:6])


def alias_for(network: str) -> str:
    return ALIAS_PREFIX + network


def network_of_alias(alias: str | None) -> str | None:
    if alias and alias.startswith(ALIAS_PREFIX):
        return alias[len(ALIAS_PREFIX):] or None
    return None


@dataclass(frozen=True)
class StaticHost:
    """A fixed address for a VM: DHCP gives `ip` to `mac`, DNS answers `vm.domain`."""

    vm: str
    mac: str
    ip: ipaddress.IPv4Address

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "mac": self.mac, "ip": str(self.ip)}


def check_host_ip(net_subnet: ipaddress.IPv4Network, ip: ipaddress.IPv4Address,
                  what: str = "address") -> None:
    gw = net_subnet.network_address + 1
    if ip not in net_subnet:
        raise InvalidArgument(f"The {what} {ip} is outside the subnet {net_subnet}.")
    if ip == net_subnet.network_address:
        raise InvalidArgument(f"The {what} {ip} is the subnet's network address.")
    if ip == net_subnet.broadcast_address:
        raise InvalidArgument(f"The {what} {ip} is the subnet's broadcast address.")
    if ip == gw:
        raise InvalidArgument(f"The {what} {ip} is the gateway's address.")


# a bridged network's: it has no subnet of its own (never shown, stored or checked)
NO_SUBNET = ipaddress.IPv4Network("0.0.0.0/32")


def default_dhcp_range(subnet: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Address,
                                                                ipaddress.IPv4Address]:
    """qemu-vlan's .32-.254 on a /24 (.2-.31 left for static hosts), scaled to the subnet."""
    n = subnet.num_addresses
    start = subnet.network_address + (32 if n >= 64 else max(2, n // 2))
    return start, subnet.broadcast_address - 1


@dataclass(frozen=True)
class Network:
    """A network definition: what the admin declared, as stored in <name>.toml."""

    name: str
    mode: str = "nat"
    subnet: ipaddress.IPv4Network = field(default=None)  # type: ignore[assignment]
    subnet6: ipaddress.IPv6Network | None = None
    mtu: int = DEFAULT_MTU
    autostart: bool = False
    taps: int = 0
    tap_base: int = 0  # the first tap's number: NAME_0.. as qemu-vlan (1: definitions before)
    tap_user: int | None = None
    tap_group: str = "vnet"
    dhcp: str = "dnsmasq"
    dhcp_start: ipaddress.IPv4Address | None = None
    dhcp_end: ipaddress.IPv4Address | None = None
    domain: str | None = None
    hosts: tuple[StaticHost, ...] = ()
    forwards: tuple[Forward, ...] = ()
    allow_host: bool = False
    routed_with: tuple[str, ...] = ()
    spoof_protection: bool = True
    vde: bool = False
    vde_ports: int = DEFAULT_VDE_PORTS
    vde_switch_args: tuple[str, ...] = ()
    vde_macs: tuple[str, ...] = ()  # switch i's MAC (qemu-vlan's vde_switch_ether_<i>)
    uplink: str | None = None  # bridged mode: the physical NIC (key "if")
    force: bool = False  # bridged mode: even if the NIC carries the only default route
    owner: int = 0  # the uid that defined it (0: root, or defined before owners were kept)
    overlay: Overlay | None = None  # VXLAN across hosts ([overlay], overlay.py)
    mtu_auto: bool = False  # overlay without an explicit mtu: underlay MTU - overhead at start

    @property
    def dns_domain(self) -> str:
        return self.domain or self.name.lower().replace("_", "-").replace(".", "-")

    @property
    def dhcp_range(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        start, end = default_dhcp_range(self.subnet)
        return self.dhcp_start or start, self.dhcp_end or end

    def host(self, vm: str) -> StaticHost | None:
        return next((h for h in self.hosts if h.vm == vm), None)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def gateway6(self) -> ipaddress.IPv6Address | None:
        return self.subnet6.network_address + 1 if self.subnet6 else None

    @property
    def bridge(self) -> str:
        return self.name

    @property
    def tap_names(self) -> list[str]:
        return [f"{self.name}_{j}" for j in range(self.tap_base, self.tap_base + self.taps)]

    @property
    def mac(self) -> str:
        """The bridge's MAC. An overlay's bridges on different hosts are on one LAN, so each
        host's differs (else a member's bridge would swallow frames for the gateway's)."""
        if self.overlay is not None:
            return bridge_mac(f"{self.name}@{self.overlay.local}")
        return bridge_mac(self.name)

    # --- construction -------------------------------------------------------------------
    KEYS = NETWORK_KEYS  # the options table's top-level keys (vnet_common.options)

    @classmethod
    def from_options(cls, name: object, options: dict[str, Any],
                     stored: bool = False) -> Network:
        """Build and validate a definition from D-Bus options or a parsed TOML table.
        `stored`: vnetd's own definition file, which may also say who owns the network (a
        caller's options may not: a network belongs to whoever defines it)."""
        name = validate_network_name(name)
        if not isinstance(options, dict):
            raise InvalidArgument("The network options must be a dictionary.")
        owner = _owner(options, stored, "a network belongs to whoever defines it")
        unknown = sorted(str(k) for k in options if k not in cls.KEYS and k not in
                         ("name", "owner"))
        if unknown:
            raise InvalidArgument(
                f"Unknown network option(s): {', '.join(_printable(k) for k in unknown)}. "
                f"Known: {', '.join(cls.KEYS)}."
            )
        if "name" in options and options["name"] != name:
            raise InvalidArgument(
                f"The definition says name = '{_printable(options['name'])}' but is for '{name}'."
            )
        mode = options.get("mode", "nat")
        if mode not in MODES:
            raise InvalidArgument(
                f"Unknown mode '{_printable(mode)}': use one of {', '.join(MODES)}."
            )
        if "subnet" in options:
            subnet = parse_subnet4(options["subnet"])
        elif mode == "bridged":
            subnet = NO_SUBNET  # its addresses are the physical LAN's
        else:
            subnet = default_subnet(name)
        subnet6 = parse_subnet6(options["subnet6"]) if options.get("subnet6") else None
        mtu = _int_in(options.get("mtu", DEFAULT_MTU), MIN_MTU, MAX_MTU, "MTU")
        autostart = _bool(options.get("autostart", False), "autostart")
        taps = 0
        # Pre-created taps are NAME_0..NAME_{n-1}, as qemu-vlan made them. A definition vnetd
        # stored before that (no tap-base written) keeps NAME_1..NAME_n.
        if "tap-base" in options:
            tap_base = _int_in(options["tap-base"], 0, 1, "first tap number (tap-base)")
        else:
            tap_base = 1 if stored and options.get("taps") else 0
        if "taps" in options:
            taps = _int_in(options["taps"], 1, MAX_TAPS, "tap count (-n)")
            longest = f"{name}_{tap_base + taps - 1}"
            if len(longest) > MAX_IFNAME:
                raise InvalidArgument(
                    f"With {taps} taps the tap name '{longest}' would exceed {MAX_IFNAME} bytes: "
                    "use a shorter network name or fewer taps."
                )
        tap_user = options.get("tap-user")
        if tap_user is not None:
            tap_user = _int_in(tap_user, 0, MAX_UID, "tap owner uid")
        tap_group = options.get("tap-group", "vnet")
        if not isinstance(tap_group, str) or not GROUP_RE.fullmatch(tap_group):
            raise InvalidArgument(f"'{_printable(tap_group)}' is not a valid group name.")
        overlay = Overlay.from_options(options["overlay"]) if "overlay" in options else None
        if overlay is not None:
            overlay_rules(mode, options, overlay)
        member = overlay is not None and overlay.is_member
        dhcp = options.get("dhcp", "none" if mode == "bridged" or member else "dnsmasq")
        if dhcp not in DHCP_KINDS:
            raise InvalidArgument(
                f"Unknown DHCP server '{_printable(dhcp)}': use one of {', '.join(DHCP_KINDS)}."
            )
        start = end = None
        if mode == "bridged" and (options.get("dhcp-start") is not None
                                  or options.get("dhcp-end") is not None):
            raise InvalidArgument("A bridged network gets DHCP from the physical network: it "
                                  "has no DHCP range (leave --dhcp-start/--dhcp-end out).")
        if options.get("dhcp-start") is not None:
            start = parse_ip4(options["dhcp-start"], "DHCP range start")
            check_host_ip(subnet, start, "DHCP range start")
        if options.get("dhcp-end") is not None:
            end = parse_ip4(options["dhcp-end"], "DHCP range end")
            check_host_ip(subnet, end, "DHCP range end")
        d_start, d_end = default_dhcp_range(subnet) if subnet != NO_SUBNET else (None, None)
        if d_start is not None and d_end is not None and (start or d_start) > (end or d_end):
            raise InvalidArgument(
                f"The DHCP range {start or d_start}-{end or d_end} is reversed.")
        domain = validate_domain(options["domain"]) if options.get("domain") else None
        hosts = parse_hosts(subnet, options.get("hosts", []))
        routed = options.get("routed-with", [])
        if not isinstance(routed, list):
            raise InvalidArgument("'routed-with' must be a list of network names.")
        routed = tuple(validate_network_name(r) for r in routed)
        net = cls(
            name=name, mode=mode, subnet=subnet, subnet6=subnet6, mtu=mtu, autostart=autostart,
            taps=taps, tap_base=tap_base if taps else 0, tap_user=tap_user, tap_group=tap_group,
            dhcp=dhcp, dhcp_start=start,
            dhcp_end=end, domain=domain, hosts=hosts, owner=owner,
            allow_host=_bool(options.get("allow-host", False), "allow-host"),
            routed_with=routed,
            spoof_protection=_bool(options.get("spoof-protection", True), "spoof-protection"),
            vde=_bool(options.get("vde", False), "vde"),
            vde_ports=_int_in(options.get("vde-ports", DEFAULT_VDE_PORTS), MIN_VDE_PORTS,
                              MAX_VDE_PORTS, "VDE port count"),
            vde_switch_args=_vde_args(options.get("vde-switch-args", [])),
            overlay=overlay, mtu_auto=overlay is not None and "mtu" not in options,
        )
        if mode == "bridged":
            if not options.get("if"):
                raise InvalidArgument("A bridged network needs the physical interface to "
                                      "bridge: --if=eth0.")
            if dhcp != "none":
                raise InvalidArgument("A bridged network gets DHCP from the physical network: "
                                      "leave --dhcp out (it is 'none').")
            if options.get("forwards"):
                raise InvalidArgument("Port forwarding is for nat and host-only networks; a "
                                      "bridged network's guests are on the physical network.")
        elif "if" in options or "force" in options:
            raise InvalidArgument("--if and --force go with --mode=bridged.")
        if "if" in options:
            net = replace(net, uplink=validate_ifname(options["if"], "interface name"),
                          force=_bool(options.get("force", False), "force"))
        if net.vde and not net.taps:
            raise InvalidArgument("A VDE network runs one switch per tap: give it taps "
                                  "(-n COUNT), e.g. --vde -n 4 for 4 x 32 ports.")
        if "vde-macs" in options:
            net = replace(net, vde_macs=_vde_macs(options["vde-macs"], net))
        rows = options.get("forwards", [])
        if not isinstance(rows, list):
            raise InvalidArgument("'forwards' must be a list of tables.")
        forwards: list[Forward] = []
        index = ForwardIndex()
        for row in rows:
            f = parse_forward(net, expand_forward_words(row), stored=stored)
            clash = index.clash(f)
            if clash:
                raise InvalidArgument(f"The forwards '{clash[1].describe()}' and "
                                      f"'{f.describe()}' overlap.")
            index.add(name, f)
            forwards.append(f)
        return replace(net, forwards=tuple(forwards)) if forwards else net

    def to_dict(self, forwards: bool = True, owner: bool = True) -> dict[str, Any]:
        """The TOML table (and D-Bus 'definition'); the exact inverse of from_options
        (stored=True). forwards=False leaves them out (the definition file keeps them in a
        directory); owner=False leaves out who owns it and its forwards (an export is
        portable); an owner of 0 (root) is never written."""
        d: dict[str, Any] = {"name": self.name}
        if owner and self.owner:
            d["owner"] = self.owner
        d["mode"] = self.mode
        if self.subnet != NO_SUBNET:
            d["subnet"] = str(self.subnet)
        if self.subnet6:
            d["subnet6"] = str(self.subnet6)
        if not self.mtu_auto:
            d["mtu"] = self.mtu
        d["autostart"] = self.autostart
        if self.taps:
            d["taps"] = self.taps
            d["tap-base"] = self.tap_base
        if self.tap_user is not None:
            d["tap-user"] = self.tap_user
        if self.taps or self.tap_group != "vnet":
            d["tap-group"] = self.tap_group
        d["dhcp"] = self.dhcp
        if self.dhcp_start:
            d["dhcp-start"] = str(self.dhcp_start)
        if self.dhcp_end:
            d["dhcp-end"] = str(self.dhcp_end)
        if self.domain:
            d["domain"] = self.domain
        if self.hosts:
            d["hosts"] = [h.to_dict() for h in self.hosts]
        if self.allow_host:
            d["allow-host"] = True
        if self.routed_with:
            d["routed-with"] = list(self.routed_with)
        if not self.spoof_protection:
            d["spoof-protection"] = False
        if self.uplink:
            d["if"] = self.uplink
            if self.force:
                d["force"] = True
        if self.vde:
            d["vde"] = True
            d["vde-ports"] = self.vde_ports
            if self.vde_switch_args:
                d["vde-switch-args"] = list(self.vde_switch_args)
            if self.vde_macs:
                d["vde-macs"] = list(self.vde_macs)
        if self.overlay is not None:
            d["overlay"] = self.overlay.to_dict()
        if forwards and self.forwards:
            d["forwards"] = [f.to_dict(owner=owner) for f in self.forwards]
        return d

    def with_changes(self, **kw: Any) -> Network:
        return replace(self, **kw)


def overlay_rules(mode: str, options: dict[str, Any], overlay: Overlay) -> None:
    """What an [overlay] may go with: a member host only extends the LAN (the gateway host
    holds the gateway address, DHCP/DNS, NAT and forwards)."""
    if mode == "bridged":
        raise InvalidArgument("An overlay extends a nat or host-only network; a bridged "
                              "network is already on the physical LAN.")
    if overlay.is_member:
        if options.get("dhcp", "none") != "none":
            raise InvalidArgument("A member host of an overlay runs no DHCP: the gateway host "
                                  "serves the whole LAN (leave --dhcp out).")
        if options.get("forwards"):
            raise InvalidArgument("Port forwards live on the overlay's gateway host, not on a "
                                  "member.")


def parse_hosts(subnet: ipaddress.IPv4Network, rows: object) -> tuple[StaticHost, ...]:
    if not isinstance(rows, list):
        raise InvalidArgument("'hosts' must be a list of {vm, mac, ip} tables.")
    out: list[StaticHost] = []
    for row in rows:
        if not isinstance(row, dict) or set(row) != {"vm", "mac", "ip"}:
            raise InvalidArgument("Each static host needs exactly vm, mac and ip.")
        h = StaticHost(vm=validate_vm_name(row["vm"]), mac=validate_mac(row["mac"]),
                       ip=parse_ip4(row["ip"], "static address"))
        validate_hostname(h.vm)
        check_host_ip(subnet, h.ip, "static address")
        for o in out:
            if o.vm == h.vm:
                raise InvalidArgument(f"VM '{h.vm}' has two static hosts.")
            if o.ip == h.ip:
                raise InvalidArgument(f"The address {h.ip} is given to both '{o.vm}' and '{h.vm}'.")
            if o.mac == h.mac:
                raise InvalidArgument(f"The MAC {h.mac} is given to both '{o.vm}' and '{h.vm}'.")
        out.append(h)
    return tuple(out)


# --- port forwarding -----------------------------------------------------------------------
PROTOS = ("tcp", "udp")


@dataclass(frozen=True)
class Forward:
    """DNAT of host traffic to PROTO [EXT_ADDR:]PORT_LO[-PORT_HI] onto TARGET:TARGET_PORT.
    `target` is an address in the network or a VM name (resolved through its static host or
    current lease). An interface narrows it in one of two ways: `iface`, traffic arriving on
    it; `addr_of`, traffic to its addresses, whatever they are now (qemu-vlan's meaning of
    its rules' interface field: iptables -d ADDRESS), from anywhere, the host included."""

    proto: str
    family: int
    port_lo: int
    port_hi: int
    target: str
    target_port: int
    ext_addr: str | None = None
    iface: str | None = None
    addr_of: str | None = None
    owner: int = 0  # the uid that added it (0: root, or added before owners were kept)

    @property
    def ports(self) -> str:
        if self.port_lo == self.port_hi:
            return str(self.port_lo)
        return f"{self.port_lo}-{self.port_hi}"

    @property
    def external(self) -> str:
        if self.addr_of is not None:
            return f"{self.addr_of}'s addresses:{self.ports}"
        if self.ext_addr is None:
            return self.ports
        addr = f"[{self.ext_addr}]" if ":" in self.ext_addr else self.ext_addr
        return f"{addr}:{self.ports}"

    def to_dict(self, owner: bool = True) -> dict[str, Any]:
        """Its TOML table (its file, or a row of an export with owner=False); an owner of 0
        (root) is never written."""
        d: dict[str, Any] = {"proto": self.proto, "family": self.family, "port": self.ports,
                             "target": self.target, "target-port": self.target_port}
        if self.ext_addr:
            d["ext-addr"] = self.ext_addr
        if self.iface:
            d["iface"] = self.iface
        if self.addr_of:
            d["addr-of"] = self.addr_of
        if owner and self.owner:
            d["owner"] = self.owner
        return d

    def clashes(self, other: Forward) -> bool:
        return (self.proto == other.proto and self.family == other.family
                and self.port_lo <= other.port_hi and other.port_lo <= self.port_hi
                and (self.ext_addr is None or other.ext_addr is None
                     or self.ext_addr == other.ext_addr)
                and (self.iface is None or other.iface is None or self.iface == other.iface))

    def describe(self) -> str:
        tgt = f"[{self.target}]" if ":" in self.target else self.target
        return f"{self.proto} {self.external} -> {tgt}:{self.target_port}"

    @property
    def file_name(self) -> str:
        """Its file in <network>.forwards/: one small file per forward, so adding or removing
        one costs the same however many there are."""
        ext = (self.ext_addr or (f"of.{self.addr_of}" if self.addr_of else "any")
               ).replace(":", "_")
        return f"{self.proto}{self.family}-{ext}-{self.iface or 'any'}-{self.ports}.toml"


class ForwardIndex:
    """Forwards by (proto, family, port): finding a clash costs the new forward's port count,
    not the number of forwards present. It also counts them by owner (the per-user limit)."""

    def __init__(self) -> None:
        self._by_port: dict[tuple[str, int, int], list[tuple[str, Forward]]] = {}
        self._owned: dict[int, int] = {}

    def add(self, network: str, f: Forward) -> None:
        for port in range(f.port_lo, f.port_hi + 1):
            self._by_port.setdefault((f.proto, f.family, port), []).append((network, f))
        self._owned[f.owner] = self._owned.get(f.owner, 0) + 1

    def remove(self, network: str, f: Forward) -> None:
        found = False
        for port in range(f.port_lo, f.port_hi + 1):
            rows = self._by_port.get((f.proto, f.family, port), [])
            kept = [r for r in rows if r != (network, f)]
            found = found or len(kept) != len(rows)
            rows[:] = kept
        if found:
            self._owned[f.owner] -= 1

    def owned_by(self, uid: int) -> int:
        """How many forwards `uid` added, on all networks."""
        return self._owned.get(uid, 0)

    def clash(self, f: Forward, skip: str | None = None) -> tuple[str, Forward] | None:
        """The first forward `f` clashes with (of any network but `skip`)."""
        for port in range(f.port_lo, f.port_hi + 1):
            for network, other in self._by_port.get((f.proto, f.family, port), ()):
                if network != skip and other.clashes(f):
                    return network, other
        return None

    def find(self, network: str, proto: str, family: int, lo: int, hi: int,
             ext_addr: str | None) -> Forward | None:
        for net, f in self._by_port.get((proto, family, lo), ()):
            if net == network and f.port_hi == hi and f.port_lo == lo and f.ext_addr == ext_addr:
                return f
        return None


def _split_addr_port(text: str, what: str) -> tuple[str | None, str]:
    """'[v6]:port', 'v4:port', 'port'; returns (address or None, port part)."""
    if text.startswith("["):
        addr, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise InvalidArgument(f"The {what} '{_printable(text)}' is malformed: write "
                                  "[IPv6]:PORT.")
        return addr, rest[1:]
    if text.count(":") == 1:
        addr, _, port = text.partition(":")
        return addr, port
    if ":" in text:
        raise InvalidArgument(f"The {what} '{_printable(text)}' is malformed: put an IPv6 "
                              "address in brackets, [fd00::5]:80.")
    return None, text


def parse_forward(net: Network, spec: dict[str, Any], stored: bool = False) -> Forward:
    """A forward from D-Bus options / a TOML table, checked against its network. `stored`:
    vnetd's own file, which may also say who owns the forward (a caller's options may not)."""
    if not isinstance(spec, dict):
        raise InvalidArgument("A forward must be a dictionary.")
    owner = _owner(spec, stored, "a forward belongs to whoever adds it")
    known = {"proto", "family", "port", "target", "target-port", "ext-addr", "iface",
             "addr-of"}
    unknown = sorted(_printable(k) for k in spec if k not in known and k != "owner")
    if unknown:
        raise InvalidArgument(f"Unknown forward option(s): {', '.join(unknown)}. "
                              f"Known: {', '.join(sorted(known))}.")
    proto = spec.get("proto")
    if proto not in PROTOS:
        raise InvalidArgument(f"Unknown protocol '{_printable(proto)}': use tcp or udp.")
    family = spec.get("family", 4)
    if family not in (4, 6) or isinstance(family, bool):
        raise InvalidArgument(f"The family must be 4 or 6, not {_printable(family)}.")
    if "port" not in spec or "target" not in spec:
        raise InvalidArgument("A forward needs a port and a target.")
    lo, hi = parse_port_range(spec["port"])
    tport = _port(spec.get("target-port", lo), "target port")
    if tport + (hi - lo) > MAX_PORT:
        raise InvalidArgument(f"The target ports {tport}-{tport + hi - lo} go past {MAX_PORT}.")
    ext = spec.get("ext-addr")
    if ext is not None:
        try:
            a = ipaddress.ip_address(ext)
        except ValueError:
            raise InvalidArgument(f"'{_printable(ext)}' is not an IP address.") from None
        if a.version != family:
            raise InvalidArgument(f"The external address {a} is not IPv{family}.")
        ext = str(a)
    iface = spec.get("iface")
    if iface is not None:
        iface = validate_ifname(iface, "interface name")
    addr_of = spec.get("addr-of")
    if addr_of is not None:
        addr_of = validate_ifname(addr_of, "interface name")
        if ext is not None or iface is not None:
            raise InvalidArgument("A forward to an interface's addresses (addr-of) takes "
                                  "neither an external address nor an incoming interface "
                                  "(iface): give one of the three.")
    target = spec["target"]
    if not isinstance(target, str) or not target:
        raise InvalidArgument("The forward's target must be an address or a VM name.")
    try:
        ip = ipaddress.ip_address(target)
    except ValueError:
        validate_vm_name(target)
    else:
        subnet = net.subnet if ip.version == 4 else net.subnet6
        if ip.version != family:
            raise InvalidArgument(f"The target {ip} is not IPv{family} (use -6 for IPv6).")
        if subnet is None:
            raise InvalidArgument(f"The network '{net.name}' has no IPv6 prefix: give it one "
                                  "(--subnet6) to forward IPv6.")
        if ip not in subnet:
            raise InvalidArgument(f"The target {ip} is outside {net.name}'s subnet {subnet}.")
        if ip in (net.gateway, net.gateway6) or ip == subnet.network_address or (
                ip.version == 4 and ip == subnet.broadcast_address):
            raise InvalidArgument(f"The target {ip} is not a guest's address in {subnet}.")
        target = str(ip)
    if family == 6 and net.subnet6 is None:
        raise InvalidArgument(f"The network '{net.name}' has no IPv6 prefix: give it one "
                              "(--subnet6) to forward IPv6.")
    return Forward(proto=proto, family=family, port_lo=lo, port_hi=hi, target=target,
                   target_port=tport, ext_addr=ext, iface=iface, addr_of=addr_of, owner=owner)


def parse_forward_args(proto: str, external: str, target: str, *, iface: str | None = None,
                       family: int = 4) -> dict[str, Any]:
    """The CLI's words: PROTO [EXT_ADDR:]PORT[-PORT] TARGET:PORT -> forward options."""
    ext, ports = _split_addr_port(external, "external port")
    tgt, tport = _split_addr_port(target, "target")
    if tgt is None:
        raise InvalidArgument(f"The target '{_printable(target)}' needs a port: TARGET:PORT.")
    spec: dict[str, Any] = {"proto": proto.lower(), "family": family, "port": ports,
                            "target": tgt, "target-port": tport}
    if ext:
        spec["ext-addr"] = ext
    if iface:
        spec["iface"] = iface
    return spec


def expand_forward_words(spec: dict[str, Any]) -> dict[str, Any]:
    """Accept the CLI's words as they were typed: 'rule' (qemu-vlan's format) or 'external'
    ([EXT_ADDR:]PORT[-PORT]) with 'to' (TARGET:PORT); other keys pass through."""
    if not isinstance(spec, dict):
        raise InvalidArgument("A forward must be a dictionary.")
    spec = dict(spec)
    if "rule" in spec:
        rule = spec.pop("rule")
        means = spec.pop("interface-means", "addresses")
        if not isinstance(rule, str):
            raise InvalidArgument("'rule' must be a string.")
        return {**parse_original_rule(rule, means), **spec}
    if "interface-means" in spec:
        raise InvalidArgument("'interface-means' goes with 'rule' (qemu-vlan's format).")
    if "external" in spec:
        external, to = spec.pop("external"), spec.pop("to", None)
        proto = spec.pop("proto", None)
        family = spec.pop("family", 4)
        if not all(isinstance(x, str) for x in (external, proto)) or (
                to is not None and not isinstance(to, str)):
            raise InvalidArgument("'proto', 'external' and 'to' must be strings.")
        if to is None:  # removal: no target needed
            ext, ports = _split_addr_port(external, "external port")
            out = {"proto": proto.lower(), "family": family, "port": ports, **spec}
            return {**out, "ext-addr": ext} if ext else out
        return {**parse_forward_args(proto, external, to, family=family), **spec}
    return spec


RULE_MEANINGS = ("addresses", "incoming")


def parse_original_rule(rule: str, means: object = "addresses") -> dict[str, Any]:
    """qemu-vlan's 'interface,proto,port,address:port[/4|6]' (PREROUTING_RULES). The
    interface means, by default as in the original, traffic to its addresses (addr-of);
    `means="incoming"`: traffic arriving on it (iface)."""
    if means not in RULE_MEANINGS:
        raise InvalidArgument(f"interface-means '{_printable(means)}': use addresses (traffic "
                              "to the interface's addresses, as qemu-vlan meant) or incoming "
                              "(traffic arriving on it).")
    parts = rule.strip().split(",")
    if len(parts) != 4:
        raise InvalidArgument(f"'{_printable(rule)}' is not 'interface,proto,port,"
                              "address:port[/4|6]'.")
    iface, proto, port, dest = (p.strip() for p in parts)
    family = 4
    if dest.endswith(("/4", "/6")):
        family = int(dest[-1])
        dest = dest[:-2]
    spec = parse_forward_args(proto, port, dest, iface=iface or None, family=family)
    if means == "addresses" and "iface" in spec:
        spec["addr-of"] = spec.pop("iface")
    return spec


def overlapping(a: ipaddress._BaseNetwork, b: ipaddress._BaseNetwork) -> bool:
    """Whether two subnets share an address (as integers: a start compares its subnets
    with every definition's, a fifth of ipaddress's `overlaps` at 500 networks)."""
    return (a.version == b.version and int(a.network_address) <= int(b.broadcast_address)
            and int(b.network_address) <= int(a.broadcast_address))
