"""Attacks on vnetd's authorization and its memory: a local user must not bloat the
authorization cache, keep rights an administrator took away, act on another user's network or
forward with delegated rights, read other users' ports, or forge the signals vnetd trusts."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.harness.daemon import ALICE, BOB, PolkitRule, grant_rule, run_client, sh, uid_of
from tests.harness.users import read_json, run_as, spawn_as

CACHE_SECONDS = 2

ATTACH_ACTION = "org.qemuvnet.Vnet1.attach"
MANAGE_ACTION = "org.qemuvnet.Vnet1.manage"
FORWARD_ACTION = "org.qemuvnet.Vnet1.forward"


@pytest.fixture(scope="module", autouse=True)
def daemon(vnetd):
    """This module's vnetd keeps positive answers for CACHE_SECONDS only; vnet2 is root's."""
    vnetd.stop()
    vnetd.start(["--authz-cache-seconds", str(CACHE_SECONDS)])
    run_client("define", "vnet2", "--dhcp=none", check=True)
    run_client("start", "vnet2", check=True)
    yield vnetd


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def network_rule(user: str, action: str, network: str) -> str:
    return (
        "polkit.addRule(function(action, subject) {\n"
        f'  if (action.id == "{action}" && subject.user == "{user}" &&\n'
        f'      action.lookup("network") == "{network}") return polkit.Result.YES;\n'
        "});\n"
    )


def grant_all(users: list[str], actions: list[str]) -> str:
    return "".join(grant_rule(u, a) for u in users for a in actions)


# --- 1. the authorization cache is bounded, and expires --------------------------------------

GETMAC_FLOOD = """
async def main():
    async with Client() as c:
        kinds = {}
        for i in range(int(sys.argv[1])):
            long = f"{i:08d}" + "x" * 4088  # 4096 characters, a new one each time
            try:
                await c.call("GetMac", "ssu", [long, long, 0])
                kinds["ok"] = kinds.get("ok", 0) + 1
            except VnetClientError as e:
                kinds[e.name] = kinds.get(e.name, 0) + 1
        print(json.dumps(kinds), flush=True)
        sys.stdin.read()  # the connection stays open until the test has looked
asyncio.run(main())
"""


def test_long_arguments_on_one_connection_do_not_grow_vnetd(daemon):
    pid = daemon.proc.pid
    run_as(ALICE, GETMAC_FLOOD, "200", timeout=120, input="")  # warm: allocator, code paths
    before = rss_kb(pid)
    proc = spawn_as(ALICE, GETMAC_FLOOD, "4000")
    try:
        kinds = read_json(proc)
        grown = rss_kb(pid) - before  # while the connection is still open
    finally:
        proc.kill()
        proc.wait()
    assert kinds == {"org.qemuvnet.Vnet1.Error.InvalidArgument": 4000}, kinds
    assert grown < 8 * 1024, f"vnetd grew by {grown} KB over 4000 refused calls"


ATTACHER = """
async def main():
    async with Client() as c:
        print(json.dumps({"name": c.bus.unique_name}), flush=True)
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            try:
                if cmd == "attach":
                    a = await c.attach("vnet2", arg)
                    a.close()
                elif cmd == "mac":
                    await c.get_mac("vnet2", arg)
                print(json.dumps({"ok": True}), flush=True)
            except VnetClientError as e:
                print(json.dumps({"ok": False, "error": e.name}), flush=True)
