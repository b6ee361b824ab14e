"""The nftables firewall: a pure *render* half (JSON command lists for libnftables) and a small
*apply* half (one ``json_cmd`` per change, so every change is one kernel transaction).

Only two tables are ever named: ``inet qemu_vnet`` (filtering and NAT of the routed traffic
of our bridges) and ``bridge qemu_vnet`` (anti-spoofing on guest ports). Every command this
module renders is checked by :func:`check_scope` before it is applied; no other table is
created, flushed, changed or deleted. Other tables are only ever *read*
(:func:`foreign_drop_chains`).

Ruleset (``render_ruleset``)
----------------------------
``table inet qemu_vnet``; every base chain has policy accept, so traffic that does not touch
one of our bridges is never judged here; our bridges' traffic that is not allowed is dropped
(and counted) explicitly.

=============  ======================================  ============================================
chain          hook / priority                         does
=============  ======================================  ============================================
input          filter input, 0 (filter)                ``iifname @bridges jump from_bridge``
from_bridge    (regular)                               established/related, DHCP (udp 67, 547),
                                                       DNS (udp/tcp 53) and ping to the bridge's
                                                       own gateway (``@gw4``/``@gw6``), ICMPv6
                                                       ND/RS/MLD; ``iifname @host_ok accept``;
                                                       ``counter drop``
forward        filter forward, 0 (filter)              not ours (``iifname != @bridges oifname !=
                                                       @bridges``): return; established/related,
                                                       ``ct status dnat`` accept;
                                                       ``iifname . oifname @pass`` accept (same
                                                       network, ``routed_with``);
                                                       ``iifname @nat_out oifname != @bridges``
                                                       accept; ``counter drop``
prerouting     nat prerouting, -100 (dstnat)           ``fib daddr type local``: the forward maps
                                                       with an interface (``dnat_if``), then
                                                       those without (``dnat_any``)
output         nat output, -100 (dstnat)               the host's own connections to its own
                                                       addresses (not loopback): ``dnat_any``
postrouting    nat postrouting, 100 (srcnat)           hairpin (``ct status dnat`` and saddr .
                                                       daddr in ``@intra4``/``@intra6``):
                                                       masquerade; intra-subnet: return;
                                                       multicast/broadcast: return;
                                                       ``ip saddr @masq4`` / ``ip6 saddr @masq6``
                                                       masquerade
=============  ======================================  ============================================

Sets (all keyed by interface name or address, so adding a network changes elements, not
rules): ``bridges``, ``nat_out`` (nat networks), ``host_ok`` (nat networks and host-only
networks with ``allow_host``), ``pass`` (``ifname . ifname``: each network with itself and the
``routed_with`` pairs, both directions), ``gw4``/``gw6`` (``ifname . address`` of each gateway),
``intra4``/``intra6`` (``subnet . subnet``, interval), ``masq4`` (nat subnets) and ``masq6``
(ULA ``subnet6`` of nat networks; a global prefix is routed without NAT).

Port forwards live in hash maps, two per key shape and family, because libnftables 1.0.6
cannot declare a map whose *value* is a concatenation in JSON: ``fwdF[_S]_ip`` maps the key to
the target address and ``fwdF[_S]_port`` maps the same key to the target port; the ``dnat``
statement looks up both. ``F`` is 4 or 6, ``S`` is the key shape:

======  =========================================  =====================================
shape   key                                        forward has
======  =========================================  =====================================
_ia     iifname . daddr . l4proto . dport          ``iface`` and ``ext_addr``
_i      iifname . l4proto . dport                  ``iface``
_a      daddr . l4proto . dport                    ``ext_addr``
(none)  l4proto . dport                            neither
======  =========================================  =====================================

More specific shapes are looked up first, so an address-specific forward and an any-address
forward may share a port. A port range is one element per port (the kernel's DNAT cannot
shift a range by an offset), so a forward costs its own size and nothing else. Interval
maps were measured and rejected: libnftables dumps every element of an interval set before
deleting one (33 ms with 10,000 elements against 0.2 ms for a hash map).

``table bridge qemu_vnet``: chain ``prerouting`` (filter prerouting, -200) sends frames from
``@guarded`` ports (the guest taps of networks with ``spoof_protection``) to chain ``guard``,
which drops, counting into the port's named counter ``spoof_<ifname>`` (looked up through the
map ``port_ctr``): frames whose source MAC is not the port's (``@mac_known``,
``iifname . ether saddr != @port_mac``); VLAN-tagged frames from a port with a known MAC or
IPv4 (``@strict``; tags would hide the L3 header from the checks); DHCP and DHCPv6 server
replies (udp sport 67 / 547) and router advertisements from any guarded port; ARP whose
sender MAC or IPv4 is not the port's; IPv4 whose source is not the port's (``@ip_known``,
``iifname . ip saddr != @port_ip4``) except a DHCP client's 0.0.0.0.

Reading the counters: apply :func:`render_counters_query` with :func:`query` and give the
result to :func:`parse_spoof_counters` (``list counters table bridge qemu_vnet``).

What the engine must do
-----------------------
* ``net.ipv4.ip_forward=1`` (and ``net.ipv6.conf.all.forwarding=1`` with ``subnet6``) in the
  namespace the bridges live in; without it nat networks and forwards do not route.
* Nothing for ``bridge-nf-call-*``: the ``bridge`` family sees bridged frames without
  ``br_netfilter``. When ``br_netfilter`` is loaded (built in on the 6.18 test kernel) and
  ``bridge-nf-call-iptables``/``-ip6tables`` are 1 (their default, per network namespace),
  *bridged* IPv4/IPv6 traffic between two guests of one bridge also passes the ``inet``
  prerouting/forward/postrouting hooks with iifname = oifname = the bridge: the ``pass`` set
  accepts it and postrouting returns before any NAT. The rules are correct with either
  setting (both are tested); do not change these sysctls (Docker depends on them).
* Another table's base chain with ``policy drop`` on the same hook (Docker's ``ip filter
  FORWARD``, a host firewall) drops our traffic too, whatever we accept: each table's verdict
  is independent and a packet must survive all of them. With ``br_netfilter`` this includes
  traffic between two guests of one bridge (the well-known Docker + libvirt clash). vnetd
  never edits foreign tables; :func:`foreign_drop_chains` lists such chains so that the
  engine can say so in a sentence, and the administrator adds an accept for our bridges where
  that firewall expects it (Docker: ``iifname BRIDGE accept`` and ``oifname BRIDGE accept`` in
  ``DOCKER-USER``; firewalld: the bridges in a trusted zone or policy).
* Guests of nat networks reach every service of the host (as with libvirt); ``allow_host``
  opens them to a host-only network. A connection to a forward's external port is accepted
  from wherever it comes, another network's guests included (it is a published service).
  New connections from outside into a network are dropped, also for a nat network's routed
  (non-ULA) IPv6 prefix; only forwards reach in.
* Forwards to a host-only network work only if its guests route replies through the gateway
  (only hairpin connections are masqueraded).
* Overlapping forwards (same shape, proto and port) are rejected by the kernel (EEXIST);
  ``model.py`` should refuse them first. ``render_forward_remove`` / ``render_port_update``
  / ``render_port_remove`` must be given exactly what was applied (deleting a missing element
  fails the transaction).
* After an upgrade that changes a set's type or a chain's hook, ``render_ruleset`` with the
  default in-place rebuild fails: rebuild with ``fresh=True`` (delete and recreate both tables
  in the same transaction; resets the counters).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vnet_common.limits import MAX_IFNAME

TABLE = "qemu_vnet"
FAMILIES = ("inet", "bridge")

PRIO_FILTER = 0
PRIO_DSTNAT = -100
PRIO_SRCNAT = 100
PRIO_BRIDGE_FILTER = -200

MODES = ("nat", "host-only")
PROTOS = ("tcp", "udp")
ULA = ipaddress.IPv6Network("fc00::/7")
_IFNAME = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_IFNAME}}}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")

# (with iface, with ext_addr) for each forward key shape, most specific first.
SHAPES: dict[str, tuple[bool, bool]] = {
    "_ia": (True, True),
    "_i": (True, False),
    "_a": (False, True),
    "": (False, False),
}


# --- data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FwNetwork:
    """One running network, as the firewall sees it."""

    name: str  # also the bridge's ifname, e.g. "vnet2"
    mode: str  # "nat" | "host-only"
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    subnet6: ipaddress.IPv6Network | None = None
    gateway6: ipaddress.IPv6Address | None = None
    # host-only: guests may reach host services beyond DHCP/DNS/ping (nat guests always may,
    # as with libvirt's NAT networks)
    allow_host: bool = False
    routed_with: tuple[str, ...] = ()  # networks this one may exchange traffic with
    spoof_protection: bool = True
    # a VXLAN overlay: its VNI on its UDP port is accepted only from these hosts; evpn: from
    # any host (its VTEPs come from BGP, not from a list known here)
    overlay_port: int | None = None
    overlay_vni: int | None = None
    overlay_peers: tuple[str, ...] = ()
    overlay_evpn: bool = False
    mac: str | None = None  # the bridge's (the gateway's) MAC, which no port may take


@dataclass(frozen=True)
class FwForward:
    network: str
    proto: str  # "tcp" | "udp"
    family: int  # 4 | 6
    ext_addr: str | None  # only packets to this host address (None: any address of the host)
    port_lo: int
    port_hi: int  # external port range (equal for a single port)
    target: str  # IP inside the network's subnet
    target_port: int  # port_lo..port_hi -> target_port..target_port+(hi-lo)
    iface: str | None = None  # only packets arriving on this interface


@dataclass(frozen=True)
class FwPort:
    """A guest port (tap) on a bridge, for anti-spoofing."""

    ifname: str
    network: str
    mac: str | None  # None: learning; locks to its first unicast source that is not taken
    ipv4: str | None = None  # once bound: IPv4 and ARP from the port must carry it (until
    # then only DHCP client traffic and ARP probes leave it)
    # addresses the port keeps beside `ipv4` for a while: the lease its guest holds from
    # before a static address was given (until the guest renews, and gets the static one)
    ipv4_also: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()  # bound IPv6 addresses beyond the MAC's link-local address
    segment: bool = False  # many guests behind it (a VDE switch): none may take a port's or
    # the gateway's identity, but their own MACs and addresses are not known
    # where this host cannot know the leases (an overlay member: DHCP runs on the gateway
    # host), an unbound port may use any address of this subnet that no one here holds
    unbound_in: str | None = None
    # a bridged network's port: its addresses come from the physical LAN's servers, which vnetd
    # does not know, so only its MAC is held (both ways); its network is not among ours
    bridged: bool = False


# --- validation -------------------------------------------------------------------------------


def _ifname(name: object, what: str) -> str:
    if not isinstance(name, str) or not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{what} {name!r} is not a valid interface name "
                         f"(1-{MAX_IFNAME} of A-Z a-z 0-9 _ . -).")
    return name


def _mac(mac: str) -> str:
    m = mac.lower() if isinstance(mac, str) else ""
    if not _MAC.fullmatch(m) or int(m[:2], 16) & 1:
        raise ValueError(f"{mac!r} is not a unicast MAC address.")
    return m


def _addr(text: object, family: int, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        a = ipaddress.ip_address(text)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an IP address.") from None
    if a.version != family:
        raise ValueError(f"{what} {a} is not an IPv{family} address.")
    return a


def _port(p: object, what: str) -> int:
    if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= 65535:
        raise ValueError(f"{what} {p!r} is not a port number (1-65535).")
    return p


def validate_network(n: FwNetwork) -> None:
    _ifname(n.name, "Network")
    if n.mode not in MODES:
        raise ValueError(f"Unknown mode {n.mode!r} of {n.name}: use one of {', '.join(MODES)}.")
    if not isinstance(n.subnet, ipaddress.IPv4Network) or n.gateway not in n.subnet:
        raise ValueError(f"The gateway {n.gateway} of {n.name} is not in {n.subnet}.")
    if (n.subnet6 is None) != (n.gateway6 is None):
        raise ValueError(f"{n.name}: subnet6 and gateway6 go together.")
    if n.subnet6 is not None and (not isinstance(n.subnet6, ipaddress.IPv6Network)
                                  or n.gateway6 not in n.subnet6):
        raise ValueError(f"The gateway {n.gateway6} of {n.name} is not in {n.subnet6}.")
    for r in n.routed_with:
        _ifname(r, f"routed_with of {n.name}:")
    if n.mac is not None:
        _mac(n.mac)
    if n.overlay_port is not None:
        _port(n.overlay_port, "VXLAN port")
        if not isinstance(n.overlay_vni, int) or not 1 <= n.overlay_vni <= 0xFFFFFF:
            raise ValueError(f"{n.name}: the VNI {n.overlay_vni!r} is not 1..16777215.")
        for peer in n.overlay_peers:
            if "%" in peer:
                raise ValueError(f"{n.name}: the peer {peer!r} has a zone.")
            ipaddress.ip_address(peer)


def validate_forward(f: FwForward) -> None:
    _ifname(f.network, "Network")
    if f.proto not in PROTOS:
        raise ValueError(f"Unknown protocol {f.proto!r}: use tcp or udp.")
    if f.family not in (4, 6):
        raise ValueError(f"Unknown family {f.family!r}: use 4 or 6.")
    lo, hi = _port(f.port_lo, "Port"), _port(f.port_hi, "Port")
    if lo > hi:
        raise ValueError(f"The port range {lo}-{hi} is reversed.")
    tp = _port(f.target_port, "Target port")
    if tp + (hi - lo) > 65535:
        raise ValueError(f"The target ports {tp}-{tp + hi - lo} go beyond 65535.")
    _addr(f.target, f.family, "Target")
    if f.ext_addr is not None:
        _addr(f.ext_addr, f.family, "External address")
    if f.iface is not None:
        _ifname(f.iface, "Interface")


def validate_port(p: FwPort) -> None:
    _ifname(p.ifname, "Port")
    _ifname(p.network, "Network")
    if p.mac is not None:
        _mac(p.mac)
    if p.ipv4 is not None:
        _addr(p.ipv4, 4, "Port address")
    for a in p.ipv4_also:
        _addr(a, 4, "Port address")
    if p.ipv4_also and p.ipv4 is None:
        raise ValueError(f"The port {p.ifname} keeps an address but has none bound.")
    if p.unbound_in is not None:
        ipaddress.IPv4Network(p.unbound_in)
    for a in p.ipv6:
        _addr(a, 6, "Port address")
        if "%" in a:
            raise ValueError(f"The port address {a!r} has a zone.")


# --- JSON building blocks ---------------------------------------------------------------------


def _obj(family: str, **kw: Any) -> dict[str, Any]:
    return {"family": family, "table": TABLE, **kw}


def _match(left: Any, right: Any, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict:
    return {"meta": {"key": key}}


def _pl(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _cat(*exprs: Any) -> dict:
    return {"concat": list(exprs)}


def _prefix(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> dict:
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _set_cmd(family: str, name: str, type_: str | list[str], *, flags: Sequence[str] = (),
             map_: str | None = None) -> dict:
    body = _obj(family, name=name, type=type_)
    if map_ is not None:
        body["map"] = map_
    if flags:
        body["flags"] = list(flags)
    return {"add": {"map" if map_ is not None else "set": body}}


def _elements(op: str, family: str, name: str, elems: list) -> dict:
    return {op: {"element": _obj(family, name=name, elem=elems)}}


def _rule(family: str, chain: str, *expr: dict, comment: str | None = None) -> dict:
    body = _obj(family, chain=chain, expr=list(expr))
    if comment:
        body["comment"] = comment
    return {"add": {"rule": body}}


def _chain(family: str, name: str, hook: str | None = None, type_: str = "filter",
           prio: int = 0) -> dict:
    body = _obj(family, name=name)
    if hook:
        body.update(type=type_, hook=hook, prio=prio, policy="accept")
    return {"add": {"chain": body}}


ACCEPT: dict = {"accept": None}
DROP: dict = {"drop": None}
RETURN: dict = {"return": None}
L4 = _meta("l4proto")
DPORT = _pl("th", "dport")
IIF = _meta("iifname")
OIF = _meta("oifname")
TCP_UDP = _match(L4, {"set": ["tcp", "udp"]})
FIB_LOCAL = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")


def _jump(chain: str) -> dict:
    return {"jump": {"target": chain}}


def _counter() -> dict:
    return {"counter": {"packets": 0, "bytes": 0}}


# --- forwards ---------------------------------------------------------------------------------


def forward_shape(f: FwForward) -> str:
    return {(True, True): "_ia", (True, False): "_i", (False, True): "_a",
            (False, False): ""}[(f.iface is not None, f.ext_addr is not None)]


def forward_maps(family: int, shape: str) -> tuple[str, str]:
    """(address map, port map) names for one family and key shape."""
    return f"fwd{family}{shape}_ip", f"fwd{family}{shape}_port"


def _fwd_key_types(family: int, shape: str) -> list[str]:
    iface, addr = SHAPES[shape]
    return ((["ifname"] if iface else []) + ([f"ipv{family}_addr"] if addr else [])
            + ["inet_proto", "inet_service"])


def _fwd_key_expr(family: int, shape: str) -> dict:
    iface, addr = SHAPES[shape]
    parts: list = [IIF] if iface else []
    if addr:
        parts.append(_pl("ip" if family == 4 else "ip6", "daddr"))
    return _cat(*parts, L4, DPORT)


def _forward_elems(f: FwForward) -> dict[str, list]:
    """{map name: elements} of one forward: one element per external port in each map."""
    validate_forward(f)
    shape = forward_shape(f)
    ip_map, port_map = forward_maps(f.family, shape)
    target = str(ipaddress.ip_address(f.target))
    head: list = [f.iface] if f.iface is not None else []
    if f.ext_addr is not None:
        head.append(str(ipaddress.ip_address(f.ext_addr)))
    ips, ports = [], []
    for i, p in enumerate(range(f.port_lo, f.port_hi + 1)):
        key = _cat(*head, f.proto, p)
        ips.append([key, target])
        ports.append([key, f.target_port + i])
    return {ip_map: ips, port_map: ports}


def render_forward_add(f: FwForward) -> dict:
    """One small transaction: the map elements of one forward (nothing else)."""
    return {"nftables": [_elements("add", "inet", m, e) for m, e in _forward_elems(f).items()]}


def render_forward_remove(f: FwForward) -> dict:
    """The inverse of :func:`render_forward_add` (the forward must be the one applied)."""
    return {"nftables": [_elements("delete", "inet", m, e)
                         for m, e in _forward_elems(f).items()]}


# --- ports (bridge table) ---------------------------------------------------------------------
# Every guarded port has two chains of its own, in_<ifname> (frames from it) and out_<ifname>
# (frames to it), reached through the verdict maps guard_in / guard_out: what a port may send
# is a handful of constants in its own chain, so adding, changing or removing one port is one
# small transaction whatever the number of ports, and no concatenation of a raw payload with
# a typed set is needed (nftables cannot type those).


def eui64_ll(mac: str) -> str:
    """The EUI-64 link-local IPv6 address of a MAC (what the kernel's default gives a guest)."""
    b = bytes.fromhex(_mac(mac).replace(":", ""))
    iid = bytes([b[0] ^ 2, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]])
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + iid))


