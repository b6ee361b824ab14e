"""IPv6 from a port: only its link-local address (EUI-64 of its MAC) and its bound addresses as
source; neighbour solicitations and advertisements only for its own addresses and with its
own MAC in their link-layer options; no router advertisements, no redirects. An unsolicited
override advertisement for the gateway's address never reaches another guest, and the host's
neighbour entry for a guest never moves to the attacker's MAC.
"""

from __future__ import annotations

import struct

import pytest

from tests.harness import frames as F
from tests.harness.daemon import ALICE, BOB, run_client

from .lab import (
    bridge_mac,
    exchange,
    fdb_ports_of,
    matching,
    neigh_macs,
    respond,
    settle,
    wait_for,
)

NET, GW6, PREFIX = "vnet2", "fd00:12::1", "fd00:12::/64"


@pytest.fixture(scope="module", autouse=True)
def network(vnetd, bob_may_attach):
    run_client("define", NET, f"--subnet6={PREFIX}", check=True)
    run_client("start", NET, check=True)
    yield


def bridge_ll(vnetd) -> str | None:
    """The bridge's link-local address once duplicate address detection is over (the bridge
    has a carrier only from its first port on)."""
    addrs = vnetd.ipj("-6", "addr", "show", "dev", NET)
    info = addrs[0]["addr_info"] if addrs else []
    if any(a.get("tentative") for a in info) or not any(a.get("local") == GW6 for a in info):
        return None
    return next((a["local"] for a in info if a.get("scope") == "link"), None)


@pytest.fixture
def scene(vnetd, agents, request):
    n = request.node.name.split("_")[1]
    victim = agents(ALICE, NET, f"victim6-{n}")
    attacker = agents(BOB, NET, f"evil6-{n}")
    assert victim.error is None and attacker.error is None
    assert wait_for(lambda: bridge_ll(vnetd), 10), "the bridge's IPv6 addresses stay tentative"
    vll = F.eui64_ll(victim.mac)
    respond(victim, ip6=[vll])
    brmac = bridge_mac(vnetd, NET)
    # positive control: the victim resolves its gateway, and the host learns the victim
    got = exchange(victim, [F.neighbor_solicit(victim.mac, vll, GW6)],
                   {"icmp6.type": F.NA, "icmp6.target": GW6})
    assert matching(got, icmp6__type=F.NA, icmp6__target=GW6), "no NA from the gateway"
    got = exchange(victim, [F.echo6(victim.mac, brmac, vll, GW6)], {"icmp6.type": 129})
    assert matching(got, icmp6__type=129), "no echo reply from the gateway"
    assert neigh_macs(vnetd, NET).get(vll) == victim.mac
    return victim, attacker, vll, brmac


