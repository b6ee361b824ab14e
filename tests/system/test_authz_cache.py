"""The cache of positive polkit answers answers exactly as polkit would: it is dropped when
polkit's configuration changes and when the sender disconnects."""

from __future__ import annotations

import time

import pytest

from tests.harness.daemon import ALICE, BOB, PolkitRule, grant_rule, run_client, uid_of
from tests.harness.users import read_json, spawn_as

LONG_LIVED = """
async def main():
    async with Client() as c:
        print(json.dumps({"name": c.bus.unique_name}), flush=True)
        for line in sys.stdin:
            vm = line.strip()
            try:
                a = await c.attach("vnet2", vm)
                a.close()
                print(json.dumps({"ok": True}), flush=True)
            except VnetClientError as e:
                print(json.dumps({"ok": False, "error": e.name}), flush=True)
asyncio.run(main())
"""


@pytest.fixture(scope="module", autouse=True)
def network(vnetd):
    run_client("define", "vnet2", "--dhcp=none", check=True)
    run_client("start", "vnet2", check=True)
    yield


def ask(proc, vm: str) -> dict:
    proc.stdin.write(vm + "\n")
    proc.stdin.flush()
    return read_json(proc)


def test_polkit_changed_drops_cached_answers(vnetd):
    proc = spawn_as(BOB, LONG_LIVED)
    try:
        read_json(proc)
        assert ask(proc, "c1")["error"].endswith("InteractiveAuthorizationRequired")
        with PolkitRule("90-vnet-test-bob-attach", grant_rule(BOB, "org.qemuvnet.Vnet1.attach")):
            assert ask(proc, "c2") == {"ok": True}
            assert ask(proc, "c3") == {"ok": True}  # answered from the cache
        # the rule is gone; polkitd emitted Changed: the same connection is asked anew
        deadline = time.monotonic() + 5
        result = ask(proc, "c4")
        while result.get("ok") and time.monotonic() < deadline:
            time.sleep(0.2)
            result = ask(proc, f"c{time.monotonic_ns()}")
        assert result == {"ok": False,
                          "error": "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"}
        assert "dropped" in vnetd.log() and "cached answers" in vnetd.log()
    finally:
        proc.kill()
        proc.wait()


def test_disconnect_drops_the_senders_answers(vnetd):
    with PolkitRule("90-vnet-test-bob-attach", grant_rule(BOB, "org.qemuvnet.Vnet1.attach")):
        proc = spawn_as(BOB, LONG_LIVED)
        name = read_json(proc)["name"]
        assert ask(proc, "d1") == {"ok": True}
        proc.stdin.close()
        proc.wait(10)
        deadline = time.monotonic() + 5
        while f"for {name}: it disconnected" not in vnetd.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"forgot 1 cached answer(s) for {name}: it disconnected" in vnetd.log()


def test_a_clients_new_vms_are_answered_from_its_networks_answer(vnetd):
    """polkit is asked whether the caller may attach to the network, not to each VM: a
    long-lived client's new VMs cost no polkit check (polkitd takes about 3 ms a check, more
    than a known VM's whole attach). Each VM name is still its first registrant's."""
    mark = len(vnetd.log())
    proc = spawn_as(ALICE, LONG_LIVED)
    try:
        read_json(proc)
        for i in range(5):
            assert ask(proc, f"fresh{i}") == {"ok": True}
    finally:
        proc.kill()
        proc.wait()
    asked = vnetd.log()[mark:].count(
        f"polkit: org.qemuvnet.Vnet1.attach for uid {uid_of(ALICE)}:")
    assert asked == 1, vnetd.log()[mark:][-3000:]
    # the names are Alice's now: Bob, allowed the network, may not take one of them
    with PolkitRule("90-vnet-test-bob-attach", grant_rule(BOB, "org.qemuvnet.Vnet1.attach")):
        proc = spawn_as(BOB, LONG_LIVED)
        try:
            read_json(proc)
            assert ask(proc, "fresh3") == {"ok": False,
                                           "error": "org.qemuvnet.Vnet1.Error.NotOwner"}
            assert ask(proc, "bobs") == {"ok": True}
        finally:
            proc.kill()
            proc.wait()