def eui64_in(prefix: ipaddress.IPv6Network, mac: str) -> str:
    """The SLAAC address (EUI-64) of a MAC in a /64 prefix."""
    ll = int(ipaddress.IPv6Address(eui64_ll(mac)))
    return str(ipaddress.IPv6Address(int(prefix.network_address) | (ll & ((1 << 64) - 1))))


def counter_name(ifname: str) -> str:
    return f"spoof_{ifname}"


def _in_chain(ifname: str) -> str:
    return f"in_{ifname}"


def _out_chain(ifname: str) -> str:
    return f"out_{ifname}"


def port_allowed6(p: FwPort) -> list[str]:
    """The IPv6 sources a strict port may use: its MAC's link-local address and its bound
    addresses (none while its MAC is unknown)."""
    if p.mac is None:
        return []
    return sorted({eui64_ll(p.mac), *(str(ipaddress.IPv6Address(a)) for a in p.ipv6)},
                  key=lambda a: int(ipaddress.IPv6Address(a)))


def _port_elems(p: FwPort) -> list[tuple[str, Any]]:
    """(set or map name, element) pairs of one guarded port (its chains aside)."""
    validate_port(p)
    out: list[tuple[str, Any]] = [
        ("guard_in", [p.ifname, _jump(_in_chain(p.ifname))]),
        ("guard_out", [p.ifname, _jump(_out_chain(p.ifname))]),
        ("port_ctr", [p.ifname, counter_name(p.ifname)]),
    ]
    if p.mac is not None and not p.segment:
        out.append(("taken", _mac(p.mac)))
    if p.mac is None and not p.segment:
        out.append(("unlocked", p.ifname))
    if p.ipv4 is not None and not p.segment:
        for a in (p.ipv4, *p.ipv4_also):
            out.append(("claimed4", str(ipaddress.ip_address(a))))
    if not p.segment:
        out += [("claimed6", a) for a in port_allowed6(p)]
    return out


