"""Who a VM is on a network (resolver.py): its MACs, its addresses, whose a MAC is. Only
vnetd's own identity counts (registry, static hosts, ports); a hostname a guest sent in a
DHCP request names nobody's address."""

from __future__ import annotations

from types import SimpleNamespace

from vnetd.macs import MacRegistry
from vnetd.model import Network
from vnetd.ports import Port
from vnetd.render.dnsmasq import Lease
from vnetd.resolver import Resolver

NET = Network.from_options("vnet3", {
    "subnet6": "fd00:13::/64",
    "hosts": [{"vm": "db", "mac": "52:54:00:00:00:0d", "ip": "172.16.13.20"}]})


def port(vm: str, mac: str, known: bool = True, kind: str = "attach") -> Port:
    return Port(ifname=f"vnet3-{vm}", ifindex=9, network="vnet3", vm=vm, nic=0, uid=1000,
                mac=mac, mac_known=known, holder_pid=None, queues=1, created=0.0, kind=kind)


def resolver(ports=(), leases=()) -> Resolver:
    macs = MacRegistry({"vnet3": {"web/0": "52:54:00:00:00:01", "web/1": "52:54:00:00:00:02",
                                  "old/0": "52:54:00:00:00:0f"}}, lambda *written: None)
    fake_ports = SimpleNamespace(on_network=lambda n: list(ports) if n == "vnet3" else [])
    fake_dhcp = SimpleNamespace(leases=lambda net: list(leases),
                                leases_of=lambda net, mac: tuple(le for le in leases
                                                                 if le.mac == mac))
    return Resolver(lambda n: NET if n == "vnet3" else None, macs, fake_ports, fake_dhcp)


def lease(mac: str, ip: str, hostname: str = "", expiry: int = 0) -> Lease:
    return Lease(mac=mac, ip=ip, hostname=hostname, expiry=expiry)


def test_an_address_is_itself_and_a_vm_keeps_its_lease_until_it_renews():
    r = resolver()
    assert r.address(NET, "172.16.13.7", 4) == "172.16.13.7"
    assert r.address(NET, "db", 4) == "172.16.13.20"  # no lease: its static host
    # db leased .99 before its static host was given: forwards keep going there until the
    # guest renews (and gets .20); an expired lease counts no more
    r = resolver(leases=[lease("52:54:00:00:00:0d", "172.16.13.99")])
    assert r.address(NET, "db", 4) == "172.16.13.99"
    assert r.kept_lease(NET, "db") == "172.16.13.99"
    r = resolver(leases=[lease("52:54:00:00:00:0d", "172.16.13.99", expiry=1)])
    assert r.address(NET, "db", 4) == "172.16.13.20"
    assert r.kept_lease(NET, "db") is None
    r = resolver(leases=[lease("52:54:00:00:00:0d", "172.16.13.20")])
    assert r.kept_lease(NET, "db") is None  # renewed: the lease is the static address


def test_a_vm_resolves_through_the_leases_of_its_own_macs_only():
    leases = [lease("52:54:00:00:00:02", "172.16.13.51"),
              lease("52:54:00:00:00:99", "172.16.13.52", hostname="web"),  # a guest's claim
              lease("52:54:00:00:00:02", "fd00:13::51")]
    r = resolver(leases=leases)
    assert r.address(NET, "web", 4) == "172.16.13.51"
    assert r.address(NET, "web", 6) == "fd00:13::51"
    assert r.address(NET, "nobody", 4) is None
    # the MAC of a port that holds the VM counts too, a learning port's does not
    r = resolver(ports=[port("app", "52:54:00:00:00:aa"), port("app", "52:54:00:00:00:bb",
                                                                known=False)],
                 leases=[lease("52:54:00:00:00:bb", "172.16.13.60")])
    assert r.address(NET, "app", 4) is None
    r = resolver(ports=[port("app", "52:54:00:00:00:aa")],
                 leases=[lease("52:54:00:00:00:aa", "172.16.13.61")])
    assert r.address(NET, "app", 4) == "172.16.13.61"


def test_port_addresses_bind_the_static_host_and_keep_an_older_lease():
    r = resolver(leases=[lease("52:54:00:00:00:0d", "172.16.13.99"),
                         lease("52:54:00:00:00:0d", "fd00:13::d"),
                         lease("52:54:00:00:00:77", "172.16.13.77")])
    assert r.port_addresses(NET, "52:54:00:00:00:0d") == (
        "172.16.13.20", ("172.16.13.99",), ["fd00:13::d"])
    assert r.port_addresses(NET, "52:54:00:00:00:77") == ("172.16.13.77", (), [])
    assert r.port_addresses(NET, "52:54:00:00:00:78") == (None, (), [])
    r = resolver(leases=[lease("52:54:00:00:00:0d", "172.16.13.20")])
    assert r.port_addresses(NET, "52:54:00:00:00:0d") == ("172.16.13.20", (), [])


def test_whose_mac():
    r = resolver(ports=[port("app", "52:54:00:00:00:aa"),
                        port("seg", "52:54:00:00:00:cc", kind="vde")])
    assert r.owner_of_mac("vnet3", NET.mac) == "the gateway"
    assert r.owner_of_mac("vnet3", "52:54:00:00:00:0d") == "db"
    assert r.owner_of_mac("vnet3", "52:54:00:00:00:aa") == "app"
    assert r.owner_of_mac("vnet3", "52:54:00:00:00:02") == "web"
    assert r.owner_of_mac("vnet3", "52:54:00:00:00:cc") is None  # a VDE segment is no VM
    assert r.owner_of_mac("vnet3", "52:54:00:00:00:ee") is None


def test_knows_vm_and_lease_attribution():
    r = resolver(ports=[port("app", "52:54:00:00:00:aa")],
                 leases=[lease("52:54:00:00:00:77", "172.16.13.70", hostname="Later")])
    assert r.knows_vm(NET, "web") and r.knows_vm(NET, "db") and r.knows_vm(NET, "10.0.0.1")
    assert r.knows_vm(NET, "later")  # a forward may wait for a VM that named itself
    assert not r.knows_vm(NET, "ghost")
    vms = r.lease_vms(NET)
    assert vms["52:54:00:00:00:aa"] == {"vm": "app", "port": "vnet3-app"}
    assert vms["52:54:00:00:00:0d"] == {"vm": "db"}
    assert vms["52:54:00:00:00:0f"] == {"vm": "old"}
    assert "52:54:00:00:00:77" not in vms


def test_lease_attribution_is_one_pass_and_a_port_wins():
    """Leases maps every lease through one dictionary (anyone may call it, a lease file holds
    up to 65,536 leases): a port's VM over a static host's over the registry's."""
    r = resolver(ports=[port("app", "52:54:00:00:00:0d")])
    assert r.lease_vms(NET)["52:54:00:00:00:0d"] == {"vm": "app", "port": "vnet3-app"}