asyncio.run(main())
"""


def ask(proc, line: str) -> dict:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return read_json(proc)


def test_removal_from_group_vnet_reaches_an_open_connection(daemon):
    proc = spawn_as(ALICE, ATTACHER)
    try:
        read_json(proc)
        assert ask(proc, "attach g1") == {"ok": True}
        assert ask(proc, "attach g1") == {"ok": True}  # from the cache
        sh("gpasswd", "-d", ALICE, "vnet")
        try:
            time.sleep(CACHE_SECONDS + 1)
            result = ask(proc, "attach g1")  # the very call polkit said yes to before
        finally:
            sh("gpasswd", "-a", ALICE, "vnet")
        assert result["ok"] is False, "alice attached after she left group vnet"
        assert result["error"] in ("org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
                                   "org.freedesktop.DBus.Error.AccessDenied")
    finally:
        proc.kill()
        proc.wait()


# --- 2. polkit details name the network ------------------------------------------------------

PORT_CALLS = """
async def main():
    async with Client() as c:
        out = {}
        for what in sys.argv[1:]:
            cmd, _, arg = what.partition(":")
            try:
                if cmd == "enslave":
                    out[what] = await c.enslave(arg)
                elif cmd == "release":
                    out[what] = await c.release(arg)
                elif cmd == "attach-detach":
                    a = await c.attach(arg, "bobvm")
                    await c.detach(a.ifname)
                    a.close()
                    out[what] = "ok"
            except VnetClientError as e:
                out[what] = e.name
        print(json.dumps(out))
asyncio.run(main())
"""


def test_enslave_release_and_detach_name_the_network_for_polkit(daemon):
    run_client("define", "vnet3", "--dhcp=none", check=True)
    run_client("start", "vnet3", check=True)
    bob = str(uid_of(BOB))
    for tap in ("vnet2_1", "vnet3_1"):
        daemon.ip("tuntap", "add", "dev", tap, "mode", "tap", "user", bob)
    try:
        with PolkitRule("60-vnet-adv-bob-vnet3", network_rule(BOB, ATTACH_ACTION, "vnet3")):
            r = run_as(BOB, PORT_CALLS, "enslave:vnet3_1", "release:vnet3_1", "enslave:vnet2_1",
                       "attach-detach:vnet3")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["enslave:vnet3_1"] == "vnet3", out  # the rule for vnet3 applies
        assert out["release:vnet3_1"] == "vnet3", out
        assert out["attach-detach:vnet3"] == "ok", out
        assert out["enslave:vnet2_1"].endswith("InteractiveAuthorizationRequired"), out
    finally:
        for tap in ("vnet2_1", "vnet3_1"):
            daemon.ip("link", "del", tap, check=False)
        run_client("stop", "vnet3")
        run_client("undefine", "vnet3")


# --- 3. owners, when manage and forward are delegated ----------------------------------------

CALLS = """
async def main():
    async with Client() as c:
        out = {}
        for spec in json.loads(sys.argv[1]):
            key, member, sig, body = spec
            try:
                await c.call(member, sig, body)
                out[key] = "ok"
            except VnetClientError as e:
                out[key] = e.name
        print(json.dumps(out))
asyncio.run(main())
"""


def calls(user: str | None, *specs) -> dict:
    r = run_as(user, CALLS, json.dumps(list(specs)), timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


FWD_CALLS = """
from dbus_fast import Variant
async def main():
    async with Client() as c:
        out = {}
        for key, member, network, port, target in json.loads(sys.argv[1]):
            spec = {"proto": Variant("s", "tcp"), "port": Variant("s", str(port))}
            if target:
                spec["target"] = Variant("s", target)
                spec["target-port"] = Variant("s", "80")
            try:
                await c.call(member, "sa{sv}", [network, spec])
                out[key] = "ok"
            except VnetClientError as e:
                out[key] = e.name
        print(json.dumps(out))
