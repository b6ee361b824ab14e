"""Ports vnetd did not hand out through Attach are guarded too: a VDE switch's tap (whoever
plugs into the switch socket is behind it) and the pre-created taps of a network defined with
-n COUNT (their owner opens them directly). From either, no DHCP server reply, no claim on the
gateway's address or MAC, no frame with an Attach port's MAC reaches a guarded Attach port on
the same bridge; their own ordinary traffic does.
"""

from __future__ import annotations

import json
import os

import pytest
from vnetd.networks.routed import FDB_MAX_LEARNED

from tests.harness import frames as F
from tests.harness.daemon import ALICE, BOB, run_client
from tests.harness.users import run_as

from .lab import (
    Agent,
    bridge_mac,
    dhcp_bind,
    fdb,
    fdb_ports_of,
    leases,
    neigh_macs,
    ping,
    require_tools,
    respond,
    settle,
    wait_for,
)

VDE_NET, TAP_NET = "vnet3", "vnet4"


@pytest.fixture(scope="module", autouse=True)
def networks(vnetd, bob_may_attach):
    require_tools("vde_plug", "vde_switch")
    run_client("define", VDE_NET, "--vde", "-n", "1", check=True)
    run_client("start", VDE_NET, check=True)
    run_client("define", TAP_NET, "-n", "1", f"--user={ALICE}", check=True)
    run_client("start", TAP_NET, check=True)
    yield


def show(network: str) -> dict:
    return json.loads(run_client("show", network, "--json", check=True).stdout)


@pytest.fixture
def inside(agents):
    """Agents that are not Attach ports (a VDE plug, a pre-created tap), closed at the end."""
    made: list[Agent] = []

    def make(user: str, mode: str, arg: str, netns: str | None = None) -> Agent:
        a = Agent(user, mode, arg, netns=netns)
        made.append(a)
        assert a.error is None, a.hello
        return a

    yield make
    for a in made:
        a.close()


def victim_on(vnetd, agents, network: str):
    """Bob's guarded Attach port, bound by DHCP, reaching its gateway."""
    victim = agents(BOB, network, f"victim-{network}")
    assert victim.error is None, victim.hello
    gw = show(network)["gateway"]
    vip = dhcp_bind(victim, xid=0x54000001)
    respond(victim, ip4=[vip])
    brmac = bridge_mac(vnetd, network)
    assert ping(victim, vip, brmac, gw), "positive control: the victim reaches its gateway"
    return victim, vip, gw, brmac


def attack(vnetd, network: str, victim, vip: str, gw: str, brmac: str, attacker,
           amac: str) -> None:
    """The same attacks from a VDE plug or a pre-created tap."""
    prefix = gw.rsplit(".", 1)[0]
    rogue, other_ip = f"{prefix}.66", f"{prefix}.67"
    allowed = [  # first: a pre-created tap locks to the first source MAC it sends
        F.udp4_frame(amac, F.BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67, tag="own"),
        F.dhcp_client(F.DISCOVER, amac, xid=0x54000002, tag="own-discover"),
    ]
    blocked = [
        F.dhcp_server(F.OFFER, amac, rogue, victim.mac, other_ip, router=rogue,
                      tag="rogue-offer"),
        F.dhcp_server(F.ACK, amac, rogue, victim.mac, vip, router=rogue, dst_mac=victim.mac,
                      tag="rogue-ack-unicast"),
        F.gratuitous_arp(amac, gw, tag="garp-gw"),
        F.gratuitous_arp(amac, gw, reply=True, tag="garp-gw-reply"),
        F.arp(2, amac, gw, victim.mac, vip, dst=victim.mac, tag="arp-reply-gw"),
        F.arp(2, brmac, gw, victim.mac, vip, src=amac, dst=victim.mac, tag="arp-gw-mac"),
        F.udp4_frame(brmac, F.BROADCAST, gw, "255.255.255.255", 9, 9, tag="src-gw-mac"),
        F.udp4_frame(victim.mac, F.BROADCAST, vip, "255.255.255.255", 9, 9,
                     tag="src-victim-mac"),
        F.gratuitous_arp(amac, vip, tag="garp-victim"),
        F.udp4_frame(amac, F.BROADCAST, vip, "255.255.255.255", 9, 9, tag="src-victim-ip"),
        F.udp4_frame(amac, F.BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67, tag="vlan",
                     vlan=5),
        F.router_advert(amac, F.eui64_ll(amac), "fd00:99::/64", tag="ra"),
        # answering for the victim's link-local address (a port's, not only the gateway's)
        F.neighbor_advert(amac, F.eui64_ll(amac), F.eui64_ll(victim.mac), tag="na-victim"),
    ]
    before_leases = leases(network)
    victim.clear()
    attacker.send(*allowed)
    settle(0.5)
    attacker.send(*blocked)
    # and the host: the victim's address is the attacker's
    attacker.send(F.arp(2, amac, vip, brmac, gw, dst=brmac, tag="arp-victim-to-host"),
                  F.dhcp_client(F.RELEASE, amac, chaddr=victim.mac, ciaddr=vip, dst=gw,
                                dst_mac=brmac, server=gw, xid=0x54000003),
                  # broadcast, as a client without an address sends: the kernel hands it to
                  # the server (the unicast one above, from 0.0.0.0, it drops as martian),
                  # which keys the lease by the client hardware address alone
                  F.dhcp_client(F.RELEASE, amac, chaddr=victim.mac, ciaddr=vip, server=gw,
                                xid=0x54000004),
                  F.dhcp_client(F.DECLINE, amac, chaddr=victim.mac, requested=vip,
                                server=gw, xid=0x54000005))
    settle(1.0)
    seen = F.tags(victim.collect(0.3), F.distinct(allowed + blocked))
    assert {"own", "own-discover"} <= seen, f"positive control: {seen}"
    problems = []
    leaked = seen & {t for f in blocked for t in F.parse(f)["tags"]}
    if leaked:
        problems.append(f"reached the guarded port: {sorted(leaked)}")
    table = neigh_macs(vnetd, network)
    if table.get(vip) != victim.mac:
        problems.append(f"the host's entry for the victim moved to {table.get(vip)}")
    if (victim.mac, vip) not in leases(network) or \
            [le for le in before_leases if le not in leases(network)]:
        problems.append(f"leases changed: {before_leases} -> {leases(network)}")
    if fdb_ports_of(vnetd, network, victim.mac) - {victim.ifname}:
        problems.append(f"the victim's MAC moved: {fdb_ports_of(vnetd, network, victim.mac)}")
    assert not problems, problems
    assert ping(victim, vip, brmac, gw, seq=40)


