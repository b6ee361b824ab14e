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


@pytest.fixture(scope="module")
def lan(system_services):
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
                if j != i:
                    args += ["--peer", a]
            if i:
                args += ["--role", "member"]
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
    return all(len(sessions(h)) == 2 and set(sessions(h).values()) == {"Established"}
               for h in hosts)


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