asyncio.run(main())
"""


def fwd_calls(user: str | None, *specs) -> dict:
    r = run_as(user, FWD_CALLS, json.dumps(list(specs)), timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


NOT_OWNER = "org.qemuvnet.Vnet1.Error.NotOwner"


def test_delegated_managers_cannot_touch_another_users_network_or_forward(daemon):
    rule = grant_all([ALICE, BOB], [MANAGE_ACTION, FORWARD_ACTION])
    with PolkitRule("60-vnet-adv-delegated", rule):
        try:
            out = calls(ALICE, ["define", "Define", "sa{sv}", ["vnet4", {}]],
                        ["start", "Start", "s", ["vnet4"]])
            assert out == {"define": "ok", "start": "ok"}, out
            out = fwd_calls(ALICE, ["alice-fwd", "AddForward", "vnet4", 8041, "172.16.14.5"],
                            ["alice-fwd-root", "AddForward", "vnet2", 8042, "172.16.12.5"])
            assert out == {"alice-fwd": "ok", "alice-fwd-root": "ok"}, out

            # bob, granted manage and forward by a rule, against alice's network and forwards
            out = calls(BOB,
                        ["stop", "Stop", "s", ["vnet4"]],
                        ["undefine", "Undefine", "s", ["vnet4"]],
                        ["autostart", "SetAutostart", "sb", ["vnet4", True]],
                        ["addhost", "AddHost", "ssa{sv}", ["vnet4", "bobvm", {}]],
                        ["forget", "ForgetMac", "ss", ["vnet4", "x"]])
            assert out == {k: NOT_OWNER for k in out}, out
            out = fwd_calls(BOB, ["rm-alice", "RemoveForward", "vnet4", 8041, None],
                            ["rm-alice-on-root", "RemoveForward", "vnet2", 8042, None],
                            ["add-into-alice", "AddForward", "vnet4", 8043, "172.16.14.6"])
            assert out == {k: NOT_OWNER for k in out}, out
            assert "vnet4" in run_client("list").stdout
            assert len(json.loads(run_client("forward", "list", "vnet4", "--json").stdout)) == 1

            # root's network stays open to a delegated manager, as before
            out = fwd_calls(BOB, ["bob-fwd-root", "AddForward", "vnet2", 8044, "172.16.12.6"])
            assert out == {"bob-fwd-root": "ok"}, out
            out = calls(BOB, ["autostart-root", "SetAutostart", "sb", ["vnet2", False]])
            assert out == {"autostart-root": "ok"}, out
            # ...but not bob's forward to alice, even on root's network
            out = fwd_calls(ALICE, ["rm-bob", "RemoveForward", "vnet2", 8044, None])
            assert out == {"rm-bob": NOT_OWNER}, out

            # the owner and root may
            out = fwd_calls(ALICE, ["rm-own", "RemoveForward", "vnet4", 8041, None])
            assert out == {"rm-own": "ok"}, out
            out = fwd_calls(None, ["rm-bob-root", "RemoveForward", "vnet2", 8044, None],
                            ["rm-alice-root", "RemoveForward", "vnet2", 8042, None])
            assert out == {"rm-bob-root": "ok", "rm-alice-root": "ok"}, out
            out = calls(ALICE, ["stop", "Stop", "s", ["vnet4"]],
                        ["undefine", "Undefine", "s", ["vnet4"]])
            assert out == {"stop": "ok", "undefine": "ok"}, out
        finally:
            run_client("stop", "vnet4")
            run_client("undefine", "vnet4")


def test_not_owner_says_whose_it_is(daemon):
    with PolkitRule("60-vnet-adv-delegated", grant_all([ALICE, BOB], [MANAGE_ACTION])):
        try:
            run_client("define", "vnet5", user=ALICE, check=True)
            r = run_client("undefine", "vnet5", user=BOB)
            assert r.returncode != 0
            assert "belongs to" in r.stderr and ALICE in r.stderr, r.stderr
        finally:
            run_client("undefine", "vnet5")


# --- 4. GetNetwork shows callers without manage only their own ports -------------------------

SHOW = """
async def main():
    async with Client() as c:
        print(json.dumps(await c.get_network(sys.argv[1])))
asyncio.run(main())
"""

HOLD = """
async def main():
    async with Client() as c:
        a = await c.attach(sys.argv[1], sys.argv[2])
        print(json.dumps({"ifname": a.ifname, "mac": a.mac}), flush=True)
        sys.stdin.read()
