"""Authorization matrix: every method of the contract, called as root, as a vnet member and as
a user outside vnet, with polkit answering yes, no or 'authentication needed' (through real
rules files), and as the owner and a non-owner of a port. Every outcome is checked against the
table below; a method added to the contract without a row fails the test. Each is called on the
bus and again on a private session (OpenSession), where every outcome must be the same."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.harness.daemon import ALICE, BOB, PolkitRule, run_client
from tests.harness.users import HOLDER, read_json, run_as, spawn_as

CONTRACT = Path(__file__).resolve().parents[2] / "dbus/org.qemuvnet.Vnet1.xml"

# method -> (the action it needs, arguments). "PORT" is replaced by a port alice holds.
MATRIX = {
    ("Manager", "ListNetworks"): ("info", "", []),
    ("Manager", "GetNetwork"): ("info", "s", ["vnet2"]),
    ("Manager", "Define"): ("manage", "sa{sv}", ["mx9", {}]),
    ("Manager", "ExportDefinition"): ("info", "s", ["vnet2"]),
    ("Manager", "Undefine"): ("manage", "s", ["nosuch"]),
    ("Manager", "Start"): ("manage", "s", ["vnet2"]),
    ("Manager", "Stop"): ("manage", "s", ["nosuch"]),
    ("Manager", "SetAutostart"): ("manage", "sb", ["vnet2", False]),
    ("Manager", "Reload"): ("manage", "", []),
    ("Manager", "Attach"): ("attach", "ssa{sv}", ["vnet2", "mx", {}]),
    ("Manager", "Detach"): ("attach+owner", "s", ["PORT"]),
    ("Manager", "OpenSession"): ("info", "", []),
    ("Manager", "ListPorts"): ("info", "", []),
    ("Manager", "GetMac"): ("attach", "ssu", ["vnet2", "mx", 0]),
    ("Manager", "ExportEtherConf"): ("info", "s", ["vnet2"]),
    ("Manager", "VdeSocket"): ("attach", "ssu", ["vnet2", "mx", 0]),
    ("Manager", "ImportMacs"): ("manage", "sa{ss}", ["vnet2", {"bad name": "x"}]),
    ("Manager", "ExportMacs"): ("info", "s", ["vnet2"]),
    ("Manager", "ForgetMac"): ("manage", "ss", ["vnet2", "nosuch"]),
    ("Manager", "TransferVm"): ("manage", "ssu", ["vnet2", "nosuch", 0]),
    ("Manager", "CheckDefinition"): ("manage", "sa{sv}", ["mx9", {}]),
    ("Manager", "Redefine"): ("manage", "sa{sv}b", ["nosuch", {}, True]),
    ("Manager", "Enslave"): ("attach", "s", ["nosuch_1"]),
    ("Manager", "Release"): ("attach", "s", ["nosuch_1"]),
    ("Manager", "AddHost"): ("manage", "ssa{sv}", ["vnet2", "mx", {"ip": "1.2.3.4"}]),
    ("Manager", "RemoveHost"): ("manage", "ss", ["vnet2", "nosuch"]),
    ("Manager", "ListHosts"): ("info", "s", ["vnet2"]),
    ("Manager", "Leases"): ("info", "s", ["vnet2"]),
    ("Manager", "AddForward"): ("forward", "sa{sv}", ["vnet2", {"proto": "tcp"}]),
    ("Manager", "RemoveForward"): ("forward", "sa{sv}", ["vnet2", {"proto": "tcp"}]),
    ("Manager", "ListForwards"): ("info", "s", ["vnet2"]),
    ("Manager", "AddPeer"): ("manage", "ss", ["vnet2", "10.77.0.9"]),
    ("Manager", "RemovePeer"): ("manage", "ss", ["vnet2", "10.77.0.9"]),
    ("Network", "GetInfo"): ("info", "", []),
    ("Network", "Start"): ("manage", "", []),
    ("Network", "Stop"): ("manage", "", []),
}

DENIED = "org.freedesktop.DBus.Error.AccessDenied"
IAR = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"

CALLER = """
from dbus_fast import Variant
calls = json.loads(sys.argv[1])
async def main():
    results = {}
    async with Client() as c:
        if sys.argv[2] == "session":  # the same calls on a private session
            try:
                await c.open_session()
            except VnetClientError:
                pass  # refused (polkit said no to everything): on the bus then
        for key, (iface, member, sig, args) in calls.items():
            if "a{sv}" in sig:
                args = [({k: Variant("s" if isinstance(v, str) else "b", v) for k, v in a.items()}
                         if isinstance(a, dict) and sig.count("a{sv}") else a) for a in args]
            path = "/org/qemuvnet/Vnet1" + ("/network/vnet2" if iface == "Network" else "")
            try:
                await c.call(member, sig, args, path=path,
                             interface="org.qemuvnet.Vnet1." + iface)
                results[key] = "ok"
            except VnetClientError as e:
                results[key] = e.name
    print(json.dumps(results))
