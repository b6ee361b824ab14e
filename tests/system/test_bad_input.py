"""Bad input gets a named error and a sentence, and changes nothing in the kernel."""

from __future__ import annotations

import pytest

from tests.harness.daemon import BOB
from tests.harness.users import run_as

INVALID = "org.qemuvnet.Vnet1.Error.InvalidArgument"
EXISTS = "org.qemuvnet.Vnet1.Error.Exists"
NOT_FOUND = "org.qemuvnet.Vnet1.Error.NotFound"
BUSY = "org.qemuvnet.Vnet1.Error.Busy"


@pytest.fixture(scope="module", autouse=True)
def base_network(vnetd):
    from tests.harness.daemon import run_client

    run_client("define", "vnet2", check=True)
    run_client("start", "vnet2", check=True)
    # an interface vnetd did not make, and an address it must not overlap
    vnetd.ip("link", "add", "hostnic0", "type", "veth", "peer", "name", "hostnic0p")
    vnetd.ip("addr", "add", "10.99.0.1/16", "dev", "hostnic0")
    vnetd.ip("addr", "add", "fd99:77::1/64", "dev", "hostnic0")
    # point to point: the interface's own address is 10.97.0.1 (its peer's is not this host's)
    vnetd.ip("addr", "add", "10.97.0.1", "peer", "10.96.0.2/32", "dev", "hostnic0")
    yield


@pytest.mark.parametrize("argv, error, words", [
    (["define", "averyveryverylong"], INVALID, "too long"),  # 17 bytes
    (["define", "exactly16bytes__"], INVALID, "too long"),
    (["define", "vnet\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e95"], INVALID, "too long"),
    (["define", "vn\u00e95"], INVALID, "not allowed"),
    (["define", "../x"], INVALID, "not allowed"),
    (["define", "a b"], INVALID, "not allowed"),
    (["define", "x;rm"], INVALID, "not allowed"),
    (["define", "$(id)1"], INVALID, "not allowed"),
    (["define", ".."], INVALID, "not allowed"),
    (["define", "--", "-x1"], INVALID, "not allowed"),
    (["define", "lo"], EXISTS, "already exists"),
    (["define", "hostnic0", "--subnet=10.50.0.0/24"], EXISTS, "already exists"),
    (["define", "vnet2"], EXISTS, "already defined"),
    (["define", "vmnet2"], INVALID, "overlaps"),  # 172.16.12.0/24 like vnet2
    (["define", "other2"], INVALID, "needs one"),  # a subnet from vnetN/vmnetN names only
    (["define", "net1", "--subnet=10.99.5.0/24"], INVALID, "hostnic0"),
    (["define", "net1", "--subnet=10.98.0.0/24", "--subnet6=fd99:77::/64"], INVALID,
     "fd99:77::1/64 already on interface 'hostnic0'"),
    (["define", "net1", "--subnet=10.97.0.0/24"], INVALID, "10.97.0.1/32 already on interface"),
    (["define", "net1", "--subnet=172.16.300.0/24"], INVALID, "not an IPv4 subnet"),
    (["define", "net1", "--subnet=172.16.40.1/24"], INVALID, "host bits"),
    (["define", "net1", "--subnet=172.16.40.0"], INVALID, "prefix"),
    (["define", "net1", "--subnet=127.0.0.0/8"], INVALID, "special-purpose"),
    (["define", "net1", "--subnet=172.16.40.0/24", "--subnet6=fe80::/64"], INVALID, "special"),
    (["define", "net1", "--subnet=172.16.40.0/24", "--subnet6=fd00::1/64"], INVALID, "host bits"),
    (["define", "noNumber"], INVALID, "'noNumber' needs one"),
    (["define", "vnet999"], INVALID, "too large"),
    (["define", "vnet5", "-n", "0"], INVALID, "out of range"),
    (["define", "vnet5", "-n", "100000"], INVALID, "out of range"),
    (["define", "vnetlongname5", "--subnet=10.55.0.0/24", "-n", "64"], INVALID, "exceed"),
    (["define", "vnet5", "--mtu", "100"], INVALID, "MTU"),
    (["start", "nosuchnet"], NOT_FOUND, "no network named"),
    (["stop", "nosuchnet"], NOT_FOUND, "no network named"),
    (["start", "vnet2"], BUSY, "already running"),
    (["undefine", "vnet2"], BUSY, "stop it first"),
    (["show", "../etc"], INVALID, "not allowed"),
])
def test_refused_with_a_named_error_and_nothing_changes(vnetd, client, argv, error, words):
    before = vnetd.snapshot()
    defs_before = sorted(p.name for p in (vnetd.config_dir / "networks").glob("*"))
    r = client(*argv)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert error in r.stderr
    assert words in r.stderr
    assert "Traceback" not in r.stderr
    assert vnetd.snapshot() == before
    assert sorted(p.name for p in (vnetd.config_dir / "networks").glob("*")) == defs_before
    assert vnetd.alive()