def _int128(addr: str) -> str:
    return hex(int(ipaddress.IPv6Address(addr)))


def _th(offset_bytes: int, len_bytes: int) -> dict:
    return {"payload": {"base": "th", "offset": offset_bytes * 8, "len": len_bytes * 8}}


def _mac_int(mac: str) -> str:
    return "0x" + _mac(mac).replace(":", "")


ICMP6 = _pl("icmpv6", "type")
NS, NA = "nd-neighbor-solicit", "nd-neighbor-advert"
IP6_LEN = _pl("ip6", "length")
UNSPEC6 = "::"
NS_NA = {"range": [NS, NA]}  # types 135 and 136


def _none_of(left: Any, values: Iterable[Any]) -> list[dict]:
    """``left`` is none of ``values``, as one inequality each (ANDed in a rule). A port's
    chains use no anonymous sets: libnftables reads every set of the table before each
    transaction, so sets per port would make every port's change cost more with every port
    (12 ms at 1,000 ports, against about 1 ms without)."""
    return [_match(left, v, "!=") for v in values]


def _port_rules(p: FwPort, gateways: tuple[str, ...] = ()) -> list[dict]:
    """The rules of one port's two chains (see the module text for what they hold).
    `gateways` are the addresses of the network's gateway (IPv4, IPv6 and the bridge's
    link-local), which a VDE segment must never claim."""
    b = "bridge"
    ci, co = _in_chain(p.ifname), _out_chain(p.ifname)
    count_drop = [{"counter": {"map": {"key": IIF, "data": "@port_ctr"}}}, DROP]
    count_drop_out = [{"counter": {"map": {"key": OIF, "data": "@port_ctr"}}}, DROP]

    def r(*expr: dict, comment: str) -> dict:
        return _rule(b, ci, *expr, *count_drop, comment=comment)

    unicast_dst = _match({"&": [_pl("ether", "daddr"), "01:00:00:00:00:00"]},
                         "00:00:00:00:00:00")
    rules = [_rule(b, ci, _jump("from_any_port"))]
    if p.segment:
        # many guests behind one port (a VDE switch): none may take an identity vnetd gave
        # to a port, or the gateway's
        rules += [
            r(_match(_pl("ether", "saddr"), "@taken"), comment="MAC of a port or the gateway"),
            r(_match(_pl("arp", "saddr ether"), "@taken"),
              comment="ARP sender MAC of a port or the gateway"),
            r(_match(_pl("arp", "saddr ip"), "@claimed4"),
              comment="ARP for an address of a port or the gateway"),
            r(_match(_pl("ip", "saddr"), "@claimed4"),
              comment="IPv4 source of a port or the gateway"),
            r(_match(_pl("ip6", "saddr"), "@claimed6"),
              comment="IPv6 source of a port or the gateway"),
        ]
        # asking for the gateway is fine; answering for it or DAD of it is not
        for g in (g for g in gateways if ":" in g):
            rules += [r(_match(ICMP6, NA), _match(_th(8, 16), _int128(g)),
                        comment="NA for the gateway"),
                      r(_match(_pl("ip6", "saddr"), UNSPEC6), _match(ICMP6, NS),
                        _match(_th(8, 16), _int128(g)), comment="DAD for the gateway")]
        rules.append(_rule(b, co, unicast_dst, _match(_pl("ether", "daddr"), "@taken"),
                           *count_drop_out, comment="unicast for another port"))
        return rules
    mac = _mac(p.mac) if p.mac is not None else None
    if mac is not None:
        rules += [
            r(_match(_pl("ether", "saddr"), mac, "!="), comment="source MAC"),
            r(_match(_pl("arp", "saddr ether"), mac, "!="), comment="ARP sender MAC"),
            r(_match(_pl("udp", "dport"), 67), _match(_th(8 + 28, 6), _mac_int(mac), "!="),
              comment="DHCP client hardware address"),
        ]
        rules.append(_rule(b, co, unicast_dst, _match(_pl("ether", "daddr"), mac, "!="),
                           *count_drop_out, comment="unicast for another MAC"))
    else:
        # learning: the first unicast source locks the port, but never an identity that is
        # already taken (a port's MAC, the bridge's)
        rules += [
            r(_match(_pl("ether", "saddr"), "@taken"), comment="MAC of a port or the gateway"),
            r(_match(_pl("arp", "saddr ether"), "@taken"),
              comment="ARP sender MAC of a port or the gateway"),
        ]
        rules.append(_rule(b, co, unicast_dst, _match(_pl("ether", "daddr"), "@taken"),
                           *count_drop_out, comment="unicast for another port"))
    if p.bridged:
        if mac is not None:
            rules += _nd_option_rules(r, mac)
        return rules
    # IPv4 and ARP: until an address is bound only DHCP client traffic and ARP probes
    arp_ip = _pl("arp", "saddr ip")
    if p.ipv4 is not None:
        rules.append(r(*_none_of(arp_ip, ["0.0.0.0", p.ipv4, *p.ipv4_also]),
                       comment="ARP sender IP"))
    elif p.unbound_in is not None:
        sub = _prefix(ipaddress.IPv4Network(p.unbound_in))
        rules += [r(*_none_of(arp_ip, ["0.0.0.0", sub]),
                    comment="ARP sender IP outside the subnet"),
                  r(_match(arp_ip, "@claimed4"), comment="ARP for an address held here"),
                  r(*_none_of(_pl("ip", "saddr"), ["0.0.0.0", sub]),
                    comment="source IPv4 outside the subnet"),
                  r(_match(_pl("ip", "saddr"), "@claimed4"),
                    comment="source IPv4 held here")]
    else:
        rules.append(r(_match(arp_ip, "0.0.0.0", "!="), comment="ARP before an address"))
    rules.append(_rule(b, ci, _match(_pl("ip", "saddr"), "0.0.0.0"),
                       _match(_pl("udp", "sport"), 68), _match(_pl("udp", "dport"), 67),
                       RETURN, comment="DHCP client without an address"))
    if p.ipv4 is not None:
        rules.append(r(*_none_of(_pl("ip", "saddr"), [p.ipv4, *p.ipv4_also]),
                       comment="source IPv4"))
    elif p.unbound_in is None:
        rules.append(r(_match(_pl("ether", "type"), "ip"), comment="IPv4 before an address"))
    # IPv6: the port's link-local and bound addresses; '::' only for DAD and MLD
    allowed = port_allowed6(p)
    rules += [
        r(*_none_of(_pl("ip6", "saddr"), [UNSPEC6, *allowed]), comment="source IPv6"),
        r(_match(_pl("ip6", "saddr"), UNSPEC6), _match(L4, "ipv6-icmp", "!="),
          comment="unspecified source beyond ICMPv6"),
        r(_match(_pl("ip6", "saddr"), UNSPEC6),
          *_none_of(ICMP6, [NS, "mld-listener-report", "mld2-listener-report"]),
          comment="unspecified source beyond DAD and MLD"),
    ]
    if mac is None:
        rules.append(r(_match(ICMP6, NS_NA), *_none_of(IP6_LEN, [24, 32]),
                       comment="neighbour discovery with unexpected options"))
    targets = [_int128(a) for a in allowed]
    if not targets:
        rules.append(r(_match(ICMP6, NA), comment="NA before an address"))
        rules.append(r(_match(_pl("ip6", "saddr"), UNSPEC6), _match(ICMP6, NS),
                       comment="DAD before an address"))
    else:
        rules += [
            r(_match(ICMP6, NA), *_none_of(_th(8, 16), targets), comment="NA target"),
            r(_match(_pl("ip6", "saddr"), UNSPEC6), _match(ICMP6, NS),
              *_none_of(_th(8, 16), targets), comment="DAD target"),
        ]
    if mac is not None:
        rules += _nd_option_rules(r, mac)
    return rules


