"""The running service exports exactly the contract in dbus/org.qemuvnet.Vnet1.xml."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

CONTRACT = Path(__file__).resolve().parents[2] / "dbus/org.qemuvnet.Vnet1.xml"


def introspect(path: str) -> ET.Element:
    out = subprocess.run(
        ["dbus-send", "--system", "--print-reply=literal", "--dest=org.qemuvnet.Vnet1", path,
         "org.freedesktop.DBus.Introspectable.Introspect"],
        capture_output=True, text=True, check=True).stdout
    return ET.fromstring(out[out.index("<node"):])


def canon(iface: ET.Element) -> str:
    return ET.canonicalize(ET.tostring(iface), strip_text=True)


def ours(node: ET.Element) -> dict[str, str]:
    return {i.get("name"): canon(i) for i in node.findall("interface")
            if i.get("name").startswith("org.qemuvnet.")}


def test_manager_and_network_objects_export_exactly_the_contract(vnetd, client):
    contract = {i.get("name"): canon(i) for i in ET.parse(CONTRACT).getroot().findall("interface")}
    manager = introspect("/org/qemuvnet/Vnet1")
    assert ours(manager) == {"org.qemuvnet.Vnet1.Manager": contract["org.qemuvnet.Vnet1.Manager"]}
    client("define", "lab-1.x", "--subnet=10.77.0.0/24", check=True)
    children = [n.get("name") for n in introspect("/org/qemuvnet/Vnet1/network").findall("node")]
    assert children == ["lab_2d1_2ex"]
    net = introspect("/org/qemuvnet/Vnet1/network/lab_2d1_2ex")
    assert ours(net) == {"org.qemuvnet.Vnet1.Network": contract["org.qemuvnet.Vnet1.Network"]}
    every = set(ours(manager)) | set(ours(net))
    assert every == set(contract), "an interface of the contract is not exported"
    client("undefine", "lab-1.x", check=True)


def test_network_object_methods_work(vnetd, client):
    client("define", "vnet2", check=True)
    path = "/org/qemuvnet/Vnet1/network/vnet2"
    subprocess.run(["dbus-send", "--system", "--print-reply", "--dest=org.qemuvnet.Vnet1", path,
                    "org.qemuvnet.Vnet1.Network.Start"], check=True, capture_output=True)
    assert "vnet2" in vnetd.link_names()
    out = subprocess.run(["dbus-send", "--system", "--print-reply", "--dest=org.qemuvnet.Vnet1",
                          path, "org.qemuvnet.Vnet1.Network.GetInfo"],
                         check=True, capture_output=True, text=True).stdout
    assert "running" in out
    subprocess.run(["dbus-send", "--system", "--print-reply", "--dest=org.qemuvnet.Vnet1", path,
                    "org.qemuvnet.Vnet1.Network.Stop"], check=True, capture_output=True)
    assert "vnet2" not in vnetd.link_names()
    client("undefine", "vnet2", check=True)
