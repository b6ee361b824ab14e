"""BGP EVPN across three hosts: FRR from Debian (zebra, bgpd) runs in each host namespace
with no BGP configuration of its own; each host's vnetd writes it through vtysh. The VXLAN
devices do not learn (nolearning), so guests reach each other only through the MAC/IP and
flood-list routes BGP carries, and `bridge fdb` shows remote MACs as extern_learn."""

from __future__ import annotations

import json

import pytest

from tests.harness.guests import Guest
from tests.harness.multihost import Frr, Host, Underlay, frr_available, ping, wait_until

NET = "vnet7"
VNI = "6007"
GW = "172.16.17.1"

if not frr_available():
    pytest.fail("FRR is missing: 'sudo make test' installs it (Debian package frr)",
                pytrace=False)


@pytest.fixture(scope="module", params=["mesh", "reflector"])
def lan(system_services, request):
    """mesh: every host peers with every other. reflector: A reflects routes; B and C peer
    with A only, so what B knows of C comes through A."""
    rr = request.param == "reflector"
    ul = Underlay("10.89.0.0/24")
    hosts = [Host(f"ev{c}") for c in "abc"]
    frrs: list[Frr] = []
    guests: list[Guest] = []
    try:
        addrs = [ul.join(h) for h in hosts]
        for h in hosts:
            frrs.append(Frr(h))
            h.start(["--frr-pathspace", h.netns])
        for i, h in enumerate(hosts):
            args = ["define", NET, "--vni", VNI, "--local", addrs[i], "--control", "evpn"]
            for j, a in enumerate(addrs):
                if j != i and not (rr and i and j):
                    args += ["--peer", a]
            if i:
                args += ["--role", "member"]
            elif rr:
                args += ["--route-reflector"]
            r = h.client(*args)
            assert r.returncode == 0, r.stderr
            r = h.client("start", NET)
            assert r.returncode == 0, r.stderr + h.log()[-2000:]
        guests += [Guest(h, NET) for h in hosts]
        yield hosts, guests, addrs, frrs
    finally:
        for g in guests:
            g.close()
        for f in frrs:
            f.stop()
        for h in hosts:
            h.close()
        ul.close()


def sessions(host) -> dict[str, str]:
    show = json.loads(host.client("show", NET, "--json", check=True).stdout)
    return show["overlay-state"]["evpn"].get("peers", {})


def established(hosts) -> bool:
    """Every host's sessions (2 for A, and 2 or 1 for B and C) are up."""
    states = [sessions(h) for h in hosts]
    return (len(states[0]) == 2 and all(s and set(s.values()) == {"Established"}
                                        for s in states))


def remote_macs(host) -> dict[str, str]:
    entries = json.loads(host.exec("bridge", "-j", "fdb", "show", "dev", f"vx{VNI}").stdout)
    return {e["mac"]: e["dst"] for e in entries
            if "extern_learn" in e.get("flags", []) and e.get("dst")}


def test_vnetd_configures_bgp_evpn_and_sessions_come_up(lan):
    hosts, _, addrs, frrs = lan
    wait_until(lambda: established(hosts), 30, "all BGP sessions to be established")
    running = frrs[1].vtysh("show running-config")
    assert "router bgp 65000" in running and "advertise-all-vni" in running
    assert f"bgp router-id {addrs[1]}" in running
    (vx,) = hosts[1].ipj("-d", "link", "show", f"vx{VNI}")
    assert vx["linkinfo"]["info_data"]["learning"] is False
    vni = frrs[1].vtysh("show evpn vni")
    assert VNI in vni


def test_guests_reach_each_other_through_evpn_routes(lan):
    hosts, guests, addrs, _ = lan
    wait_until(lambda: established(hosts), 30, "all BGP sessions to be established")
    for g in guests:
        g.lease = g.dhcp(configure=True)
    assert all(g.lease and g.lease["router"] == GW for g in guests), [g.lease for g in guests]
    assert ping(guests[1], guests[2].lease["ip"]) and ping(guests[2], GW)
    assert ping(guests[1], guests[0].lease["ip"])
    # the path depends on BGP: B knows the guests of A and C as routes, not by learning
    macs = wait_until(lambda: (m := remote_macs(hosts[1])) and guests[0].mac in m
                      and guests[2].mac in m and m, 15, "EVPN MAC routes on host B")
    assert macs[guests[0].mac] == addrs[0] and macs[guests[2].mac] == addrs[2]


