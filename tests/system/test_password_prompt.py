"""A real password prompt: polkit's text agent on a pseudo-terminal, as a person sees it."""

from __future__ import annotations

import pexpect
import pytest

from tests.harness.daemon import ADMIN, ADMIN_PASSWORD, ALICE, CLIENT, PolkitRule

ADMIN_RULE = (
    "polkit.addAdminRule(function(action, subject) {\n"
    f'  return ["unix-user:{ADMIN}"];\n'
    "});\n"
)


@pytest.fixture(scope="module")
def admin_identity(vnetd):
    with PolkitRule("10-vnet-test-admin", ADMIN_RULE):
        yield


def spawn_as_alice(*args: str) -> pexpect.spawn:
    return pexpect.spawn("runuser", ["-u", ALICE, "--", str(CLIENT), *args],
                         encoding="utf-8", timeout=30,
                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TERM": "dumb"})


def test_right_password_starts_the_network(vnetd, client, admin_identity):
    client("define", "vnet9", check=True)
    child = spawn_as_alice("start", "vnet9")
    child.expect("AUTHENTICATING FOR org.qemuvnet.Vnet1.manage")
    child.expect("Authentication is required to manage virtual network vnet9")
    child.expect(r"[Pp]assword: ")
    child.sendline(ADMIN_PASSWORD)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "Started network vnet9" in child.before
    assert "vnet9" in vnetd.link_names()
    client("stop", "vnet9", check=True)


def test_wrong_password_fails_cleanly(vnetd, client, admin_identity):
    before = vnetd.snapshot()
    child = spawn_as_alice("start", "vnet9")
    child.expect(r"[Pp]assword: ")
    child.sendline("not-the-password")
    # pkttyagent may offer another try; refuse them all
    while True:
        i = child.expect([r"[Pp]assword: ", pexpect.EOF], timeout=30)
        if i == 1:
            break
        child.sendline("still-wrong")
    child.close()
    assert child.exitstatus == 4, child.before
    assert vnetd.snapshot() == before
    assert "vnet9" not in vnetd.link_names()
