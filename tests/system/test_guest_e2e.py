"""End to end with real QEMU guests, run by an unprivileged user in group vnet: the heart of
the project. The guest is a Debian cloud kernel with a busybox initramfs (tests/guest)."""

from __future__ import annotations

import ipaddress
import json
import subprocess

import pytest

from tests.guest import build_guest as bg
from tests.harness.daemon import ALICE, VENV, as_user, run_client

SUBNET = ipaddress.IPv4Network("172.16.12.0/24")
GW = "172.16.12.1"


@pytest.fixture(scope="module")
def guest(vnetd):
    g = bg.build_guest()
    run_client("define", "vnet2", check=True)
    run_client("start", "vnet2", check=True)
    return g


def boot_with_attach(guest, vm: str, cmdline: dict, timeout: float = 90):
    argv = bg.qemu_argv(guest, netdevs=["tap,id=n0,fd={fd}"],
                        devices=["virtio-net-pci,netdev=n0,mac={mac}"], cmdline=cmdline)
    r = run_client("attach", "--br=vnet2", f"--vm={vm}", "--", *argv, user=ALICE,
                   timeout=timeout)
    return r, bg.parse_results(r.stdout)


def test_guest_attached_by_a_normal_user_gets_a_lease_and_reaches_the_gateway(guest):
    r, res = boot_with_attach(guest, "e2e1", {"dhcp": 1, "ping": GW, "hostname": "e2e1"})
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    assert res.get("dhcp") == "ok", r.stdout[-2000:]
    ip = ipaddress.IPv4Interface(res["ip"])
    assert ip.ip in SUBNET and res["router"] == GW and res["dns"] == GW
    assert res["ping"][GW] == "ok"
    mac = run_client("mac", "--br=vnet2", "--vm=e2e1", user=ALICE).stdout.strip()
    assert res["mac"] == mac  # the guest wears its stable MAC
    leases = json.loads(run_client("leases", "vnet2", "--json", check=True).stdout)
    assert any(le["mac"] == mac and le["ip"] == str(ip.ip) for le in leases)


def test_guest_through_the_bridge_helper(guest):
    helper = str(VENV / "bin/vnet-bridge-helper")
    argv = bg.qemu_argv(guest, netdevs=[f"bridge,id=n0,br=vnet2,helper={helper}"],
                        devices=["virtio-net-pci,netdev=n0,mac=52:54:00:e2:e2:02"],
                        cmdline={"dhcp": 1, "ping": GW})
    argv[1:1] = ["-name", "guest=e2e2"]
    r = subprocess.run(as_user(ALICE, argv), capture_output=True, text=True, timeout=90)
    res = bg.parse_results(r.stdout)
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    assert res.get("dhcp") == "ok" and ipaddress.IPv4Interface(res["ip"]).ip in SUBNET
    assert res["mac"] == "52:54:00:e2:e2:02"
    assert res["ping"][GW] == "ok"


def test_two_guests_on_one_network_reach_each_other(guest):
    run_client("host", "add", "vnet2", "--vm=peer-a", "--ip=172.16.12.10",
               "--mac=52:54:00:e2:e2:0a", check=True)
    helper = str(VENV / "bin/vnet-bridge-helper")
    a_argv = bg.qemu_argv(guest, netdevs=[f"bridge,id=n0,br=vnet2,helper={helper}"],
                          devices=["virtio-net-pci,netdev=n0,mac=52:54:00:e2:e2:0a"],
                          cmdline={"dhcp": 1, "wait": 60})
    a_argv[1:1] = ["-name", "guest=peer-a"]
    with bg.start_guest(as_user(ALICE, a_argv)) as a:
        assert a.wait_for_result("ready", 60), a.text[-2000:]
        assert a.results["ip"].startswith("172.16.12.10/")
        r, res = boot_with_attach(guest, "peer-b", {"dhcp": 1, "ping": "172.16.12.10"})
        assert r.returncode == 0, r.stderr
        assert res["ping"]["172.16.12.10"] == "ok", r.stdout[-2000:]
        a.release()
        rc, _, _ = a.wait(30)
        assert rc == 0