asyncio.run(main())
"""


def show_as(user: str | None, network: str) -> dict:
    r = run_as(user, SHOW, network)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_get_network_shows_other_users_ports_only_as_a_count(daemon):
    with PolkitRule("60-vnet-adv-bob-attach", grant_rule(BOB, ATTACH_ACTION)):
        alice = spawn_as(ALICE, HOLD, "vnet2", "secretvm")
        bob = spawn_as(BOB, HOLD, "vnet2", "bobvm")
        try:
            a = read_json(alice)
            b = read_json(bob)
            seen = show_as(BOB, "vnet2")
            assert [p["vm"] for p in seen["ports"]] == ["bobvm"], seen["ports"]
            assert seen["other-ports"] == 1
            assert a["mac"] not in json.dumps(seen) and "secretvm" not in json.dumps(seen)
            mine = show_as(ALICE, "vnet2")
            assert [p["vm"] for p in mine["ports"]] == ["secretvm"]
            every = show_as(None, "vnet2")
            assert sorted(p["vm"] for p in every["ports"]) == ["bobvm", "secretvm"]
            assert every.get("other-ports", 0) == 0
            assert b["ifname"] in json.dumps(every)
        finally:
            for p in (alice, bob):
                p.kill()
                p.wait()


# --- 6. forged signals -----------------------------------------------------------------------

FORGER = """
from dbus_fast import Message, MessageType
async def main():
    victim = sys.argv[1]
    async with Client() as c:
        c.bus.send(Message(message_type=MessageType.SIGNAL, destination="org.qemuvnet.Vnet1",
                           path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                           member="NameOwnerChanged", signature="sss",
                           body=[victim, victim, ""]))
        c.bus.send(Message(message_type=MessageType.SIGNAL, destination="org.qemuvnet.Vnet1",
                           path="/org/freedesktop/PolicyKit1/Authority",
                           interface="org.freedesktop.PolicyKit1.Authority", member="Changed"))
        await c.list_networks()  # the signals went before this call's answer came
        print(json.dumps({"sent": True}))
asyncio.run(main())
"""


def test_forged_bus_and_polkit_signals_are_ignored(daemon):
    proc = spawn_as(ALICE, ATTACHER)
    try:
        name = read_json(proc)["name"]
        assert ask(proc, "mac forged1") == {"ok": True}  # a cached answer for alice
        mark = len(daemon.log())
        r = run_as(BOB, FORGER, name)
        assert r.returncode == 0, r.stderr
        time.sleep(0.3)
        after = daemon.log()[mark:]
        assert f"for {name}: it disconnected" not in after, after
        assert "polkit configuration changed" not in after, after
        assert "ignored" in after and "signal" in after, after
        assert ask(proc, "mac forged2") == {"ok": True}
    finally:
        proc.kill()
        proc.wait()


# --- leases: who has which address is told to its owner and administrators only ---------------


def register(network: str, vms) -> dict[str, str]:
    """Each (user, vm) registers its VM's MAC on the network, as that user: vm -> MAC."""
    macs = {}
    for user, vm in vms:
        r = run_client("mac", f"--br={network}", f"--vm={vm}", user=user)
        assert r.returncode == 0, r.stderr
        macs[vm] = r.stdout.strip()
    return macs


def test_leases_show_a_user_only_its_own_vms(daemon):
    from tests.harness.guests import Guest

    run_client("define", "vnet3", "--mode=host-only", check=True)
    run_client("start", "vnet3", check=True)
    guests = []
    try:
        with PolkitRule("60-vnet-adv-bob-attach", grant_rule(BOB, ATTACH_ACTION)):
            macs = register("vnet3", ((ALICE, "alicevm"), (BOB, "bobvm")))
            for vm in macs:
                g = Guest(daemon, "vnet3", mac=macs[vm])
                guests.append(g)
                assert g.dhcp(), f"{vm} got no lease"

            def leases(user):
                r = run_client("leases", "vnet3", "--json", user=user)
                assert r.returncode == 0, r.stderr
                return json.loads(r.stdout)

            mine = leases(ALICE)
            assert [le.get("vm") for le in mine] == ["alicevm"], mine
            assert macs["bobvm"] not in json.dumps(mine)
            assert [le.get("vm") for le in leases(BOB)] == ["bobvm"]
            assert sorted(le.get("vm") for le in leases(None)) == ["alicevm", "bobvm"]
    finally:
        for g in guests:
            g.close()
        run_client("stop", "vnet3")
        run_client("undefine", "vnet3")


