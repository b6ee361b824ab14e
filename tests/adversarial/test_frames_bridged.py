"""Ports of a bridged network: the guests share the physical LAN, whose addresses come from
servers vnetd does not know, so a port is held to its MAC, both ways. Here the "physical"
interface is one end of a veth whose other end sits on a plain test bridge with a tap a test
agent holds: the agent sees every frame the network sends to the LAN and plays the LAN's
hosts.

The rule: from a bridged port only its own MAC (as Ethernet and ARP sender, in neighbour
discovery's link-layer options) and no DHCP server replies or router advertisements reach
the LAN or the other guests; a holder that re-MACs its tap to another guest's MAC receives
nothing meant for that guest.
"""

from __future__ import annotations

import pytest

from tests.harness import frames as F
from tests.harness.daemon import ALICE, BOB, run_client

from .lab import Agent, fdb_ports_of, settle

NET, UPLINK, PEER, LABBR, LANTAP = "lan9", "eth0", "up9", "labbr9", "lantap9"
LAN_MAC, LAN_IP = "52:54:00:9a:00:01", "10.97.0.1"


@pytest.fixture(scope="module")
def lan(vnetd, bob_may_attach):
    """The uplink (a veth to a test bridge whose tap a test agent holds: the LAN) and the
    bridged network on it."""
    vnetd.ip("link", "add", UPLINK, "type", "veth", "peer", "name", PEER)
    vnetd.ip("link", "add", LABBR, "type", "bridge", "forward_delay", "0")
    vnetd.ip("tuntap", "add", "dev", LANTAP, "mode", "tap", "user", ALICE)
    for dev in (PEER, LANTAP):
        vnetd.ip("link", "set", dev, "master", LABBR)
    for dev in (UPLINK, PEER, LABBR, LANTAP):
        vnetd.ip("link", "set", dev, "up")
    up = Agent(ALICE, "tap", LANTAP, netns=vnetd.netns)
    assert up.error is None, up.hello
    try:
        run_client("define", NET, "--mode=bridged", f"--if={UPLINK}", check=True)
        run_client("start", NET, check=True)
        yield up
    finally:
        run_client("stop", NET)
        run_client("undefine", NET)
        up.close()
        for dev in (UPLINK, LABBR, LANTAP):
            vnetd.ip("link", "del", dev, check=False)


def pair(agents):
    victim = agents(ALICE, NET, "bv1")
    attacker = agents(BOB, NET, "be1")
    assert victim.error is None and attacker.error is None, (victim.hello, attacker.hello)
    return victim, attacker


def test_a_bridged_port_speaks_only_as_itself(vnetd, agents, lan):
    victim, attacker = pair(agents)
    v, a = victim.mac, attacker.mac
    vip, aip = "10.97.0.50", "10.97.0.66"
    blocked = [
        F.udp4_frame(v, "ff:ff:ff:ff:ff:ff", vip, "10.97.0.255", 9, 9, tag="src-victim"),
        F.udp4_frame(F.random_mac(), "ff:ff:ff:ff:ff:ff", aip, "10.97.0.255", 9, 9,
                     tag="src-invented"),
        F.arp(2, v, vip, LAN_MAC, LAN_IP, src=a, tag="arp-victim-sender"),
        F.dhcp_server(F.OFFER, a, aip, v, vip, tag="rogue-dhcp"),
        F.router_advert(a, F.eui64_ll(a), "fd97::/64", tag="router-advert"),
        F.neighbor_advert(a, F.eui64_ll(a), F.eui64_ll(a), tll=v, tag="na-lladdr-victim"),
    ]
    own = [F.udp4_frame(a, "ff:ff:ff:ff:ff:ff", aip, "10.97.0.255", 9, 9, tag="own"),
           F.arp(2, a, aip, LAN_MAC, LAN_IP, tag="own-arp")]
    lan.clear()
    victim.clear()
    attacker.send(*blocked, *own)
    settle(0.5)
    sent = F.distinct(blocked + own)
    on_lan = F.tags(lan.collect(0.3), sent)
    at_victim = F.tags(victim.collect(0.3), sent)
    assert {"own", "own-arp"} <= on_lan, f"positive control: {on_lan}"
    leaked = (on_lan | at_victim) - {"own", "own-arp"}
    assert not leaked, f"frames not in the port's own name left it: {leaked}"
    assert fdb_ports_of(vnetd, NET, v) <= {victim.ifname}, "the victim's MAC moved"


def test_a_remac_on_a_bridged_port_steals_nothing(vnetd, agents, lan):
    victim, attacker = pair(agents)
    victim.send(F.udp4_frame(victim.mac, "ff:ff:ff:ff:ff:ff", "10.97.0.51", "10.97.0.255",
                             9, 9, tag="hello"))  # the bridge learns where the victim is
    settle(0.3)
    to_victim = [F.udp4_frame(LAN_MAC, victim.mac, LAN_IP, "10.97.0.51", 9, 9,
                              tag=f"for-victim-{i}") for i in range(2)]
    victim.clear()
    attacker.clear()
    lan.send(to_victim[0])
    assert "for-victim-0" in F.tags(victim.collect(0.5), to_victim), "positive control"
    r = attacker.setmac(victim.mac)  # SIOCSIFHWADDR through the fd it holds
    assert "ok" in r.values(), f"the re-MAC itself must work for this attack: {r}"
    settle(0.5)
    victim.clear()
    attacker.clear()
    lan.send(to_victim[1])
    settle(0.5)
    assert not F.tags(attacker.collect(0.3), to_victim), "the re-MACed port got the victim's frame"
    assert "for-victim-1" in F.tags(victim.collect(0.3), to_victim), "the victim lost its frames"
