"""Moving real qemu-vlan directories over (tests/data/qemu-vlan: made by running the script,
v0.1.0 and v1.0.0, and the samples its repository ships): each imports for real, starts with
taps named as the original named them, and a QEMU guest run by a member of group vnet with
the original's own command line (-netdev tap,ifname=<br>_0,script=no) and the MAC the old
ether.conf gave gets a lease from the imported network."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.guest import build_guest as bg
from tests.harness.daemon import ALICE, BOB, PolkitRule, as_user, run_client
from tests.harness.netpeers import physical_lan
from tests.harness.tools import require

DATA = Path(__file__).resolve().parents[1] / "data" / "qemu-vlan"


def copy(rel: str, tmp_path: Path) -> Path:
    d = tmp_path / Path(rel).name
    shutil.copytree(DATA / rel, d)
    return d


def ether_0(d: Path) -> str | None:
    """ether_0's MAC in the old ether.conf, when the script wrote a valid one."""
    p = d / "ether.conf"
    if not p.exists():
        return None
    m = re.search(r"^ether_0=(52:54:00(?::[0-9a-f]{2}){3})$", p.read_text(), re.M)
    return m.group(1) if m else None


def boot_old_style(vnetd, guest: bg.Guest, tap: str, mac: str) -> dict:
    """QEMU as ALICE (group vnet) in vnetd's namespace, opening the pre-created tap by name
    as qemu-vlan's users did."""
    argv = bg.qemu_argv(guest, netdevs=[f"tap,id=n0,ifname={tap},script=no,downscript=no"],
                        devices=[f"virtio-net-pci,netdev=n0,mac={mac}"],
                        cmdline={"dhcp": 1}, qemu=require("qemu-system-x86_64"))
    r = subprocess.run(["ip", "netns", "exec", vnetd.netns, *as_user(ALICE, argv)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    return bg.parse_results(r.stdout)


@pytest.fixture(scope="module")
def guest():
    return bg.build_guest()


# (fixture, -n given to the import when the directory does not say, network)
GUESTS = [("v0.1.0/vnet3", None, "vnet3"), ("v1.0.0/vnet3", None, "vnet3"),
          ("v0.1.0/vnet6", 2, "vnet6"), ("v1.0.0/vnet6", 2, "vnet6")]


@pytest.mark.parametrize("rel,num,net", GUESTS, ids=[g[0] for g in GUESTS])
def test_imported_directory_serves_an_old_style_guest(vnetd, guest, tmp_path, rel, num, net):
    d = copy(rel, tmp_path)
    extra = (["-n", str(num)] if num else []) + [f"--user={ALICE}"]
    r = run_client("import-qemu-vlan", str(d), "--dry-run", *extra)
    assert r.returncode == 0, r.stderr
    r = run_client("import-qemu-vlan", str(d), "--start", *extra)
    try:
        check_guest(vnetd, guest, d, net, r)
    finally:
        run_client("stop", net)
        run_client("undefine", net)


def check_guest(vnetd, guest, d: Path, net: str, r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr
    n = json.loads(run_client("show", net, "--json", check=True).stdout)
    assert n["state"] == "running"
    assert n["tap-names"][0] == f"{net}_0"  # the original's names, from 0
    assert f"{net}_0" in vnetd.link_names()
    old = ether_0(d)
    mac = run_client("mac", f"--br={net}", f"--vm={net}_0", check=True).stdout.strip()
    if old is not None:
        assert mac == old  # VM <net>_0 keeps ether_0's MAC
    res = boot_old_style(vnetd, guest, f"{net}_0", old or mac)
    assert res.get("dhcp") == "ok", res
    ip = ipaddress.IPv4Interface(res["ip"]).ip
    assert ip in ipaddress.IPv4Network(n["subnet"])
    assert res["router"] == n["gateway"]
    leases = json.loads(run_client("leases", net, "--json", check=True).stdout)
    assert any(le["mac"] == (old or mac) and le["ip"] == str(ip) for le in leases), leases


VDE = ["samples/vnet1", "samples/vmnet4", "v0.1.0/vnet4", "v1.0.0/vnet4"]


@pytest.mark.parametrize("rel", VDE)
def test_imported_vde_directory_runs_its_switches_with_their_old_macs(vnetd, tmp_path, rel):
    d = copy(rel, tmp_path)
    net = d.name
    r = run_client("import-qemu-vlan", str(d), "--start")
    try:
        check_vde(vnetd, d, net, r)
    finally:
        run_client("stop", net)
        run_client("undefine", net)


def check_vde(vnetd, d: Path, net: str, r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr
    n = json.loads(run_client("show", net, "--json", check=True).stdout)
    taps = n["tap-names"]
    assert n["state"] == "running" and taps == [f"{net}_{i}" for i in range(len(taps))]
    assert [s["tap"] for s in n["vde"]] == taps and all(s["state"] == "running"
                                                         for s in n["vde"])
    conf = dict(re.findall(r"^(vde_switch_ether_\d+)=(\S+)$",
                           (d / f"{net}.conf").read_text(), re.M))
    ps = vnetd.exec("ps", "-ww", "-eo", "args").stdout
    for i, tap in enumerate(taps):
        switch = next(line for line in ps.splitlines()
                      if "vde_switch" in line and f"--tap {tap} " in line + " ")
        if n.get("vde-macs"):
            assert f"--macaddr {conf[f'vde_switch_ether_{i}']}" in switch
        else:
            assert "--macaddr" not in switch


def test_bridged_directory_is_refused_without_the_nic(vnetd, tmp_path):
    d = copy("v1.0.0/vnet7", tmp_path)
    r = run_client("import-qemu-vlan", str(d))
    assert r.returncode == 1 and "--if=NIC" in r.stderr and "vnet7.conf:19" in r.stderr
    assert "vnet7" not in run_client("list", "--json", check=True).stdout
    r = run_client("import-qemu-vlan", str(d), "--if=eth9", "-n", "2", "--dry-run")
    assert r.returncode == 0 and 'mode = "bridged"' in r.stdout and 'if = "eth9"' in r.stdout


def test_bridge_conf_becomes_a_polkit_rule_polkitd_applies(vnetd):
    """The repository's sample bridge.conf (allow br0, vnet0..vnet4, virbr0) for BOB's group:
    with the rule polkitd itself lets BOB (not in group vnet) attach to vnet2 without a
    password, and still not to vnet5, which bridge.conf does not allow."""
    for net in ("vnet2", "vnet5"):
        run_client("define", net, "--dhcp=none", check=True)
        run_client("start", net, check=True)
    try:
        def attach(net: str) -> subprocess.CompletedProcess:
            return run_client("attach", f"--br={net}", "--vm=b1", "--no-ask-password", "--",
                              "true", user=BOB)

        assert attach("vnet2").returncode == 4  # before: not authorized
        r = run_client("import-bridge-conf", str(DATA / "samples/bridge.conf"),
                       f"--group={BOB}")
        assert r.returncode == 0, r.stderr
        assert "bridge.conf:5" in r.stderr  # allow vnet1, named with its line
        with PolkitRule("40-qemu-vnet-bridge-conf", r.stdout):
            r2 = attach("vnet2")
            assert r2.returncode == 0, r2.stderr
            assert attach("vnet5").returncode == 4
        assert attach("vnet2").returncode == 4
    finally:
        for net in ("vnet2", "vnet5"):
            run_client("stop", net)
            run_client("undefine", net)


@pytest.fixture
def lan(vnetd):
    """A physical LAN for a bridged network: a veth 'lan0' in vnetd's namespace (no default
    route on it), its far end in a namespace with a DHCP server handing out 10.89.0.100-150."""
    with physical_lan(vnetd, "lan0", "10.89.0") as ns:
        yield ns


def test_imported_bridged_directory_puts_an_old_style_guest_on_the_lan(vnetd, guest, lan,
                                                                        tmp_path):
    d = copy("v1.0.0/vnet7", tmp_path)
    r = run_client("import-qemu-vlan", str(d), "--if=lan0", "-n", "2", f"--user={ALICE}",
                   "--start")
    try:
        assert r.returncode == 0, r.stderr
        n = json.loads(run_client("show", "vnet7", "--json", check=True).stdout)
        assert (n["state"], n["mode"], n["if"]) == ("running", "bridged", "lan0")
        assert n["tap-names"] == ["vnet7_0", "vnet7_1"]
        assert vnetd.ipj("link", "show", "lan0")[0]["master"] == "vnet7"
        mac = run_client("mac", "--br=vnet7", "--vm=vnet7_0", check=True).stdout.strip()
        res = boot_old_style(vnetd, guest, "vnet7_0", mac)
        assert res.get("dhcp") == "ok", res  # from the LAN's own DHCP server
        assert ipaddress.IPv4Interface(res["ip"]).ip in ipaddress.IPv4Network("10.89.0.0/24")
        assert res["server"] == "10.89.0.1"
    finally:
        run_client("stop", "vnet7")
        run_client("undefine", "vnet7")
    # stop gave lan0 its address back
    assert "10.89.0.5" in vnetd.ip("addr", "show", "lan0").stdout