def _nd_option_rules(r, mac: str) -> list[dict]:
    """Neighbour solicitations and advertisements carry at most one option, and a link-layer
    address option carries the port's MAC."""
    return [
        r(_match(ICMP6, NS_NA), *_none_of(IP6_LEN, [24, 32]),
          comment="neighbour discovery with unexpected options"),
        r(_match(ICMP6, NA), _match(IP6_LEN, 32), _match(_th(24, 2), "0x0201", "!="),
          comment="NA option"),
        r(_match(ICMP6, NA), _match(IP6_LEN, 32), _match(_th(26, 6), _mac_int(mac), "!="),
          comment="NA target link-layer address"),
        r(_match(ICMP6, NS), _match(IP6_LEN, 32), *_none_of(_th(24, 1), [1, 14]),
          comment="NS option"),
        r(_match(ICMP6, NS), _match(IP6_LEN, 32), _match(_th(24, 2), "0x0101"),
          _match(_th(26, 6), _mac_int(mac), "!="), comment="NS source link-layer address"),
    ]


def _port_chain_cmds(p: FwPort, gateways: tuple[str, ...], *, flush: bool) -> list[dict]:
    cmds: list[dict] = []
    for name in (_in_chain(p.ifname), _out_chain(p.ifname)):
        cmds.append(_chain("bridge", name))
        if flush:
            cmds.append({"flush": {"chain": _obj("bridge", name=name)}})
    return cmds + _port_rules(p, gateways)


def _group(pairs: Iterable[tuple[str, Any]], op: str) -> list[dict]:
    by_set: dict[str, list] = {}
    for name, elem in pairs:
        if elem not in by_set.setdefault(name, []):
            by_set[name].append(elem)
    return [_elements(op, "bridge", name, elems) for name, elems in by_set.items()]


def _counter_obj(ifname: str, packets: int = 0, bytes_: int = 0) -> dict:
    c = _obj("bridge", name=counter_name(ifname))
    if packets or bytes_:
        c.update(packets=packets, bytes=bytes_)
    return c


