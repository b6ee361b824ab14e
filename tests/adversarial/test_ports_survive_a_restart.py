"""A network stopped with VMs attached: `stop` names them and needs --force; with it, their
ports leave the network (down, off any bridge: no frame in or out, nothing from the host)
and come back on the new bridge, guarded as before, when it starts again. The guest keeps
its address and reaches its gateway again; a spoofed frame is still dropped and counted."""

from __future__ import annotations

import json

import pytest

from tests.harness import frames as F
from tests.harness.daemon import ALICE, run_client

from .lab import bridge_mac, dhcp_bind, ping, respond, settle, wait_for

NET = "vnet7"


def show(network: str) -> dict:
    return json.loads(run_client("show", network, "--json", check=True).stdout)


@pytest.fixture(scope="module", autouse=True)
def network(vnetd):
    run_client("define", NET, "--subnet=10.77.7.0/24", check=True)
    run_client("start", NET, check=True)
    yield
    run_client("stop", NET, "--force")
    run_client("undefine", NET)


def link(vnetd, ifname: str) -> dict:
    got = vnetd.ipj("-d", "link", "show", ifname)
    assert got, f"the tap {ifname} is gone"
    return got[0]


def test_stop_names_attached_vms_and_force_brings_their_ports_back_guarded(vnetd, agents):
    vm = agents(ALICE, NET, "survivor")
    assert vm.error is None, vm.hello
    ip = dhcp_bind(vm, xid=0x57000001)
    respond(vm, ip4=[ip])
    gw = show(NET)["gateway"]
    assert ping(vm, ip, bridge_mac(vnetd, NET), gw), "positive control: the guest is online"

    r = run_client("stop", NET)
    assert r.returncode == 1, r.stdout
    assert "survivor" in r.stderr and f"stop {NET} --force" in r.stderr, r.stderr
    r = run_client("stop", NET, "--json")
    assert json.loads(r.stderr)["error"] == "org.qemuvnet.Vnet1.Error.Busy", r.stderr
    assert show(NET)["state"] == "running"

    run_client("stop", NET, "--force", check=True)
    lk = link(vnetd, vm.ifname)
    assert "master" not in lk and "UP" not in lk["flags"], lk
    waiting = show(NET)
    assert waiting["state"] == "stopped"
    assert [(p["vm"], p.get("waiting")) for p in waiting["ports"]] == [("survivor", True)]
    # off the network the guest reaches nothing, the host included
    vm.clear()
    vm.send(F.icmp4_echo(vm.mac, F.BROADCAST, ip, gw, seq=50), check=False)
    settle(0.3)
    assert not vm.collect(0.3), "a parked port passed frames"

    run_client("start", NET, check=True)
    lk = link(vnetd, vm.ifname)
    assert lk.get("master") == NET and "UP" in lk["flags"], lk
    assert ping(vm, ip, bridge_mac(vnetd, NET), gw, seq=60), "the guest did not come back"
    # and guarded as before: another source is dropped and counted against the port
    before = {p["ifname"]: p["spoof-drops"] for p in show(NET)["ports"]}[vm.ifname]
    vm.send(F.udp4_frame(vm.mac, F.BROADCAST, "10.77.7.250", "255.255.255.255", 9, 9,
                         tag="spoofed-ip"),
            F.udp4_frame(F.random_mac(), F.BROADCAST, ip, "255.255.255.255", 9, 9,
                         tag="spoofed-mac"))
    assert wait_for(lambda: {p["ifname"]: p["spoof-drops"] for p in show(NET)["ports"]}[
        vm.ifname] >= before + 2, 5), "the port came back without its guard"


def test_a_port_whose_holder_leaves_while_it_waits_is_gone_at_start(vnetd, agents):
    vm = agents(ALICE, NET, "leaver")
    assert vm.error is None, vm.hello
    run_client("stop", NET, "--force", check=True)
    assert [p["vm"] for p in show(NET)["ports"]] == ["leaver"]
    vm.close()
    assert wait_for(lambda: not show(NET).get("ports"), 5), show(NET)
    run_client("start", NET, check=True)
    assert not show(NET).get("ports")
    assert vm.ifname not in vnetd.link_names()


def test_a_stop_and_start_back_to_back_keep_the_port(vnetd, agents):
    """The events of a parked tap leaving its bridge may be read after the start put it back:
    they must not end the port then."""
    vm = agents(ALICE, NET, "quick")
    assert vm.error is None, vm.hello
    for _ in range(3):
        run_client("stop", NET, "--force", check=True)
        run_client("start", NET, check=True)
    lk = link(vnetd, vm.ifname)
    assert lk.get("master") == NET and "UP" in lk["flags"], lk
    assert [p["vm"] for p in show(NET)["ports"]] == ["quick"]
    vm.close()