asyncio.run(main())
"""


def rule(user: str, verdict: str) -> str:
    return ("polkit.addRule(function(action, subject) {\n"
            f'  if (action.id.indexOf("org.qemuvnet.Vnet1.") == 0 && subject.user == "{user}")'
            f"    return polkit.Result.{verdict};\n"
            "});\n")


def call_all(user: str | None, port: str, transport: str = "bus") -> dict[str, str]:
    calls = {}
    for (iface, member), (_, sig, args) in MATRIX.items():
        args = [port if a == "PORT" else a for a in args]
        calls[f"{iface}.{member}"] = [iface, member, sig, args]
    r = run_as(user, CALLER, json.dumps(calls), transport, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def expected(who: str, mode: str, action: str) -> str:
    """'allowed' (authorization passed; the call may still fail for other reasons),
    or the refusal's error name."""
    if who == "root" or mode == "yes":
        return "allowed"
    if mode == "no":
        return DENIED
    if mode == "auth":
        return IAR
    # polkit's defaults with the project's policy and rules.d file
    base = action.split("+")[0]
    if base == "info":
        return "allowed"
    if base == "attach" and who == "alice":  # group vnet; and alice owns the port
        return "allowed"
    return IAR


@pytest.fixture(scope="module")
def network(vnetd):
    run_client("define", "vnet2", "--dhcp=none", check=True)


@pytest.fixture
def alices_port(vnetd, network):
    run_client("start", "vnet2")  # rows of an earlier run may have stopped it
    holder = spawn_as(ALICE, HOLDER, "vnet2", "ownedvm")
    ifname = read_json(holder)["ifname"]
    yield ifname
    holder.kill()
    holder.wait()


def test_every_contract_method_has_a_row():
    root = ET.parse(CONTRACT).getroot()
    methods = {(i.get("name").rsplit(".", 1)[-1], m.get("name"))
               for i in root.findall("interface") for m in i.findall("method")}
    assert methods == set(MATRIX), f"rows missing or extra: {methods ^ set(MATRIX)}"
    for iface in root.findall("interface"):
        for m in iface.findall("method"):
            action = next(a.get("value") for a in m.findall("annotation")
                          if a.get("name") == "org.qemuvnet.Vnet1.PolkitAction")
            want = MATRIX[(iface.get("name").rsplit(".", 1)[-1], m.get("name"))][0]
            assert action.endswith("." + want.split("+")[0]), (m.get("name"), action)


@pytest.mark.parametrize("transport", ["bus", "session"])
@pytest.mark.parametrize("who, user, mode", [
    ("root", None, "default"),
    ("alice", ALICE, "default"), ("bob", BOB, "default"),
    ("alice", ALICE, "yes"), ("bob", BOB, "yes"),
    ("alice", ALICE, "no"), ("bob", BOB, "no"),
    ("alice", ALICE, "auth"), ("bob", BOB, "auth"),
])
def test_matrix(vnetd, alices_port, who, user, mode, transport):
    verdict = {"yes": "YES", "no": "NO", "auth": "AUTH_ADMIN"}.get(mode)
    if verdict:
        with PolkitRule(f"10-vnet-test-matrix-{who}", rule(user, verdict)):
            got = call_all(user, alices_port, transport)
    else:
        got = call_all(user, alices_port, transport)
    unexpected = {}
    for (iface, member), (action, _, _) in MATRIX.items():
        key = f"{iface}.{member}"
        want = expected(who, mode, action)
        outcome = got[key]
        refused = outcome in (DENIED, IAR)
        if want == "allowed" and refused or want != "allowed" and outcome != want:
            unexpected[key] = (want, outcome)
    assert not unexpected, unexpected
    assert vnetd.alive()


def test_a_non_owner_needs_manage_to_detach(vnetd, alices_port):
    """bob may attach (a rule grants it) but not detach alice's port without 'manage'."""
    code = """
async def main():
    async with Client() as c:
        try:
            await c.detach(sys.argv[1]); print("ok")
        except VnetClientError as e:
            print(e.name)
asyncio.run(main())
"""
    with PolkitRule("10-vnet-test-bob-attach-only", rule(BOB, "YES").replace(
            'action.id.indexOf("org.qemuvnet.Vnet1.") == 0',
            'action.id == "org.qemuvnet.Vnet1.attach"')):
        assert run_as(BOB, code, alices_port).stdout.strip() == IAR
    assert alices_port in vnetd.link_names()
    assert run_as(ALICE, code, alices_port).stdout.strip() == "ok"