def test_neighbour_discovery_spoofing(vnetd, scene):
    victim, attacker, vll, brmac = scene
    a, all_ = attacker.mac, "ff02::1"
    all_mac = F.mcast6_mac(all_)
    all_ll = F.eui64_ll(a)
    gw_ll = bridge_ll(vnetd)
    forged = F.random_mac()
    blocked = F.distinct([
        F.neighbor_advert(a, all_ll, GW6, tag="na-gw-override"),
        F.neighbor_advert(a, all_ll, GW6, tll=brmac, tag="na-gw-gwmac"),
        F.neighbor_advert(a, gw_ll, GW6, tag="na-gw-from-gw-ll"),
        F.neighbor_advert(a, all_ll, gw_ll, flags=F.NA_OVERRIDE | F.NA_ROUTER,
                          tag="na-gw-ll"),
        F.neighbor_advert(a, all_ll, vll, tag="na-victim"),
        F.neighbor_advert(a, all_ll, all_ll, tll=forged, tag="na-own-forged-tll"),
        F.neighbor_advert(a, all_ll, all_ll, tll=victim.mac, tag="na-own-victim-tll"),
        F.neighbor_advert(a, all_ll, GW6, tll=None, tag="na-gw-no-option"),
        # solicitations go to all nodes or to the victim itself: a bridge sends a
        # solicited-node group only where a listener asked for it
        F.neighbor_solicit(a, all_ll, vll, sll=forged, dst=vll, dst_mac=victim.mac,
                           tag="ns-forged-sll"),
        F.neighbor_solicit(a, all_ll, GW6, sll=brmac, dst=all_, tag="ns-gwmac-sll"),
        F.neighbor_solicit(a, vll, GW6, sll=victim.mac, dst=all_, tag="ns-as-victim"),
        F.neighbor_solicit(a, "::", vll, sll=None, dst=all_, tag="dad-victim"),
        F.neighbor_solicit(a, "::", GW6, sll=None, dst=all_, tag="dad-gw"),
        F.neighbor_advert(a, all_ll, GW6, tag="vlan-na", vlan=5),
        F.neighbor_advert(a, all_ll, all_ll, tag="vlan-own-na", vlan=0),
        F.router_advert(a, all_ll, "fd00:99::/64", tag="ra"),
        F.router_advert(a, gw_ll, PREFIX, tag="ra-as-gw"),
        F.redirect6(a, gw_ll, vll, victim.mac, all_ll, "2001:db8::1", tag="redirect-as-gw"),
        F.redirect6(a, all_ll, vll, victim.mac, all_ll, "2001:db8::1", tag="redirect"),
    ])
    allowed = [
        F.neighbor_advert(a, all_ll, all_ll, tag="own-na"),
        F.neighbor_solicit(a, "::", all_ll, sll=None, dst=all_, tag="own-dad"),
        F.udp6_frame(a, all_mac, all_ll, all_, 9, 9, tag="own-udp6"),
    ]
    victim.clear()
    attacker.send(*blocked, *allowed)
    # what the host is told: the victim's address is at the attacker's MAC
    attacker.send(F.neighbor_advert(a, all_ll, vll, dst=gw_ll, dst_mac=brmac,
                                    flags=F.NA_OVERRIDE, tag="na-victim-to-host"),
                  F.neighbor_advert(a, vll, vll, dst=gw_ll, dst_mac=brmac,
                                    flags=F.NA_OVERRIDE | F.NA_SOLICITED,
                                    tag="na-victim-to-host-as-victim"),
                  F.neighbor_solicit(a, vll, GW6, sll="same", tag="ns-as-victim-to-gw"))
    settle(0.5)
    seen = F.tags(victim.collect(0.3), F.distinct(blocked + allowed))
    assert {"own-na", "own-dad", "own-udp6"} <= seen, f"positive control: {seen}"
    problems = []
    leaked = seen & {t for f in blocked for t in F.parse(f)["tags"]}
    if leaked:
        problems.append(f"forbidden neighbour discovery reached another guest: {sorted(leaked)}")
    table = neigh_macs(vnetd, NET)
    if table.get(vll) != victim.mac:
        problems.append(f"the host's entry for the victim moved: {vll} -> {table.get(vll)}")
    wrong = [ip for ip, mac in table.items() if mac == a and ip != all_ll]
    if wrong:
        problems.append(f"the host believes the attacker holds {wrong}")
    assert not problems, problems
    assert fdb_ports_of(vnetd, NET, victim.mac) <= {victim.ifname}
    assert attacker.ifname not in fdb_ports_of(vnetd, NET, brmac)


def test_ipv6_sources(vnetd, scene):
    victim, attacker, vll, brmac = scene
    a, all_ = attacker.mac, "ff02::1"
    all_mac = F.mcast6_mac(all_)
    all_ll = F.eui64_ll(a)
    blocked = {
        "src-victim-ll": vll,
        "src-gw": GW6,
        "src-gw-ll": bridge_ll(vnetd),
        "src-unbound": "fd00:12::99",
        "src-other-ll": "fe80::1234",
        "src-victim-slaac": F.eui64_ll(victim.mac).replace("fe80::", "fd00:12::"),
        "src-unspecified": "::",
    }
    frames = [F.udp6_frame(a, all_mac, src, all_, 9, 9, tag=tag) for tag, src in blocked.items()]
    frames.append(F.echo6(a, victim.mac, "fd00:12::99", vll, tag="echo-from-unbound"))
    frames.append(F.udp6_frame(a, all_mac, all_ll, all_, 9, 9, tag="own-ll"))
    victim.clear()
    attacker.send(*frames)
    settle(0.5)
    seen = F.tags(victim.collect(0.3), F.distinct(frames))
    assert "own-ll" in seen, f"positive control: {seen}"
    leaked = seen & (set(blocked) | {"echo-from-unbound"})
    assert not leaked, f"IPv6 from addresses the port does not hold got through: {leaked}"


def test_a_first_fragment_to_a_group_does_not_hide_a_router_advertisement(vnetd, scene):
    """A first fragment whose extension headers run past its end hides the ICMPv6 header
    (and a router advertisement in it) from the rules that drop one: fragments to a
    multicast group go nowhere; a control from the same port to the same group does."""
    victim, attacker, _vll, _brmac = scene
    # with br_netfilter calling ip6tables, IPv6 fragments crossing a bridge are reassembled
    # first (and a lone first fragment waits there): a host without it is the one to test
    calls = "net.bridge.bridge-nf-call-ip6tables"
    before = vnetd.exec("sysctl", "-n", calls, check=False).stdout.strip()
    if before:
        vnetd.exec("sysctl", "-qw", f"{calls}=0")
    try:
        first_fragment_to_all_nodes(victim, attacker)
    finally:
        if before:
            vnetd.exec("sysctl", "-qw", f"{calls}={before}")