POLKIT_FLOOD = """
import time
async def main():
    conns, per, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    clients = [Client() for _ in range(conns)]
    for c in clients:
        await c.__aenter__()
    kinds = {}
    print(json.dumps({"ready": True}), flush=True)
    end = time.monotonic() + seconds
    async def worker(c):
        while time.monotonic() < end:
            try:
                await c.list_ports()
                kinds["ok"] = kinds.get("ok", 0) + 1
            except VnetClientError as e:
                kinds[e.name] = kinds.get(e.name, 0) + 1
    await asyncio.gather(*(worker(c) for c in clients for _ in range(per)))
    print(json.dumps(kinds), flush=True)
asyncio.run(main())
"""

ATTACH_NEW_VMS = """
async def main():
    out = {"ok": 0, "refused": []}
    for i in range(int(sys.argv[1])):
        async with Client() as c:  # a new connection each time: polkit is asked each time
            try:
                a = await c.attach("vnet2", f"{sys.argv[2]}{i}")
                a.close()
                out["ok"] += 1
            except VnetClientError as e:
                out["refused"].append(e.message)
        await asyncio.sleep(0.2)
    print(json.dumps(out))
asyncio.run(main())
"""


def test_one_user_cannot_make_everyone_elses_polkit_checks_fail(daemon):
    """vnetd's bus connection may wait for at most 128 replies (dbus-daemon's
    max_replies_per_connection). Bob keeping 160 calls in flight that each ask polkit (a
    non-administrator's ListPorts asks about manage) made the checks beyond that fail, other
    users' first attach among them: "polkit is not available; refused"."""
    flood = spawn_as(BOB, POLKIT_FLOOD, "5", "32", "6")
    try:
        assert read_json(flood, 30) == {"ready": True}
        r = run_as(ALICE, ATTACH_NEW_VMS, "10", "polkit-starve-", timeout=120)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        bob = read_json(flood, 60)
    finally:
        flood.kill()
        flood.wait()
    assert got == {"ok": 10, "refused": []}, got
    # Bob's own calls are answered (beyond vnetd's calls in flight per connection: refused as
    # such), none refused for want of polkit
    assert bob.get("ok", 0) > 0, bob
    assert set(bob) <= {"ok", "org.freedesktop.DBus.Error.LimitsExceeded"}, bob


HOLD_WITH_MAC = """
async def main():
    async with Client() as c:
        a = await c.attach(sys.argv[1], sys.argv[2], mac=sys.argv[3])
        print(json.dumps({"ifname": a.ifname, "mac": a.mac}), flush=True)
        sys.stdin.read()
asyncio.run(main())
"""


def test_a_name_whose_mac_another_vm_holds_gets_another_mac(daemon):
    """A VM's stable MAC derives from its name, which anyone chooses: Bob searched offline
    for a name whose MAC is Alice's port's (hers given with mac=, or learned, so not in the
    registry), registered it, and his port was locked to her MAC, with her lease and her
    traffic. Before the fix GetMac gave Bob exactly Alice's MAC."""
    from vnetd.macs import derive_mac

    target = derive_mac("vnet2", "bobsquat", 0)
    alice = spawn_as(ALICE, HOLD_WITH_MAC, "vnet2", "alicevm-mac", target)
    try:
        port = read_json(alice, 30)
        assert port.get("mac") == target, port
        with PolkitRule("60-vnet-adv-bob-attach", grant_rule(BOB, ATTACH_ACTION)):
            r = run_client("mac", "--br=vnet2", "--vm=bobsquat", user=BOB)
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() != target
            assert r.stdout.strip() == derive_mac("vnet2", "bobsquat", 0, 1)
    finally:
        alice.kill()
        alice.wait()
        run_client("mac", "forget", "vnet2", "bobsquat")


