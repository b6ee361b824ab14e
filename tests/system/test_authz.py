"""Authorization through the real polkitd with the project's policy and rules."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from tests.harness import services
from tests.harness.daemon import ALICE, BOB, PolkitRule, grant_rule

IAR = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
DENIED = "org.freedesktop.DBus.Error.AccessDenied"


def test_everyone_may_list(vnetd, client):
    client("define", "vnet3", check=True)
    for user in (ALICE, BOB):
        r = client("list", "--json", user=user)
        assert r.returncode == 0, r.stderr
        assert [n["name"] for n in json.loads(r.stdout)] == ["vnet3"]
        r = client("show", "vnet3", user=user)
        assert r.returncode == 0 and "172.16.13.0/24" in r.stdout


def test_manage_without_password_is_interactive_authorization_required(vnetd, client):
    before = vnetd.snapshot()
    for user in (ALICE, BOB):
        r = client("define", "vnet4", "--no-ask-password", user=user)
        assert r.returncode == 4, r.stderr
        assert IAR in r.stderr
        assert "Authentication is required" in r.stderr
        r = client("start", "vnet3", "--no-ask-password", user=user)
        assert r.returncode == 4 and IAR in r.stderr
    # Without --no-ask-password and no terminal, the call allows interaction but no agent
    # answers: a clear refusal all the same.
    r = client("start", "vnet3", user=ALICE)
    assert r.returncode == 4 and DENIED in r.stderr and "no polkit" in r.stderr
    assert vnetd.snapshot() == before
    assert "vnet4" not in client("list", "--json").stdout


def test_a_rule_granting_manage_lets_alice_define_and_start(vnetd, client):
    with PolkitRule("90-vnet-test-alice-manage", grant_rule(ALICE, "org.qemuvnet.Vnet1.manage")):
        r = client("define", "vnet6", "--mode=host-only", "--no-ask-password", user=ALICE)
        assert r.returncode == 0, r.stderr
        r = client("start", "vnet6", "--no-ask-password", user=ALICE)
        assert r.returncode == 0, r.stderr
        assert "vnet6" in vnetd.link_names()
        # bob gets nothing from alice's rule
        r = client("stop", "vnet6", "--no-ask-password", user=BOB)
        assert r.returncode == 4
        r = client("stop", "vnet6", "--no-ask-password", user=ALICE)
        assert r.returncode == 0, r.stderr
    # the rule is gone: polkit's Changed signal dropped any cached answer
    r = client("start", "vnet6", "--no-ask-password", user=ALICE)
    assert r.returncode == 4, r.stdout + r.stderr
    client("undefine", "vnet6", check=True)


def test_root_may_do_everything(vnetd, client):
    for argv in (["define", "vnet7", "-n", "2"], ["start", "vnet7"], ["autostart", "vnet7", "on"],
                 ["reload"], ["stop", "vnet7"], ["undefine", "vnet7"]):
        r = client(*argv)
        assert r.returncode == 0, (argv, r.stderr)


def test_polkit_absent_denies_non_root(vnetd, client):
    """With polkitd gone, non-root callers are denied (fail closed); root still works."""
    # D-Bus activation must not bring polkitd back during the test
    with services.activation_parked(
            Path("/usr/share/dbus-1/system-services/org.freedesktop.PolicyKit1.service")):
        pid = services.name_owner_pid("org.freedesktop.PolicyKit1")
        if pid:
            os.kill(pid, signal.SIGTERM)
        services.wait_for(lambda: not services.has_owner("org.freedesktop.PolicyKit1"), 10,
                          "polkitd to exit")
        r = client("define", "vnet8", "--no-ask-password", user=ALICE)
        assert r.returncode == 4, r.stderr
        assert DENIED in r.stderr
        r = client("define", "vnet8")
        assert r.returncode == 0, r.stderr
        client("undefine", "vnet8", check=True)
    services.ensure_polkitd()
