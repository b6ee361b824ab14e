"""The D-Bus contract: one table (vnet_common.contract) that the XML file, the polkit check and the
service's handlers all agree with. A method without a polkit action cannot exist."""

from __future__ import annotations

import dataclasses
import inspect
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from vnet_common import contract, wire
from vnetd import api, bus

REPO = Path(__file__).parents[2]
XML_PATH = REPO / "dbus" / "org.qemuvnet.Vnet1.xml"
FOUR = {
    "org.qemuvnet.Vnet1.info", "org.qemuvnet.Vnet1.attach", "org.qemuvnet.Vnet1.manage",
    "org.qemuvnet.Vnet1.forward",
}


def test_the_xml_file_is_exactly_what_the_table_generates():
    assert XML_PATH.read_text(encoding="utf-8") == api.contract_xml(), (
        "dbus/org.qemuvnet.Vnet1.xml is stale: regenerate it with "
        "'PYTHONPATH=helper python3 -m vnetd.api > dbus/org.qemuvnet.Vnet1.xml'"
    )


def _parse(xml: str) -> ET.Element:
    # ElementTree does not fetch the DTD; drop the DOCTYPE line pair to parse the body.
    body = xml.split("\n", 2)[2]
    return ET.fromstring(body)


def test_the_xml_is_well_formed_and_lists_every_method_and_signal():
    xml = api.contract_xml()
    assert xml.startswith("<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object "
                          "Introspection 1.0//EN\"")
    root = _parse(xml)
    assert root.tag == "node"
    seen_methods, seen_signals = set(), set()
    for iface in root.findall("interface"):
        iname = iface.get("name")
        assert iname in api.INTERFACES
        for m in iface.findall("method"):
            seen_methods.add((iname, m.get("name")))
            spec = next(x for x in api.METHODS if (x.iface, x.name) == (iname, m.get("name")))
            ann = {a.get("name"): a.get("value") for a in m.findall("annotation")}
            assert ann["org.qemuvnet.Vnet1.PolkitAction"] == spec.action
            assert ann["org.qemuvnet.Vnet1.Doc"] == spec.doc
            ins = "".join(a.get("type") for a in m.findall("arg") if a.get("direction") == "in")
            outs = "".join(a.get("type") for a in m.findall("arg")
                           if a.get("direction") == "out")
            assert (ins, outs) == (spec.in_sig, spec.out_sig)
        for s in iface.findall("signal"):
            seen_signals.add((iname, s.get("name")))
    assert seen_methods == {(m.iface, m.name) for m in api.METHODS}
    assert seen_signals == {(s.iface, s.name) for s in api.SIGNALS}
    assert {i.get("name") for i in root.findall("interface")} == set(api.INTERFACES)


def test_names_are_the_fixed_ones():
    assert api.BUS_NAME == "org.qemuvnet.Vnet1"
    assert api.MANAGER_PATH == "/org/qemuvnet/Vnet1"
    assert api.NETWORK_PATH == "/org/qemuvnet/Vnet1/network"
    assert api.PORT_PATH == "/org/qemuvnet/Vnet1/port"
    assert set(wire.ACTIONS) == FOUR


def test_every_method_has_one_of_the_four_polkit_actions():
    assert api.METHODS
    for m in api.METHODS:
        assert m.action in FOUR, m.name


# Methods that change state (GetMac gives out, and remembers, a new MAC). None of them may be
# open to everyone through 'info'.
CHANGING = {"Define", "Undefine", "Start", "Stop", "SetAutostart", "Reload", "Attach", "Detach",
            "ImportMacs", "Enslave", "Release", "GetMac", "ForgetMac", "AddPeer", "RemovePeer"}
NETWORK_ADMIN = {"Define", "Undefine", "Start", "Stop", "SetAutostart", "Reload"}


def test_reading_methods_need_info_and_changing_methods_need_more():
    for name in ("ListNetworks", "GetNetwork"):
        assert next(m for m in api.METHODS if m.name == name).action == wire.INFO
    for m in api.METHODS:
        if m.name in CHANGING:
            assert m.action != wire.INFO, f"{m.name} changes state but needs only 'info'"
        if m.name in NETWORK_ADMIN:
            assert m.action == wire.MANAGE, (m.iface, m.name)


def test_polkit_details_name_real_arguments():
    """A detail that names no argument would silently never reach polkit, so a rules file
    testing it would never match."""
    for m in api.METHODS:
        names = [a.name for a in m.args]
        for d in getattr(m, "details", ()):
            assert d in names or (m.iface == api.NETWORK and d == "name"), (m.name, d)


