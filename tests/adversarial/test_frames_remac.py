"""Re-MAC through the handed-out fd: the holder of a tap can change the tap's hardware address
with SIOCSIFHWADDR issued on the tun fd itself (no capability needed). The bridge then keeps
that address as a local, permanent FDB entry on the holder's port, and what the host sends to
it (DHCP replies, ping replies from the gateway, NAT return traffic) leaves through that
port.

The rule: a port receives no unicast frame whose destination is not its own MAC; a port
whose MAC changes is cut off (its frames dropped both ways) and the change is logged; the
owner of the MAC keeps getting its traffic.
"""

from __future__ import annotations

import pytest

from tests.harness import frames as F
from tests.harness.daemon import ALICE, BOB, run_client

from .lab import (
    bridge_mac,
    dhcp_bind,
    exchange,
    fdb_ports_of,
    matching,
    neigh_macs,
    ping,
    ports,
    respond,
    settle,
)

NET, GW = "vnet2", "172.16.12.1"


@pytest.fixture(scope="module", autouse=True)
def network(vnetd, bob_may_attach):
    run_client("define", NET, check=True)
    run_client("start", NET, check=True)
    yield


def victim_traffic(victim, brmac: str, vip: str, seq: int, xid: int) -> tuple[bool, bool]:
    """Does the victim get a ping reply from the gateway, and a DHCP offer (unicast to its
    MAC, as dnsmasq sends it)?"""
    echo = ping(victim, vip, brmac, GW, seq=seq * 10)
    got = exchange(victim, [F.dhcp_client(F.DISCOVER, victim.mac, xid=xid)],
                   {"dhcp.type": F.OFFER, "dhcp.xid": xid})
    offer = bool(matching(got, dhcp__type=F.OFFER, dhcp__xid=xid))
    return echo, offer


def foreign_unicast(frames: list[bytes], own_mac: str) -> list[dict]:
    """Unicast frames addressed to a MAC other than the port's own."""
    out = []
    for f in frames:
        d = F.parse(f)
        if not int(d["dst"][:2], 16) & 1 and d["dst"] != own_mac.lower():
            out.append(d)
    return out


def setup_pair(vnetd, agents, victim_vm: str, attacker_vm: str):
    victim = agents(ALICE, NET, victim_vm)
    attacker = agents(BOB, NET, attacker_vm)
    assert victim.error is None and attacker.error is None, (victim.hello, attacker.hello)
    vip = dhcp_bind(victim, xid=0x51000001)
    respond(victim, ip4=[vip])
    brmac = bridge_mac(vnetd, NET)
    assert ping(victim, vip, brmac, GW), "positive control: the victim reaches its gateway"
    return victim, attacker, vip, brmac


def test_remac_to_the_victims_mac_steals_nothing(vnetd, agents):
    victim, attacker, vip, brmac = setup_pair(vnetd, agents, "victim1", "evil1")
    own = attacker.mac
    # positive control: the victim is served, the attacker sees only broadcasts and its own
    assert victim_traffic(victim, brmac, vip, 1, 0x51000002) == (True, True)
    before_ports = ports()
    log_mark = len(vnetd.log())

    result = attacker.setmac(victim.mac)
    # through the fd the holder needs no capability: this is the attack's way in
    assert result["fd"] == "ok", result
    settle(0.5)

    attacker.clear()
    echo, offer = victim_traffic(victim, brmac, vip, 2, 0x51000003)
    stolen = foreign_unicast(attacker.collect(0.5), own)
    assert not stolen, f"the re-MACed port received the victim's unicast: {stolen}"
    assert (echo, offer) == (True, True), \
        f"the victim lost its traffic (ping reply {echo}, DHCP offer {offer})"
    assert attacker.ifname not in fdb_ports_of(vnetd, NET, victim.mac)
    # every other port is as it was; the attacker's keeps the MAC it was handed, or is gone
    after_ports = ports()
    assert [p for p in after_ports if p[0] != attacker.ifname] == \
        [p for p in before_ports if p[0] != attacker.ifname]
    assert [p for p in after_ports if p[0] == attacker.ifname] in \
        ([], [p for p in before_ports if p[0] == attacker.ifname])
    log = vnetd.log()[log_mark:]
    assert any(attacker.ifname in line and victim.mac in line.lower()
               for line in log.splitlines()), \
        f"no log line names {attacker.ifname} and the MAC it took:\n{log[-2000:]}"