def render_port_update(port: FwPort, old: FwPort | None, *, spoof_protection: bool = True,
                       gateways: tuple[str, ...] = (),
                       keep: frozenset[tuple[str, Any]] = frozenset()) -> dict:
    """Add or replace one port's guard in one transaction: its two chains are (re)written,
    the elements of ``old`` (what was applied before; None: nothing) that ``port`` no longer
    has are deleted and those of ``port`` added; the named counter ``spoof_<ifname>`` keeps its
    value. ``spoof_protection`` is the port's network's setting; ``gateways`` the gateway's
    addresses (for VDE segments). Elements in ``keep`` (the identities other ports or
    gateways still hold: the sets are host-wide) are never deleted."""
    if not spoof_protection:
        return render_port_remove(old, keep=keep) if old is not None else {"nftables": []}
    if old is not None and old.ifname != port.ifname:
        raise ValueError(f"A port update cannot rename {old.ifname} to {port.ifname}.")
    new = _port_elems(port)
    cmds: list[dict] = []
    if old is not None:
        cmds += _group([pe for pe in _port_elems(old) if pe not in new and _keyed(pe) not in keep],
                       "delete")
    cmds.append({"add": {"counter": _counter_obj(port.ifname)}})
    cmds += _port_chain_cmds(port, gateways, flush=old is not None)
    cmds += _group(new, "add")  # adding an element that is there changes nothing
    return {"nftables": cmds}


def _keyed(pe: tuple[str, Any]) -> tuple[str, Any]:
    return pe[0], json.dumps(pe[1], sort_keys=True) if not isinstance(pe[1], str) else pe[1]


def shared_elems(p: FwPort) -> set[tuple[str, Any]]:
    """The host-wide identity elements of a port (what ``keep`` is made of)."""
    return {_keyed(pe) for pe in _port_elems(p) if pe[0] in ("taken", "claimed4", "claimed6")}


def render_port_remove(port: FwPort, *, spoof_protection: bool = True,
                       keep: frozenset[tuple[str, Any]] = frozenset()) -> dict:
    """Delete one port's guard (as it was applied): its elements (but those in ``keep``),
    chains and counter."""
    if not spoof_protection:
        return {"nftables": []}
    cmds = _group([pe for pe in _port_elems(port) if _keyed(pe) not in keep], "delete")
    for name in (_in_chain(port.ifname), _out_chain(port.ifname)):
        cmds.append({"flush": {"chain": _obj("bridge", name=name)}})
        cmds.append({"delete": {"chain": _obj("bridge", name=name)}})
    cmds.append({"delete": {"counter": _counter_obj(port.ifname)}})
    return {"nftables": cmds}


def render_counters_query() -> dict:
    """``list counters table bridge qemu_vnet``: feed :func:`query`'s result to
    :func:`parse_spoof_counters`."""
    return {"nftables": [{"list": {"counters": {"family": "bridge", "table": TABLE}}}]}


def parse_spoof_counters(listing: dict) -> dict[str, dict[str, int]]:
    """{ifname: {"packets": n, "bytes": n}} from a listing of the bridge table's counters."""
    out: dict[str, dict[str, int]] = {}
    for o in (listing or {}).get("nftables", []):
        c = o.get("counter")
        if (c and c.get("family") == "bridge" and c.get("table") == TABLE
                and c.get("name", "").startswith("spoof_")):
            out[c["name"][len("spoof_"):]] = {"packets": c.get("packets", 0),
                                              "bytes": c.get("bytes", 0)}
    return out


# --- the whole ruleset ------------------------------------------------------------------------


def _sorted(elems: Iterable) -> list:
    return sorted(elems, key=lambda e: json.dumps(e, sort_keys=True))


def _table_head(family: str, fresh: bool) -> list[dict]:
    t = {"family": family, "name": TABLE}
    if fresh:
        return [{"add": {"table": t}}, {"delete": {"table": dict(t)}}, {"add": {"table": dict(t)}}]
    return [{"add": {"table": t}}, {"flush": {"table": dict(t)}}]


def _with_flush(family: str, add_set: dict, fresh: bool) -> list[dict]:
    kind = "map" if "map" in add_set["add"] else "set"
    if fresh:
        return [add_set]
    name = add_set["add"][kind]["name"]
    return [add_set, {"flush": {kind: _obj(family, name=name)}}]


def _inet_sets() -> list[dict]:
    sets = [
        _set_cmd("inet", "bridges", "ifname"),
        _set_cmd("inet", "nat_out", "ifname"),
        _set_cmd("inet", "host_ok", "ifname"),
        _set_cmd("inet", "pass", ["ifname", "ifname"]),
        _set_cmd("inet", "gw4", ["ifname", "ipv4_addr"]),
        _set_cmd("inet", "gw6", ["ifname", "ipv6_addr"]),
        _set_cmd("inet", "intra4", ["ipv4_addr", "ipv4_addr"], flags=["interval"]),
        _set_cmd("inet", "intra6", ["ipv6_addr", "ipv6_addr"], flags=["interval"]),
        _set_cmd("inet", "masq4", "ipv4_addr", flags=["interval"]),
        _set_cmd("inet", "masq6", "ipv6_addr", flags=["interval"]),
        _set_cmd("inet", "vx_ports", "inet_service"),
    ]
    for fam in (4, 6):
        for shape in SHAPES:
            ip_map, port_map = forward_maps(fam, shape)
            key = _fwd_key_types(fam, shape)
            sets.append(_set_cmd("inet", ip_map, key, map_=f"ipv{fam}_addr"))
            sets.append(_set_cmd("inet", port_map, key, map_="inet_service"))
    return sets


def _dnat_rule(chain: str, fam: int, shape: str) -> dict:
    ip_map, port_map = forward_maps(fam, shape)
    key = _fwd_key_expr(fam, shape)
    return _rule("inet", chain,
                 _match(_meta("nfproto"), "ipv4" if fam == 4 else "ipv6"),
                 TCP_UDP,
                 {"dnat": {"family": "ip" if fam == 4 else "ip6",
                           "addr": {"map": {"key": key, "data": "@" + ip_map}},
                           "port": {"map": {"key": key, "data": "@" + port_map}}}})


