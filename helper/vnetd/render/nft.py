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
from_bridge    (regular)                               established/related; a new connection
                                                       beyond ``CT_PER_GUEST`` of its source
                                                       address (meters ``ct4_from_bridge``,
                                                       ``ct6_from_bridge``): drop;
                                                       a DNS connection over TCP to the
                                                       gateway beyond ``DNS_TCP_PER_GUEST``
                                                       of its source address
                                                       (``dns4_from_bridge``,
                                                       ``dns6_from_bridge``): reset;
                                                       DHCP (udp 67, 547),
                                                       DNS (udp/tcp 53) and ping to the bridge's
                                                       own gateway (``@gw4``/``@gw6``), ICMPv6
                                                       ND/RS/MLD; ``iifname @host_ok accept``;
                                                       ``counter drop``
forward        filter forward, 0 (filter)              not ours (``iifname != @bridges oifname !=
                                                       @bridges``): return; established/related
                                                       accept; from a bridge, a new connection
                                                       beyond ``CT_PER_GUEST``: drop;
                                                       ``ct status dnat`` accept; to the
                                                       gateway's MAC, back out of the same
                                                       bridge, within its subnet
                                                       (``@routed_back``, ``@intra4/6``): drop;
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
(ULA ``subnet6`` of nat networks; a global prefix is routed without NAT), ``routed_back``
(``ifname . ifname . ether_addr``: each network with itself and its gateway's MAC); the meters
``ct4_<chain>``/``ct6_<chain>`` (a connection count per guest address) are declared by their
rules.

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

``table bridge qemu_vnet``: the guest ports' guard, default-deny in both directions. No port
has a chain or a named object of its own: fixed chains look a port up in sets keyed by its
interface name, so a port's guard is set elements only (see the ports section below).
Chain ``prerouting`` (filter prerouting, -200) drops every frame from a ``@pending`` tap (a
spare made ahead of an attach, until the port's guard replaces that) and sends frames from
``@guarded`` ports (the guest taps of networks with ``spoof_protection``) to ``guard_in``;
``forward`` and ``output`` drop frames to a ``@pending`` tap and send frames to guarded ports
to ``guard_out``. ``guard_in`` first jumps to ``from_any_port`` (what no guest
may send: multicast source MACs, anything but IPv4/ARP/IPv6 (VLAN tags, STP), DHCP and DHCPv6
server replies, router advertisements and redirects, ARP for other hardware), drops DHCP and
DHCPv6 client messages beyond ``DHCP_RATE`` a second (a limiter per port in the dynamic set
``dhcp_rate``; ten times that for a VDE segment), sends VDE
segments (``@seg``) to ``seg_in`` (no identity a port or gateway holds: ``@taken``,
``@claimed4``, ``@claimed6``, ND targets in ``@claimed6_raw``, DHCP client hardware addresses
in ``@taken_raw``), then drops: from a
``@locked`` port, a source MAC, ARP sender MAC or DHCP client hardware address that is not its
own (``port_mac``, ``port_mac_raw``); from an ``@unlocked`` (learning) port, a MAC that is
``@taken``; ARP and IPv4 from an address that is not the port's (``@v4_bound``:
``port_ip4``; an overlay member's ``@v4_sub``: inside ``port_sub4`` and not ``@claimed4``;
neither: only DHCP from 0.0.0.0 and ARP probes); IPv6 from an address that is not the port's
(``port_ip6``: its MAC's link-local and bound addresses), ``::`` beyond DAD and MLD, NA and
DAD for a target that is not its own (``port_t6``), and (``nd_options``) ND messages with more
than one option or a link-layer option that is not its MAC. A bridged network's ports
(``@bridged``) are held to their MAC only. ``guard_out`` drops unicast to a ``@locked`` port
for any other MAC, and to other ports unicast for an identity that is ``@taken``. Every drop
first counts into the port's element of ``spoof`` (a dynamic set with a counter).

Reading the counters: apply :func:`render_counters_query` with :func:`query` and give the
result to :func:`parse_spoof_counters` (``list set bridge qemu_vnet spoof``).

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
* Before every :func:`render_ruleset`, :func:`prepare_bridge` (it makes the sets libnftables
  declares only in text, and returns the drop counts to render with).
* After an upgrade that changes a set's type or a chain's hook, ``render_ruleset`` with the
  default in-place rebuild fails: rebuild with ``fresh=True`` (the inet table is deleted and
  made again in the same transaction; ``prepare_bridge(fresh=True)`` does the same to the
  bridge table, in a transaction before, which resets the drop counts).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Sequence
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
# No port has a chain, a rule or a named object of its own: the guard is one fixed set of
# chains whose rules look a port's identity up in sets keyed by its interface name. Adding,
# changing or removing a port changes set elements only, and libnftables reads every chain
# and every named object of every table before each transaction (about 0.6 and 1 us each)
# but not the elements of a hash set, so a port's change costs the same with 1 or 10,000
# ports (and the kernel never re-validates jumps, which it does for every chain a verdict map
# element names).
#
# Five sets compare raw header fields with a port's MAC or addresses (the DHCP client
# hardware address, an ND target, an ND link-layer option): their keys are declared with
# ``typeof`` over a raw payload, which libnftables 1.0.6 reads only in its text syntax, so
# they are made by :data:`BRIDGE_TEXT_SETS` (text) before the JSON ruleset; so is ``spoof``,
# the dynamic set whose elements count each port's drops.

RAW_SETS = ("port_mac_raw", "port_t6", "claimed6_raw", "taken_raw", "spoof")


def eui64_ll(mac: str) -> str:
    """The EUI-64 link-local IPv6 address of a MAC (what the kernel's default gives a guest)."""
    b = bytes.fromhex(_mac(mac).replace(":", ""))
    iid = bytes([b[0] ^ 2, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]])
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + iid))