SWEEP = """
import os
secrets, found = sys.argv[3:], []
for top in sys.argv[1:3]:
    for d, dirs, files in os.walk(top):
        for f in files:
            path = os.path.join(d, f)
            if path == os.path.join(sys.argv[1], "vnetd.log"):
                continue  # the harness's copy of the log (a host's goes to the journal)
            try:
                with open(path, "rb") as fh:
                    text = fh.read().decode("utf-8", "replace").lower()
            except OSError:
                continue
            found += [(path, s) for s in secrets if s.lower() in text]
print(json.dumps(found))
"""


def test_vnetds_files_tell_a_user_nothing_of_another_users_vms(daemon):
    """What ListPorts, Leases and ExportMacs keep from a user must not lie in a file it can
    read: a port's runtime record (VM, MAC, uid), the DHCP server's lease file (MAC, address,
    host name of every guest), the registry's last good copy. Before the fix Bob read
    Alice's VM name and MAC from the port records and her guest's lease from the lease
    file, both mode 0644 in directories anyone may enter."""
    from tests.harness.guests import Guest
    from tests.harness.users import HOLDER

    run_client("define", "vnet3", "--mode=host-only", check=True)
    run_client("start", "vnet3", check=True)
    holder = guest = None
    try:
        holder = spawn_as(ALICE, HOLDER, "vnet3", "alicevm")
        port = read_json(holder, 30)
        assert "error" not in port, port
        guest = Guest(daemon, "vnet3", mac=port["mac"])
        assert guest.dhcp(), "alicevm's guest got no lease"
        lease = next(le for le in json.loads(run_client("leases", "vnet3", "--json").stdout)
                     if le.get("vm") == "alicevm")
        r = run_as(BOB, SWEEP, str(daemon.dir), str(daemon.runtime_dir), "alicevm",
                   port["mac"], lease["ip"])
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == []
        # root still reads them all (the control: the sweep finds what is there)
        r = run_as(None, SWEEP, str(daemon.dir), str(daemon.runtime_dir), "alicevm",
                   port["mac"], lease["ip"])
        found = {s for _path, s in json.loads(r.stdout)}
        assert found == {"alicevm", port["mac"], lease["ip"]}, r.stdout
    finally:
        if guest is not None:
            guest.close()
        if holder is not None:
            holder.kill()
            holder.wait()
        run_client("stop", "vnet3")
        run_client("undefine", "vnet3")


EXPORTS = """
async def main():
    async with Client() as c:
        macs = (await c.call("ExportMacs", "s", ["vnet2"])).body[0]
        conf = (await c.call("ExportEtherConf", "s", ["vnet2"])).body[0]
        print(json.dumps({"macs": macs, "conf": conf}))
asyncio.run(main())
"""


def test_the_mac_registry_shows_a_user_only_its_own_vms(daemon):
    """Which VM has which MAC is what an attack on another guest starts from (a copied MAC,
    a guessed name): ExportMacs and ExportEtherConf give an administrator every entry, any
    other caller its own VMs'."""
    with PolkitRule("60-vnet-adv-bob-attach", grant_rule(BOB, ATTACH_ACTION)):
        macs = register("vnet2", ((ALICE, "alice-reg"), (BOB, "bob-reg")))

        def exports(user):
            r = run_as(user, EXPORTS)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        bob = exports(BOB)
        every = exports(None)
        alices = {k for k in every["macs"] if k.split("/")[0] in ("alice-reg", "secretvm")}
        assert "bob-reg/0" in bob["macs"] and "alice-reg/0" in alices
        assert not alices & set(bob["macs"]), bob
        assert macs["alice-reg"] not in json.dumps(bob) and "alice-reg" not in json.dumps(bob)
        assert macs["bob-reg"] in bob["conf"]
        assert {"alice-reg/0", "bob-reg/0"} <= set(every["macs"])
        assert macs["alice-reg"] in every["conf"] and macs["bob-reg"] in every["conf"]
        # the command line says what was left out for whom
        r = run_client("mac", "export", "vnet2", user=BOB)
        assert r.returncode == 0 and "only for an administrator" in r.stderr, r.stderr
        assert macs["alice-reg"] not in r.stdout and macs["bob-reg"] in r.stdout
        r = run_client("mac", "export", "vnet2")
        assert r.returncode == 0 and r.stderr == "" and macs["alice-reg"] in r.stdout


