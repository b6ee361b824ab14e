"""One LAN across three hosts over static VXLAN: three netns "hosts", each with its own vnetd
on its own bus, joined by an underlay switch; host A is the gateway (DHCP, NAT), B and C are
members. Guests on every host get leases from A, reach each other and, through A's NAT, an
outside host. Removing a peer cuts exactly that host off; adding it back restores it."""

from __future__ import annotations

import json

import pytest

from tests.harness.guests import Guest
from tests.harness.multihost import Host, Underlay, ping, wait_until
from tests.harness.netpeers import Outside, Server, connect

NET = "vnet7"
VNI = "5007"
GW = "172.16.17.1"


@pytest.fixture(scope="module")
def lan(system_services):
    ul = Underlay()
    hosts = [Host(f"ov{c}") for c in "abc"]
    made: list = []
    try:
        addrs = [ul.join(h) for h in hosts]
        for h in hosts:
            h.start()
        for i, h in enumerate(hosts):
            peers = [a for j, a in enumerate(addrs) if j != i]
            args = ["define", NET, "--vni", VNI, "--local", addrs[i]]
            for p in peers:
                args += ["--peer", p]
            if i:
                args += ["--role", "member"]
            r = h.client(*args)
            assert r.returncode == 0, r.stderr
            h.client("start", NET, check=True)
        guests = [Guest(h, NET) for h in hosts]
        made += guests
        outside = Outside(hosts[0])
        made.append(outside)
        yield hosts, guests, addrs, outside, ul
    finally:
        for m in made:
            m.close()
        for h in hosts:
            h.close()
        ul.close()


def dnsmasq_of(host) -> list[int]:
    out = []
    for pid in host.children():
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "dnsmasq":
                    out.append(pid)
        except OSError:
            pass
    return out


def configured(lan):
    hosts, guests, *_ = lan
    for g in guests:
        if not getattr(g, "lease", None):
            g.lease = g.dhcp(configure=True)
    return guests


def test_overlay_devices_and_mtu(lan):
    hosts, _, addrs, *_ = lan
    for i, h in enumerate(hosts):
        (vx,) = h.ipj("-d", "link", "show", f"vx{VNI}")
        info = vx["linkinfo"]["info_data"]
        assert info["id"] == int(VNI) and info["local"] == addrs[i] and info["port"] == 4789
        assert vx["ifalias"] == f"qemu-vnet:{NET}" and vx["master"] == NET
        assert vx["mtu"] == 1450
        (br,) = h.ipj("link", "show", NET)
        assert br["mtu"] == 1450  # underlay 1500 - 50
        flood = {e["dst"] for e in json.loads(h.exec("bridge", "-j", "fdb", "show", "dev",
                                                       f"vx{VNI}").stdout)
                 if e["mac"] == "00:00:00:00:00:00"}
        assert flood == {a for j, a in enumerate(addrs) if j != i}
        show = json.loads(h.client("show", NET, "--json", check=True).stdout)
        assert show["mtu"] == 1450 and show["overlay-state"]["mtu-source"].startswith("underlay")
    # members hold no gateway address and run no DHCP server
    assert not [a for a in hosts[1].ipj("addr", "show", "dev", NET)[0]["addr_info"]
                if a["family"] == "inet"]
    assert hosts[0].ipj("addr", "show", "dev", NET)[0]["addr_info"][0]["local"] == GW
    assert not dnsmasq_of(hosts[1]) and dnsmasq_of(hosts[0])


def test_guests_on_every_host_lease_from_the_gateway_and_reach_each_other(lan):
    guests = configured(lan)
    ips = [g.lease["ip"] for g in guests]
    assert all(g.lease and g.lease["router"] == GW for g in guests), [g.lease for g in guests]
    assert len(set(ips)) == 3
    assert ping(guests[1], ips[2]) and ping(guests[2], ips[1]) and ping(guests[1], ips[0])
    assert ping(guests[2], GW)
    # the gateway's leases list the remote guests
    leases = json.loads(lan[0][0].client("leases", NET, "--json", check=True).stdout)
    assert {le["mac"] for le in leases} >= {g.mac for g in guests[1:]}


def test_member_guest_reaches_outside_through_the_gateways_nat(lan):
    hosts, _, _, outside, _ = lan
    guests = configured(lan)
    srv = Server(outside.netns, "tcp", 8090)
    try:
        seen = connect(guests[2].netns, "tcp", Outside.PEER, 8090)
        assert seen == f"seen {Outside.HOST}", seen  # masqueraded by host A
    finally:
        srv.close()


