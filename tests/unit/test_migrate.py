"""import-qemu-vlan's reader (vnet_client.migrate): fixture directories written here from the
formats qemu-vlan's documentation gives import to definitions with the
same MACs and static addresses; whatever is not carried over is named with its file and line;
malformed files raise MigrationError naming the line; the TOML written round-trips exactly
and is accepted by vnetd's own model."""

from __future__ import annotations

import ast
import dataclasses
import ipaddress
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vnet_client.migrate import (
    Finding,
    Imported,
    MigrationError,
    read_qemu_vlan_dir,
    render_definition_toml,
)
from vnet_common import limits, names
from vnetd import model

REPO = Path(__file__).resolve().parents[2]


def write(d: Path, files: dict[str, str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def ether_conf(prefix: str, count: int, quote: str = "") -> str:
    lines = ["# ether.conf written by qemu-vlan --macaddr"]
    lines += [f"ether_{i}={quote}{prefix}:{i:02x}{quote}" for i in range(1, count + 1)]
    return "\n".join(lines) + "\n"


def findings(imp: Imported, name: str | None = None) -> list[Finding]:
    return [f for f in imp.findings if name is None or Path(f.file).name == name]


def finding_at(imp: Imported, name: str, line: int, *words: str) -> Finding:
    hits = [f for f in findings(imp, name) if f.line == line
            and all(w in f.reason or w in f.text for w in words)]
    assert hits, f"no finding at {name}:{line} with {words}: " + "\n".join(map(str, imp.findings))
    return hits[0]


def vnetd_accepts(imp: Imported) -> model.Network:
    """What vnetd's Define would build; forwards in qemu-vlan's format go through the same
    expansion vnetd's AddForward applies to them."""
    d = dict(imp.definition)
    if "forwards" in d:
        d["forwards"] = [model.expand_forward_words(f) for f in d["forwards"]]
    return model.Network.from_options(imp.network, d)


# --- the fixtures --------------------------------------------------------------------------
VNET3_CONF = """\
# /etc/qemu/vnet3/vnet3.conf: NAT network, dnsmasq, 4 taps
netmask=255.255.255.0
gateway=172.16.13.1
export ether="/nonexistent/etc/qemu/vnet3/ether.conf"   # where it lived
dhcp=dnsmasq
num=4
DNSMASQ_ARGS="--dhcp-host=52:54:00:aa:00:01,172.16.13.5,web1
  --dhcp-host=52:54:00:aa:00:02,db_main,172.16.13.6 --domain=lab.example
  --dhcp-hostsfile=/nonexistent/etc/qemu/vnet3/dhcp.host --log-dhcp"
PREROUTING_RULSES="eth0,tcp,8080,172.16.13.5:80 eth0,udp,5353,172.16.13.6:53/4
  eth0,tcp,8443,172.16.13.5:443/6"
frobnicate=yes
"""
VNET3_HOSTS = """\
# dnsmasq --dhcp-hostsfile: mac,ip[,name] or mac,name,ip
52:54:00:3a:00:03,172.16.13.7
52:54:00:aa:00:03,172.16.13.8,mail.lab.example
52:54:00:AA:00:04,infinite,172.16.13.9,build01
52:54:00:aa:00:01,172.16.13.5,web1
"""


@pytest.fixture
def vnet3(tmp_path: Path) -> Path:
    return write(tmp_path / "vnet3", {"vnet3.conf": VNET3_CONF,
                                      "ether.conf": ether_conf("52:54:00:3a:00", 32),
                                      "dhcp.host": VNET3_HOSTS})


VNET2_DHCPD = """\
# written by qemu-vlan for --dhcp=dhcpd
authoritative;
subnet 172.16.12.0 netmask 255.255.255.0 {
  range 172.16.12.128 172.16.12.254;
  option routers 172.16.12.2;
  option domain-name-servers 172.16.12.2;
  option domain-name "vnet2.lan";
}
host files {
  hardware ethernet 52:54:00:2b:00:01;
  fixed-address 172.16.12.10;
}
host "backup_1" { hardware ethernet 52:54:00:2B:00:02; fixed-address 172.16.12.11; }
group {
  host printer { hardware ethernet 52:54:00:2b:01:05; fixed-address 172.16.12.12; }
}
"""


@pytest.fixture
def vnet2(tmp_path: Path) -> Path:
    return write(tmp_path / "vnet2", {
        "vnet2.conf": "netmask=255.255.255.0\ngateway=172.16.12.1\nether=ether.conf\n"
                      "dhcp=dhcpd\nnum=8; group=qemu\n",
        "ether.conf": ether_conf("52:54:00:2b:01", 64, quote='"'),
        "dhcpd.conf": VNET2_DHCPD,
        "dhcpd.leases": "lease 172.16.12.130 {\n}\n",
    })


@pytest.fixture
def vnet4(tmp_path: Path) -> Path:
    return write(tmp_path / "vnet4", {
        "vnet4.conf": "# bridged: qemu-vlan --br=vnet4 -n8 --if=eth0 --start\n"
                      "if=eth0\nnum=8\nether=/etc/qemu/$br/ether.conf\n",
        "ether.conf": ether_conf("52:54:00:4c:00", 64),
    })


@pytest.fixture
def vnet5(tmp_path: Path) -> Path:
    return write(tmp_path / "vnet5", {
        "vnet5.conf": "# qemu-vlan --br=vnet5 -n4 --vde --dhcp=dnsmasq\n"
                      "vde=yes\nnum=4\ndhcp=dnsmasq\n"
                      'VDE_SWITCH_ARGS="-n64 --hub --daemon --priority 7"\n',
        "ether.conf": ether_conf("52:54:00:5d:00", 128).replace(":00:80", ":01:00"),
    })


# --- NAT with dnsmasq ------------------------------------------------------------------------
def test_nat_dnsmasq_network_keeps_macs_static_ips_and_forwards(vnet3: Path):
    imp = read_qemu_vlan_dir(vnet3)
    assert imp.network == "vnet3"
    assert imp.definition == {
        "mode": "nat",
        "subnet": "172.16.13.0/24",
        "taps": 4,
        "dhcp": "dnsmasq",
        "domain": "lab.example",
        "hosts": [
            {"vm": "web1", "mac": "52:54:00:aa:00:01", "ip": "172.16.13.5"},
            {"vm": "db-main", "mac": "52:54:00:aa:00:02", "ip": "172.16.13.6"},
            {"vm": "vnet3-3", "mac": "52:54:00:3a:00:03", "ip": "172.16.13.7"},
            {"vm": "mail", "mac": "52:54:00:aa:00:03", "ip": "172.16.13.8"},
            {"vm": "build01", "mac": "52:54:00:aa:00:04", "ip": "172.16.13.9"},
        ],
        "forwards": [{"rule": "eth0,tcp,8080,172.16.13.5:80"},
                     {"rule": "eth0,udp,5353,172.16.13.6:53/4"}],
    }
    # every ether_<i> keeps its MAC as VM vnet3_<i>
    for i in range(1, 33):
        assert imp.macs[f"vnet3_{i}"] == f"52:54:00:3a:00:{i:02x}"
    # named hosts whose MAC ether.conf does not hold keep it under their own name
    assert {k: v for k, v in imp.macs.items() if not k.startswith("vnet3_")} == {
        "web1": "52:54:00:aa:00:01", "db-main": "52:54:00:aa:00:02",
        "mail": "52:54:00:aa:00:03", "build01": "52:54:00:aa:00:04"}
    assert len(set(imp.macs.values())) == len(imp.macs)


def test_nat_dnsmasq_findings_name_file_and_line(vnet3: Path):
    imp = read_qemu_vlan_dir(vnet3)
    finding_at(imp, "vnet3.conf", 12, "unknown key 'frobnicate'")
    finding_at(imp, "vnet3.conf", 4, "does not exist", "ether.conf")
    finding_at(imp, "vnet3.conf", 9, "log-dhcp")
    finding_at(imp, "vnet3.conf", 8, "'db_main' becomes 'db-main'")
    f = finding_at(imp, "vnet3.conf", 11, "IPv6 forward")
    assert f.text == "eth0,tcp,8443,172.16.13.5:443/6"
    assert "vnet-client forward add vnet3 --rule eth0,tcp,8443,172.16.13.5:443/6" in f.reason
    finding_at(imp, "vnet3.conf", 10, "never applied")
    finding_at(imp, "dhcp.host", 2, "ether_3", "--vm vnet3_3")
    finding_at(imp, "dhcp.host", 3, "'mail.lab.example' becomes 'mail'")
    finding_at(imp, "dhcp.host", 4, "infinite")
    finding_at(imp, "dhcp.host", 5, "already listed", "kept once")
    for f in imp.findings:
        assert Path(f.file).is_absolute() and f.line >= 0 and f.reason
        assert str(f).startswith(f.file)


def test_every_fixture_is_a_definition_vnetd_accepts(vnet3, vnet2, vnet4, vnet5):
    if "vde" not in model.Network.KEYS:
        pytest.skip("vnetd's model has no VDE keys in this tree")
    for d in (vnet3, vnet2, vnet4, vnet5):
        imp = read_qemu_vlan_dir(d)
        net = vnetd_accepts(imp)
        assert net.name == imp.network
        assert {str(h.ip) for h in net.hosts} == {h["ip"] for h in imp.definition.get("hosts", [])}
        assert model.Network.from_options(imp.network, net.to_dict()) == net


# --- host-only with dhcpd ------------------------------------------------------------------
def test_host_only_dhcpd_network(vnet2: Path):
    imp = read_qemu_vlan_dir(vnet2)
    assert imp.definition == {
        "mode": "host-only",
        "subnet": "172.16.12.0/24",
        "taps": 8,
        "tap-group": "qemu",
        "dhcp": "dhcpd",
        "dhcp-start": "172.16.12.128",
        "dhcp-end": "172.16.12.254",
        "domain": "vnet2.lan",
        "hosts": [
            {"vm": "files", "mac": "52:54:00:2b:00:01", "ip": "172.16.12.10"},
            {"vm": "backup-1", "mac": "52:54:00:2b:00:02", "ip": "172.16.12.11"},
            {"vm": "printer", "mac": "52:54:00:2b:01:05", "ip": "172.16.12.12"},
        ],
    }
    assert len([k for k in imp.macs if k.startswith("vnet2_")]) == 64
    assert imp.macs["vnet2_64"] == "52:54:00:2b:01:40"
    # printer's MAC is ether_5's: that VM keeps it, the host says how to attach it
    assert "printer" not in imp.macs
    finding_at(imp, "dhcpd.conf", 15, "ether_5", "--vm vnet2_5")
    # the original's wrong router/DNS (.2) are named, with the gateway vnetd uses
    for line in (5, 6):
        f = finding_at(imp, "dhcpd.conf", line, "172.16.12.2", "172.16.12.1")
        assert "by mistake" in f.reason
    finding_at(imp, "dhcpd.conf", 2, "authoritative")
    finding_at(imp, "dhcpd.conf", 13, "'backup_1' becomes 'backup-1'")
    finding_at(imp, "dhcpd.leases", 0, "leases are not carried over")
    finding_at(imp, "vnet2.conf", 0, "host-only")


# --- bridged and VDE -----------------------------------------------------------------------
def test_bridged_network_is_imported_as_bridged(vnet4: Path):
    imp = read_qemu_vlan_dir(vnet4)
    assert imp.definition == {"mode": "bridged", "if": "eth0", "taps": 8}
    f = finding_at(imp, "vnet4.conf", 2, "bridged network", "physical LAN")
    assert "eth0" in f.reason
    # ether=/etc/qemu/$br/ether.conf: $br is the network, and the copy here is read
    assert imp.macs["vnet4_64"] == "52:54:00:4c:00:40"
    vnetd_accepts(imp)


def test_vde_network(vnet5: Path):
    imp = read_qemu_vlan_dir(vnet5)
    d = imp.definition
    assert (d["vde"], d["vde-ports"], d["vde-switch-args"]) == (True, 64, ["--hub", "--priority",
                                                                         "7"])
    assert d["taps"] == 4
    finding_at(imp, "vnet5.conf", 5, "--daemon", "supervises")
    assert len(imp.macs) == 128


def test_vde_switch_args_without_vde_is_reported_not_enabled(tmp_path: Path):
    d = write(tmp_path / "vnet6", {"vnet6.conf": "num=2\nvde_switch_args=-n64\n",
                                   "ether.conf": ether_conf("52:54:00:66:00", 64)})
    imp = read_qemu_vlan_dir(d)
    assert "vde" not in imp.definition and "vde-ports" not in imp.definition
    finding_at(imp, "vnet6.conf", 2, "VDE_SWITCH_ARGS", "--vde")
    finding_at(imp, "vnet6.conf", 0, "32 per tap", "--vde")


def test_vde_without_taps_is_not_enabled(tmp_path: Path):
    imp = read_qemu_vlan_dir(write(tmp_path / "vnet7", {"vnet7.conf": "vde=yes\n"}))
    assert "vde" not in imp.definition
    finding_at(imp, "vnet7.conf", 1, "one switch per tap")


# --- liberal reading, strict naming --------------------------------------------------------
def test_shell_forms_are_read_liberally(tmp_path: Path):
    conf = (
        "# comment\n"
        "   export netmask='255.255.255.0'  # trailing comment\n"
        "gateway=\"172.16.20.1\" dhcp=dnsmasq\n"
        ": ${num:=3}\n"
        "export group\n"
        "DNSMASQ_ARGS=\"--dhcp-host=52:54:00:10:00:01,${br}-a,172.16.20.5 \\\n"
        "--dhcp-host 52:54:00:10:00:02,172.16.20.6,b_x\"\r\n"
        "readonly user=1000\n"
        "PREROUTING_RULES='eth0,tcp,2222,172.16.20.5:22'\n"
        "ether_1=52-54-00-10-00-01\n"
    )
    imp = read_qemu_vlan_dir(write(tmp_path / "vnet10", {"vnet10.conf": conf}))
    assert imp.definition == {
        "mode": "nat", "subnet": "172.16.20.0/24", "taps": 3, "tap-user": 1000,
        "dhcp": "dnsmasq",
        "hosts": [{"vm": "vnet10-a", "mac": "52:54:00:10:00:01", "ip": "172.16.20.5"},
                  {"vm": "b-x", "mac": "52:54:00:10:00:02", "ip": "172.16.20.6"}],
        "forwards": [{"rule": "eth0,tcp,2222,172.16.20.5:22"}],
    }
    assert imp.macs == {"vnet10_1": "52:54:00:10:00:01", "b-x": "52:54:00:10:00:02"}
    # a host given on the second line of DNSMASQ_ARGS is named with that line
    finding_at(imp, "vnet10.conf", 7, "--dhcp-host 52:54:00:10:00:02", "'b_x' becomes 'b-x'")
    finding_at(imp, "vnet10.conf", 6, "ether_1", "--vm vnet10_1")
    vnetd_accepts(imp)


def test_what_needs_the_shell_is_a_finding_not_a_guess(tmp_path: Path):
    conf = ('DNSMASQ_ARGS="$(cat /etc/extra-args)"\n'
            "n=`echo 4`\n"
            "domain_x=${HOME}/x\n"
            "user=alice\n"
            "group='Bad Group'\n")
    imp = read_qemu_vlan_dir(write(tmp_path / "vnet11", {"vnet11.conf": conf}))
    assert imp.definition == {"mode": "nat", "subnet": "172.16.21.0/24", "dhcp": "dnsmasq"}
    finding_at(imp, "vnet11.conf", 1, "DNSMASQ_ARGS", "runs a command")
    finding_at(imp, "vnet11.conf", 2, "'n'", "runs a command")
    finding_at(imp, "vnet11.conf", 3, "unknown key 'domain_x'")
    finding_at(imp, "vnet11.conf", 4, "alice", "-u alice")
    finding_at(imp, "vnet11.conf", 5, "not a valid group name")


def test_unknown_keys_are_reported_never_dropped(tmp_path: Path):
    conf = "netmask=255.255.255.0\nfoo=1\nexport BAR='x y'\nbaz=2 qux=3\n"
    imp = read_qemu_vlan_dir(write(tmp_path / "vnet12", {
        "vnet12.conf": conf, "ether.conf": "ether_1=52:54:00:12:00:01\nstray=1\n"}))
    got = {(Path(f.file).name, f.line, f.text) for f in imp.findings if "unknown key" in f.reason}
    assert got == {("vnet12.conf", 2, "foo=1"), ("vnet12.conf", 3, "export BAR='x y'"),
                   ("vnet12.conf", 4, "baz=2 qux=3"), ("ether.conf", 2, "stray=1")}
    assert len([f for f in imp.findings if f.line == 4]) == 2  # baz and qux, each named


def test_conflicts_are_named_and_the_first_kept(tmp_path: Path):
    d = write(tmp_path / "vnet13", {
        "vnet13.conf": "num=2\nnum=3\n",
        "ether.conf": "ether_1=52:54:00:13:00:01\nether_2=52:54:00:13:00:01\n",
        "dhcp.host": ("52:54:00:13:00:09,172.16.23.5,a\n"
                      "52:54:00:13:00:09,172.16.23.6,a2\n"
                      "52:54:00:13:00:0a,172.16.23.5,b\n"
                      "52:54:00:13:00:0b,172.16.24.5,c\n"
                      "52:54:00:13:00:0c,172.16.23.1,d\n"
                      "52:54:00:13:00:0d,172.16.23.7,a\n"
                      "52:54:00:13:00:0e,172.16.23.8\n"
                      "52:54:00:13:00:0f,172.16.23.9,ignore\n"
                      "host-only-name,172.16.23.10\n"),
    })
    imp = read_qemu_vlan_dir(d)
    assert imp.definition["taps"] == 3
    assert imp.definition["hosts"] == [
        {"vm": "a", "mac": "52:54:00:13:00:09", "ip": "172.16.23.5"},
        {"vm": "a-2", "mac": "52:54:00:13:00:0d", "ip": "172.16.23.7"},
        {"vm": "host8", "mac": "52:54:00:13:00:0e", "ip": "172.16.23.8"},
    ]
    assert imp.macs == {"vnet13_1": "52:54:00:13:00:01", "a": "52:54:00:13:00:09",
                        "a-2": "52:54:00:13:00:0d", "host8": "52:54:00:13:00:0e"}
    finding_at(imp, "vnet13.conf", 1, "set again on line 2")
    finding_at(imp, "ether.conf", 2, "already ether_1's")
    finding_at(imp, "dhcp.host", 2, "already has 172.16.23.5")
    finding_at(imp, "dhcp.host", 3, "already given to 52:54:00:13:00:09")
    finding_at(imp, "dhcp.host", 4, "not a guest address")
    finding_at(imp, "dhcp.host", 5, "not a guest address")
    finding_at(imp, "dhcp.host", 6, "'a' is taken", "'a-2'")
    finding_at(imp, "dhcp.host", 7, "called host8")
    finding_at(imp, "dhcp.host", 8, "ignore")
    finding_at(imp, "dhcp.host", 9, "no MAC")
    vnetd_accepts(imp)


def test_dnsmasq_conf_files_and_a_custom_subnet(tmp_path: Path):
    d = write(tmp_path / "lab", {
        "lab.conf": "gateway=10.20.30.1\nnetmask=16\n",
        "dnsmasq.conf": ("# extra options\ninterface=lab\ndhcp-range=10.20.40.1,10.20.40.200,12h\n"
                         "dhcp-host=52:54:00:30:00:01,10.20.0.9,ns\ndhcp-option=3,10.20.0.2\n"
                         "domain=Lab.Example,10.20.0.0/16\ndhcp-range=10.20.50.1,10.20.50.9\n"
                         "conf-file=/nonexistent/dnsmasq.conf\n"),
        "dhcp.conf": "dhcp-range=10.20.50.1,10.20.50.9\noption:ntp-server,10.20.0.3\n",
    })
    imp = read_qemu_vlan_dir(d)
    assert imp.definition == {
        "mode": "nat", "subnet": "10.20.0.0/16", "dhcp": "dnsmasq",
        "dhcp-start": "10.20.40.1", "dhcp-end": "10.20.40.200", "domain": "lab.example",
        "hosts": [{"vm": "ns", "mac": "52:54:00:30:00:01", "ip": "10.20.0.9"}],
    }
    finding_at(imp, "lab.conf", 1, "gateway is the subnet's first address", "10.20.0.1")
    finding_at(imp, "dnsmasq.conf", 2, "interface")
    finding_at(imp, "dnsmasq.conf", 3, "12h")
    finding_at(imp, "dnsmasq.conf", 5, "10.20.0.2", "10.20.0.1")
    finding_at(imp, "dnsmasq.conf", 7, "second DHCP range")
    finding_at(imp, "dnsmasq.conf", 8, "does not exist")
    # dhcp.conf is dnsmasq's dhcp-optsfile: DHCP options, not configuration lines
    finding_at(imp, "dhcp.conf", 1, "not a DHCP option", "refuses")
    finding_at(imp, "dhcp.conf", 2, "extra DHCP options")
    vnetd_accepts(imp)


def test_files_named_twice_are_read_once(tmp_path: Path):
    d = write(tmp_path / "vnet14", {
        "vnet14.conf": 'DNSMASQ_ARGS="--conf-file=dnsmasq.conf --dhcp-hostsfile=dhcp.host"\n',
        "dnsmasq.conf": "dhcp-host=52:54:00:14:00:01,172.16.24.5,a\nconf-file=dnsmasq.conf\n",
        "dhcp.host": "52:54:00:14:00:02,172.16.24.6,b\n",
    })
    imp = read_qemu_vlan_dir(d)
    assert [h["vm"] for h in imp.definition["hosts"]] == ["a", "b"]
    assert not [f for f in imp.findings if "already listed" in f.reason]


def test_conf_path_br_override_and_no_conf(tmp_path: Path):
    d = write(tmp_path / "old-copy", {"vnet3.conf": "br=vnet8\n",
                                      "ether.conf": "ether_1=52:54:00:08:00:01\n"})
    imp = read_qemu_vlan_dir(d / "vnet3.conf")
    assert imp.network == "vnet8"
    assert imp.definition["subnet"] == "172.16.18.0/24"
    assert imp.macs == {"vnet8_1": "52:54:00:08:00:01"}
    finding_at(imp, "vnet3.conf", 1, "br=vnet8")
    imp = read_qemu_vlan_dir(write(tmp_path / "vnet9", {}))
    assert imp.definition == {"mode": "nat", "subnet": "172.16.19.0/24", "dhcp": "dnsmasq"}
    assert any("no vnet9.conf" in f.reason for f in imp.findings)
    assert any("no ether.conf" in f.reason for f in imp.findings)


# --- malformed files -------------------------------------------------------------------------
BAD = [
    ("unterminated quote", {"vnet3.conf": 'n=1\nDNSMASQ_ARGS="--dhcp-host=52:54:00:1:2:3\n'
                            "gateway=172.16.13.1\n"}, "vnet3.conf", 2),
    ("unterminated single quote", {"vnet3.conf": "PREROUTING_RULES='eth0,tcp,1,2\n"},
     "vnet3.conf", 1),
    ("garbage line", {"vnet3.conf": "n=4\n\nthis is not an assignment\n"}, "vnet3.conf", 3),
    ("a command after an assignment", {"vnet3.conf": "n=4 ip link add x\n"}, "vnet3.conf", 1),
    ("shell syntax", {"vnet3.conf": "# ok\nn=4 && rm -rf /\n"}, "vnet3.conf", 2),
    ("bad netmask", {"vnet3.conf": "netmask=255.0.255.0\n"}, "vnet3.conf", 1),
    ("bad gateway", {"vnet3.conf": "\ngateway=172.16.300.1\n"}, "vnet3.conf", 2),
    ("garbage in dhcp.host", {"dhcp.host": "52:54:00:aa:00:01,172.16.13.5\n"
                              "52:54:00:aa:00:zz,172.16.13.6\n"}, "dhcp.host", 2),
    ("bad dnsmasq.conf line", {"dnsmasq.conf": "dhcp-range=1,2\n%% nonsense\n"},
     "dnsmasq.conf", 2),
    ("unclosed dhcpd block", {"dhcpd.conf": "subnet 172.16.13.0 netmask 255.255.255.0 {\n"
                              "  range 172.16.13.128 172.16.13.254;\n"}, "dhcpd.conf", 1),
    ("dhcpd statement without ;", {"dhcpd.conf": "host a {\n hardware ethernet "
                                   "52:54:00:aa:00:01;\n}\nauthoritative\n"}, "dhcpd.conf", 4),
    ("bad dhcpd MAC", {"dhcpd.conf": "host a {\n  hardware ethernet 52:54:00:aa:01;\n}\n"},
     "dhcpd.conf", 2),
    ("stray }", {"dhcpd.conf": "authoritative;\n}\n"}, "dhcpd.conf", 2),
]


@pytest.mark.parametrize("what,files,name,line", BAD, ids=[b[0] for b in BAD])
def test_malformed_files_raise_naming_the_line(tmp_path, what, files, name, line):
    d = write(tmp_path / "vnet3", files)
    with pytest.raises(MigrationError) as e:
        read_qemu_vlan_dir(d)
    assert Path(e.value.file).name == name
    assert e.value.line == line, str(e.value)
    assert f"{name}:{line}: " in str(e.value)
    assert e.value.message


def test_not_a_directory_and_no_subnet(tmp_path: Path):
    with pytest.raises(MigrationError):
        read_qemu_vlan_dir(tmp_path / "missing")
    with pytest.raises(MigrationError, match="gives no subnet"):
        read_qemu_vlan_dir(write(tmp_path / "lan", {}))
    with pytest.raises(MigrationError, match="cannot be a network"):
        read_qemu_vlan_dir(write(tmp_path / "vnet3", {"vnet3.conf": "br='bad name'\n"}))
    with pytest.raises(MigrationError, match="/31"):
        read_qemu_vlan_dir(write(tmp_path / "vnet4", {"vnet4.conf": "netmask=31\n"}))


# --- TOML ------------------------------------------------------------------------------------
def test_rendered_toml_round_trips_every_fixture(vnet3, vnet2, vnet4, vnet5, tmp_path):
    for d in (vnet3, vnet2, vnet4, vnet5):
        imp = read_qemu_vlan_dir(d)
        text = render_definition_toml(imp)
        assert tomllib.loads(text) == imp.definition
        assert "[[hosts]]" in text or "hosts" not in imp.definition
        assert "[[forwards]]" in text or "forwards" not in imp.definition
        assert all(line.startswith("#") for line in text.splitlines()[:2])


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_scalar = st.one_of(_text, st.booleans(), st.integers(-(2**63), 2**63 - 1))
_key = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(scalars=st.dictionaries(_key, st.one_of(_scalar, st.lists(_text, max_size=4)),
                               max_size=6),
       rows=st.lists(st.dictionaries(_key, _scalar, min_size=1, max_size=4), max_size=3),
       reason=_text)
def test_rendered_toml_round_trips_any_strings(scalars, rows, reason):
    definition = {k: v for k, v in scalars.items() if k not in ("hosts", "forwards")}
    if rows:
        definition["hosts"] = rows
    imp = Imported("vnet3", definition, {}, [Finding("/etc/qemu/vnet3/a\nb", 3, reason, reason)])
    assert tomllib.loads(render_definition_toml(imp)) == definition


def test_rendered_strings_are_escaped():
    imp = Imported("vnet3", {"domain": 'a"b\\c\n\x7f\té', "x y": ["\x00"]}, {}, [])
    text = render_definition_toml(imp)
    assert '"a\\"b\\\\c\\n\\u007f\\té"' in text
    assert '"x y" = ["\\u0000"]' in text
    assert tomllib.loads(text) == imp.definition


# --- in step with vnetd, apart from it -------------------------------------------------------
def test_limits_and_names_are_vnetds_own():
    from vnet_client.migrate import importer

    assert importer.MAX_IFNAME is limits.MAX_IFNAME
    assert importer.MAX_TAPS is limits.MAX_TAPS
    assert importer.MAX_VM_NAME is limits.MAX_VM_NAME
    assert importer._LABEL_RE is names.LABEL_RE
    for bad in ("ab_c", "-ab", "a" * 64, "a.b"):
        assert not importer._LABEL_RE.fullmatch(bad)
        with pytest.raises(model.InvalidArgument):
            model.validate_hostname(bad)
    net = ipaddress.IPv4Network("172.16.13.0/24")
    assert model.default_subnet("vnet3") == net


def test_client_module_does_not_import_the_daemon():
    files = sorted((REPO / "client/vnet_client/migrate").glob("*.py"))
    assert len(files) > 1
    for f in files:
        tree = ast.parse(f.read_text())
        mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        mods += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in mods if m.split(".")[0] == "vnetd"], f
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import vnet_client.migrate; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('vnetd', 'dbus_fast')]")
    subprocess.run([sys.executable, "-c", code, str(REPO / "client")], check=True)


