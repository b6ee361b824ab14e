"""Identity: a VM name on a network belongs to the uid that first registered it, and so do its
MACs. Another user attaching with that VM name, or with option mac= set to that VM's MAC, is
refused with org.qemuvnet.Vnet1.Error.NotOwner (the CLI prints the sentence and exits
non-zero) and nothing is created. A learn-mac port never locks to an identity that is
taken (a port's MAC, the bridge's), and frames with such a source do not get through.
"""

from __future__ import annotations

import json

import pytest

from tests.harness import frames as F
from tests.harness.daemon import ALICE, BOB, run_client, uid_of
from tests.harness.users import run_as

from .lab import (
    Agent,
    bridge_mac,
    dhcp_bind,
    exchange,
    fdb_ports_of,
    leases,
    ports,
    settle,
    wait_for,
)

NET = "vnet2"
NOT_OWNER = "org.qemuvnet.Vnet1.Error.NotOwner"


@pytest.fixture(scope="module", autouse=True)
def network(vnetd, bob_may_attach):
    run_client("define", NET, check=True)
    run_client("start", NET, check=True)
    yield


def refused_via_cli(*args: str) -> str:
    r = run_client("attach", f"--br={NET}", *args, "--", "true", user=BOB)
    assert r.returncode != 0, f"vnet-client attach {' '.join(args)} was accepted: {r.stdout}"
    msg = r.stderr.strip()
    assert msg and "Traceback" not in msg and len(msg.split()) >= 4, r.stderr
    return msg


def attempts(agents, *specs: tuple[str, dict]) -> list[dict]:
    """Bob's Attach calls through the client library: what each one answered."""
    out = []
    for vm, opts in specs:
        a = agents(BOB, NET, vm, **opts)
        out.append({"vm": vm, **opts, "answer": a.hello.get("error") or a.hello.get("ifname")})
    return out


def test_another_users_vm_name_is_not_owner(vnetd, agents):
    victim = agents(ALICE, NET, "victim")
    assert victim.error is None
    parked = run_as(ALICE, """
async def main():
    async with Client() as c:
        print(await c.get_mac(sys.argv[1], "parked"))
asyncio.run(main())
""", NET)
    assert parked.returncode == 0, parked.stderr  # registered, not attached
    links, before = vnetd.snapshot(), ports()
    got = attempts(agents, ("victim", {}), ("parked", {}), ("parked", {"nic": 1}))
    assert [g["answer"] for g in got] == [NOT_OWNER] * 3, got
    refused_via_cli("--vm=victim")
    refused_via_cli("--vm=parked")
    assert vnetd.snapshot() == links and ports() == before
    # positive control: a name of his own works
    mine = agents(BOB, NET, "bobs-own")
    assert mine.error is None and mine.ifname in vnetd.link_names()


def test_another_vms_mac_is_not_owner(vnetd, agents):
    victim = agents(ALICE, NET, "victim2")
    assert victim.error is None
    own_other = agents(ALICE, NET, "alices-other")
    brmac = bridge_mac(vnetd, NET)
    links, before = vnetd.snapshot(), ports()
    got = attempts(agents, ("mine", {"mac": victim.mac}),
                   ("mine2", {"mac": victim.mac.upper()}),
                   ("mine3", {"mac": own_other.mac}))
    assert [g["answer"] for g in got] == [NOT_OWNER] * 3, got
    msg = refused_via_cli("--vm=mine4", f"--mac={victim.mac}")
    # the refusal does not tell Bob the name of Alice's VM (her ports are hidden from him)
    assert "victim2" not in msg and "another user's VM" in msg, msg
    # Alice, whose VM it is, is told which one
    r = run_client("attach", f"--br={NET}", "--vm=alices-third", f"--mac={victim.mac}", "--",
                   "true", user=ALICE)
    assert r.returncode != 0 and "VM 'victim2'" in r.stderr, r.stderr
    # the bridge's MAC (the gateway's) is nobody's to take
    r = agents(BOB, NET, "mine5", mac=brmac)
    assert r.error is not None, "a port was handed out with the gateway's MAC"
    assert vnetd.snapshot() == links and ports() == before
    # positive control: a MAC nobody holds is fine
    fresh = F.random_mac()
    ok = agents(BOB, NET, "mine6", mac=fresh)
    assert ok.error is None and ok.mac == fresh


def port_record(ifname: str) -> dict:
    r = run_client("ports", "--json", check=True)
    return next(p for p in json.loads(r.stdout) if p["ifname"] == ifname)