def test_a_remaced_port_is_cut_off_both_ways(vnetd, agents):
    victim, attacker, vip, brmac = setup_pair(vnetd, agents, "victim2", "evil2")
    bystander = agents(ALICE, NET, "bystander2")
    # positive control: before, broadcasts go both ways
    attacker.clear()
    bystander.clear()
    attacker.send(F.udp4_frame(attacker.mac, F.BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                               tag="before-out"))
    victim.send(F.udp4_frame(victim.mac, F.BROADCAST, vip, "255.255.255.255", 9, 9,
                             tag="before-in"))
    settle()
    assert "before-out" in F.tags(bystander.collect(0.3))
    assert "before-in" in F.tags(attacker.collect(0.3))

    new = F.random_mac()
    assert attacker.setmac(new)["fd"] == "ok"
    settle(0.5)
    attacker.clear()
    bystander.clear()
    attacker.send(  # a port cut off by deleting its tap refuses the writes: fine
        F.udp4_frame(new, F.BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67, tag="new-mac"),
        F.udp4_frame(victim.mac, F.BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                     tag="victim-mac"),
        F.udp4_frame(attacker.mac, F.BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                     tag="old-mac"),
        check=False)
    victim.send(F.udp4_frame(victim.mac, F.BROADCAST, vip, "255.255.255.255", 9, 9,
                             tag="after-in"),
                F.udp4_frame(victim.mac, new, vip, "172.16.12.200", 9, 9, tag="after-uni"))
    settle()
    leaked_out = F.tags(bystander.collect(0.3)) & {"new-mac", "victim-mac", "old-mac"}
    leaked_in = F.tags(attacker.collect(0.3)) & {"after-in", "after-uni"}
    assert not leaked_out, f"frames from a re-MACed port got through: {leaked_out}"
    assert not leaked_in, f"frames reached a re-MACed port: {leaked_in}"
    # the victim is unaffected
    assert victim_traffic(victim, brmac, vip, 3, 0x51000004) == (True, True)


def test_the_host_neighbour_entry_and_fdb_stay_with_the_owner(vnetd, agents):
    victim, attacker, vip, brmac = setup_pair(vnetd, agents, "victim3", "evil3")
    assert victim_traffic(victim, brmac, vip, 1, 0x51000005)[0]
    assert neigh_macs(vnetd, NET).get(vip) == victim.mac
    assert fdb_ports_of(vnetd, NET, victim.mac) == {victim.ifname}
    assert attacker.setmac(victim.mac)["fd"] == "ok"
    settle(0.5)
    # the attacker now answers for the victim's address with the victim's MAC
    attacker.send(F.arp(2, victim.mac, vip, brmac, GW, dst=brmac, tag="steal-arp"),
                  F.icmp4_echo(victim.mac, brmac, vip, GW, seq=9), check=False)
    settle(0.5)
    assert neigh_macs(vnetd, NET).get(vip) in (None, victim.mac)
    assert attacker.ifname not in fdb_ports_of(vnetd, NET, victim.mac)


def test_a_port_remaced_while_vnetd_is_away_is_cut_off_when_it_returns(vnetd, agents):
    """A holder that re-MACs its tap while no vnetd watches (between a stop and a start) is
    cut off when vnetd returns: its port is not adopted, its frames go nowhere."""
    victim, attacker, vip, brmac = setup_pair(vnetd, agents, "victim4", "evil4")
    bystander = agents(ALICE, NET, "bystander4")
    assert attacker.ifname in [p[0] for p in ports()]
    vnetd.stop()  # its networks and ports go on without it
    try:
        assert attacker.setmac(victim.mac)["fd"] == "ok"
    finally:
        log_mark = len(vnetd.log())
        vnetd.start()
    assert attacker.ifname not in [p[0] for p in ports()], "the re-MACed port was adopted"
    log = vnetd.log()[log_mark:]
    assert any("cut off port " + attacker.ifname in line and victim.mac in line.lower()
               for line in log.splitlines()), f"no audit line for {attacker.ifname}:\n{log[-2000:]}"
    attacker.clear()
    bystander.clear()
    attacker.send(F.udp4_frame(victim.mac, F.BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                               tag="after-return"), check=False)
    settle()
    assert "after-return" not in F.tags(bystander.collect(0.3)), \
        "a frame from the re-MACed port got through after the restart"
    assert victim_traffic(victim, brmac, vip, 5, 0x51000006) == (True, True)


def test_a_port_being_cut_off_sends_nothing_unguarded(vnetd, agents):
    """A re-MAC cuts the port off; until its tap is off the bridge its guard must stay.
    Bob re-MACs his tap and at once writes, as fast as he can until the port is gone,
    gratuitous ARP claiming the gateway's address for a MAC of his choosing (what the guard
    drops). vnetd dropped the guard first and deleted the tap after, and in between such
    frames reached every other port (17 to 549 of them in three runs here)."""
    bystander = agents(ALICE, NET, "bystander5")
    attacker = agents(BOB, NET, "evil5")
    assert bystander.error is None and attacker.error is None
    spoof = F.gratuitous_arp(F.random_mac(), GW, tag="cut5")
    bystander.call(op="watch", cores=[F.core(spoof).hex()])
    r = attacker.call(timeout=60, op="setmac_send", mac=F.random_mac(), frames=[spoof.hex()],
                      seconds=5)
    assert r["stopped"], f"the port was not cut off within 5 s ({r['sent']} frames sent)"
    assert r["sent"] > 0, r  # (here 100 to 1,000 frames before the write fails)
    settle(0.3)
    seen = bystander.call(op="summary")
    assert seen["hits"] == 0, f"{seen['hits']} of {r['sent']} spoofed frames got through"
