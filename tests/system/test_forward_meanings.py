"""A qemu-vlan rule's interface has two meanings, both named: traffic to the interface's
addresses (the original's `iptables -d ADDRESS`, the default: addr-of) works from outside,
from the host and from other guests, and follows the interface's addresses as they change;
traffic arriving on the interface (interface-means incoming: iface) works from outside
through it only. Real traffic through vnetd's nftables tables."""

from __future__ import annotations

import json
import time

import pytest

from tests.harness.daemon import run_client
from tests.harness.guests import Guest
from tests.harness.netpeers import Outside, Server, connect

EXTRA = "10.77.0.77"  # a second address of the uplink, added and removed live


@pytest.fixture(scope="module")
def world(vnetd):
    out = Outside(vnetd)
    run_client("define", "vnet2", check=True)
    run_client("start", "vnet2", check=True)
    made: list[Guest] = []
    web = Guest(vnetd, "vnet2", "52:54:00:f1:00:05")
    made.append(web)
    run_client("host", "add", "vnet2", "--vm=web1", "--ip=172.16.12.5",
               "--mac=52:54:00:f1:00:05", check=True)
    assert web.dhcp(configure=True)["ip"] == "172.16.12.5"
    other = Guest(vnetd, "vnet2")
    made.append(other)
    assert other.dhcp(configure=True) is not None
    srv = Server(web.netns, "tcp", 80)
    yield out, other
    srv.close()
    for g in made:
        g.close()
    out.close()


def until(fn, want: bool, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while True:
        ok = fn()
        if ok == want or time.monotonic() > end:
            return ok
        time.sleep(0.2)


def test_rule_interface_means_its_addresses_from_everywhere(world, vnetd):
    out, other = world
    r = run_client("forward", "add", "vnet2", "--rule", "uplink0,tcp,8090,web1:80")
    assert r.returncode == 0, r.stderr
    try:
        fwds = json.loads(run_client("forward", "list", "vnet2", "--json").stdout)
        assert [(f["port"], f.get("addr-of"), f.get("iface")) for f in fwds] == [
            ("8090", "uplink0", None)]
        assert connect(out.netns, "tcp", Outside.HOST, 8090) == f"seen {Outside.PEER}"
        assert connect(vnetd.netns, "tcp", Outside.HOST, 8090).startswith("seen ")
        assert connect(other.netns, "tcp", Outside.HOST, 8090).startswith("seen ")
        # an address the uplink gains is followed, and one it loses is dropped
        assert connect(vnetd.netns, "tcp", EXTRA, 8090).startswith("fail")
        vnetd.ip("addr", "add", f"{EXTRA}/24", "dev", "uplink0")
        try:
            assert until(lambda: connect(out.netns, "tcp", EXTRA, 8090).startswith("seen "),
                         True)
        finally:
            vnetd.ip("addr", "del", f"{EXTRA}/24", "dev", "uplink0")
        assert until(lambda: connect(vnetd.netns, "tcp", EXTRA, 8090).startswith("seen "),
                     False) is False
        # only the uplink's addresses: the bridge's own address is not forwarded
        assert connect(other.netns, "tcp", "172.16.12.1", 8090).startswith("fail")
    finally:
        run_client("forward", "remove", "vnet2", "tcp", "8090", check=True)
    assert connect(out.netns, "tcp", Outside.HOST, 8090).startswith("fail")


def test_rule_interface_meaning_incoming_matches_what_arrives_on_it(world, vnetd):
    out, other = world
    r = run_client("forward", "add", "vnet2", "--rule", "uplink0,tcp,8091,web1:80",
                   "--rule-means", "incoming")
    assert r.returncode == 0, r.stderr
    try:
        fwds = json.loads(run_client("forward", "list", "vnet2", "--json").stdout)
        assert [(f["port"], f.get("addr-of"), f.get("iface")) for f in fwds] == [
            ("8091", None, "uplink0")]
        assert connect(out.netns, "tcp", Outside.HOST, 8091) == f"seen {Outside.PEER}"
        # the host's and the guests' own traffic does not arrive on uplink0
        assert connect(vnetd.netns, "tcp", Outside.HOST, 8091).startswith("fail")
        assert connect(other.netns, "tcp", Outside.HOST, 8091).startswith("fail")
    finally:
        run_client("forward", "remove", "vnet2", "tcp", "8091", check=True)


def test_forward_add_names_the_meaning_and_refuses_both(world):
    r = run_client("forward", "add", "vnet2", "tcp", "8092", "web1:80", "--addr-of", "uplink0")
    assert r.returncode == 0, r.stderr
    assert "<uplink0>" in run_client("forward", "list", "vnet2").stdout
    run_client("forward", "remove", "vnet2", "tcp", "8092", check=True)
    r = run_client("forward", "add", "vnet2", "tcp", "8093", "web1:80", "--addr-of", "uplink0",
                   "--if", "uplink0")
    assert r.returncode == 2 and "not both" in r.stderr
    r = run_client("forward", "add", "vnet2", "--rule", "uplink0,tcp,8093,web1:80",
                   "--rule-means", "sideways")
    assert r.returncode == 2