def eui64_in(prefix: ipaddress.IPv6Network, mac: str) -> str:
    """The SLAAC address (EUI-64) of a MAC in a /64 prefix."""
    ll = int(ipaddress.IPv6Address(eui64_ll(mac)))
    return str(ipaddress.IPv6Address(int(prefix.network_address) | (ll & ((1 << 64) - 1))))


def port_allowed6(p: FwPort) -> list[str]:
    """The IPv6 sources a strict port may use: its MAC's link-local address and its bound
    addresses (none while its MAC is unknown)."""
    if p.mac is None:
        return []
    return sorted({eui64_ll(p.mac), *(str(ipaddress.IPv6Address(a)) for a in p.ipv6)},
                  key=lambda a: int(ipaddress.IPv6Address(a)))


def _int128(addr: str) -> str:
    return f"0x{int(ipaddress.IPv6Address(addr)):032x}"


def _mac_int(mac: str) -> str:
    return "0x" + _mac(mac).replace(":", "")


def taken(mac: str) -> list[tuple[str, Any]]:
    """A MAC no other port may take: as a source (``taken``) and as the client hardware
    address of a DHCP message from a segment (``taken_raw``)."""
    return [("taken", mac), ("taken_raw", _mac_int(mac))]


def claimed6(addr: str) -> list[tuple[str, Any]]:
    """An IPv6 address no segment may take: as a source (``claimed6``) and as the target of
    an ND message (``claimed6_raw``)."""
    return [("claimed6", addr), ("claimed6_raw", _int128(addr))]


def _port_elems(p: FwPort) -> list[tuple[str, Any]]:
    """(set name, element) pairs of one guarded port: all of its guard."""
    validate_port(p)
    i = p.ifname
    out: list[tuple[str, Any]] = [("guarded", i), ("spoof", i)]
    if p.segment:
        return out + [("seg", i)]
    if p.bridged:
        out.append(("bridged", i))
    if p.mac is None:
        out.append(("unlocked", i))
    else:
        mac = _mac(p.mac)
        out += [("locked", i), *taken(mac), ("port_mac", _cat(i, mac)),
                ("port_mac_raw", _cat(i, _mac_int(mac)))]
    if p.bridged:  # its addresses are the LAN's; its link-local is still its own
        return out + [x for a in port_allowed6(p) for x in claimed6(a)]
    if p.ipv4 is not None:
        out.append(("v4_bound", i))
        for a in (p.ipv4, *p.ipv4_also):
            a = str(ipaddress.ip_address(a))
            out += [("port_ip4", _cat(i, a)), ("claimed4", a)]
    elif p.unbound_in is not None:
        out += [("v4_sub", i), ("port_sub4", _cat(i, _prefix(ipaddress.IPv4Network(p.unbound_in))))]
    for a in port_allowed6(p):
        out += [("port_ip6", _cat(i, a)), ("port_t6", _cat(i, _int128(a))), *claimed6(a)]
    return out


ICMP6 = _pl("icmpv6", "type")
NS, NA = "nd-neighbor-solicit", "nd-neighbor-advert"
IP6_LEN = _pl("ip6", "length")
UNSPEC6 = "::"
NS_NA = {"range": [NS, NA]}  # types 135 and 136


def _th(offset_bytes: int, len_bytes: int) -> dict:
    return {"payload": {"base": "th", "offset": offset_bytes * 8, "len": len_bytes * 8}}


def _none_of(left: Any, values: Iterable[Any]) -> list[dict]:
    """``left`` is none of ``values``, as one inequality each (ANDed in a rule)."""
    return [_match(left, v, "!=") for v in values]


def _is(key: dict, set_: str) -> dict:
    return _match(key, f"@{set_}")


def _is_not(key: dict, set_: str) -> dict:
    return _match(key, f"@{set_}", "!=")


COUNT_DROP_IN = [{"set": {"op": "update", "elem": IIF, "set": "@spoof"}}, DROP]
COUNT_DROP_OUT = [{"set": {"op": "update", "elem": OIF, "set": "@spoof"}}, DROP]
DHCP_CHADDR = _th(8 + 28, 6)  # a BOOTP message's client hardware address
ND_TARGET = _th(8, 16)
ND_OPTION_MAC = _th(26, 6)  # the link-layer address of an ND message's first option
UNICAST_DST = _match({"&": [_pl("ether", "daddr"), "01:00:00:00:00:00"]}, "00:00:00:00:00:00")

