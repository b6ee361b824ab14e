"""vnet-ifup and vnet-ifdown (Enslave and Release) move only a user's own tap of the network
its name says, never a port vnetd handed out. The name of a port of network `lab_x` is
`lab_x-<hex>`, which reads as a `<network>_<n>` tap of network `lab`: moved there, the port
would carry onto `lab` the identity it was given on `lab_x` (a MAC that, on `lab`, is another
user's VM's). Taken off its bridge, vnetd would forget it, and a tap its holder had made
persistent would outlive every quota."""

from __future__ import annotations

import subprocess

import pytest

from tests.harness import frames as F
from tests.harness.daemon import ALICE, BOB, VENV, as_user, run_client

from .lab import ports, settle

LAB, LAB_X = "lab", "lab_x"


@pytest.fixture(scope="module", autouse=True)
def networks(vnetd, bob_may_attach):
    for name, subnet in ((LAB, "10.231.1.0/24"), (LAB_X, "10.231.2.0/24")):
        run_client("define", name, f"--subnet={subnet}", "--dhcp=none", check=True)
        run_client("start", name, check=True)
    yield
    for name in (LAB, LAB_X):
        run_client("stop", name, "--force")
        run_client("undefine", name)


def ifupdown(user: str, command: str, ifname: str) -> subprocess.CompletedProcess:
    return subprocess.run(as_user(user, [str(VENV / "bin" / command), ifname]),
                          capture_output=True, text=True, timeout=60)


def master(vnetd, ifname: str) -> str | None:
    return vnetd.ipj("link", "show", ifname)[0].get("master")


def test_a_port_cannot_be_moved_onto_the_network_its_name_seems_to_say(vnetd, agents):
    victim = agents(ALICE, LAB, "victim")
    # the same MAC on another network is no conflict: identities are per network
    thief = agents(BOB, LAB_X, "thief", mac=victim.mac)
    assert victim.error is None and thief.error is None, (victim.hello, thief.hello)
    assert thief.ifname.startswith("lab_x-") and master(vnetd, thief.ifname) == LAB_X
    r = ifupdown(BOB, "vnet-ifup", thief.ifname)
    assert r.returncode != 0, "a port of lab_x was put on lab"
    assert "Traceback" not in r.stderr and "handed out" in r.stderr, r.stderr
    assert master(vnetd, thief.ifname) == LAB_X
    # a frame in the victim's name from the thief's port does not reach the victim's network
    victim.clear()
    probe = F.arp(1, victim.mac, "10.231.1.77", "00:00:00:00:00:00", "10.231.1.1",
                  tag="thief-as-victim")
    thief.send(probe, check=False)
    got = victim.collect(1.0)
    assert F.marker("thief-as-victim") not in b"".join(got)
    # nor is the port taken off its bridge and forgotten
    r = ifupdown(BOB, "vnet-ifdown", thief.ifname)
    assert r.returncode != 0, "a port vnetd handed out was released like a vnet-ifup tap"
    assert "Traceback" not in r.stderr and "handed out" in r.stderr, r.stderr
    settle()
    assert master(vnetd, thief.ifname) == LAB_X
    assert thief.ifname in [p[0] for p in ports()]



def test_a_vnet_ifup_tap_is_its_owners_vm(vnetd):
    """A tap vnet-ifup puts on a network is VM <tap name> there (qemu-vlan's NAME_<n>): that
    VM name is the tap owner's, as any VM name is its first registrant's. Otherwise Bob could
    register it once Alice's tap was on the bridge, then attach as that VM with the MAC her
    port learned (and read her leases); and a name Bob registered first is his, so Alice's
    vnet-ifup of a tap by that name is refused, naming him, rather than share it."""
    from tests.harness.daemon import uid_of

    for tap in ("lab_7", "lab_8"):
        vnetd.exec("ip", "tuntap", "add", "dev", tap, "mode", "tap", "user",
                   str(uid_of(ALICE)))
    try:
        r = ifupdown(ALICE, "vnet-ifup", "lab_7")
        assert r.returncode == 0, r.stderr
        r = run_client("mac", "--br=lab", "--vm=lab_7", user=BOB)
        assert r.returncode != 0 and "belongs to another user" in r.stderr, (r.stdout, r.stderr)
        r = run_client("attach", "--br=lab", "--vm=lab_7", "--nic=1", "--", "true", user=BOB)
        assert r.returncode != 0 and "belongs to another user" in r.stderr, (r.stdout, r.stderr)
        # a name Bob registered first stays his: Alice's tap of that name is not put on
        r = run_client("mac", "--br=lab", "--vm=lab_8", user=BOB)
        assert r.returncode == 0, r.stderr
        r = ifupdown(ALICE, "vnet-ifup", "lab_8")
        assert r.returncode != 0 and "belongs to another user" in r.stderr, r.stderr
        assert master(vnetd, "lab_8") is None
    finally:
        ifupdown(ALICE, "vnet-ifdown", "lab_7")
        for tap in ("lab_7", "lab_8"):
            vnetd.exec("ip", "link", "del", tap, check=False)
        run_client("mac", "forget", LAB, "lab_7")
        run_client("mac", "forget", LAB, "lab_8")