def test_removing_a_peer_cuts_exactly_that_host_off(lan):
    hosts, _, addrs, *_ = lan
    guests = configured(lan)
    ips = [g.lease["ip"] for g in guests]
    a, b, c = hosts
    for h in (a, b):
        r = h.client("overlay", "remove-peer", NET, addrs[2])
        assert r.returncode == 0, r.stderr
    wait_until(lambda: not ping(guests[2], GW), 10, "host C to be cut off")
    assert not ping(guests[2], ips[1])
    assert ping(guests[1], GW) and ping(guests[1], ips[0])  # A and B are untouched
    ov = json.loads(a.client("show", NET, "--json", check=True).stdout)["overlay"]
    assert ov["peers"] == [addrs[1]]
    stored = (a.config_dir / "networks" / f"{NET}.toml").read_text()
    assert addrs[2] not in stored
    for h in (a, b):
        h.client("overlay", "add-peer", NET, addrs[2], check=True)
    wait_until(lambda: ping(guests[2], GW), 10, "host C to be back")
    assert ping(guests[2], ips[1])


def test_peers_survive_a_vnetd_restart(lan):
    hosts, _, addrs, *_ = lan
    guests = configured(lan)
    a = hosts[0]
    a.kill()
    a.start()
    show = json.loads(a.client("show", NET, "--json", check=True).stdout)
    assert show["state"] == "running" and show["mtu"] == 1450
    assert ping(guests[1], GW) and ping(guests[2], guests[0].lease["ip"])


@pytest.mark.parametrize("args,error", [
    (["--vni", "0", "--local", "{a}"], "VNI"),
    (["--vni", "16777216", "--local", "{a}"], "VNI"),
    (["--vni", "5100", "--local", "{a}", "--peer", "{a}"], "own local address"),
    (["--vni", VNI, "--local", "{a}"], "already belongs"),
    (["--vni", "5101", "--local", "{a}", "--role", "member", "--dhcp", "dnsmasq"], "DHCP"),
])
def test_bad_overlay_definitions_are_refused(lan, args, error):
    a = lan[0][0]
    addr = lan[2][0]
    before = sorted(p.name for p in (a.config_dir / "networks").iterdir())
    r = a.client("define", "vnet8", *[x.format(a=addr) for x in args])
    assert r.returncode != 0 and error in r.stderr, r.stderr
    assert sorted(p.name for p in (a.config_dir / "networks").iterdir()) == before


def test_unreachable_underlay_is_refused_at_start_and_leaves_nothing(lan):
    a = lan[0][0]
    addr = lan[2][0]
    links = a.link_names()
    a.client("define", "vnet8", "--vni", "5102", "--local", addr, "--underlay-dev", "nosuch0",
             check=True)
    r = a.client("start", "vnet8")
    assert r.returncode != 0 and "nosuch0" in r.stderr and "does not exist" in r.stderr
    a.client("undefine", "vnet8", check=True)
    a.client("define", "vnet8", "--vni", "5102", "--local", "10.99.99.99", check=True)
    r = a.client("start", "vnet8")
    assert r.returncode != 0 and "not an address of this host" in r.stderr
    a.client("undefine", "vnet8", check=True)
    assert a.link_names() == links
    r = a.client("overlay", "add-peer", NET, addr)
    assert r.returncode != 0 and "own local address" in r.stderr


def test_a_vm_moving_between_hosts_keeps_its_mac(lan, tmp_path):
    """The registry is keyed by network and VM: exported on A and imported on B, a VM that
    moves keeps the MACs of all its NICs."""
    a, b = lan[0][0], lan[0][1]
    macs = {}
    for nic in (0, 1):
        macs[nic] = a.client("mac", "--br", NET, "--vm", "mover", "--nic", str(nic),
                             check=True).stdout.strip()
    export = tmp_path / "vnet7.macs"
    export.write_text(a.client("mac", "export", NET, check=True).stdout)
    r = b.client("mac", "import", NET, str(export))
    assert r.returncode == 0, r.stderr
    for nic in (0, 1):
        got = b.client("mac", "--br", NET, "--vm", "mover", "--nic", str(nic),
                       check=True).stdout.strip()
        assert got == macs[nic]


def test_reload_applies_peers_edited_in_the_file(lan):
    hosts, _, addrs, *_ = lan
    a = hosts[0]
    path = a.config_dir / "networks" / f"{NET}.toml"
    original = path.read_text()
    try:
        path.write_text(original.replace(f'"{addrs[2]}"', "").replace(", ]", "]")
                        .replace("[, ", "["))
        r = a.client("reload")
        assert r.returncode == 0, r.stdout + r.stderr
        flood = {e["dst"] for e in json.loads(a.exec("bridge", "-j", "fdb", "show", "dev",
                                                       f"vx{VNI}").stdout)
                 if e["mac"] == "00:00:00:00:00:00"}
        assert flood == {addrs[1]}
    finally:
        path.write_text(original)
        a.client("reload", check=True)
    flood = {e["dst"] for e in json.loads(a.exec("bridge", "-j", "fdb", "show", "dev",
                                                   f"vx{VNI}").stdout)
             if e["mac"] == "00:00:00:00:00:00"}
    assert flood == {addrs[1], addrs[2]}