def test_dhcpd_args_and_n_are_named_not_guessed(tmp_path: Path):
    imp = read_qemu_vlan_dir(write(tmp_path / "vnet15", {
        "vnet15.conf": 'DHCPD_ARGS="-q"\nn=4\nnum=2\n'}))
    assert imp.definition["taps"] == 2
    finding_at(imp, "vnet15.conf", 1, "DHCPD_ARGS")
    finding_at(imp, "vnet15.conf", 2, "not the tap count", "num=")


# --- the readers' records ------------------------------------------------------------------
def test_a_dhcp_host_value_is_read_into_its_fields_in_any_order():
    from vnet_client.migrate.dnsmasq import parse_dhcp_host

    h = parse_dhcp_host("web1,52:54:00:AA:bb:01,id:x,172.16.13.5,12h,[fd00::5]", "f", 3)
    assert h.macs == ("52:54:00:aa:bb:01",)
    assert h.ips == (ipaddress.IPv4Address("172.16.13.5"),)
    assert h.names == ("web1",) and h.dropped == ("id:x", "12h", "[fd00::5]")
    assert not h.ignore and parse_dhcp_host("52:54:00:*:*:*,ignore", "f", 1).ignore
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.ignore = True  # type: ignore[misc]
    with pytest.raises(MigrationError) as e:
        parse_dhcp_host("52:54:00:aa:bb:01,a b", "dhcp.host", 7)
    assert (e.value.file, e.value.line) == ("dhcp.host", 7)


