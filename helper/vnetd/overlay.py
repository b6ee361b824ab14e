"""One virtual LAN across hosts: a network's `[overlay]` (kernel VXLAN, optionally BGP EVPN).

    [overlay]
    vni = 5005                  # 1..16777215, one network per VNI on a host
    local = "10.99.0.1"         # this host's underlay address (the VXLAN source)
    peers = ["10.99.0.2"]       # static: head-end replication to each; evpn: BGP neighbours
    dev = "eth1"                # optional: the underlay interface
    port = 4789                 # UDP port (IANA's)
    role = "gateway"            # gateway: .1, DHCP/DNS, NAT, forwards; member: L2 only
    control = "static"          # static flooding, or "evpn" (FRR's bgpd)
    asn = 65000                 # evpn: the iBGP AS
    route-reflector = false     # evpn: this host reflects routes to its peers

Pure validation and naming here; the engine creates the device and the FDB entries, and
render/frr.py renders the EVPN configuration.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Any

from vnet_common.limits import (
    DEFAULT_ASN,
    DEFAULT_VXLAN_PORT,
    MAX_ASN,
    MAX_PEERS,
    MAX_PORT,
    MAX_VNI,
    MIN_PORT,
)
from vnet_common.names import boolean as _bool
from vnet_common.names import int_in as _int_in
from vnet_common.names import printable, validate_ifname
from vnet_common.options import OVERLAY_CONTROLS, OVERLAY_KEYS, OVERLAY_ROLES

from .errors import InvalidArgument

KEYS = OVERLAY_KEYS  # the options table's [overlay] keys (vnet_common.options)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _text(value: object) -> str:
    return printable(value)


def parse_address(value: object, what: str) -> Address:
    if not isinstance(value, str):
        raise InvalidArgument(f"The {what} must be an IP address string, not {_text(value)}.")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidArgument(f"The {what} '{_text(value)}' is not an IP address.") from None
    if getattr(addr, "scope_id", None) is not None:
        raise InvalidArgument(f"The {what} must be a plain address, without a %zone.")
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
        raise InvalidArgument(f"The {what} {addr} cannot carry VXLAN: use a unicast address "
                              "of the underlay.")
    return addr


def validate_vni(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"The VNI must be a whole number from 1 to {MAX_VNI}, not "
                              f"{_text(value)}.")
    if not 1 <= value <= MAX_VNI:
        raise InvalidArgument(f"The VNI {value} is out of range: VXLAN network identifiers "
                              f"are 24 bits, so use 1 to {MAX_VNI}.")
    return value


@dataclass(frozen=True)
class Overlay:
    vni: int
    local: Address
    peers: tuple[Address, ...] = ()
    dev: str | None = None
    port: int = DEFAULT_VXLAN_PORT
    role: str = "gateway"
    control: str = "static"
    asn: int = DEFAULT_ASN
    route_reflector: bool = False

    @classmethod
    def from_options(cls, options: object) -> Overlay:
        if not isinstance(options, dict):
            raise InvalidArgument("'overlay' must be a table of settings (vni, local, peers, "
                                  "...).")
        unknown = sorted(_text(k) for k in options if k not in KEYS)
        if unknown:
            raise InvalidArgument(f"Unknown overlay setting(s): {', '.join(unknown)}. Known: "
                                  f"{', '.join(KEYS)}.")
        for key in ("vni", "local"):
            if key not in options:
                raise InvalidArgument(f"The overlay needs '{key}'.")
        vni = validate_vni(options["vni"])
        local = parse_address(options["local"], "overlay's local address")
        peers = options.get("peers", [])
        if not isinstance(peers, list | tuple):
            raise InvalidArgument("The overlay's peers must be a list of addresses.")
        if len(peers) > MAX_PEERS:
            raise InvalidArgument(f"An overlay has at most {MAX_PEERS} peers, not {len(peers)}.")
        parsed: list[Address] = []
        for p in peers:
            parsed.append(check_peer(local, parse_address(p, "peer address"), parsed))
        dev = options.get("dev")
        if dev is not None:
            dev = validate_ifname(dev, "underlay interface (dev)")
        port = _int_in(options.get("port", DEFAULT_VXLAN_PORT), MIN_PORT, MAX_PORT,
                       "VXLAN UDP port")
        role = options.get("role", "gateway")
        if role not in OVERLAY_ROLES:
            raise InvalidArgument(f"The overlay role must be 'gateway' (holds the gateway "
                                  f"address, DHCP/DNS, NAT) or 'member' (extends the LAN only), "
                                  f"not {_text(role)}.")
        control = options.get("control", "static")
        if control not in OVERLAY_CONTROLS:
            raise InvalidArgument(f"The overlay control must be 'static' (flood to the listed "
                                  f"peers) or 'evpn' (BGP EVPN through FRR), not "
                                  f"{_text(control)}.")
        asn = _int_in(options.get("asn", DEFAULT_ASN), 1, MAX_ASN, "BGP AS number")
        rr = _bool(options.get("route-reflector", False), "route-reflector")
        if control == "evpn" and local.version != 4:
            raise InvalidArgument("EVPN needs an IPv4 underlay: FRR's BGP router id is the "
                                  "local address and must be IPv4 (a static overlay may use "
                                  "IPv6).")
        if control == "static" and ("asn" in options or rr):
            raise InvalidArgument("'asn' and 'route-reflector' only apply with "
                                  "control = \"evpn\".")
        return cls(vni=vni, local=local, peers=tuple(parsed), dev=dev, port=port, role=role,
                   control=control, asn=asn, route_reflector=rr)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"vni": self.vni, "local": str(self.local),
                             "peers": [str(p) for p in self.peers]}
        if self.dev is not None:
            d["dev"] = self.dev
        if self.port != DEFAULT_VXLAN_PORT:
            d["port"] = self.port
        d["role"] = self.role
        d["control"] = self.control
        if self.control == "evpn":
            d["asn"] = self.asn
            d["route-reflector"] = self.route_reflector
        return d

    @property
    def ifname(self) -> str:
        """The VXLAN device: one per VNI on a host."""
        return f"vx{self.vni}"

    @property
    def overhead(self) -> int:
        """Bytes VXLAN adds: outer IP + UDP + VXLAN + inner Ethernet header."""
        return 50 if self.local.version == 4 else 70

    @property
    def is_member(self) -> bool:
        return self.role == "member"

    def with_peer(self, peer: Address) -> Overlay:
        if len(self.peers) >= MAX_PEERS:
            raise InvalidArgument(f"An overlay has at most {MAX_PEERS} peers.")
        return replace(self, peers=(*self.peers, check_peer(self.local, peer, self.peers)))

    def without_peer(self, peer: Address) -> Overlay:
        from .errors import NotFound

        if peer not in self.peers:
            raise NotFound(f"{peer} is not a peer of VNI {self.vni}.")
        return replace(self, peers=tuple(p for p in self.peers if p != peer))


def check_peer(local: Address, peer: Address, have: tuple[Address, ...] | list[Address]) -> Address:
    from .errors import Exists

    if peer == local:
        raise InvalidArgument(f"The peer {peer} is this host's own local address: list the "
                              "other hosts only.")
    if peer.version != local.version:
        raise InvalidArgument(f"The peer {peer} is IPv{peer.version} but the local address "
                              f"{local} is IPv{local.version}: an overlay uses one family.")
    if peer in have:
        raise Exists(f"{peer} is already a peer.")
    return peer
