"""import-qemu-vlan on what qemu-vlan really wrote: tests/data/qemu-vlan/ holds the two sample
directories its repository ships (samples/vnet1, samples/vmnet4) and directories made by
running the script itself, v0.1.0 and v1.0.0, in a network namespace (see the README there).
Every one imports to a definition vnetd accepts; MACs, subnets and switch MACs come over;
every line that does not is named with its file and line."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from vnet_client.migrate import (
    Imported,
    MigrationError,
    read_bridge_conf,
    read_qemu_vlan_dir,
    render_bridge_acl_rules,
    render_definition_toml,
)
from vnetd import model

DATA = Path(__file__).resolve().parents[1] / "data" / "qemu-vlan"
NAT_DIRS = ["samples/vnet1", "samples/vmnet4", "v0.1.0/vnet3", "v0.1.0/vnet4", "v0.1.0/vnet6",
            "v1.0.0/vnet3", "v1.0.0/vnet4", "v1.0.0/vnet6"]
BRIDGED_DIRS = ["v0.1.0/vnet7", "v1.0.0/vnet7"]


def shell_values(path: Path, pattern: str) -> dict[str, str]:
    """KEY=value lines of a file the script wrote, read plainly (no shell)."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(rf"({pattern})=(\S*)", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def accepted(imp: Imported) -> model.Network:
    net = model.Network.from_options(imp.network, imp.definition)
    assert model.Network.from_options(imp.network, net.to_dict(), stored=True) == net
    return net


def lines_named(imp: Imported, name: str) -> set[int]:
    return {f.line for f in imp.findings if Path(f.file).name == name and f.line}