def test_vde_member_cannot_reach_a_guarded_port_with_server_replies_or_spoofs(vnetd, agents,
                                                                              inside):
    victim, vip, gw, brmac = victim_on(vnetd, agents, VDE_NET)
    switches = show(VDE_NET)["vde"]
    assert switches and switches[0]["state"] == "running", switches
    attacker = inside(ALICE, "vde", switches[0]["sock"])
    attack(vnetd, VDE_NET, victim, vip, gw, brmac, attacker, F.random_mac())


def test_precreated_tap_owner_cannot_reach_a_guarded_port_with_spoofs(vnetd, agents, inside):
    victim, vip, gw, brmac = victim_on(vnetd, agents, TAP_NET)
    taps = sorted(lk for lk in vnetd.link_names() if lk.startswith(f"{TAP_NET}_"))
    assert taps == [f"{TAP_NET}_0"], taps
    attacker = inside(ALICE, "tap", taps[0], netns=vnetd.netns)
    # a -n tap's guest has the stable MAC of the VM named like the tap (qemu-vlan's ether.conf)
    r = run_as(None, """
async def main():
    async with Client() as c:
        print(await c.get_mac(sys.argv[1], sys.argv[2]))
asyncio.run(main())
""", TAP_NET, taps[0])
    assert r.returncode == 0, r.stderr
    attack(vnetd, TAP_NET, victim, vip, gw, brmac, attacker, r.stdout.strip())


def test_a_segment_cannot_fill_the_bridges_forwarding_database(vnetd, agents, inside):
    """Behind a VDE switch's tap, guests send from any MAC they make up, and without a bound
    the bridge learns each one: kernel memory for five minutes apiece, and an event to every
    forwarding-database listener, vnetd among them. A network's bridge learns at most
    FDB_MAX_LEARNED; frames from MACs past that still pass, and the network still works."""
    if show(VDE_NET)["learned-macs"] is None:  # (asserted in test_lifecycle)
        pytest.skip(f"kernel {os.uname().release} cannot bound a bridge's learned MACs "
                    "(6.7 and later can): a segment's guests can still fill it there, as "
                    "docs/security.md says")
    victim, vip, gw, brmac = victim_on(vnetd, agents, VDE_NET)
    switches = show(VDE_NET)["vde"]
    attacker = inside(ALICE, "vde", switches[0]["sock"])
    invented = [f"02:ad:{i >> 16 & 0xFF:02x}:{i >> 8 & 0xFF:02x}:{i & 0xFF:02x}:01"
                for i in range(FDB_MAX_LEARNED + 1000)]
    prefix = gw.rsplit(".", 1)[0]  # (a segment's guests use addresses no port holds)
    for at in range(0, len(invented), 500):
        attacker.send(*[F.udp4_frame(mac, "02:ee:ee:ee:ee:ee", f"{prefix}.200",
                                     f"{prefix}.201", 9, 9, b"fdb flood")
                        for mac in invented[at:at + 500]])
    seen = set(invented)

    def learned() -> int:
        return sum(1 for mac, _port, _state in fdb(vnetd, VDE_NET) if mac in seen)

    wait_for(lambda: learned() >= FDB_MAX_LEARNED - 64, timeout=20)
    settle(1)
    got = learned()
    assert FDB_MAX_LEARNED - 64 <= got <= FDB_MAX_LEARNED, got  # the flood came, bounded
    counted = show(VDE_NET)["learned-macs"]
    assert counted == {"count": FDB_MAX_LEARNED, "most": FDB_MAX_LEARNED}, counted
    # past the bound frames still pass: the guarded victim still reaches its gateway
    assert ping(victim, vip, brmac, gw, seq=41)