# the sets that hold a port's guard, by interface name (JSON; the raw ones are text, below)
PORT_SETS: tuple[tuple[str, str | list[str], tuple[str, ...]], ...] = (
    ("guarded", "ifname", ()),  # every guarded port
    ("pending", "ifname", ()),  # a spare tap made ahead of an attach: nothing in or out
    ("seg", "ifname", ()),  # many guests behind one port (a VDE switch)
    ("locked", "ifname", ()),  # its MAC is known
    ("unlocked", "ifname", ()),  # learning: its first unicast source locks it
    ("bridged", "ifname", ()),  # on a bridged network: its MAC only
    ("v4_bound", "ifname", ()),  # an IPv4 address is bound
    ("v4_sub", "ifname", ()),  # any free address of a subnet (an overlay member)
    ("port_mac", ["ifname", "ether_addr"], ()),
    ("port_ip4", ["ifname", "ipv4_addr"], ()),
    ("port_sub4", ["ifname", "ipv4_addr"], ("interval",)),
    ("port_ip6", ["ifname", "ipv6_addr"], ()),
    # host-wide: the identities ports and gateways hold, which nobody else may take
    ("taken", "ether_addr", ()),
    ("claimed4", "ipv4_addr", ()),
    ("claimed6", "ipv6_addr", ()),
)

# made in text (see above); ``add`` of a set that exists as declared changes nothing
BRIDGE_TEXT_SETS = f"""\
add table bridge {TABLE}
add set bridge {TABLE} port_mac_raw {{ typeof iifname . @th,288,48; }}
add set bridge {TABLE} port_t6 {{ typeof iifname . @th,64,128; }}
add set bridge {TABLE} claimed6_raw {{ typeof @th,64,128; }}
add set bridge {TABLE} taken_raw {{ typeof @th,288,48; }}
add set bridge {TABLE} spoof {{ type ifname; size 1048576; flags dynamic; counter; }}
add set bridge {TABLE} dhcp_rate {{ type ifname; size 1048576; flags dynamic,timeout; \
timeout 1m; }}
add set bridge {TABLE} rs_rate {{ type ifname; size 1048576; flags dynamic,timeout; \
timeout 1m; }}
"""

# DHCP and DHCPv6 client messages a port may send: DHCP_RATE a second, DHCP_BURST at once
# (a VDE segment, many guests behind one port, ten times that). A client sends a handful at
# boot and one per renewal; a guest sending more costs the server, and ISC dhcpd writes one
# lease record per answer (its file is rewritten once an hour at most, and vnetd reads it)
DHCP_RATE, DHCP_BURST = 5, 20
# router solicitations likewise (a host sends three at most when its link comes up; each
# makes dnsmasq send a router advertisement to the whole network)
RS_RATE, RS_BURST = 2, 10


# each element set's key fields, for writing its elements without libnftables
# (kernel/nftnl.py): the JSON-made sets as declared (but the interval one), the text-made
# ones as their ``typeof`` reads (@th,288,48: 48 raw bits; @th,64,128: 128)
SET_FIELDS: dict[str, tuple[str, ...]] = {
    **{name: tuple([type_] if isinstance(type_, str) else type_)
       for name, type_, flags in PORT_SETS if "interval" not in flags},
    "port_mac_raw": ("ifname", "raw48"),
    "port_t6": ("ifname", "raw128"),
    "claimed6_raw": ("raw128",),
    "taken_raw": ("raw48",),
    "spoof": ("ifname",),
}


def _rate_over(name: str, rate: int, burst: int) -> dict:
    """True for a frame beyond `rate` a second (`burst` at once) from its port: a limiter
    per port in the dynamic set `name`, which forgets a port a minute after its last one."""
    return {"set": {"op": "update", "elem": IIF, "set": f"@{name}",
                    "stmt": [{"limit": {"rate": rate, "burst": burst, "per": "second",
                                        "inv": True}}]}}