def _inet_chains_and_rules() -> list[dict]:
    f = "inet"
    c: list[dict] = [
        _chain(f, "input", "input", "filter", PRIO_FILTER),
        _chain(f, "from_bridge"),
        _chain(f, "from_underlay"),
        _chain(f, "forward", "forward", "filter", PRIO_FILTER),
        _chain(f, "prerouting", "prerouting", "nat", PRIO_DSTNAT),
        _chain(f, "output", "output", "nat", PRIO_DSTNAT),
        _chain(f, "dnat_if"),
        _chain(f, "dnat_any"),
        _chain(f, "postrouting", "postrouting", "nat", PRIO_SRCNAT),
    ]
    est = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
    dnat = _match({"ct": {"key": "status"}}, "dnat", "in")
    # input: decisions only for traffic arriving on our bridges
    c.append(_rule(f, "input", _match(IIF, "@bridges"), _jump("from_bridge")))
    # VXLAN to our overlays' ports: from_underlay accepts each VNI from its peers only
    # (rules per network, render_ruleset); anything else to those ports is dropped
    c.append(_rule(f, "input", _match(_pl("udp", "dport"), "@vx_ports"), _jump("from_underlay")))
    c += [
        _rule(f, "from_bridge", est, ACCEPT),
        _rule(f, "from_bridge", _match(_pl("udp", "dport"), {"set": [67, 547]}), ACCEPT,
              comment="DHCP, DHCPv6"),
        _rule(f, "from_bridge", _match(_cat(IIF, _pl("ip", "daddr")), "@gw4"), TCP_UDP,
              _match(DPORT, 53), ACCEPT, comment="DNS"),
        _rule(f, "from_bridge", _match(_cat(IIF, _pl("ip6", "daddr")), "@gw6"), TCP_UDP,
              _match(DPORT, 53), ACCEPT, comment="DNS"),
        _rule(f, "from_bridge", _match(_cat(IIF, _pl("ip", "daddr")), "@gw4"),
              _match(_pl("icmp", "type"), "echo-request"), ACCEPT),
        _rule(f, "from_bridge", _match(_cat(IIF, _pl("ip6", "daddr")), "@gw6"),
              _match(_pl("icmpv6", "type"), "echo-request"), ACCEPT),
        _rule(f, "from_bridge", _match(_pl("icmpv6", "type"), {"set": [
            "nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert",
            "mld-listener-report", "mld2-listener-report", "mld-listener-done"]}), ACCEPT),
        _rule(f, "from_bridge", _match(IIF, "@host_ok"), ACCEPT),
        _rule(f, "from_bridge", _counter(), DROP),
    ]
    # forward
    c += [
        _rule(f, "forward", _match(IIF, "@bridges", "!="), _match(OIF, "@bridges", "!="),
              RETURN),
        _rule(f, "forward", est, ACCEPT),
        _rule(f, "forward", dnat, ACCEPT, comment="port forwards"),
        _rule(f, "forward", _match(_cat(IIF, OIF), "@pass"), ACCEPT),
        _rule(f, "forward", _match(IIF, "@nat_out"), _match(OIF, "@bridges", "!="), ACCEPT),
        _rule(f, "forward", _counter(), DROP),
    ]
    # DNAT: prerouting (from outside, and hairpin from guests) and output (the host itself)
    c += [
        _rule(f, "prerouting", FIB_LOCAL, TCP_UDP, _jump("dnat_if")),
        _rule(f, "prerouting", FIB_LOCAL, TCP_UDP, _jump("dnat_any")),
        _rule(f, "output", _match(_pl("ip", "daddr"), _prefix(
            ipaddress.ip_network("127.0.0.0/8"))), RETURN),
        _rule(f, "output", _match(_pl("ip6", "daddr"), "::1"), RETURN),
        _rule(f, "output", FIB_LOCAL, TCP_UDP, _jump("dnat_any")),
    ]
    for fam in (4, 6):
        for shape, (iface, _) in SHAPES.items():
            c.append(_dnat_rule("dnat_if" if iface else "dnat_any", fam, shape))
    # postrouting: hairpin first (DNATed from a guest to a guest of the same subnet), then
    # never NAT inside a subnet, then masquerade what leaves a nat subnet
    both = (("ip", "@intra4"), ("ip6", "@intra6"))
    for p, intra in both:
        c.append(_rule(f, "postrouting", dnat,
                       _match(_cat(_pl(p, "saddr"), _pl(p, "daddr")), intra),
                       {"masquerade": None}, comment="hairpin"))
    for p, intra in both:
        c.append(_rule(f, "postrouting", _match(_cat(_pl(p, "saddr"), _pl(p, "daddr")), intra),
                       RETURN))
    c += [
        _rule(f, "postrouting", _match(_pl("ip", "daddr"), {"set": [
            _prefix(ipaddress.ip_network("224.0.0.0/4")), "255.255.255.255"]}), RETURN),
        _rule(f, "postrouting", _match(_pl("ip6", "daddr"), _prefix(
            ipaddress.ip_network("ff00::/8"))), RETURN),
        _rule(f, "postrouting", _match(_pl("ip", "saddr"), "@masq4"), {"masquerade": None}),
        _rule(f, "postrouting", _match(_pl("ip6", "saddr"), "@masq6"), {"masquerade": None}),
    ]
    return copy.deepcopy(c)  # no shared sub-dicts: callers may edit what they get


def _bridge_sets() -> list[dict]:
    b = "bridge"
    return [
        _set_cmd(b, "guard_in", "ifname", map_="verdict"),
        _set_cmd(b, "guard_out", "ifname", map_="verdict"),
        _set_cmd(b, "taken", "ether_addr"),
        _set_cmd(b, "unlocked", "ifname"),
        _set_cmd(b, "claimed4", "ipv4_addr"),
        _set_cmd(b, "claimed6", "ipv6_addr"),
        _set_cmd(b, "port_ctr", "ifname", map_="counter"),
    ]


def _bridge_chains_and_rules() -> list[dict]:
    """The hooks and the checks every guarded port shares (from_any_port): default-deny on
    what no guest may send whoever it is."""
    b = "bridge"
    count_drop = [{"counter": {"map": {"key": IIF, "data": "@port_ctr"}}}, DROP]
    c = "from_any_port"
    return copy.deepcopy([
        _chain(b, "prerouting", "prerouting", "filter", PRIO_BRIDGE_FILTER),
        _chain(b, "forward", "forward", "filter", PRIO_FILTER),
        _chain(b, "input", "input", "filter", PRIO_FILTER),
        _chain(b, "output", "output", "filter", PRIO_FILTER),
        _chain(b, c),
        _rule(b, "prerouting", {"vmap": {"key": IIF, "data": "@guard_in"}}),
        # a learning port's DHCP before its MAC is locked: the bridge learns the source MAC
        # from it (prerouting let it pass) but nobody gets it, so its client hardware address
        # is checked from the retransmission on. Not counted as spoofing: every learning
        # port's first DISCOVER meets this (and a flooded frame would count once per port).
        *[_rule(b, hook, _match(IIF, "@unlocked"), _match(_pl("udp", "dport"), 67),
                DROP, comment="DHCP before the MAC is locked")
          for hook in ("forward", "input")],
        _rule(b, "forward", {"vmap": {"key": OIF, "data": "@guard_out"}}),
        _rule(b, "output", {"vmap": {"key": OIF, "data": "@guard_out"}}),
        _rule(b, c, _match({"&": [_pl("ether", "saddr"), "01:00:00:00:00:00"]},
                           "01:00:00:00:00:00"), *count_drop, comment="multicast source MAC"),
        _rule(b, c, _match(_pl("ether", "type"), {"set": ["ip", "arp", "ip6"]}, "!="),
              *count_drop, comment="not IPv4, ARP or IPv6 (VLAN tags, STP, ...)"),
        _rule(b, c, _match(_pl("udp", "sport"), {"set": [67, 547]}), *count_drop,
              comment="rogue DHCP server"),
        _rule(b, c, _match(ICMP6, {"set": ["nd-router-advert", "nd-redirect"]}), *count_drop,
              comment="rogue router"),
        _rule(b, c, _match(_pl("icmp", "type"), "redirect"), *count_drop,
              comment="ICMP redirect"),
        _rule(b, c, _match(_pl("arp", "htype"), 1, "!="), *count_drop,
              comment="ARP for other hardware"),
    ])


VNI = {"payload": {"base": "th", "offset": 96, "len": 24}}  # the VXLAN header's VNI field


def _overlay_rules(nets: list[FwNetwork]) -> list[dict]:
    """from_underlay: a static overlay's VNI only from its peers (VXLAN authenticates nobody:
    whoever reaches the port could otherwise inject frames into the LAN, or into another
    network's VNI on the same port); an EVPN overlay's VNI from anyone (its VTEPs come from
    BGP). Then drop the rest."""
    out = []
    for n in nets:
        if n.overlay_port is None:
            continue
        head = [_match(_pl("udp", "dport"), n.overlay_port), _match(VNI, n.overlay_vni)]
        if n.overlay_evpn:
            out.append(_rule("inet", "from_underlay", *head, ACCEPT, comment=f"{n.name} evpn"))
            continue
        for fam, proto in ((4, "ip"), (6, "ip6")):
            peers = sorted(p for p in n.overlay_peers if ipaddress.ip_address(p).version == fam)
            if peers:
                out.append(_rule("inet", "from_underlay", *head,
                                 _match(_pl(proto, "saddr"), {"set": peers}), ACCEPT,
                                 comment=f"{n.name} peers"))
    out.append(_rule("inet", "from_underlay", _counter(), DROP,
                     comment="VXLAN from a host that is not a peer"))
    return out


