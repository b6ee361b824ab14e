"""Bridged mode: a veth stands in for the host's eth0, its far end in an 'upstream' netns with
a DHCP server and the default gateway."""

from __future__ import annotations

import json

import pytest

from tests.harness.daemon import run_client
from tests.harness.guests import Guest
from tests.harness.netpeers import physical_lan


def routes(vnetd) -> list:
    return sorted(json.dumps(r, sort_keys=True) for r in vnetd.ipj("route", "show")
                  + vnetd.ipj("-6", "route", "show")
                  if not r.get("dst", "").startswith("fe80"))


def addrs(vnetd) -> list:
    return sorted((a["ifname"], i["local"], i["prefixlen"]) for a in vnetd.ipj("addr", "show")
                  for i in a.get("addr_info", []) if not i["local"].startswith("fe80"))


@pytest.fixture(scope="module")
def upstream(vnetd):
    with physical_lan(vnetd, "eth0", "10.88.0", prefix6="fd88",
                      host_routes=(("default", "via", "10.88.0.1"),
                                   ("10.99.0.0/16", "via", "10.88.0.1", "metric", "50"))) as ns:
        yield ns


def reaches_upstream(vnetd) -> bool:
    return vnetd.exec("busybox", "ping", "-c1", "-W2", "10.88.0.1", check=False).returncode == 0


def test_refusals_change_nothing(vnetd, upstream):
    before = (vnetd.snapshot(), routes(vnetd))
    r = run_client("define", "vnet2", "--mode=bridged", "--if=eth0")
    # eth0 has the default route: refused when defined, not only when started
    assert r.returncode == 1 and "default route" in r.stderr and "--force" in r.stderr
    assert run_client("show", "vnet2").returncode != 0  # nothing was defined
    # a NIC that gets the default route after the definition is refused at start
    vnetd.ip("link", "add", "eth7", "type", "veth", "peer", "name", "eth7p")
    try:
        run_client("define", "vnet2", "--mode=bridged", "--if=eth7", check=True)
        vnetd.ip("addr", "add", "10.77.0.2/24", "dev", "eth7")
        vnetd.ip("link", "set", "eth7", "up")
        vnetd.ip("link", "set", "eth7p", "up")
        vnetd.ip("route", "add", "default", "via", "10.77.0.1", "dev", "eth7", "metric", "900")
        r = run_client("start", "vnet2")
        assert r.returncode == 1 and "default route" in r.stderr and "--force" in r.stderr
        run_client("undefine", "vnet2", check=True)
    finally:
        vnetd.ip("link", "del", "eth7")
    run_client("define", "vnet4", "--if=nosuch0", check=True)
    r = run_client("start", "vnet4")
    assert r.returncode == 1 and "NotFound" in r.stderr
    run_client("undefine", "vnet4", check=True)
    vnetd.ip("link", "add", "other0", "type", "bridge")
    vnetd.ip("link", "add", "eth9", "type", "veth", "peer", "name", "eth9p")
    vnetd.ip("link", "set", "eth9", "master", "other0")
    try:
        run_client("define", "vnet5", "--if=eth9", check=True)
        r = run_client("start", "vnet5")
        assert r.returncode == 1 and "already in bridge 'other0'" in r.stderr
        run_client("undefine", "vnet5", check=True)
    finally:
        vnetd.ip("link", "del", "eth9")
        vnetd.ip("link", "del", "other0")
    assert (vnetd.snapshot(), routes(vnetd)) == before


def test_bridged_keeps_the_hosts_address_and_route_and_stop_restores_exactly(vnetd, upstream):
    before_addrs, before_routes = addrs(vnetd), routes(vnetd)
    assert reaches_upstream(vnetd)
    r = run_client("--br=vnet2", "--if=eth0", "--force", "--start")
    assert r.returncode == 0, r.stderr
    br = vnetd.ipj("link", "show", "vnet2")[0]
    nic = vnetd.ipj("link", "show", "eth0")[0]
    assert nic["master"] == "vnet2" and br["address"] == nic["address"]
    now = addrs(vnetd)
    assert ("vnet2", "10.88.0.5", 24) in now and ("vnet2", "fd88::5", 64) in now
    assert not any(a[0] == "eth0" for a in now)
    default = [r for r in vnetd.ipj("route", "show") if r["dst"] == "default"]
    assert default and default[0]["dev"] == "vnet2" and default[0]["gateway"] == "10.88.0.1"
    assert reaches_upstream(vnetd)
    # a guest on the bridge gets its lease from upstream
    g = Guest(vnetd, "vnet2")
    try:
        lease = g.dhcp()
        assert lease and lease["serverid"] == "10.88.0.1"
    finally:
        g.close()
    run_client("stop", "vnet2", check=True)
    assert addrs(vnetd) == before_addrs
    assert routes(vnetd) == before_routes
    assert reaches_upstream(vnetd)


def test_a_daemon_restart_in_between_still_restores(vnetd, upstream):
    before_addrs, before_routes = addrs(vnetd), routes(vnetd)
    run_client("start", "vnet2", check=True)
    vnetd.kill()
    vnetd.start()
    assert json.loads(run_client("show", "vnet2", "--json").stdout)["state"] == "running"
    run_client("stop", "vnet2", check=True)
    assert (addrs(vnetd), routes(vnetd)) == (before_addrs, before_routes)
    run_client("undefine", "vnet2", check=True)


def test_a_bridged_network_has_no_subnet_to_block_others_with(vnetd, upstream):
    """Its addresses are the LAN's: no subnet from its name's digits, none shown, and none
    that makes a routed network with the derived one overlap."""
    vnetd.ip("link", "add", "eth6", "type", "veth", "peer", "name", "eth6p")
    try:
        run_client("define", "ux3", "--mode=bridged", "--if=eth6", check=True)
        shown = json.loads(run_client("show", "ux3", "--json", check=True).stdout)
        assert not {"subnet", "gateway", "dhcp-range"} & set(shown), shown
        listed = run_client("list", check=True).stdout
        row = next(ln for ln in listed.splitlines() if ln.startswith("ux3 "))
        assert "172.16.13" not in row and " - " in row, listed
        assert "subnet" not in run_client("export", "ux3", check=True).stdout
        # vnet3 derives 172.16.13.0/24 from its name; ux3 took none of it
        run_client("define", "vnet3", "--mode=host-only", check=True)
        run_client("undefine", "vnet3", check=True)
        r = run_client("define", "lab3")  # a routed network needs qemu-vlan's naming or one
        assert r.returncode == 1 and "'lab3' needs one" in r.stderr and "--subnet=" in r.stderr
        run_client("undefine", "ux3", check=True)
    finally:
        vnetd.ip("link", "del", "eth6")
