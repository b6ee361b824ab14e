"""VM names belong to users: the first uid that registers a VM name on a network owns it (and
its MACs); an administrator can forget it or give it to another user (TransferVm), and only
an administrator can."""

from __future__ import annotations

import json
import time

import pytest

from tests.harness.daemon import ALICE, BOB, PolkitRule, grant_rule, run_client, uid_of
from tests.harness.users import HOLDER, read_json, run_as, spawn_as

NET = "vnet5"
ERR = "org.qemuvnet.Vnet1.Error."

CALLS = """
async def main():
    async with Client() as c:
        out = []
        for member, sig, body in json.loads(sys.argv[1]):
            try:
                out.append((await c.call(member, sig, body)).body[0])
            except VnetClientError as e:
                out.append(e.name)
        print(json.dumps(out, default=str))
asyncio.run(main())
"""


def calls(user: str | None, *specs) -> list:
    r = run_as(user, CALLS, json.dumps(list(specs)), timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def mac(user: str, vm: str):
    return calls(user, ("GetMac", "ssu", [NET, vm, 0]))[0]


@pytest.fixture(scope="module", autouse=True)
def network(vnetd):
    run_client("define", NET, "--dhcp=none", check=True)
    with PolkitRule("60-vnet-identity-bob", grant_rule(BOB, "org.qemuvnet.Vnet1.attach")):
        yield
    run_client("undefine", NET)


def test_an_administrator_gives_a_vm_name_to_another_user():
    first = mac(ALICE, "tr1")  # alice registers tr1
    assert isinstance(first, str) and first.count(":") == 5, first
    assert mac(BOB, "tr1") == ERR + "NotOwner"
    # neither the owner nor another user may move it: that is the administrator's
    for user in (ALICE, BOB):
        answer = calls(user, ("TransferVm", "ssu", [NET, "tr1", uid_of(BOB)]))[0]
        assert answer in (ERR + "NotAuthorized",
                          "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"), answer
    assert mac(BOB, "tr1") == ERR + "NotOwner"
    assert calls(None, ("TransferVm", "ssu", [NET, "tr1", uid_of(BOB)])) == [uid_of(BOB)]
    assert mac(BOB, "tr1") == first, "the VM keeps its MAC with its new owner"
    assert mac(ALICE, "tr1") == ERR + "NotOwner"
    # the command line: back to alice, by user name
    r = run_client("mac", "transfer", NET, "tr1", ALICE, "--json", check=True)
    assert json.loads(r.stdout) == {"network": NET, "vm": "tr1", "uid": uid_of(ALICE)}
    assert mac(ALICE, "tr1") == first and mac(BOB, "tr1") == ERR + "NotOwner"
    r = run_client("mac", "transfer", NET, "tr1", "no-such-user-here")
    assert r.returncode == 2 and "no user named 'no-such-user-here'" in r.stderr


def test_transfer_refusals_change_nothing():
    mac(ALICE, "tr2")
    refusals = {
        "unknown VM": ([NET, "nosuchvm", uid_of(BOB)], "NotFound"),
        "no such uid": ([NET, "tr2", 3999999], "InvalidArgument"),
        "bad VM name": ([NET, "../x", uid_of(BOB)], "InvalidArgument"),
        "bad network name": (["no/net", "tr2", uid_of(BOB)], "InvalidArgument"),
    }
    for what, (args, error) in refusals.items():
        assert calls(None, ("TransferVm", "ssu", args)) == [ERR + error], what
    assert mac(BOB, "tr2") == ERR + "NotOwner"
    assert isinstance(mac(ALICE, "tr2"), str)


def test_no_transfer_while_the_vm_is_attached():
    run_client("start", NET, check=True)
    holder = spawn_as(ALICE, HOLDER, NET, "tr3")
    try:
        port = read_json(holder)
        assert "ifname" in port, port
        assert calls(None, ("TransferVm", "ssu", [NET, "tr3", uid_of(BOB)])) == [ERR + "Busy"]
        holder.stdin.write("exit\n")
        holder.stdin.flush()
        holder.wait(10)
        deadline = time.monotonic() + 5  # the port goes when its holder does
        while calls(None, ("TransferVm", "ssu", [NET, "tr3", uid_of(BOB)]))[0] == ERR + "Busy":
            assert time.monotonic() < deadline, "the port stayed after its holder went"
            time.sleep(0.1)
        assert mac(BOB, "tr3").count(":") == 5
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        run_client("stop", NET)


def test_an_owner_a_crash_kept_from_disk_comes_back_from_the_held_port(vnetd):
    """A new VM's owner is written just after its attach answers; vnetd killed in between
    must not leave the VM name free for another user: the port's runtime record names the
    holder, and adopting the port after the restart puts the owner back."""
    run_client("start", NET, check=True)
    holder = spawn_as(ALICE, HOLDER, NET, "crashed1")
    registry = vnetd.state_dir / f"{NET}.macs.json"  # the network's entries and owners
    try:
        assert "ifname" in read_json(holder)
        deadline = time.monotonic() + 5
        while not registry.exists() or json.loads(registry.read_text())["creators"].get(
                "crashed1") != uid_of(ALICE):
            assert time.monotonic() < deadline, "the new VM's owner was never written"
            time.sleep(0.05)
        vnetd.kill()
        data = json.loads(registry.read_text())  # as if the kill came before the write
        del data["creators"]["crashed1"]
        registry.write_text(json.dumps(data))
        vnetd.start()
        assert mac(BOB, "crashed1") == ERR + "NotOwner"
        assert json.loads(registry.read_text())["creators"]["crashed1"] == uid_of(ALICE)
        # without the held port, the name would have been free: the control
        assert mac(BOB, "crashed1-other").count(":") == 5
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        run_client("stop", NET)