def _among(by_name: dict[str, FwNetwork], network: str, what: str) -> FwNetwork:
    net = by_name.get(network)
    if net is None:
        raise ValueError(f"{what} {network}, which is not among the networks.")
    return net


def gateway_addresses(n: FwNetwork) -> tuple[str, ...]:
    """The gateway's addresses on its bridge: IPv4, IPv6 and the bridge's link-local."""
    out = [str(n.gateway)]
    if n.gateway6 is not None:
        out.append(str(n.gateway6))
    if n.mac is not None:
        out.append(eui64_ll(n.mac))
    return tuple(out)


def network_elems(n: FwNetwork) -> list[tuple[str, str]]:
    """The gateway's identity on a guarded network, which no port may take."""
    out = [("claimed6" if ":" in a else "claimed4", a) for a in gateway_addresses(n)]
    if n.mac is not None:
        out.append(("taken", _mac(n.mac)))
    return out


def _network_inet_elems(n: FwNetwork) -> dict[str, list]:
    """The inet elements a network brings by itself (its pairs with the networks it is routed
    with come from :func:`_pairs`)."""
    el: dict[str, list] = {"bridges": [n.name], "pass": [_cat(n.name, n.name)],
                           "gw4": [_cat(n.name, str(n.gateway))],
                           "intra4": [_cat(_prefix(n.subnet), _prefix(n.subnet))]}
    if n.mode == "nat":
        el["nat_out"] = [n.name]
        el["masq4"] = [_prefix(n.subnet)]
    if n.mode == "nat" or n.allow_host:
        el["host_ok"] = [n.name]
    if n.subnet6 is not None:
        el["gw6"] = [_cat(n.name, str(n.gateway6))]
        el["intra6"] = [_cat(_prefix(n.subnet6), _prefix(n.subnet6))]
        if n.mode == "nat" and n.subnet6.subnet_of(ULA):
            el["masq6"] = [_prefix(n.subnet6)]
    return el


def _pairs(n: FwNetwork, others: Iterable[FwNetwork]) -> list:
    """The `pass` pairs between `n` and the running networks it is routed with, whichever
    of the two names the other."""
    out: list = []
    for o in sorted(others, key=lambda o: o.name):
        if o.name != n.name and (o.name in n.routed_with or n.name in o.routed_with):
            for pair in (_cat(n.name, o.name), _cat(o.name, n.name)):
                if pair not in out:
                    out.append(pair)
    return out


def incremental(n: FwNetwork) -> bool:
    """Whether a network can join or leave the running ruleset as elements only: an overlay
    brings rules of its own (from_underlay), so it takes the whole ruleset."""
    return n.overlay_port is None


def render_network_change(n: FwNetwork, others: Iterable[FwNetwork], *, add: bool) -> dict:
    """ONE transaction that adds (or deletes) the inet elements of one network joining (or
    leaving) the running ones (`others`): its own, and its pairs with the networks it is
    routed with. Only its elements move, so its cost does not grow with the number of
    networks, forwards or ports; the result is what :func:`render_ruleset` makes for the
    networks with (or without) it. Its forwards, ports and gateway identity are separate
    element changes (:func:`render_forward_add`, :func:`render_port_update`,
    :func:`network_elems`)."""
    validate_network(n)
    if not incremental(n):
        raise ValueError(f"The network {n.name} has an overlay: load the whole ruleset.")
    el = _network_inet_elems(n)
    pairs = _pairs(n, others)
    if pairs:
        el["pass"] = el["pass"] + pairs
    op = "add" if add else "delete"
    return {"nftables": [_elements(op, "inet", name, _sorted(elems))
                         for name, elems in sorted(el.items())]}


def render_elements(op: str, pairs: Iterable[tuple[str, Any]]) -> dict:
    """Add or delete bridge-table elements (a gateway's identity: :func:`network_elems`)."""
    return {"nftables": _group(pairs, op)}


def render_ruleset(networks: Iterable[FwNetwork], forwards: Iterable[FwForward] = (),
                   ports: Iterable[FwPort] = (), *, fresh: bool = False,
                   counters: dict[str, dict[str, int]] | None = None) -> dict:
    """ONE transaction that (re)creates both tables completely: add table, flush table (or,
    with ``fresh``, delete and add it again), then sets and maps (each flushed), chains, rules
    and elements. The bridge table (the port guards, with one pair of chains per port) is
    always made anew, so no chain of a port that is gone survives; ``counters`` (what
    :func:`parse_spoof_counters` read before) carries the ports' drop counts over. Applying it
    twice gives the same ruleset; other tables are never named."""
    nets = sorted(networks, key=lambda n: n.name)
    by_name: dict[str, FwNetwork] = {}
    for n in nets:
        validate_network(n)
        if n.name in by_name:
            raise ValueError(f"The network {n.name} is listed twice.")
        by_name[n.name] = n
    fwds = list(forwards)
    prts = sorted(ports, key=lambda p: p.ifname)

    el: dict[str, list] = {}

    def put(name: str, elem: Any) -> None:
        el.setdefault(name, []).append(elem)

    for n in nets:
        for name, elems in _network_inet_elems(n).items():
            for e in elems:
                put(name, e)
        for r in n.routed_with:
            if r in by_name and r != n.name:
                put("pass", _cat(n.name, r))
                put("pass", _cat(r, n.name))
    for port in sorted({n.overlay_port for n in nets if n.overlay_port is not None}):
        put("vx_ports", port)

    seen_keys: set[str] = set()
    for f in fwds:
        validate_forward(f)
        net = _among(by_name, f.network, f"The forward to {f.target} is for")
        target = ipaddress.ip_address(f.target)
        subnet = net.subnet if f.family == 4 else net.subnet6
        if subnet is None or target not in subnet:
            raise ValueError(f"The forward target {target} is not in the subnet of {net.name}.")
        for name, elems in _forward_elems(f).items():
            for e in elems:
                if name.endswith("_ip"):
                    k = name + repr(e[0])
                    if k in seen_keys:
                        raise ValueError(f"Two forwards use {f.proto} port {e[0]['concat'][-1]}"
                                         f" the same way ({name}).")
                    seen_keys.add(k)
                put(name, e)

    bridge_el: dict[str, list] = {}

    def bput(name: str, elem: Any) -> None:
        if elem not in bridge_el.setdefault(name, []):
            bridge_el[name].append(elem)

    for n in nets:  # the gateway's identity is taken on every guarded network
        if n.spoof_protection:
            for name, e in network_elems(n):
                bput(name, e)
    guarded: list[str] = []
    port_cmds: list[dict] = []
    for p in prts:
        validate_port(p)
        pnet: FwNetwork | None
        if p.bridged:  # a bridged network is not among ours; the engine says if it protects
            pnet = None
        else:
            pnet = _among(by_name, p.network, f"The port {p.ifname} is on")
            if not pnet.spoof_protection:
                continue
        if p.ifname in guarded:
            raise ValueError(f"The port {p.ifname} is listed twice.")
        guarded.append(p.ifname)
        for name, e in _port_elems(p):
            bput(name, e)
        port_cmds += _port_chain_cmds(p, gateway_addresses(pnet) if pnet else (), flush=False)

    cmds: list[dict] = []
    cmds += _table_head("inet", fresh)
    for s in _inet_sets():
        cmds += _with_flush("inet", s, fresh)
    cmds += _inet_chains_and_rules()
    cmds += _overlay_rules(nets)
    for name in sorted(el):
        cmds.append(_elements("add", "inet", name, _sorted(el[name])))
    cmds += _table_head("bridge", True)
    cmds += _bridge_sets()
    counts = counters or {}
    for ifname in guarded:
        c = counts.get(ifname, {})
        cmds.append({"add": {"counter": _counter_obj(ifname, c.get("packets", 0),
                                                     c.get("bytes", 0))}})
    cmds += _bridge_chains_and_rules()
    cmds += port_cmds
    for name in sorted(bridge_el):
        cmds.append(_elements("add", "bridge", name, _sorted(bridge_el[name])))
    return {"nftables": cmds}


