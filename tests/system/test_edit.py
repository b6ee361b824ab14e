"""Changing a running network's definition: `vnet-client edit` and `reload` (a file edited by
hand) check the new definition as `define` checks one, apply the live settings at once, say
what waits for a restart, and leave the previous state running when anything is wrong."""

from __future__ import annotations

import json
import os
import stat
import tempfile
import textwrap

import pytest

from tests.harness.daemon import ALICE, BOB, PolkitRule, grant_rule, uid_of

MANAGE = "org.qemuvnet.Vnet1.manage"


def show(client, name: str) -> dict:
    return json.loads(client("show", name, "--json", check=True).stdout)


def v4_addrs(vnetd, ifname: str) -> set[str]:
    return {f'{a["local"]}/{a["prefixlen"]}' for a in vnetd.ipj("addr", "show", ifname)[0]
            ["addr_info"] if a["family"] == "inet"}


def dnsmasq_conf(vnetd, name: str) -> str:
    return (vnetd.runtime_dir / name / "dnsmasq.conf").read_text()


def server_pids(client, name: str) -> list[int]:
    return [s["pid"] for s in show(client, name).get("servers", []) if s.get("pid")]


@pytest.fixture
def two_running(vnetd, client):
    """vnet2 (172.16.12.0/24) and lab (10.77.0.0/24, dnsmasq), both running."""
    client("define", "vnet2", "--dhcp=none", "--start", check=True)
    client("define", "lab", "--subnet=10.77.0.0/24", "--dhcp=dnsmasq", "--start", check=True)
    yield vnetd.config_dir / "networks" / "lab.toml"
    for n in ("lab", "vnet2"):
        client("stop", n, "--force")
        client("undefine", n)