def test_usage_errors_exit_2(client):
    for argv in (["define"], ["--br=vnet3"], ["--br=vnet3", "--start", "--stop"],
                 ["define", "vnet5", "-n", "many"], ["frobnicate"]):
        r = client(*argv)
        assert r.returncode == 2, argv


def test_start_failing_part_way_leaves_nothing(vnetd, client):
    """A tap name taken after define makes start fail after the bridge exists: rolled back."""
    client("define", "vnet5", "-n", "3", check=True)
    vnetd.ip("link", "add", "vnet5_2", "type", "veth", "peer", "name", "vnet5_2p")
    try:
        before = vnetd.snapshot()
        r = client("start", "vnet5")
        assert r.returncode == 1 and EXISTS in r.stderr and "vnet5_2" in r.stderr
        assert vnetd.snapshot() == before
        assert "vnet5" not in vnetd.link_names() and "vnet5_0" not in vnetd.link_names()
    finally:
        vnetd.ip("link", "del", "vnet5_2")
    client("start", "vnet5", check=True)
    assert {"vnet5", "vnet5_0", "vnet5_1", "vnet5_2"} <= vnetd.link_names()
    client("stop", "vnet5", check=True)
    client("undefine", "vnet5", check=True)


def test_hostile_dbus_arguments_are_refused(vnetd):
    """Wrong types and odd options straight over D-Bus: named errors, daemon alive."""
    import asyncio

    from dbus_fast import Variant
    from vnet_client import Client, VnetClientError

    deep = Variant("s", "nat")
    for _ in range(20):
        deep = Variant("v", deep)

    async def go():
        async with Client() as c:
            cases = [
                ("Define", "sa{sv}", ["vnet5", {"mtu": Variant("s", "big")}], "InvalidArgument"),
                ("Define", "sa{sv}", ["vnet5", {"bogus": Variant("b", True)}], "InvalidArgument"),
                ("Define", "sa{sv}", ["vnet5", {"taps": Variant("x", 2**40)}], "InvalidArgument"),
                ("Define", "sa{sv}", ["vnet5", {"autostart": Variant("s", "yes")}],
                 "InvalidArgument"),
                ("Define", "sa{sv}", ["vnet5", {"mode": deep}], "InvalidArgument"),
                ("Define", "sa{sv}", ["vnet5", {"mode": Variant("as", ["nat"])}],
                 "InvalidArgument"),
                ("Define", "ss", ["vnet5", "x"], "InvalidArgs"),
                ("Start", "", [], "InvalidArgs"),
                ("NoSuchMethod", "", [], "UnknownMethod"),
                ("Start", "s", ["vnet2\x01"], "InvalidArgument"),
            ]
            for member, sig, body, err in cases:
                try:
                    await c.call(member, sig, body)
                except VnetClientError as e:
                    assert e.name.endswith(err), (member, body, e.name, e.message)
                else:
                    raise AssertionError(f"{member}{body} was accepted")

    asyncio.run(go())
    assert vnetd.alive()
    assert "vnet5" not in vnetd.link_names()


def test_a_call_too_large_for_its_arguments_is_refused_before_polkit(vnetd):
    """Anyone on the system bus (Bob is not in group vnet) may send vnetd a call, and it used
    to be turned into Python values whole and held while polkit was asked: each argument was
    bounded, not a call's arguments together. Now a call whose arguments hold more than
    65,536 items in all is refused at once with InvalidArgument, one longer than the 1 MiB
    vnetd reads is dropped unread (LimitsExceeded), and a sensible one still goes through to
    polkit (Bob may not attach: refused there)."""
    r = run_as(BOB, """
from dbus_fast import Variant
async def main():
    async with Client() as c:
        for options in (
                {f"k{i}": Variant("as", ["x"] * 30000) for i in range(3)},  # 90,000 items
                {f"k{i}": Variant("s", "y" * 4000) for i in range(300)},  # 1.2 MB of text
                {"mac": Variant("s", "52:54:00:12:34:56")}):  # (a sensible one)
            try:
                await c.call("Attach", "ssa{sv}", ["vnet2", "big", options])
                print("accepted")
            except VnetClientError as e:
                print(e.name.rsplit(".", 1)[-1], e.message)
asyncio.run(main())
""", timeout=120)
    assert r.returncode == 0, r.stderr
    items, text, sensible = r.stdout.splitlines()
    assert items == "InvalidArgument The arguments hold more than 65536 items in all.", items
    assert text.startswith("LimitsExceeded A call of 12"), text
    assert text.endswith("is longer than vnetd takes (1048576 bytes); it was not read."), text
    assert not sensible.startswith("InvalidArgument"), sensible  # polkit's answer, not ours
    assert vnetd.alive()