def test_the_vm_names_of_pre_created_taps_are_the_networks(daemon):
    """A `-n` tap is guarded with the MAC of VM <network>_<n>: a user who registered that name
    first (before the network starts, say) would own the tap's MAC, could attach as it and
    would read the leases of whoever uses the tap."""
    run_client("define", "vnet5", "--taps=2", "--dhcp=none", check=True)
    try:
        with PolkitRule("60-vnet-adv-bob-attach", grant_rule(BOB, ATTACH_ACTION)):
            # the tap's MAC is anyone's to know; asking registers the network, not the asker
            r = run_client("mac", "--br=vnet5", "--vm=vnet5_1", user=BOB)
            assert r.returncode == 0, r.stderr
            tap_mac = r.stdout.strip()
            run_client("start", "vnet5", check=True)
            r = run_client("attach", "--br=vnet5", "--vm=vnet5_1", "--", "true", user=BOB)
            assert r.returncode != 0 and "pre-created tap" in r.stderr, r.stderr
            r = run_client("attach", "--br=vnet5", "--vm=vnet5_0", "--", "true", user=BOB)
            assert r.returncode != 0 and "pre-created tap" in r.stderr, r.stderr
            listed = json.loads(run_client("ports", "--json", check=True).stdout)
            tap = next(p for p in listed if p["ifname"] == "vnet5_1")
            assert tap["mac"] == tap_mac and tap["uid"] == 0, tap
            assert calls(BOB, ("own", "GetMac", "ssu", ["vnet5", "bobs-vm", 0])) == {
                "own": "ok"}  # positive control
    finally:
        run_client("stop", "vnet5")
        run_client("undefine", "vnet5")


# --- 6. the log: one user calling in a loop cannot fill it ------------------------------------

FLOOD = """
async def main():
    async with Client() as c:
        refused = 0
        for i in range(int(sys.argv[1])):
            try:
                await c.get_network("no-such-network")
            except VnetClientError:
                refused += 1
            try:  # a change refused for want of a right: an INFO line each, before the fix
                await c.call("SetAutostart", "sb", ["vnet2", True])
            except VnetClientError:
                refused += 1
        print(json.dumps({"refused": refused}))
asyncio.run(main())
"""


def test_a_user_calling_in_a_loop_cannot_fill_the_log(daemon):
    from vnetd.bus import CallLog
    uid = uid_of(BOB)
    start = len(daemon.log())
    t = time.monotonic()
    r = run_as(BOB, FLOOD, "1500", timeout=600)
    took = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["refused"] == 3000
    run_client("autostart", "vnet2", "off", check=True)  # root's line is never held back
    new = daemon.log()[start:].splitlines()
    bobs = [line for line in new if f"uid={uid} " in line]
    assert len(bobs) <= CallLog.BURST + CallLog.RATE * took + 1, (len(bobs), took)
    assert any("SetAutostart" in line and "uid=0 " in line for line in new)
    # what was held back is said, in the next line of that uid
    time.sleep(1.5)
    r = run_as(BOB, FLOOD, "1", timeout=60)
    assert r.returncode == 0, r.stderr
    # Every refused call is accounted for: a line of its own, or counted in a later line of
    # that uid. (Whether the flood's very last call had a line is timing, so the count may
    # have been said during the flood already.)
    bobs = [line for line in daemon.log()[start:].splitlines() if f"uid={uid} " in line]
    said = sum(int(m) for line in bobs
               for m in re.findall(r"\((\d+) earlier line\(s\) of this uid held back", line))
    assert said > 0, bobs[-3:]
    assert len(bobs) + said == 3002, (len(bobs), said)