def test_a_removed_peer_loses_its_session_and_comes_back(lan):
    hosts, _, addrs, frrs = lan
    wait_until(lambda: established(hosts), 30, "all BGP sessions to be established")
    hosts[0].client("overlay", "remove-peer", NET, addrs[2], check=True)
    assert addrs[2] not in frrs[0].vtysh("show running-config")
    wait_until(lambda: addrs[2] not in sessions(hosts[0]), 10, "the session to C to go")
    hosts[0].client("overlay", "add-peer", NET, addrs[2], check=True)
    wait_until(lambda: established(hosts), 30, "the session to C to come back")


def test_stopping_the_last_evpn_network_removes_vnetds_bgp_instance(lan):
    hosts, _, _, frrs = lan
    hosts[2].client("stop", NET, check=True)
    assert "router bgp" not in frrs[2].vtysh("show running-config")
    hosts[2].client("start", NET, check=True)
    assert "router bgp 65000" in frrs[2].vtysh("show running-config")
    wait_until(lambda: established(hosts), 30, "C's sessions to come back")


def test_without_frr_start_says_so_and_leaves_nothing(system_services):
    h = Host("evnofrr")
    ul = Underlay("10.90.0.0/24")
    try:
        addr = ul.join(h)
        h.start(["--frr-pathspace", "nosuch-frr"])
        h.client("define", "vnet9", "--vni", "6009", "--local", addr, "--control", "evpn",
                 check=True)
        links = h.link_names()
        r = h.client("start", "vnet9")
        assert r.returncode != 0 and "FRR" in r.stderr, r.stderr
        assert h.link_names() == links
        assert json.loads(h.client("show", "vnet9", "--json", check=True).stdout)["state"] \
            == "stopped"
    finally:
        h.close()
        ul.close()


def peer_uptimes(frr: Frr) -> dict[str, int]:
    d = json.loads(frr.vtysh("show bgp l2vpn evpn summary json"))
    return {ip: p.get("peerUptimeMsec", 0) for ip, p in d.get("peers", {}).items()}


def test_a_vnetd_restart_does_not_reset_bgp_sessions(lan):
    hosts, _, _, frrs = lan
    wait_until(lambda: established(hosts), 30, "all BGP sessions to be established")
    before = peer_uptimes(frrs[0])
    hosts[0].kill()
    hosts[0].start(["--frr-pathspace", hosts[0].netns])
    after = peer_uptimes(frrs[0])
    assert after.keys() == before.keys()
    assert all(after[ip] >= before[ip] for ip in before), (before, after)


def test_reload_gives_back_what_an_frr_restart_lost(lan):
    hosts, _, _, frrs = lan
    frrs[2].vtysh("configure terminal", "no router bgp 65000")  # as if FRR had restarted
    assert "router bgp" not in frrs[2].vtysh("show running-config")
    r = hosts[2].client("reload")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "advertise-all-vni" in frrs[2].vtysh("show running-config")
    wait_until(lambda: established(hosts), 30, "C's sessions to come back")


def test_an_admins_bgp_instance_is_shared_not_taken_over(lan):
    """vnetd adds only its neighbours and advertise-all-vni to an instance it did not make,
    and removes only those."""
    hosts, _, _, frrs = lan
    c, fc = hosts[2], frrs[2]
    c.client("stop", NET, check=True)
    assert "router bgp" not in fc.vtysh("show running-config")
    fc.vtysh("configure terminal", "router bgp 65000", "bgp router-id 10.89.0.99",
             "neighbor 192.0.2.1 remote-as 65000")
    try:
        c.client("start", NET, check=True)
        running = fc.vtysh("show running-config")
        assert "advertise-all-vni" in running and "bgp router-id 10.89.0.99" in running
        wait_until(lambda: established(hosts), 30, "C's sessions with the admin's instance")
        c.client("stop", NET, check=True)
        running = fc.vtysh("show running-config")
        assert "router bgp 65000" in running and "neighbor 192.0.2.1 remote-as" in running
        assert "advertise-all-vni" not in running and lan[2][0] not in running
    finally:
        fc.vtysh("configure terminal", "no router bgp 65000")
        c.client("start", NET, check=True)
    wait_until(lambda: established(hosts), 30, "C back")