def _guard_rules() -> list[dict]:
    """The chains every guarded port goes through, in order (see the module text)."""
    b = "bridge"

    def r(chain: str, *expr: dict, comment: str) -> dict:
        return _rule(b, chain, *expr, *COUNT_DROP_IN, comment=comment)

    g, seg, nd = "guard_in", "seg_in", "nd_options"
    arp_ip, ip_src, ip6_src = _pl("arp", "saddr ip"), _pl("ip", "saddr"), _pl("ip6", "saddr")
    locked, unlocked = _is(IIF, "locked"), _is(IIF, "unlocked")
    no_v4 = [_is_not(IIF, "v4_bound"), _is_not(IIF, "v4_sub")]
    return [
        _rule(b, g, _jump("from_any_port")),
        *[_rule(b, g, *match, _match(_pl("udp", "dport"), {"set": [67, 547]}),
                _rate_over("dhcp_rate", DHCP_RATE * k, DHCP_BURST * k), *COUNT_DROP_IN,
                comment="DHCP faster than a client asks")
          for match, k in (([_is(IIF, "seg")], 10), ([_is_not(IIF, "seg")], 1))],
        *[_rule(b, g, *match, _match(ICMP6, "nd-router-solicit"),
                _rate_over("rs_rate", RS_RATE * k, RS_BURST * k), *COUNT_DROP_IN,
                comment="router solicitations faster than a host asks")
          for match, k in (([_is(IIF, "seg")], 10), ([_is_not(IIF, "seg")], 1))],
        _rule(b, g, _is(IIF, "seg"), {"goto": {"target": seg}}),
        # the MAC: a locked port's own, a learning port's any that is not taken
        r(g, locked, _is_not(_cat(IIF, _pl("ether", "saddr")), "port_mac"),
          comment="source MAC"),
        r(g, locked, _is_not(_cat(IIF, _pl("arp", "saddr ether")), "port_mac"),
          comment="ARP sender MAC"),
        r(g, locked, _match(_pl("udp", "dport"), 67),
          _is_not(_cat(IIF, DHCP_CHADDR), "port_mac_raw"), comment="DHCP client hardware address"),
        r(g, unlocked, _is(_pl("ether", "saddr"), "taken"), comment="MAC of a port or the gateway"),
        r(g, unlocked, _is(_pl("arp", "saddr ether"), "taken"),
          comment="ARP sender MAC of a port or the gateway"),
        # a bridged network's port: its MAC only (its addresses come from the LAN)
        _rule(b, g, _is(IIF, "bridged"), locked, _jump(nd)),
        _rule(b, g, _is(IIF, "bridged"), RETURN),
        # IPv4 and ARP: until an address is bound only DHCP client traffic and ARP probes
        r(g, _is(IIF, "v4_bound"), _match(arp_ip, "0.0.0.0", "!="),
          _is_not(_cat(IIF, arp_ip), "port_ip4"), comment="ARP sender IP"),
        r(g, _is(IIF, "v4_sub"), _match(arp_ip, "0.0.0.0", "!="),
          _is_not(_cat(IIF, arp_ip), "port_sub4"), comment="ARP sender IP outside the subnet"),
        r(g, _is(IIF, "v4_sub"), _is(arp_ip, "claimed4"), comment="ARP for an address held here"),
        r(g, *no_v4, _match(arp_ip, "0.0.0.0", "!="), comment="ARP before an address"),
        _rule(b, g, _match(ip_src, "0.0.0.0"), _match(_pl("udp", "sport"), 68),
              _match(_pl("udp", "dport"), 67), RETURN, comment="DHCP client without an address"),
        r(g, _is(IIF, "v4_bound"), _is_not(_cat(IIF, ip_src), "port_ip4"),
          comment="source IPv4"),
        r(g, _is(IIF, "v4_sub"), _match(ip_src, "0.0.0.0", "!="),
          _is_not(_cat(IIF, ip_src), "port_sub4"), comment="source IPv4 outside the subnet"),
        r(g, _is(IIF, "v4_sub"), _is(ip_src, "claimed4"), comment="source IPv4 held here"),
        r(g, *no_v4, _match(_pl("ether", "type"), "ip"), comment="IPv4 before an address"),
        # IPv6: the port's link-local and bound addresses (none while its MAC is unknown);
        # '::' only for DAD and MLD; ND only for its own addresses
        r(g, _match(ip6_src, UNSPEC6, "!="), _is_not(_cat(IIF, ip6_src), "port_ip6"),
          comment="source IPv6"),
        r(g, _match(ip6_src, UNSPEC6), _match(L4, "ipv6-icmp", "!="),
          comment="unspecified source beyond ICMPv6"),
        r(g, _match(ip6_src, UNSPEC6),
          *_none_of(ICMP6, [NS, "mld-listener-report", "mld2-listener-report"]),
          comment="unspecified source beyond DAD and MLD"),
        r(g, unlocked, _match(ICMP6, NS_NA), *_none_of(IP6_LEN, [24, 32]),
          comment="neighbour discovery with unexpected options"),
        r(g, _match(ICMP6, NA), _is_not(_cat(IIF, ND_TARGET), "port_t6"), comment="NA target"),
        r(g, _match(ip6_src, UNSPEC6), _match(ICMP6, NS),
          _is_not(_cat(IIF, ND_TARGET), "port_t6"), comment="DAD target"),
        _rule(b, g, locked, _jump(nd)),
        # neighbour solicitations and advertisements of a locked port carry at most one
        # option, and a link-layer address option carries the port's MAC
        r(nd, _match(ICMP6, NS_NA), *_none_of(IP6_LEN, [24, 32]),
          comment="neighbour discovery with unexpected options"),
        r(nd, _match(ICMP6, NA), _match(IP6_LEN, 32), _match(_th(24, 2), "0x0201", "!="),
          comment="NA option"),
        r(nd, _match(ICMP6, NA), _match(IP6_LEN, 32),
          _is_not(_cat(IIF, ND_OPTION_MAC), "port_mac_raw"),
          comment="NA target link-layer address"),
        r(nd, _match(ICMP6, NS), _match(IP6_LEN, 32), *_none_of(_th(24, 1), [1, 14]),
          comment="NS option"),
        r(nd, _match(ICMP6, NS), _match(IP6_LEN, 32), _match(_th(24, 2), "0x0101"),
          _is_not(_cat(IIF, ND_OPTION_MAC), "port_mac_raw"),
          comment="NS source link-layer address"),
        # many guests behind one port (a VDE switch): none may take an identity vnetd gave to
        # a port or a gateway, nor answer for one (asking is fine)
        r(seg, _is(_pl("ether", "saddr"), "taken"), comment="MAC of a port or the gateway"),
        r(seg, _is(_pl("arp", "saddr ether"), "taken"),
          comment="ARP sender MAC of a port or the gateway"),
        r(seg, _is(arp_ip, "claimed4"), comment="ARP for an address of a port or the gateway"),
        # a DHCP server keys leases by the client hardware address: a release, decline or
        # request in another VM's name would end or take its lease
        r(seg, _match(_pl("udp", "dport"), 67), _is(DHCP_CHADDR, "taken_raw"),
          comment="DHCP in the name of a port or the gateway"),
        r(seg, _is(ip_src, "claimed4"), comment="IPv4 source of a port or the gateway"),
        r(seg, _is(ip6_src, "claimed6"), comment="IPv6 source of a port or the gateway"),
        r(seg, _match(ICMP6, NA), _is(ND_TARGET, "claimed6_raw"),
          comment="NA for an address of a port or the gateway"),
        r(seg, _match(ip6_src, UNSPEC6), _match(ICMP6, NS), _is(ND_TARGET, "claimed6_raw"),
          comment="DAD for an address of a port or the gateway"),
        # frames to a port: unicast only for its own MAC (or, while it has none, for no
        # identity another port or the gateway holds)
        _rule(b, "guard_out", _is(OIF, "locked"), UNICAST_DST,
              _is_not(_cat(OIF, _pl("ether", "daddr")), "port_mac"), *COUNT_DROP_OUT,
              comment="unicast for another MAC"),
        _rule(b, "guard_out", _is_not(OIF, "locked"), UNICAST_DST,
              _is(_pl("ether", "daddr"), "taken"), *COUNT_DROP_OUT,
              comment="unicast for another port"),
    ]