def test_dnsmasq_command_line_options_are_split_as_dnsmasq_does():
    from vnet_client.migrate.dnsmasq import split_dnsmasq_arg

    toks = [(t, 1) for t in ["--domain=lab", "-G", "52:54:00:00:00:01,h1", "--no-hosts",
                             "-Fx", "stray"]]
    out, i = [], 0
    while i < len(toks):
        name, value, n = split_dnsmasq_arg(toks, i)
        out.append((name, value))
        i += n
    assert out == [("domain", "lab"), ("dhcp-host", "52:54:00:00:00:01,h1"),
                   ("no-hosts", None), ("dhcp-range", "x"), (None, None)]


def test_dhcpd_conf_is_read_into_records_in_file_order(tmp_path: Path):
    from vnet_client.migrate.dhcpd import DhcpdHost, DhcpdOption, DhcpdSubnet, read_dhcpd_conf
    from vnet_client.migrate.records import RangeRecord

    p = tmp_path / "dhcpd.conf"
    p.write_text("authoritative;\n"
                 "subnet 172.16.13.0 netmask 255.255.255.0 {\n"
                 "  range 172.16.13.32 172.16.13.254;\n"
                 "  option routers 172.16.13.1;\n"
                 "  host web1 { hardware ethernet 52:54:00:AA:00:01; fixed-address 172.16.13.5;"
                 " ddns-hostname x; }\n"
                 "}\n")
    items = read_dhcpd_conf(p, "dhcpd.conf")
    assert [type(i).__name__ for i in items] == [
        "Finding", "DhcpdSubnet", "RangeRecord", "DhcpdOption", "Finding", "DhcpdHost"]
    assert items[0].line == 1 and "own choice" in items[0].reason
    assert items[1] == DhcpdSubnet(ipaddress.IPv4Network("172.16.13.0/24"), "dhcpd.conf", 2,
                                   "subnet 172.16.13.0 netmask 255.255.255.0 {")
    assert items[2] == RangeRecord("172.16.13.32", "172.16.13.254", "dhcpd.conf", 3,
                                   "range 172.16.13.32 172.16.13.254;")
    assert items[3] == DhcpdOption("routers", ("172.16.13.1",), "dhcpd.conf", 4,
                                   "option routers 172.16.13.1;")
    assert "'ddns-hostname' in host web1" in items[4].reason
    host = items[5]
    assert isinstance(host, DhcpdHost)
    assert (host.name, host.mac, host.ips, host.line) == ("web1", "52:54:00:aa:00:01",
                                                          ("172.16.13.5",), 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        host.mac = None  # type: ignore[misc]
    p.write_text("host a {\n  hardware token-ring 1;\n}\n")
    with pytest.raises(MigrationError) as e:
        read_dhcpd_conf(p, "dhcpd.conf")
    assert e.value.line == 2