def test_the_attach_action_is_asked_per_network_never_per_vm():
    """polkit is asked whether a caller may attach to a network; the VM names on it are
    vnetd's (the first user to register one owns it). With the VM among the details, every
    new VM would miss the answer cache and wait for polkitd (3 ms a check here), so a
    long-lived client's new VM would cost three times a known one."""
    attach = [m for m in api.METHODS if m.action == wire.ATTACH]
    assert {m.name for m in attach} >= {"Attach", "GetMac", "VdeSocket", "Detach"}
    for m in attach:
        assert "vm" not in m.details, m.name
        if "network" in [a.name for a in m.args]:
            assert m.details == ("network",), m.name


def test_method_names_are_unique_per_interface_and_signatures_valid():
    keys = [(m.iface, m.name) for m in api.METHODS]
    assert len(keys) == len(set(keys))
    from dbus_fast import SignatureTree
    for m in api.METHODS:
        SignatureTree(m.in_sig)
        SignatureTree(m.out_sig)
        assert m.doc.strip() and m.doc.endswith(".")


@pytest.mark.parametrize("action", ["", None, "org.qemuvnet.Vnet1.admin", "info",
                                    "org.qemuvnet.Vnet1.Info", "org.freedesktop.login1.reboot"])
def test_a_method_without_a_valid_action_cannot_be_constructed(action):
    with pytest.raises(ValueError):
        contract.Method(api.MANAGER, "Evil", (), (), action, "Does anything.")


def test_a_method_with_a_valid_action_can_be_constructed():
    m = contract.Method(api.MANAGER, "Fine", contract._a("name:s", "n:u"), contract._a("ok:b"),
                        wire.MANAGE, "Fine.")
    assert (m.in_sig, m.out_sig) == ("su", "b")


def test_methods_are_immutable():
    m = api.METHODS[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.action = "nothing"  # type: ignore[misc]


# --- the service's handler table -----------------------------------------------------------
class StubListeners:
    """Anything the service subscribes to: it only appends callbacks to `.listeners`."""

    def __init__(self):
        self.listeners: list = []


class StubEngine(StubListeners):
    """The engine as Service.__init__ sees it: its own listeners, and parts (ports, dhcp, ...)
    that have listeners too. Any part asked for is made on first use."""

    def __getattr__(self, name: str) -> StubListeners:
        if name.startswith("__"):
            raise AttributeError(name)
        part = StubListeners()
        setattr(self, name, part)
        return part


def _service():
    return bus.Service(object(), StubEngine(), object())


def test_service_handlers_cover_exactly_the_contract():
    svc = _service()
    contract = {(m.iface, m.name) for m in api.METHODS}
    assert set(svc.handlers) == contract
    assert set(svc.methods) == contract
    for key, spec in svc.methods.items():
        assert spec.action in FOUR, key


def test_service_subscribes_to_the_engines_one_event_stream():
    eng = StubEngine()
    svc = bus.Service(object(), eng, object())
    assert eng.listeners == [svc.emit_event]
    # nothing else: not the engine's parts (ports, DHCP servers) behind its back
    for part in (v for v in vars(eng).values() if isinstance(v, StubListeners)):
        assert part.listeners == []
    sent = []
    svc.bus = type("Bus", (), {"send": lambda self, m: sent.append(m)})()
    port = type("Port", (), {"ifname": "vnet2-a", "network": "vnet2"})()
    svc.emit_event("network", "vnet2", "running")
    svc.emit_event("port", port, "attached")
    svc.emit_event("lease", "vnet2", object(), "added")
    assert [(m.member, m.body) for m in sent] == [
        ("NetworkChanged", ["vnet2", "running"]),
        ("PortChanged", ["vnet2-a", "vnet2", "attached"]),
        ("LeaseChanged", ["vnet2", "added"])]


def test_handlers_take_the_contract_arguments():
    """Each handler takes the caller, the object's network (on Network objects) and one
    parameter per 'in' argument of the contract."""
    svc = _service()
    for m in api.METHODS:
        handler = svc.handlers[(m.iface, m.name)]
        assert inspect.iscoroutinefunction(handler), m.name
        params = list(inspect.signature(handler).parameters)
        expected = 1 + len(m.args) + (1 if m.iface == api.NETWORK else 0)
        assert len(params) == expected, (m.iface, m.name, params)
        assert params[0] == "caller"


def test_service_refuses_a_contract_method_without_a_handler(monkeypatch):
    extra = contract.Method(api.MANAGER, "Unhandled", (), (), wire.MANAGE, "No handler.")
    monkeypatch.setattr(api, "METHODS", (*api.METHODS, extra))
    with pytest.raises(RuntimeError, match="Unhandled"):
        _service()


def test_service_refuses_a_handler_outside_the_contract(monkeypatch):
    monkeypatch.setattr(api, "METHODS", tuple(m for m in api.METHODS if m.name != "Reload"))
    with pytest.raises(RuntimeError, match="Reload"):
        _service()