def render_delete_all() -> dict:
    """Delete both tables (uninstall, tests); succeeds when they do not exist."""
    cmds: list[dict] = []
    for fam in FAMILIES:
        t = {"family": fam, "name": TABLE}
        cmds += [{"add": {"table": t}}, {"delete": {"table": dict(t)}}]
    return {"nftables": cmds}


def render_flowtable_probe() -> dict:
    """A throwaway flowtable in our own table, for :func:`kernel_supports_flowtables` (run in
    dry-run mode: the kernel checks it and the transaction is aborted)."""
    return {"nftables": [
        {"add": {"table": {"family": "inet", "name": TABLE}}},
        {"add": {"flowtable": _obj("inet", name="probe_flowtable", hook="ingress", prio=0,
                                   dev=["lo"])}},
    ]}


# --- scope check ------------------------------------------------------------------------------

_VERBS = ("add", "create", "insert", "replace", "delete", "flush", "reset", "list", "rename")


def check_scope(cmd: dict) -> None:
    """Raise ValueError unless every command of ``cmd`` names one of our two tables."""
    if not isinstance(cmd, dict) or set(cmd) != {"nftables"} or not isinstance(
            cmd["nftables"], list):
        raise ValueError("An nftables command is {'nftables': [...]}.")
    for i, c in enumerate(cmd["nftables"]):
        if not isinstance(c, dict) or len(c) != 1:
            raise ValueError(f"Command {i} is not one verb.")
        (verb, body), = c.items()
        if verb not in _VERBS or not isinstance(body, dict) or len(body) != 1:
            raise ValueError(f"Command {i}: unknown verb or object {verb!r}.")
        (kind, obj), = body.items()
        if kind == "ruleset" or not isinstance(obj, dict):
            raise ValueError(f"Command {i} ({verb} {kind}) is not about one of our tables.")
        if obj.get("family") not in FAMILIES:
            raise ValueError(f"Command {i} ({verb} {kind}) names family {obj.get('family')!r}.")
        table = obj.get("name") if kind == "table" else obj.get("table")
        if table != TABLE:
            raise ValueError(f"Command {i} ({verb} {kind}) names table {table!r}.")


# --- apply (the only I/O) ---------------------------------------------------------------------


def _context():
    import nftables  # python3-nftables; imported here so that rendering needs no libnftables

    nft = nftables.Nftables()
    nft.set_json_output(True)
    return nft


def apply(cmd: dict, nft=None) -> None:
    """Run ``cmd`` as one transaction; RuntimeError with nft's error text on failure."""
    check_scope(cmd)
    if not cmd["nftables"]:
        return
    nft = nft or _context()
    rc, _out, err = nft.json_cmd(cmd)
    if rc != 0:
        raise RuntimeError((err or "").strip() or f"libnftables failed ({rc}).")


def query(cmd: dict, nft=None) -> dict:
    """Run a read-only ``list`` command and return the parsed JSON (no scope check: reading
    other tables is allowed, e.g. for :func:`foreign_drop_chains`)."""
    for c in cmd.get("nftables", []):
        if set(c) != {"list"}:
            raise ValueError("query() only lists; use apply() to change.")
    nft = nft or _context()
    rc, out, err = nft.json_cmd(cmd)
    if rc != 0:
        raise RuntimeError((err or "").strip() or f"libnftables failed ({rc}).")
    return out or {"nftables": []}


def kernel_supports_flowtables(nft=None) -> bool:
    """Whether the kernel accepts a flowtable: a throwaway one in our table, checked by the
    kernel in dry-run mode (the batch is aborted; nothing is created)."""
    return flowtable_probe(nft)[0]


def flowtable_probe(nft=None) -> tuple[bool, str]:
    nft = nft or _context()
    was = nft.get_dry_run()
    nft.set_dry_run(True)
    try:
        rc, _out, err = nft.json_cmd(render_flowtable_probe())
    finally:
        nft.set_dry_run(was)
    return rc == 0, (err or "").strip()


# --- reading other tables (never changing them) -----------------------------------------------


def render_chains_query() -> dict:
    return {"nftables": [{"list": {"chains": None}}]}


def foreign_drop_chains(listing: dict) -> list[str]:
    """Base chains of *other* tables whose policy drop on the forward or input hook also
    drops our bridges' traffic (give it the result of ``render_chains_query``)."""
    out = []
    for o in (listing or {}).get("nftables", []):
        ch = o.get("chain")
        if not ch or ch.get("table") == TABLE and ch.get("family") in FAMILIES:
            continue
        if ch.get("hook") in ("forward", "input") and ch.get("policy") == "drop":
            out.append(f"{ch.get('family')} {ch.get('table')} {ch.get('name')} "
                       f"(hook {ch['hook']}, policy drop)")
    return out


# --- Docker's DOCKER-USER hook (the one place outside our tables) ------------------------------
# Docker sets `policy drop` on the forward hook of table ip (and ip6) `filter`, and a drop in
# any base chain drops a packet whatever our tables say. Docker provides the DOCKER-USER chain
# for exactly this: rules there run before its own. vnetd adds accept rules for its bridges
# there, marked with a comment, and replaces only rules carrying that comment. Nothing else
# of Docker's table is read for changing, flushed or edited.

DOCKER_CHAIN = "DOCKER-USER"
DOCKER_MARK = "qemu-vnet"


def docker_user_query(family: str) -> dict:
    return {"nftables": [{"list": {"chain": {"family": family, "table": "filter",
                                             "name": DOCKER_CHAIN}}}]}


def render_docker_user(family: str, listing: dict, bridges: Iterable[str]) -> dict:
    """One transaction: delete our previously added rules (by handle, found by their
    comment) and add an accept pair for each running bridge."""
    cmds: list[dict] = []
    for o in (listing or {}).get("nftables", []):
        r = o.get("rule")
        if r and r.get("chain") == DOCKER_CHAIN and r.get("comment") == DOCKER_MARK:
            cmds.append({"delete": {"rule": {"family": family, "table": "filter",
                                             "chain": DOCKER_CHAIN, "handle": r["handle"]}}})
    for br in sorted(bridges):
        _ifname(br, "bridge")
        for expr in (
            [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": br}},
             {"accept": None}],
            [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": br}},
             {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                        "right": ["established", "related"]}},
             {"accept": None}],
        ):
            cmds.append({"insert": {"rule": {"family": family, "table": "filter",
                                             "chain": DOCKER_CHAIN, "expr": expr,
                                             "comment": DOCKER_MARK}}})
    return {"nftables": cmds}


def apply_docker_user(cmd: dict, nft=None) -> None:
    """Apply a render_docker_user() transaction: only rules of the DOCKER-USER chain."""
    for c in cmd.get("nftables", []):
        (verb, body), = c.items()
        rule = body.get("rule", {})
        if verb not in ("insert", "delete") or set(body) != {"rule"} or (
                rule.get("table"), rule.get("chain")) != ("filter", DOCKER_CHAIN):
            raise ValueError("apply_docker_user() only touches rules of DOCKER-USER.")
    if not cmd["nftables"]:
        return
    nft = nft or _context()
    rc, _out, err = nft.json_cmd(cmd)
    if rc != 0:
        raise RuntimeError((err or "").strip() or f"libnftables failed ({rc}).")