def _group(pairs: Iterable[tuple[str, Any]], op: str) -> list[dict]:
    by_set: dict[str, list] = {}
    for name, elem in pairs:
        if elem not in by_set.setdefault(name, []):
            by_set[name].append(elem)
    return [_elements(op, "bridge", name, elems) for name, elems in by_set.items()]


def render_port_update(port: FwPort, old: FwPort | None, *, spoof_protection: bool = True,
                       keep: frozenset[tuple[str, Any]] = frozenset(),
                       pending: bool = False) -> dict:
    """Add or replace one port's guard in one transaction of set elements: those of ``old``
    (what was applied before; None: nothing) that ``port`` no longer has are deleted, those of
    ``port`` added; its drop count stays. ``spoof_protection`` is the port's network's
    setting. Elements in ``keep`` (the identities other ports or gateways still hold: those
    sets are host-wide) are never deleted."""
    if not spoof_protection:
        return render_port_remove(old, keep=keep) if old is not None else {"nftables": []}
    if old is not None and old.ifname != port.ifname:
        raise ValueError(f"A port update cannot rename {old.ifname} to {port.ifname}.")
    new = _port_elems(port)
    cmds: list[dict] = []
    if old is not None:
        cmds += _group([pe for pe in _port_elems(old) if pe not in new and _keyed(pe) not in keep],
                       "delete")
    cmds += _group(new, "add")  # adding an element that is there changes nothing
    if pending:  # a spare tap becomes this port: its guard and its release at once
        cmds += render_pending("delete", [port.ifname])["nftables"]
    return {"nftables": cmds}


def render_pending(op: str, names: Iterable[str]) -> dict:
    """Spare taps in (``add``) or out (``delete``) of ``pending``: nothing passes to or from
    a tap made ahead of an attach until its port's guard replaces this."""
    if op not in ("add", "delete"):
        raise ValueError(f"Spare taps are added or deleted, not {op!r}.")
    elems = sorted({_ifname(n, "Spare tap") for n in names})
    return {"nftables": [_elements(op, "bridge", "pending", elems)] if elems else []}


def _keyed(pe: tuple[str, Any]) -> tuple[str, Any]:
    return pe[0], json.dumps(pe[1], sort_keys=True) if not isinstance(pe[1], str) else pe[1]


SHARED = ("taken", "taken_raw", "claimed4", "claimed6", "claimed6_raw")


def shared_elems(p: FwPort) -> set[tuple[str, Any]]:
    """The host-wide identity elements of a port (what ``keep`` is made of)."""
    return {_keyed(pe) for pe in _port_elems(p) if pe[0] in SHARED}


def render_port_remove(port: FwPort, *, spoof_protection: bool = True,
                       keep: frozenset[tuple[str, Any]] = frozenset()) -> dict:
    """Delete one port's guard (as it was applied): its elements, but those in ``keep``."""
    if not spoof_protection:
        return {"nftables": []}
    return {"nftables": _group([pe for pe in _port_elems(port) if _keyed(pe) not in keep],
                               "delete")}


def render_counters_query() -> dict:
    """``list set bridge qemu_vnet spoof``: feed :func:`query`'s result to
    :func:`parse_spoof_counters`."""
    return {"nftables": [{"list": {"set": _obj("bridge", name="spoof")}}]}


_COUNTER_TEXT = re.compile(r'"([^"]+)" counter packets (\d+) bytes (\d+)')


def get_spoof_counters(ifnames: Iterable[str], nft=None) -> dict[str, dict[str, int]]:
    """The drop counts of these ports only (``get element``, in text: libnftables 1.0.6
    has no JSON form of it, and answers in text), so that one network's `show` does not read
    every port's; RuntimeError if any of them has no element."""
    names = [_ifname(n, "Port") for n in ifnames]
    if not names:
        return {}
    nft = nft or _context()
    quoted = ", ".join(f'"{n}"' for n in names)
    rc, out, err = nft.cmd(f"get element bridge {TABLE} spoof {{ {quoted} }}")
    if rc != 0:
        raise RuntimeError((err or "").strip() or f"libnftables failed ({rc}).")
    return {m[1]: {"packets": int(m[2]), "bytes": int(m[3])}
            for m in _COUNTER_TEXT.finditer(out or "")}


def parse_spoof_counters(listing: dict) -> dict[str, dict[str, int]]:
    """{ifname: {"packets": n, "bytes": n}} from a listing of the ``spoof`` set."""
    out: dict[str, dict[str, int]] = {}
    for o in (listing or {}).get("nftables", []):
        s = o.get("set")
        if not (s and s.get("family") == "bridge" and s.get("table") == TABLE
                and s.get("name") == "spoof"):
            continue
        for e in s.get("elem", []):
            inner = e.get("elem", {}) if isinstance(e, dict) else {}
            name = inner.get("val") if inner else e
            c = inner.get("counter") or {}
            if isinstance(name, str):
                out[name] = {"packets": c.get("packets", 0), "bytes": c.get("bytes", 0)}
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
        _set_cmd("inet", "routed_back", ["ifname", "ifname", "ether_addr"]),
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