def test_learn_mac_port_never_locks_to_a_taken_identity(vnetd, agents):
    victim = agents(ALICE, NET, "victim3")
    learner = agents(BOB, NET, "learner", learn_mac=True)
    assert victim.error is None and learner.error is None
    brmac = bridge_mac(vnetd, NET)
    assert port_record(learner.ifname)["mac-known"] is False
    taken = {"gateway": brmac, "victim": victim.mac}
    victim.clear()
    for who, mac in taken.items():
        learner.send(
            F.udp4_frame(mac, F.BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                         tag=f"src-{who}"),
            F.gratuitous_arp(mac, "172.16.12.1", tag=f"garp-{who}"),
            F.arp_probe(mac, "172.16.12.99", tag=f"probe-{who}"),
            F.dhcp_client(F.DISCOVER, mac, xid=0x53000001, tag=f"dhcp-{who}"),
        )
    settle(0.5)
    leaked = F.tags(victim.collect(0.3))
    rec = port_record(learner.ifname)
    assert not leaked, f"frames with a taken source MAC got through: {leaked}"
    assert rec["mac-known"] is False and rec["mac"] not in taken.values(), rec
    assert learner.ifname not in fdb_ports_of(vnetd, NET, brmac)
    assert fdb_ports_of(vnetd, NET, victim.mac) <= {victim.ifname}

    # positive control: its own MAC locks the port and gets through, nothing else after
    own, other = F.random_mac(), F.random_mac()
    learner.send(F.dhcp_client(F.DISCOVER, own, xid=0x53000002, tag="own"))
    assert wait_for(lambda: port_record(learner.ifname)["mac-known"], 5)
    assert port_record(learner.ifname)["mac"] == own
    learner.send(F.udp4_frame(own, F.BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                              tag="own-again"),
                 F.udp4_frame(other, F.BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                              tag="other-after-lock"),
                 F.udp4_frame(victim.mac, F.BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                              tag="victim-after-lock"))
    settle(0.5)
    seen = F.tags(victim.collect(0.3))
    assert "own-again" in seen, seen
    assert not seen & {"other-after-lock", "victim-after-lock"}, seen


def test_learn_mac_port_cannot_speak_dhcp_in_anothers_name(vnetd, agents):
    """The DHCP client hardware address must equal the frame's source MAC, also while a
    learn-mac port has not locked yet (its first frames)."""
    victim = agents(ALICE, NET, "victim5")
    assert victim.error is None
    vip = dhcp_bind(victim, xid=0x53000010)
    assert wait_for(lambda: (victim.mac, vip) in leases(NET))
    learner = agents(BOB, NET, "learner5", learn_mac=True)
    assert learner.error is None
    own = F.random_mac()
    brmac = bridge_mac(vnetd, NET)
    frames = [
        F.dhcp_client(F.DISCOVER, own, chaddr=victim.mac, xid=0x53000011, tag="discover-other"),
        F.dhcp_client(F.REQUEST, own, chaddr=victim.mac, xid=0x53000012, requested=vip,
                      server="172.16.12.1", tag="request-other"),
        F.dhcp_client(F.RELEASE, own, chaddr=victim.mac, ciaddr=vip, dst="172.16.12.1",
                      dst_mac=brmac, server="172.16.12.1", xid=0x53000013),
    ]
    victim.clear()
    got = exchange(learner, frames, {"dhcp.type": F.OFFER}, seconds=1.5)
    # the first frame locked the port to its source MAC; a DHCP client retransmits, and its
    # own DISCOVER (its own hardware address) then gets through
    assert wait_for(lambda: (learner.ifname, "learner5", own, uid_of(BOB)) in ports())
    got += exchange(learner, [F.dhcp_client(F.DISCOVER, own, xid=0x53000014,
                                            tag="own-discover")],
                    {"dhcp.type": F.OFFER, "dhcp.xid": 0x53000014})
    settle(1.0)
    seen = F.tags(victim.collect(0.3))
    assert "own-discover" in seen, seen  # positive control
    problems = []
    if seen & {"discover-other", "request-other"}:
        problems.append(f"DHCP in the victim's name reached it: {seen}")
    if [d for d in map(F.parse, got) if d.get("dhcp", {}).get("chaddr") == victim.mac]:
        problems.append("the server answered the learn-mac port for the victim's MAC")
    if (victim.mac, vip) not in leases(NET):
        problems.append("the victim's lease was released by the learn-mac port")
    assert not problems, problems


def test_a_port_of_another_user_is_not_detachable(vnetd, agents):
    victim = agents(ALICE, NET, "victim4")
    assert victim.error is None
    r = run_client("detach", victim.ifname, user=BOB)
    assert r.returncode != 0
    assert victim.ifname in vnetd.link_names()
    assert victim.ifname in [p[0] for p in ports()]


def test_agent_error_shape(vnetd):
    """The harness reports a refused Attach as the D-Bus error name (a control for the
    checks above: an unknown network is NotFound, not NotOwner)."""
    a = Agent.attach(BOB, "no-such-net", "x")
    try:
        assert a.error and a.error != NOT_OWNER, a.hello
    finally:
        a.close()