def first_fragment_to_all_nodes(victim, attacker):
    all_nodes, all_mac = "ff02::1", "33:33:00:00:00:01"
    all_ll = F.eui64_ll(attacker.mac)
    # fragment header (next: destination options), offset 0, more fragments; then the
    # first 8 bytes of a 96-byte destination options header whose ICMPv6 part never comes
    frag = struct.pack("!BBHI", 60, 0, 0x0001, 0x5EC0DE) + bytes([58, 11]) + bytes(6)
    first = F.ether(all_mac, attacker.mac, 0x86DD, F.ipv6(all_ll, all_nodes, 44, frag),
                    tag="v6-first-fragment")
    control = F.udp6_frame(attacker.mac, all_mac, all_ll, all_nodes, 5000, 5000, b"hello",
                           tag="v6-control")
    # a fragmented UDP datagram to the group (a large mDNS answer) still goes through
    udp = struct.pack("!HHHH", 5353, 5353, 8 + 1400, 0) + bytes(64)
    frag_udp = F.ether(all_mac, attacker.mac, 0x86DD, F.ipv6(
        all_ll, all_nodes, 44, struct.pack("!BBHI", 17, 0, 0x0001, 0x5EC0DF) + udp),
        tag="v6-udp-fragment")
    victim.clear()
    attacker.send(first, control, frag_udp)
    got = b"".join(victim.collect(1.0))
    assert F.marker("v6-control") in got, "positive control: the group's frames arrive"
    assert F.marker("v6-udp-fragment") in got, "a UDP fragment to the group was dropped"
    assert F.marker("v6-first-fragment") not in got, "a first fragment reached another guest"


def router_ports(vnetd) -> set[str]:
    """The ports the bridge's multicast snooping takes for multicast routers' (every group's
    traffic goes to them)."""
    out = vnetd.exec("bridge", "-d", "mdb", "show", "dev", NET).stdout
    return {port for line in out.splitlines() if line.startswith("router ports on")
            for port in line.split(":", 1)[1].split()}


def mld_query(mac: str, src: str) -> bytes:
    """A general MLD query, as a multicast router sends it: hop limit 1, router alert."""
    msg = struct.pack("!BBHHH16s", 130, 0, 0, 1000, 0, bytes(16))
    c = F._l4_checksum(F._pseudo6(src, "ff02::1", len(msg), 58), msg)
    msg = msg[:2] + struct.pack("!H", c) + msg[4:]
    hbh = bytes([58, 0, 5, 2, 0, 0, 1, 0])  # next: ICMPv6; router alert (MLD); PadN
    return F.ether("33:33:00:00:00:01", mac, 0x86DD,
                   F.ipv6(src, "ff02::1", 0, hbh + msg, hlim=1), tag="mld-query")


def igmp_query(mac: str) -> bytes:
    """A general IGMPv2 query from 0.0.0.0 (a querier with no address yet may send one)."""
    msg = struct.pack("!BBH4s", 0x11, 100, 0, bytes(4))
    msg = msg[:2] + struct.pack("!H", F.inet_checksum(msg)) + msg[4:]
    opts = bytes([0x94, 4, 0, 0])  # router alert
    hdr = struct.pack("!BBHHHBBH4s4s", 0x46, 0, 24 + len(msg), 0, 0, 1, 2, 0, F.ip4("0.0.0.0"),
                      F.ip4("224.0.0.1")) + opts
    hdr = hdr[:10] + struct.pack("!H", F.inet_checksum(hdr)) + hdr[12:]
    return F.ether("01:00:5e:00:00:01", mac, 0x0800, hdr + msg, tag="igmp-query")


def test_a_guest_cannot_make_itself_the_bridges_multicast_router(vnetd, scene):
    """A multicast query makes the port it came in on a router port of the bridge's snooping:
    every group's traffic, the other guests' too, would go to that guest. Guests are not
    multicast routers here: their queries go nowhere."""
    victim, attacker, _vll, _brmac = scene
    victim.clear()
    attacker.send(mld_query(attacker.mac, F.eui64_ll(attacker.mac)), igmp_query(attacker.mac))
    got = b"".join(victim.collect(1.0))
    assert attacker.ifname not in router_ports(vnetd), router_ports(vnetd)
    assert F.marker("mld-query") not in got and F.marker("igmp-query") not in got