def meaningful_lines(path: Path) -> set[int]:
    return {n for n, line in enumerate(path.read_text().splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")}


@pytest.mark.parametrize("rel", NAT_DIRS)
def test_every_fixture_imports_to_a_definition_vnetd_accepts(rel: str):
    d = DATA / rel
    imp = read_qemu_vlan_dir(d)
    net = accepted(imp)
    conf = shell_values(d / f"{d.name}.conf", r"gateway|ether|vde_switch_ether_\d+")
    # the subnet and gateway are kept (the script's 172.16.(10+N).1)
    assert str(net.gateway) == conf["gateway"]
    # every valid ether_<i> is VM <net>_<i>'s, from 0
    ether = shell_values(d / "ether.conf", r"ether_\d+") if (d / "ether.conf").exists() else {}
    valid = {f"{imp.network}_{k.split('_')[1]}": v for k, v in ether.items()
             if re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", v)}
    assert imp.macs == valid
    # the bridge's own MAC (ether=) is named, never taken for a file
    assert conf["ether"] not in imp.macs.values()
    assert any(conf["ether"] in f.reason for f in imp.findings)
    # the TOML written is the definition
    assert tomllib.loads(render_definition_toml(imp)) == imp.definition


@pytest.mark.parametrize("rel", ["v0.1.0/vnet3", "v1.0.0/vnet3", "samples/vmnet4"])
def test_dnsmasq_files_every_line_is_carried_or_named(rel: str):
    d = DATA / rel
    imp = read_qemu_vlan_dir(d)
    # dnsmasq.conf: each line is vnetd's own choice, a file read, or the range (carried over,
    # its lease time named)
    assert meaningful_lines(d / "dnsmasq.conf") <= lines_named(imp, "dnsmasq.conf")
    assert imp.definition["dhcp-start"].endswith(".32")
    assert imp.definition["dhcp-end"].endswith(".254")
    # dhcp.conf is a dhcp-optsfile: router 0.0.0.0 (dnsmasq: "this machine", the gateway) and
    # the domain, which comes over
    assert imp.definition["domain"] == "localdomain"
    assert [f for f in imp.findings if Path(f.file).name == "dhcp.conf"
            and "gateway" in f.reason and "as router" in f.reason]


def test_the_samples_blank_separated_options_are_read_and_named():
    imp = read_qemu_vlan_dir(DATA / "samples/vnet1")
    refused = [f for f in imp.findings if "dnsmasq refuses this line" in f.reason]
    assert {(Path(f.file).name, f.line) for f in refused} == {("dhcp.conf", 3), ("dhcp.conf", 4)}
    assert imp.definition["domain"] == "localdomain"


def test_sample_vnet1_points_at_another_networks_files_and_reuses_vm_macs_for_switches():
    d = DATA / "samples/vnet1"
    imp = read_qemu_vlan_dir(d)
    # dnsmasq.conf names /etc/qemu/vnet4/...: the same names here are read, and that is said
    for line in (11, 12):
        assert any(f.line == line and "the same name in this directory" in f.reason
                   for f in imp.findings if Path(f.file).name == "dnsmasq.conf")
    # its four switch MACs are ether_0..3's: a MAC is a VM's or a switch's, never both
    assert imp.definition["vde"] is True and imp.definition["taps"] == 4
    assert "vde-macs" not in imp.definition
    assert lines_named(imp, "vnet1.conf") >= {24, 25, 26, 27}
    assert imp.macs == {f"vnet1_{i}": m for i, m in enumerate(
        ["52:54:00:08:6a:ba", "52:54:00:6d:e1:39", "52:54:00:93:44:56", "52:54:00:63:27:7a"])}


@pytest.mark.parametrize("rel", ["samples/vmnet4", "v0.1.0/vnet4", "v1.0.0/vnet4"])
def test_vde_switch_macs_come_over_and_the_switch_count_gives_the_taps(rel: str):
    d = DATA / rel
    imp = read_qemu_vlan_dir(d)
    switches = shell_values(d / f"{d.name}.conf", r"vde_switch_ether_\d+")
    assert imp.definition["vde"] is True
    assert imp.definition["taps"] == len(switches)
    assert imp.definition["vde-macs"] == [switches[f"vde_switch_ether_{i}"]
                                          for i in range(len(switches))]
    net = accepted(imp)
    assert net.tap_names == [f"{d.name}_{i}" for i in range(len(switches))]


def test_v0_1_0_tap_count_follows_from_the_macs_it_wrote():
    imp = read_qemu_vlan_dir(DATA / "v0.1.0/vnet3")  # -n 2 --macaddr: 16 MACs
    assert imp.definition["taps"] == 2
    assert len(imp.macs) == 16 and imp.macs["vnet3_0"] == "52:54:00:0f:dd:1b"
    assert any("8 per tap" in f.reason for f in imp.findings)
    # -n given to the import wins, and a bad one is refused
    assert read_qemu_vlan_dir(DATA / "v0.1.0/vnet3", num=3).definition["taps"] == 3
    with pytest.raises(MigrationError, match="-n 99"):
        read_qemu_vlan_dir(DATA / "v0.1.0/vnet3", num=99)


def test_v1_0_0_broken_ether_conf_is_named_line_by_line():
    d = DATA / "v1.0.0/vnet3"
    imp = read_qemu_vlan_dir(d)
    assert imp.macs == {}
    bad = [f for f in imp.findings if Path(f.file).name == "ether.conf"]
    assert {f.line for f in bad} == meaningful_lines(d / "ether.conf")
    assert all("1.0.0" in f.reason and "not carried over" in f.reason for f in bad)
    assert imp.definition["taps"] == 4  # 32 lines, 8 per tap: v1.0.0's default -n 4
    assert any("oadcast" in f.reason for f in imp.findings)


@pytest.mark.parametrize("rel", ["v0.1.0/vnet6", "v1.0.0/vnet6"])
def test_dhcpd_directories_are_host_only(rel: str):
    imp = read_qemu_vlan_dir(DATA / rel)
    assert (imp.definition["mode"], imp.definition["dhcp"]) == ("host-only", "dhcpd")
    accepted(imp)


def test_v0_1_0_dhcpd_conf_mistakes_are_named():
    d = DATA / "v0.1.0/vnet6"
    imp = read_qemu_vlan_dir(d)
    assert (imp.definition["dhcp-start"], imp.definition["dhcp-end"]) == ("172.16.16.128",
                                                                          "172.16.16.254")
    assert meaningful_lines(d / "dhcpd.conf") - {7, 8, 11, 16, 18, 19, 23} <= \
        lines_named(imp, "dhcpd.conf")
    assert any(f.line == 15 and "by mistake" in f.reason for f in imp.findings)
    assert "hosts" not in imp.definition  # the bridge's own entry (.1) is not a guest


@pytest.mark.parametrize("rel", BRIDGED_DIRS)
def test_bridged_directories_are_refused_without_the_nic_and_bridged_with_it(rel: str):
    d = DATA / rel
    with pytest.raises(MigrationError) as e:
        read_qemu_vlan_dir(d)
    assert "--if=NIC" in e.value.message and "bridged" in e.value.message
    assert e.value.line == 19  # gateway=192.168.0.1
    imp = read_qemu_vlan_dir(d, iface="eth0", num=2)
    assert imp.definition == {"mode": "bridged", "if": "eth0", "taps": 2}
    net = accepted(imp)
    assert net.tap_names == ["vnet7_0", "vnet7_1"]
    assert lines_named(imp, "vnet7.conf") >= {18, 19, 21}
    with pytest.raises(MigrationError, match="not an interface name"):
        read_qemu_vlan_dir(d, iface="bad name")


def test_fixtures_hold_no_copy_of_the_script():
    for p in DATA.rglob("*"):
        if p.is_file() and p.name != "README.md":
            assert "#!/bin/sh" not in p.read_text()


# --- /etc/qemu/bridge.conf -------------------------------------------------------------------
def test_sample_bridge_conf_gives_its_group_the_same_bridges():
    acl = read_bridge_conf(DATA / "samples/bridge.conf", lambda p: "qemu")
    assert acl.networks("qemu") == (["br0", "virbr0", "vnet0", "vnet1", "vnet2", "vnet3",
                                     "vnet4"], [])
    assert acl.networks("bob") == ([], [])  # its include line is commented out
    js = render_bridge_acl_rules(acl, "/etc/qemu/bridge.conf")
    assert 'subject.isInGroup("qemu")' in js
    assert '["br0", "virbr0", "vnet0", "vnet1", "vnet2", "vnet3", "vnet4"]' in js
    assert 'action.id != "org.qemuvnet.Vnet1.attach"' in js
    assert js.count("polkit.Result.YES") == 1 and "polkit.Result.NO;" not in js


def test_bridge_conf_includes_are_per_group_and_deny_wins(tmp_path: Path):
    (tmp_path / "bridge.conf").write_text("allow vnet1\ndeny vnet2\nallow vnet2\n"
                                          "include bob.conf\ninclude /nonexistent/x.conf\n")
    (tmp_path / "bob.conf").write_text("# bob's\nallow all\ndeny vnet1\ninclude bridge.conf\n")
    groups = {"bridge.conf": "qemu", "bob.conf": "bob"}
    acl = read_bridge_conf(tmp_path / "bridge.conf", lambda p: groups[p.name])
    assert acl.networks("qemu") == (["vnet1"], [])
    assert acl.networks("bob") == (None, ["vnet1"])
    js = render_bridge_acl_rules(acl, "bridge.conf")
    assert 'subject.isInGroup("bob") && ["vnet1"].indexOf(network) < 0' in js
    assert 'subject.isInGroup("qemu") && ["vnet1"].indexOf(network) >= 0' in js
    assert any("does not exist" in f.reason and f.line == 5 for f in acl.findings)
    assert any("included again" in f.reason for f in acl.findings)
    # --group names the group for every file
    acl = read_bridge_conf(tmp_path / "bridge.conf", lambda p: None, group="vnetusers")
    assert set(acl.allow) == {"vnetusers"}


@pytest.mark.parametrize("text,line", [("allow\n", 1), ("# ok\npermit vnet1\n", 2),
                                       ("allow vnet1 vnet2\n", 1), ("allow bad/name\n", 1)])
def test_bridge_conf_bad_lines_are_named(tmp_path: Path, text: str, line: int):
    (tmp_path / "bridge.conf").write_text(text)
    with pytest.raises(MigrationError) as e:
        read_bridge_conf(tmp_path / "bridge.conf", lambda p: "qemu")
    assert e.value.line == line and e.value.message