# Connections a guest address may hold through the host (to it, or forwarded): the connection
# tracking table is the host's, one for all (nf_conntrack_max, 65,536 on a small host), and a
# guest opening flows as fast as it can would fill it, and every other guest's new
# connections, and the host's, would be dropped. CT_GUESTS: addresses counted at once.
CT_PER_GUEST = 4096
CT_GUESTS = 65536
NEW = _match({"ct": {"key": "state"}}, "new", "in")
# DNS over TCP to a gateway, per guest address: dnsmasq serves at most 20 TCP connections at
# once and keeps an idle one up to 150 s, so one guest holding 20 stalled TCP DNS for every
# other guest of the host's networks' servers; past this many, a guest's new one is reset
DNS_TCP_PER_GUEST = 4


def _per_guest(f: str, chain: str, name: str, limit: int,
               matches: Callable[[int, str, str], list[dict]], verdict: dict,
               comment: str) -> list[dict]:
    """A rule per family whose meter (``<name>4_<chain>``, ``<name>6_<chain>``: a dynamic
    set that the rule itself declares, libnftables 1.0.6 cannot declare one in JSON) counts
    the connections of each guest source address that `matches` selects (given the family,
    its payload protocol and its unspecified address), which the kernel drops with the
    address's last connection; past `limit`, `verdict`."""
    return [_rule(f, chain, *matches(fam, proto, unspec),
                  {"meter": {"name": f"{name}{fam}_{chain}", "key": _pl(proto, "saddr"),
                             "size": CT_GUESTS,
                             "stmt": {"ct count": {"val": limit, "inv": True}}}},
                  _counter(), verdict, comment=comment)
            for fam, proto, unspec in ((4, "ip", "0.0.0.0"), (6, "ip6", "::"))]


def _ct_limit(f: str, chain: str) -> list[dict]:
    """Connections per guest address through the host (``ct4_<chain>``): past
    CT_PER_GUEST, dropped. A DHCP client without an address is no guest's address: 0.0.0.0
    and :: are not counted, and the guard's DHCP limit bounds them."""
    return _per_guest(f, chain, "ct", CT_PER_GUEST, lambda fam, proto, unspec: [
        _match(IIF, "@bridges"), NEW, _match(_pl(proto, "saddr"), unspec, "!=")],
        DROP, "more connections than a guest may hold")


