"""Moving over from qemu-vlan, and definitions that round-trip through export/define --from."""

from __future__ import annotations

import json
import os

from tests.harness.daemon import run_client

VNET3_CONF = """\
# qemu-vlan configuration of vnet3
netmask=255.255.255.0
gateway=172.16.13.1
ether=52:54:00:aa:bb:cc
dhcp=dnsmasq
num=4
DNSMASQ_ARGS="--dhcp-host=52:54:00:13:00:07,172.16.13.7,db1"
PREROUTING_RULSES="eth0,tcp,8080,172.16.13.5:80"
frobnicate=yes
"""
ETHER = "".join(f"ether_{i}=52:54:00:13:00:{i:02x}\n" for i in range(0, 8))
DHCP_HOST = "52:54:00:13:00:05,172.16.13.5,web1\n"


def test_import_qemu_vlan_keeps_macs_and_static_addresses(vnetd, tmp_path):
    d = tmp_path / "vnet3"
    d.mkdir()
    (d / "vnet3.conf").write_text(VNET3_CONF)
    (d / "ether.conf").write_text(ETHER)
    (d / "dhcp.host").write_text(DHCP_HOST)
    os.chmod(tmp_path, 0o755)
    r = run_client("import-qemu-vlan", str(d), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "frobnicate" in r.stderr and "vnet3.conf:9" in r.stderr  # named, line by line
    r = run_client("import-qemu-vlan", str(d), "--start")
    assert r.returncode == 0, r.stderr
    for i in range(0, 8):
        mac = run_client("mac", "--br=vnet3", f"--vm=vnet3_{i}").stdout.strip()
        assert mac == f"52:54:00:13:00:{i:02x}"
    hosts = {h["vm"]: h for h in json.loads(run_client("host", "list", "vnet3", "--json").stdout)}
    assert hosts["web1"]["ip"] == "172.16.13.5" and hosts["db1"]["ip"] == "172.16.13.7"
    fwds = json.loads(run_client("forward", "list", "vnet3", "--json").stdout)
    assert [(f["proto"], f["port"], f["target"]) for f in fwds] == [("tcp", "8080",
                                                                     "172.16.13.5")]
    n = json.loads(run_client("show", "vnet3", "--json").stdout)
    assert n["state"] == "running" and n["tap-names"] == [f"vnet3_{i}" for i in range(4)]
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "broken.conf").write_text('netmask="255.255.255.0\n')
    r = run_client("import-qemu-vlan", str(bad))
    assert r.returncode == 1 and "broken.conf:1" in r.stderr
    run_client("stop", "vnet3", check=True)


def test_export_and_define_from_round_trip_exactly(vnetd, tmp_path):
    run_client("define", "vnet6", "--mode=host-only", "--subnet6=fd00:16::/64", "-n", "2",
               "--domain=lab6.test", check=True)
    run_client("host", "add", "vnet6", "--vm=web6", "--ip=172.16.16.6",
               "--mac=52:54:00:16:00:06", check=True)
    run_client("forward", "add", "vnet6", "tcp", "8066", "web6:80", check=True)
    first = run_client("export", "vnet6", check=True).stdout
    path = tmp_path / "vnet6.toml"
    path.write_text(first)
    run_client("undefine", "vnet6", check=True)
    r = run_client("define", "vnet6", "--from", str(path))
    assert r.returncode == 0, r.stderr
    assert run_client("export", "vnet6", check=True).stdout == first
    r = run_client("define", "vnet7", "--from", str(path), "--mtu=1400")
    assert r.returncode == 2
    run_client("undefine", "vnet6", check=True)
