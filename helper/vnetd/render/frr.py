"""FRR's configuration for BGP EVPN: pure rendering and diffing (evpn.py runs vtysh).

One iBGP instance per host carries every EVPN network: zebra learns the VNIs from the kernel
(`advertise-all-vni` advertises each VXLAN device that sits in a bridge), so the fragment only
names the AS, the router id (the underlay address) and the neighbours (the networks' peers).
A change is sent to FRR as the vtysh commands that turn the applied fragment into the new one.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass, replace

from ..errors import InvalidArgument

VTYSH = "/usr/bin/vtysh"
CONNECT_RETRY = 2  # seconds between attempts to reach a neighbour (FRR's default is 120)


def _plain(addr: str) -> str:
    """An address as it may appear in a vtysh command: re-parsed, no zone, no whitespace
    (vtysh runs every line of a -c argument; nothing user-given may carry one)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise InvalidArgument(f"'{addr!r}' is not an address FRR can be given.") from None
    text = str(ip)
    if getattr(ip, "scope_id", None) is not None or not re.fullmatch(r"[0-9a-fA-F:.]+", text):
        raise InvalidArgument(f"'{addr}' cannot be given to FRR.")
    return text


@dataclass(frozen=True)
class Fragment:
    asn: int
    router_id: str
    neighbors: tuple[str, ...]
    reflector: bool = False  # neighbours are route-reflector clients of this host
    # vnetd made the `router bgp` instance (and removes it whole); False: it was the
    # admin's, and vnetd adds and removes only its neighbours and advertise-all-vni
    owned: bool = True

    def __post_init__(self) -> None:
        _plain(self.router_id)
        for n in self.neighbors:
            _plain(n)
        if not 1 <= int(self.asn) <= 4294967295:
            raise InvalidArgument(f"{self.asn} is not a BGP AS number.")

    def render(self) -> str:
        """The fragment as FRR configuration text (what `commands` applies)."""
        return "\n".join(self.commands()) + "\n"

    def commands(self) -> list[str]:
        """The whole fragment; applying it again changes nothing (no session resets)."""
        out = [f"router bgp {self.asn}"]
        if self.owned:
            out += [f" bgp router-id {self.router_id}", " no bgp default ipv4-unicast"]
        for n in self.neighbors:
            out += self._neighbor(n)
        out += [" address-family l2vpn evpn"]
        for n in self.neighbors:
            out += self._activate(n)
        out += ["  advertise-all-vni", " exit-address-family"]
        return out

    def _neighbor(self, n: str) -> list[str]:
        return [f" neighbor {n} remote-as {self.asn}",
                f" neighbor {n} timers connect {CONNECT_RETRY}"]

    def _activate(self, n: str) -> list[str]:
        out = [f"  neighbor {n} activate"]
        if self.reflector:
            out.append(f"  neighbor {n} route-reflector-client")
        return out

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def removal(self) -> list[str]:
        """Take this fragment out of FRR again."""
        if self.owned:
            return [f"no router bgp {self.asn}"]
        return [f"router bgp {self.asn}", *[f" no neighbor {n}" for n in self.neighbors],
                " address-family l2vpn evpn", "  no advertise-all-vni", " exit-address-family"]

    @classmethod
    def parse(cls, text: str) -> Fragment:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("not a fragment")
        return cls(asn=int(d["asn"]), router_id=str(d["router_id"]),
                   neighbors=tuple(str(n) for n in d["neighbors"]),
                   reflector=bool(d.get("reflector", False)), owned=bool(d.get("owned", True)))


def instances(running_config: str) -> list[int]:
    """The default-VRF BGP instances in `show running-config` (FRR allows one)."""
    return [int(m) for m in re.findall(r"^router bgp (\d+)\s*$", running_config, re.M)]


def merged(have: Fragment | None, want: Fragment | None) -> Fragment | None:
    """What FRR may hold after an apply that failed half-way: both, so that a later removal
    covers everything that was sent."""
    if have is None or want is None or have.asn != want.asn:
        return want or have
    return replace(want, neighbors=tuple(sorted(set(have.neighbors) | set(want.neighbors))),
                   owned=have.owned)


def fragment(networks: list) -> Fragment | None:
    """The fragment for this host's running EVPN networks (None: there are none)."""
    if not networks:
        return None
    asns = {n.overlay.asn for n in networks}
    if len(asns) > 1:
        raise InvalidArgument(f"EVPN networks on one host share one BGP instance, but these "
                              f"name different AS numbers: {sorted(asns)}.")
    locals_ = {str(n.overlay.local) for n in networks}
    if len(locals_) > 1:
        raise InvalidArgument(f"EVPN networks on one host share one BGP router id, but these "
                              f"name different local addresses: {sorted(locals_)}.")
    neighbors = sorted({str(p) for n in networks for p in n.overlay.peers})
    return Fragment(asn=asns.pop(), router_id=locals_.pop(), neighbors=tuple(neighbors),
                    reflector=any(n.overlay.route_reflector for n in networks))


def diff(have: Fragment | None, want: Fragment | None) -> list[str]:
    """vtysh configuration commands (inside `configure terminal`) from `have` to `want`. The
    whole of `want` is always sent (it is idempotent), so an FRR that restarted and lost what
    vnetd gave it gets it all back with the next change."""
    if want is None:
        return have.removal() if have is not None else []
    if have is None:
        return want.commands()
    if (have.asn, have.router_id, have.reflector) != (want.asn, want.router_id, want.reflector):
        return have.removal() + want.commands()
    gone = [n for n in have.neighbors if n not in want.neighbors]
    out = [f"router bgp {want.asn}", *[f" no neighbor {n}" for n in gone]] if gone else []
    return out + want.commands()


def parse_summary(text: str) -> dict:
    """`show bgp l2vpn evpn summary json`: the router id, AS and each peer's state."""
    try:
        d = json.loads(text)
    except ValueError:
        return {"frr": "no answer in JSON"}
    if not isinstance(d, dict):
        return {"frr": "no answer in JSON"}
    peers = d.get("peers") or {}
    return {
        "router-id": str(d.get("routerId", "")),
        "as": int(d.get("as", 0) or 0),
        "peers": {str(ip): str(p.get("state", "?")) for ip, p in peers.items()
                  if isinstance(p, dict)},
    }