def _dns_tcp_limit(f: str, chain: str) -> list[dict]:
    """DNS connections over TCP per guest address to its gateway (``dns4_<chain>``;
    ``@gw4``/``@gw6``: our dnsmasq, never a server of the host's own that a bridged
    network's LAN may use): past DNS_TCP_PER_GUEST, a new one is reset (at once, so its
    resolver tries UDP or another server rather than wait)."""
    return _per_guest(f, chain, "dns", DNS_TCP_PER_GUEST, lambda fam, proto, unspec: [
        NEW, _match(_pl("tcp", "dport"), 53), _match(_pl(proto, "saddr"), unspec, "!="),
        _match(_cat(IIF, _pl(proto, "daddr")), f"@gw{fam}")],
        {"reject": {"type": "tcp reset"}}, "more DNS connections over TCP than a guest may hold")


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
    # input: decisions only for traffic arriving on our bridges; VXLAN from a guest (to
    # the gateway, say) never reaches an overlay, whatever it claims to come from
    c.append(_rule(f, "input", _match(IIF, "@bridges"), _match(_pl("udp", "dport"),
                                                                "@vx_ports"),
                   _counter(), DROP, comment="VXLAN from a guest"))
    c.append(_rule(f, "input", _match(IIF, "@bridges"), _jump("from_bridge")))
    # VXLAN to our overlays' ports: from_underlay accepts each VNI from its peers only
    # (rules per network, render_ruleset); anything else to those ports is dropped
    c.append(_rule(f, "input", _match(_pl("udp", "dport"), "@vx_ports"), _jump("from_underlay")))
    c += [
        _rule(f, "from_bridge", est, ACCEPT),
        *_ct_limit(f, "from_bridge"),
        *_dns_tcp_limit(f, "from_bridge"),
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
        *_ct_limit(f, "forward"),
        _rule(f, "forward", dnat, ACCEPT, comment="port forwards"),
        # sent to the gateway from its own subnet for an address of that subnet: a guest's own
        # subnet is on its link, so this is a guest making the host look for addresses nobody
        # holds (one neighbour entry each, in a table all interfaces share: a /64 would fill
        # it). A route through a guest (to addresses beyond its subnet) still passes, and so
        # does what br_netfilter hands over from guest to guest (to another guest's MAC)
        *[_rule(f, "forward", _match(_cat(IIF, OIF, _pl("ether", "daddr")), "@routed_back"),
                _match(_cat(_pl(p, "saddr"), _pl(p, "daddr")), intra), _counter(), DROP,
                comment="routed back into its own network") for p, intra in
          (("ip", "@intra4"), ("ip6", "@intra6"))],
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
    return [_set_cmd("bridge", name, type_, flags=flags) for name, type_, flags in PORT_SETS]


def _bridge_chains_and_rules() -> list[dict]:
    """The hooks, the checks every guarded port shares (from_any_port: default-deny on what
    no guest may send whoever it is) and the guard itself."""
    b = "bridge"
    c = "from_any_port"
    return copy.deepcopy([
        _chain(b, "prerouting", "prerouting", "filter", PRIO_BRIDGE_FILTER),
        _chain(b, "forward", "forward", "filter", PRIO_FILTER),
        _chain(b, "input", "input", "filter", PRIO_FILTER),
        _chain(b, "output", "output", "filter", PRIO_FILTER),
        _chain(b, c),
        _chain(b, "guard_in"),
        _chain(b, "guard_out"),
        _chain(b, "seg_in"),
        _chain(b, "nd_options"),
        # a spare tap (made ahead of an attach, until its holder's guard is in): nothing
        *[_rule(b, hook, _is(key, "pending"), DROP, comment="a spare tap")
          for hook, key in (("prerouting", IIF), ("forward", OIF), ("output", OIF))],
        _rule(b, "prerouting", _is(IIF, "guarded"), _jump("guard_in")),
        # a learning port's DHCP before its MAC is locked: the bridge learns the source MAC
        # from it (prerouting let it pass) but nobody gets it, so its client hardware address
        # is checked from the retransmission on. Not counted as spoofing: every learning
        # port's first DISCOVER meets this (and a flooded frame would count once per port).
        *[_rule(b, hook, _match(IIF, "@unlocked"), _match(_pl("udp", "dport"), 67),
                DROP, comment="DHCP before the MAC is locked")
          for hook in ("forward", "input")],
        _rule(b, "forward", _is(OIF, "guarded"), _jump("guard_out")),
        _rule(b, "output", _is(OIF, "guarded"), _jump("guard_out")),
        # reserved link-local groups (01:80:c2:00:00:0X) that the bridge hands to the host
        # on the port itself, past inet's rules for the bridge: ports forward them (their
        # group_fwd_mask, kernel/links.py) so that the guard sees them; this is the rest
        _rule(b, "input", _is(IIF, "guarded"),
              _match({"&": [_pl("ether", "daddr"), "ff:ff:ff:ff:ff:f0"]}, "01:80:c2:00:00:00"),
              *COUNT_DROP_IN, comment="to a link-local group"),
        _rule(b, c, _match({"&": [_pl("ether", "saddr"), "01:00:00:00:00:00"]},
                           "01:00:00:00:00:00"), *COUNT_DROP_IN, comment="multicast source MAC"),
        _rule(b, c, _match(_pl("ether", "type"), {"set": ["ip", "arp", "ip6"]}, "!="),
              *COUNT_DROP_IN, comment="not IPv4, ARP or IPv6 (VLAN tags, STP, ...)"),
        _rule(b, c, _match(_pl("udp", "sport"), {"set": [67, 547]}), *COUNT_DROP_IN,
              comment="rogue DHCP server"),
        # DHCP never needs fragments; a first fragment that ends before the client hardware
        # address would hide it from the guard's check (the rest alone never reassembles)
        _rule(b, c, _match({"&": [_pl("ip", "frag-off"), 0x2000]}, 0, "!="),
              _match(_pl("udp", "dport"), 67), *COUNT_DROP_IN, comment="fragmented DHCP"),
        _rule(b, c, _match(ICMP6, {"set": ["nd-router-advert", "nd-redirect"]}),
              *COUNT_DROP_IN, comment="rogue router"),
        # a first fragment can end before its ICMPv6 header (behind long extension headers),
        # and the two rules above would not see a router advertisement in it: to a group,
        # only UDP may come in fragments (a large mDNS answer), whose header nft can read
        _rule(b, c, _match(_pl("ip6", "daddr"), _prefix(ipaddress.ip_network("ff00::/8"))),
              _match({"exthdr": {"name": "frag"}}, True), _match(L4, "udp", "!="),
              *COUNT_DROP_IN, comment="fragment to a multicast group"),
        _rule(b, c, _match(_pl("icmp", "type"), "redirect"), *COUNT_DROP_IN,
              comment="ICMP redirect"),
        # a query makes its port a router port of the bridge's multicast snooping, and every
        # group's traffic, the other guests' too, goes there: guests are not its routers
        _rule(b, c, _match(ICMP6, "mld-listener-query"), *COUNT_DROP_IN,
              comment="MLD query"),
        _rule(b, c, _match(_pl("igmp", "type"), "membership-query"), *COUNT_DROP_IN,
              comment="IGMP query"),
        _rule(b, c, _match(_pl("arp", "htype"), 1, "!="), *COUNT_DROP_IN,
              comment="ARP for other hardware"),
        *_guard_rules(),
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
    out: list[tuple[str, str]] = []
    for a in gateway_addresses(n):
        out += claimed6(a) if ":" in a else [("claimed4", a)]
    if n.mac is not None:
        out += taken(_mac(n.mac))
    return out


def _network_inet_elems(n: FwNetwork) -> dict[str, list]:
    """The inet elements a network brings by itself (its pairs with the networks it is routed
    with come from :func:`_pairs`)."""
    el: dict[str, list] = {"bridges": [n.name], "pass": [_cat(n.name, n.name)],
                           "gw4": [_cat(n.name, str(n.gateway))],
                           "intra4": [_cat(_prefix(n.subnet), _prefix(n.subnet))]}
    if n.mac is not None:
        el["routed_back"] = [_cat(n.name, n.name, _mac(n.mac))]
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
                   counters: dict[str, dict[str, int]] | None = None,
                   pending: Iterable[str] = ()) -> dict:
    """ONE transaction that (re)creates both tables completely: add table, flush table (or,
    with ``fresh``, delete and add the inet table again), then sets and maps (each flushed),
    chains, rules and elements. The bridge table must have its text-made sets first
    (:func:`bridge_text`, applied just before); ``spoof`` is not flushed, so the ports' drop
    counts stay: ``counters`` (what :func:`parse_spoof_counters` read before) names its
    elements, and those of ports that are gone are deleted. Applying it twice gives the same
    ruleset; other tables are never named. ``pending``: the spare taps (nothing passes to or
    from them)."""
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
    bridge_seen: set[tuple[str, Any]] = set()  # an element once, found by key (not a scan)

    def bput(name: str, elem: Any) -> None:
        k = _keyed((name, elem))
        if k not in bridge_seen:
            bridge_seen.add(k)
            bridge_el.setdefault(name, []).append(elem)

    for n in nets:  # the gateway's identity is taken on every guarded network
        if n.spoof_protection:
            for name, e in network_elems(n):
                bput(name, e)
    guarded: list[str] = []
    guarded_set: set[str] = set()
    for p in prts:
        validate_port(p)
        pnet: FwNetwork | None
        if p.bridged:  # a bridged network is not among ours; the engine says if it protects
            pnet = None
        else:
            pnet = _among(by_name, p.network, f"The port {p.ifname} is on")
            if not pnet.spoof_protection:
                continue
        if p.ifname in guarded_set:
            raise ValueError(f"The port {p.ifname} is listed twice.")
        guarded.append(p.ifname)
        guarded_set.add(p.ifname)
        for name, e in _port_elems(p):
            bput(name, e)
    for name in sorted(set(pending)):
        bput("pending", _ifname(name, "Spare tap"))

    cmds: list[dict] = []
    cmds += _table_head("inet", fresh)
    for s in _inet_sets():
        cmds += _with_flush("inet", s, fresh)
    cmds += _inet_chains_and_rules()
    cmds += _overlay_rules(nets)
    for name in sorted(el):
        cmds.append(_elements("add", "inet", name, _sorted(el[name])))
    cmds += _table_head("bridge", False)
    for s in _bridge_sets():
        cmds += _with_flush("bridge", s, False)
    cmds += [{"flush": {"set": _obj("bridge", name=name)}} for name in RAW_SETS
             if name != "spoof"]
    gone = sorted(set(counters or {}) - guarded_set)
    if gone:
        cmds.append(_elements("delete", "bridge", "spoof", gone))
    cmds += _bridge_chains_and_rules()
    for name in sorted(bridge_el):
        cmds.append(_elements("add", "bridge", name, _sorted(bridge_el[name])))
    return {"nftables": cmds}


BRIDGE_RECREATE = f"add table bridge {TABLE}\ndelete table bridge {TABLE}\n"


def bridge_text(existing: Iterable[str] | None, *, fresh: bool = False) -> str:
    """The text transaction that makes the bridge table's ``typeof`` sets and ``spoof``
    (:data:`BRIDGE_TEXT_SETS`), to apply before :func:`render_ruleset`. ``existing``: the
    names of the sets and maps the bridge table has (None: there is no table). A table
    without ``guarded`` (made by an older vnetd, with chains of its own for each port) and
    ``fresh`` are deleted first: the guard is down from this transaction to the next."""
    if existing is not None and (fresh or "guarded" not in set(existing)):
        return BRIDGE_RECREATE + BRIDGE_TEXT_SETS
    return BRIDGE_TEXT_SETS


def render_bridge_sets_query() -> dict:
    """``list sets table bridge qemu_vnet`` (names for :func:`bridge_text`)."""
    return {"nftables": [{"list": {"sets": {"family": "bridge", "table": TABLE}}}]}


def set_names(listing: dict) -> list[str]:
    """The names of the sets and maps in a listing of :func:`render_bridge_sets_query`."""
    return [o[k]["name"] for o in (listing or {}).get("nftables", []) for k in ("set", "map")
            if k in o and isinstance(o[k], dict) and "name" in o[k]]


def apply_text(text: str, nft=None) -> None:
    """Apply one of the texts :func:`bridge_text` makes (nothing else is accepted)."""
    if text not in (BRIDGE_TEXT_SETS, BRIDGE_RECREATE + BRIDGE_TEXT_SETS):
        raise ValueError("Only the bridge table's own text is applied as text.")
    nft = nft or _context()
    rc, _out, err = nft.cmd(text)
    if rc != 0:
        raise RuntimeError((err or "").strip() or f"libnftables failed ({rc}).")


def prepare_bridge(nft=None, *, fresh: bool = False) -> dict[str, dict[str, int]]:
    """Before :func:`render_ruleset`: make the bridge table's text-made sets where they are
    missing (a first start, a table an older vnetd made, ``fresh``) and return the drop
    counts its ``spoof`` set holds (the ``counters`` to render with)."""
    nft = nft or _context()
    try:
        existing: list[str] | None = set_names(query(render_bridge_sets_query(), nft))
    except RuntimeError:
        existing = None  # no bridge table yet
    apply_text(bridge_text(existing, fresh=fresh), nft)
    return parse_spoof_counters(query(render_counters_query(), nft))


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
