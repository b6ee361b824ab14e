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


def _bob_may_attach(network: str) -> bool:
    """polkit's own answer for Bob attaching to `network` (pkcheck on a process of his)."""
    import subprocess

    from tests.harness.daemon import as_user

    sleeper = subprocess.Popen(as_user(BOB, ["sleep", "60"]))
    try:
        r = subprocess.run(["pkcheck", "--action-id", "org.qemuvnet.Vnet1.attach", "--process",
                            str(sleeper.pid), "--detail", "network", network],
                           capture_output=True, text=True, timeout=30)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert r.returncode in (0, 1, 2), r.stderr  # yes, no, a password: anything else is broken
    return r.returncode == 0


def test_a_rule_a_killed_test_session_left_behind_is_swept_before_tests_run(system_services):
    """A test session killed while a rule gave Bob more (SIGKILL, a stopped machine) leaves
    its file in /etc/polkit-1/rules.d, and polkitd goes on granting: the next session's
    tests of refusals would pass Bob through. Every harness rule carries a mark, and the
    session removes marked files before its first test (and SIGTERM unwinds a session)."""
    from tests.harness import daemon as hd

    path = hd.RULES_DIR / "60-vnet-test-left-behind.rules"
    left = f"{hd.RULE_MARK} (pid 999999999)\n" + grant_rule(BOB, "org.qemuvnet.Vnet1.attach")
    fresh = path.with_name(f".{path.name}.tmp")  # (in place whole: one change, one reload)
    fresh.write_text(left)
    hd.polkit_rules_changed(lambda: os.replace(fresh, path))
    try:
        assert _bob_may_attach("vnet7")  # what the file left behind grants
        assert path.name in hd.sweep_stale_rules()
        assert not path.exists()
        assert not _bob_may_attach("vnet7")
    finally:
        path.unlink(missing_ok=True)
