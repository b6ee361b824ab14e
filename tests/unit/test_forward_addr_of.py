"""A forward to an interface's addresses (addr-of) is, in the kernel, one element set per
address the interface has now, of the forward's family; none while it has none. Pure: the
addresses are given, no netlink."""

from __future__ import annotations

from types import SimpleNamespace

from vnetd.model import Network, expand_forward_words, parse_forward
from vnetd.resolver import Resolver
from vnetd.subsystems.firewall import Firewall


def forwards(addrs: dict[str, tuple[str, ...]], rule: str, family: int = 4, **kw):
    net = Network.from_options("vnet3", {"subnet6": "fd00:13::/64"})
    f = parse_forward(net, expand_forward_words({"rule": rule, **kw}))
    assert f.family == family
    # targets are addresses here: the resolver needs no registry, ports or leases
    fw = Firewall(SimpleNamespace(resolver=Resolver(lambda name: None, None, None, None)))
    fw.iface_addrs = addrs
    return f, fw._fw_forward(net, f)


def test_one_element_set_per_address_of_the_forwards_family():
    addrs = {"eth0": ("10.0.0.5", "192.0.2.7", "fd00:77::5")}
    f, ff = forwards(addrs, "eth0,tcp,8080,172.16.13.5:80")
    assert f.addr_of == "eth0"
    assert [(x.ext_addr, x.iface, x.target, x.port_lo, x.target_port) for x in ff] == [
        ("10.0.0.5", None, "172.16.13.5", 8080, 80), ("192.0.2.7", None, "172.16.13.5", 8080, 80)]
    _, ff6 = forwards(addrs, "eth0,tcp,8080,[fd00:13::5]:80/6", family=6)
    assert [x.ext_addr for x in ff6] == ["fd00:77::5"]


def test_no_address_no_element_and_incoming_is_one_element_on_the_interface():
    _, ff = forwards({"eth0": ()}, "eth0,tcp,8080,172.16.13.5:80")
    assert ff == ()
    _, ff = forwards({}, "eth1,tcp,8080,172.16.13.5:80")  # an interface that does not exist
    assert ff == ()
    _, ff = forwards({"eth0": ("10.0.0.5",)}, "eth0,tcp,8080,172.16.13.5:80",
                     **{"interface-means": "incoming"})
    assert [(x.ext_addr, x.iface) for x in ff] == [(None, "eth0")]