def test_reload_refuses_an_overlapping_subnet_and_the_running_network_goes_on(
        vnetd, client, two_running):
    path = two_running
    good = path.read_text()
    assert 'subnet = "10.77.0.0/24"' in good
    path.write_text(good.replace("10.77.0.0/24", "172.16.12.0/24"))
    r = client("reload")
    assert r.returncode == 1
    assert "lab: The subnet 172.16.12.0/24 overlaps 172.16.12.0/24 of network 'vnet2'" \
        in r.stderr, r.stderr
    assert "The previous definition stays in force" in r.stderr
    # nothing of it reached the kernel, the running network or its server
    assert v4_addrs(vnetd, "lab") == {"10.77.0.1/24"}
    assert v4_addrs(vnetd, "vnet2") == {"172.16.12.1/24"}
    assert show(client, "lab")["subnet"] == "10.77.0.0/24"
    pids = server_pids(client, "lab")
    assert pids
    # the file put back: the next reload is clean, and the server was never touched
    path.write_text(good)
    r = client("reload", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["problems"] == [], r.stdout + r.stderr
    assert server_pids(client, "lab") == pids
    # a live setting by hand: the server takes the new range at once
    path.write_text(good.replace('dhcp-end = "10.77.0.254"', 'dhcp-end = "10.77.0.150"')
                    if 'dhcp-end' in good else good + 'dhcp-end = "10.77.0.150"\n')
    client("reload", check=True)
    assert "dhcp-range=10.77.0.10,10.77.0.150," in dnsmasq_conf(vnetd, "lab") or \
        ",10.77.0.150," in dnsmasq_conf(vnetd, "lab"), dnsmasq_conf(vnetd, "lab")
    assert show(client, "lab")["state"] == "running"


def edited(tmp_path, text: str) -> str:
    """A file any test user can read (pytest's own directory is root's alone)."""
    d = tempfile.mkdtemp(prefix="vnet-edit-")
    os.chmod(d, 0o755)
    p = os.path.join(d, "new.toml")
    with open(p, "w") as f:
        f.write(text)
    os.chmod(p, 0o644)
    return p


def test_edit_applies_live_settings_at_once(vnetd, client, two_running, tmp_path):
    old = client("export", "lab", check=True).stdout
    new = old + textwrap.dedent("""\
        allow-host = true

        [[forwards]]
        proto = "tcp"
        port = "8080"
        target = "10.77.0.5"
        target-port = 80
        """).replace("allow-host = false\n", "")
    r = client("edit", "lab", "--from", edited(tmp_path, new), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["notes"] == ["lab: changed while it runs: allow-host, forwards."], out
    assert "+allow-host = true" in out["diff"]
    rules = vnetd.exec("nft", "list", "ruleset").stdout
    assert "8080" in rules and "10.77.0.5" in rules  # the forward, live
    n = show(client, "lab")
    assert n["allow-host"] is True and "restart-needed" not in n
    assert json.loads(client("forward", "list", "lab", "--json", check=True).stdout)
    # the file holds it too: a restart of vnetd keeps it
    vnetd.restart()
    assert show(client, "lab")["allow-host"] is True


def test_a_setting_only_a_restart_applies_is_refused_while_it_runs(
        vnetd, client, two_running, tmp_path):
    """The subnet makes the bridge's address and every guest's: changed under running
    guests it would cut them off, so it changes only while the network is stopped."""
    old = client("export", "lab", check=True).stdout
    text = two_running.read_text()
    new = old.replace("10.77.0.0/24", "10.78.0.0/24")
    r = client("edit", "lab", "--from", edited(tmp_path, new), "--json")
    assert r.returncode == 1, r.stdout
    err = json.loads(r.stderr)
    assert err["error"].endswith("Busy") and "subnet can change only while it is stopped" \
        in err["message"] and "vnet-client stop lab" in err["message"], err
    assert v4_addrs(vnetd, "lab") == {"10.77.0.1/24"}  # the guests' network goes on
    assert two_running.read_text() == text and "restart-needed" not in show(client, "lab")
    # the same by hand: reload refuses it, and the previous definition stays in force
    two_running.write_text(text.replace("10.77.0.0/24", "10.78.0.0/24"))
    r = client("reload")
    assert r.returncode == 1 and "lab: The network 'lab' is running, and subnet" in r.stderr
    assert v4_addrs(vnetd, "lab") == {"10.77.0.1/24"}
    assert show(client, "lab")["subnet"] == "10.77.0.0/24"
    two_running.write_text(text)
    client("reload", check=True)
    # stopped, it changes; started, it is in force
    client("stop", "lab", check=True)
    r = client("edit", "lab", "--from", edited(tmp_path, new))
    assert r.returncode == 0, r.stderr
    assert "lab: saved; it is not running" in r.stdout
    client("start", "lab", check=True)
    assert v4_addrs(vnetd, "lab") == {"10.78.0.1/24"}


@pytest.mark.parametrize("change, error, words", [
    (("10.77.0.0/24", "172.16.12.0/24"), "InvalidArgument", "overlaps 172.16.12.0/24 of "
                                                           "network 'vnet2'"),
    (('mode = "nat"', 'mode = "natt"'), "InvalidArgument", "natt"),
    (('mode = "nat"', 'name = "other"\nmode = "nat"'), None, "cannot rename 'lab'"),
    (('mode = "nat"', 'mode = '), None, "is not valid TOML"),
])
def test_a_bad_edit_is_refused_by_name_and_changes_nothing(
        vnetd, client, two_running, tmp_path, change, error, words):
    before = (two_running.read_text(), show(client, "lab"), v4_addrs(vnetd, "lab"))
    old = client("export", "lab", check=True).stdout
    assert change[0] in old
    r = client("edit", "lab", "--from", edited(tmp_path, old.replace(change[0], change[1])),
               "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    err = json.loads(r.stderr)
    assert words in err["message"], err
    if error:
        assert err["error"].endswith(error), err
    assert (two_running.read_text(), show(client, "lab"), v4_addrs(vnetd, "lab")) == before


def test_dry_run_checks_and_tells_but_changes_nothing(vnetd, client, two_running, tmp_path):
    old = client("export", "lab", check=True).stdout
    text = two_running.read_text()
    assert "autostart = false" in old
    r = client("edit", "lab", "--dry-run", "--from",
               edited(tmp_path, old.replace("autostart = false", "autostart = true")))
    assert r.returncode == 0, r.stderr
    assert "lab: changed while it runs: autostart." in r.stdout
    assert "nothing was changed (--dry-run)" in r.stdout
    assert two_running.read_text() == text and show(client, "lab")["autostart"] is False


EDITOR = """#!/bin/sh
# an editor that sets allow-host, as a person would in vi
sed -i 's/^allow-host = false$/allow-host = true/' "$1"
grep -q '^allow-host = true$' "$1" || echo 'allow-host = true' >> "$1"
"""


def test_edit_opens_the_editor_on_the_definition(vnetd, client, two_running, tmp_path):
    ed = tmp_path / "editor.sh"
    ed.write_text(EDITOR)
    ed.chmod(ed.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    r = client("edit", "lab", env={"EDITOR": str(ed), "VISUAL": ""})
    assert r.returncode == 0, r.stderr
    assert "+allow-host = true" in r.stdout and "Changed the definition of lab." in r.stdout
    assert show(client, "lab")["allow-host"] is True
    # an editor that changes nothing: nothing is done
    r = client("edit", "lab", env={"EDITOR": "true", "VISUAL": ""})
    assert r.returncode == 0 and "No change to lab" in r.stdout, r.stdout + r.stderr
    # an editor that fails: nothing is done, and the text is kept
    r = client("edit", "lab", env={"EDITOR": "false", "VISUAL": ""})
    assert r.returncode == 1 and "exited with code 1: nothing was changed" in r.stderr


def test_only_the_owner_or_root_edits_a_network(vnetd, client, tmp_path):
    rules = grant_rule(ALICE, MANAGE) + grant_rule(BOB, MANAGE)
    with PolkitRule("60-vnet-edit-delegated", rules):
        try:
            client("define", "alices", "--subnet=10.79.0.0/24", user=ALICE, check=True)
            text = client("export", "alices", check=True).stdout.replace(
                "autostart = false", "autostart = true")
            r = client("edit", "alices", "--from", edited(tmp_path, text), user=BOB)
            assert r.returncode == 1 and "belongs to" in r.stderr and ALICE in r.stderr, r.stderr
            r = client("edit", "alices", "--from", edited(tmp_path, text), user=ALICE)
            assert r.returncode == 0, r.stderr
            assert show(client, "alices")["autostart"] is True
            assert show(client, "alices")["owner"] != 0  # still alice's
        finally:
            client("undefine", "alices")


SQUAT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_live_change_that_fails_puts_back_what_ran(vnetd, client, tmp_path):
    """The DNS port of the gateway is taken, so the DHCP/DNS server a live edit asks for
    cannot start: the edit fails by name, and the network, its file and its firewall are as
    they were; once the port is free the same edit goes through."""
    import subprocess
    import sys

    from tests.harness.users import read_line

    client("define", "lab2", "--subnet=10.81.0.0/24", "--dhcp=none", "--start", check=True)
    try:
        old = client("export", "lab2", check=True).stdout
        before = (client("export", "lab2", check=True).stdout, show(client, "lab2"),
                  vnetd.exec("nft", "list", "ruleset").stdout)
        new = old.replace('dhcp = "none"', 'dhcp = "dnsmasq"') + "allow-host = true\n"
        squatter = subprocess.Popen(["ip", "netns", "exec", vnetd.netns, sys.executable, "-c",
                                     SQUAT, "10.81.0.1"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        try:
            assert read_line(squatter, 10) == "ready\n"
            r = client("edit", "lab2", "--from", edited(tmp_path, new), "--json")
            assert r.returncode == 1, r.stdout + r.stderr
            err = json.loads(r.stderr)
            assert err["error"].endswith("Failed") and "dnsmasq" in err["message"], err
            after = (client("export", "lab2", check=True).stdout, show(client, "lab2"),
                     vnetd.exec("nft", "list", "ruleset").stdout)
            assert after == before
        finally:
            squatter.kill()
            squatter.wait()
        r = client("edit", "lab2", "--from", edited(tmp_path, new), "--json")
        assert r.returncode == 0, r.stderr
        n = show(client, "lab2")
        assert n["dhcp"] == "dnsmasq" and n["allow-host"] is True
        assert server_pids(client, "lab2")
    finally:
        client("stop", "lab2", "--force")
        client("undefine", "lab2")


def test_an_edit_may_not_forward_to_a_vm_nobody_knows(vnetd, client, two_running, tmp_path):
    old = client("export", "lab", check=True).stdout
    new = old + textwrap.dedent("""\

        [[forwards]]
        proto = "tcp"
        port = "8081"
        target = "ghost9"
        target-port = 80
        """)
    r = client("edit", "lab", "--from", edited(tmp_path, new))
    assert r.returncode == 1 and "'ghost9' is neither an address nor a known VM" in r.stderr


def test_a_wider_forward_may_not_take_a_port_another_network_forwards(
        vnetd, client, two_running, tmp_path):
    client("forward", "add", "lab", "tcp", "18080", "10.77.0.5:80", check=True)
    client("forward", "add", "vnet2", "tcp", "18081", "172.16.12.5:80", check=True)
    old = client("export", "lab", check=True).stdout
    assert 'port = "18080"' in old
    r = client("edit", "lab", "--from",
               edited(tmp_path, old.replace('port = "18080"', 'port = "18080-18081"')))
    assert r.returncode == 1, r.stdout
    assert "tcp 18080-18081 is already forwarded" in r.stderr and "'vnet2'" in r.stderr, \
        r.stderr


def test_an_edit_may_not_drop_another_users_forward(vnetd, client, tmp_path):
    """Delegated managers may change what root owns, never what another of them owns: on
    root's network, alice's edit may not drop bob's forward, and one that keeps it keeps it
    bob's."""
    forward = "org.qemuvnet.Vnet1.forward"
    rules = "".join(grant_rule(u, a) for u in (ALICE, BOB) for a in (MANAGE, forward))
    with PolkitRule("60-vnet-edit-forwards", rules):
        try:
            client("define", "rootnet", "--subnet=10.82.0.0/24", check=True)
            r = client("forward", "add", "rootnet", "tcp", "18090", "10.82.0.9:80", user=BOB)
            assert r.returncode == 0, r.stderr
            old = client("export", "rootnet", check=True).stdout
            assert 'port = "18090"' in old
            without = old[:old.index("[[forwards]]")]
            r = client("edit", "rootnet", "--from", edited(tmp_path, without), user=ALICE)
            assert r.returncode == 1 and "belongs to" in r.stderr and BOB in r.stderr, r.stderr
            fwds = json.loads(client("forward", "list", "rootnet", "--json", check=True).stdout)
            assert [str(f["port"]) for f in fwds] == ["18090"], fwds
            kept = old.replace("autostart = false", "autostart = true")
            r = client("edit", "rootnet", "--from", edited(tmp_path, kept), user=ALICE)
            assert r.returncode == 0, r.stderr
            fwds = json.loads(client("forward", "list", "rootnet", "--json", check=True).stdout)
            assert len(fwds) == 1 and fwds[0]["owner"] == uid_of(BOB), fwds
        finally:
            client("undefine", "rootnet")
