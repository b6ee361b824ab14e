"""[overlay] validation: VNI, addresses, peers, roles, control plane."""

from __future__ import annotations

import ipaddress

import pytest
from vnetd.errors import Exists, InvalidArgument, NotFound
from vnetd.overlay import MAX_VNI, Overlay

BASE = {"vni": 5005, "local": "10.77.0.1"}


def ov(**kw) -> Overlay:
    return Overlay.from_options({**BASE, **kw})


def test_defaults():
    o = ov(peers=["10.77.0.2", "10.77.0.3"])
    assert o.vni == 5005 and o.port == 4789 and o.role == "gateway" and o.control == "static"
    assert o.peers == (ipaddress.ip_address("10.77.0.2"), ipaddress.ip_address("10.77.0.3"))
    assert o.ifname == "vx5005" and o.overhead == 50
    assert ov(local="fd00::1").overhead == 70


def test_round_trip():
    for o in (ov(peers=["10.77.0.2"], dev="ul0", port=8472, role="member"),
              ov(control="evpn", asn=65001, **{"route-reflector": True})):
        assert Overlay.from_options(o.to_dict()) == o


@pytest.mark.parametrize("vni", [0, -1, MAX_VNI + 1, 2**40, "5005", True, 1.5])
def test_bad_vni(vni):
    with pytest.raises(InvalidArgument, match="VNI"):
        ov(vni=vni)


def test_vni_bounds_accepted():
    assert ov(vni=1).vni == 1 and ov(vni=MAX_VNI).ifname == f"vx{MAX_VNI}"


def test_peer_equal_to_local_refused():
    with pytest.raises(InvalidArgument, match="own local address"):
        ov(peers=["10.77.0.1"])


@pytest.mark.parametrize("bad", ["nope", "0.0.0.0", "127.0.0.1", "239.1.1.1", 7, "10.77.0.2/24"])
def test_bad_addresses(bad):
    with pytest.raises(InvalidArgument):
        ov(peers=[bad])
    with pytest.raises(InvalidArgument):
        ov(local=bad)


def test_mixed_families_and_duplicates():
    with pytest.raises(InvalidArgument, match="one family"):
        ov(peers=["fd00::2"])
    with pytest.raises(Exists):
        ov(peers=["10.77.0.2", "10.77.0.2"])


@pytest.mark.parametrize("opts,match", [
    ({"role": "boss"}, "role"), ({"control": "ospf"}, "control"), ({"port": 0}, "port"),
    ({"dev": "../eth0"}, "dev"), ({"asn": 65001}, "evpn"), ({"colour": "red"}, "Unknown"),
    ({"peers": "10.77.0.2"}, "list"),
])
def test_bad_settings(opts, match):
    with pytest.raises(InvalidArgument, match=match):
        ov(**opts)


def test_missing_required():
    with pytest.raises(InvalidArgument, match="vni"):
        Overlay.from_options({"local": "10.77.0.1"})
    with pytest.raises(InvalidArgument, match="table"):
        Overlay.from_options(["vni", 1])


def test_peer_changes():
    o = ov(peers=["10.77.0.2"])
    o2 = o.with_peer(ipaddress.ip_address("10.77.0.3"))
    assert [str(p) for p in o2.peers] == ["10.77.0.2", "10.77.0.3"]
    assert o2.without_peer(ipaddress.ip_address("10.77.0.2")).peers == (
        ipaddress.ip_address("10.77.0.3"),)
    with pytest.raises(Exists):
        o.with_peer(ipaddress.ip_address("10.77.0.2"))
    with pytest.raises(NotFound):
        o.without_peer(ipaddress.ip_address("10.77.0.9"))
    with pytest.raises(InvalidArgument):
        o.with_peer(ipaddress.ip_address("10.77.0.1"))


# --- the firewall's VXLAN filter ------------------------------------------------------------
def _fwnet(name, subnet, port=None, peers=(), evpn=False):
    from vnetd.backends import firewall as fw

    net = ipaddress.ip_network(subnet)
    return fw.FwNetwork(name=name, mode="nat", subnet=net, gateway=net[1], overlay_port=port,
                        overlay_peers=tuple(peers), overlay_evpn=evpn)


def _elements(cmd, name):
    return [e for c in cmd["nftables"] if "add" in c and "element" in c["add"]
            and c["add"]["element"]["name"] == name for e in c["add"]["element"]["elem"]]


def test_static_overlay_port_accepts_only_peers():
    from vnetd.backends import firewall as fw

    cmd = fw.render_ruleset([_fwnet("vnet7", "172.16.17.0/24", 4789, ["10.88.0.2"]),
                             _fwnet("vnet8", "172.16.18.0/24", 4789, ["10.88.0.3"]),
                             _fwnet("vnet9", "172.16.19.0/24", 8472, ["fd88::2"])])
    assert sorted(_elements(cmd, "vx_ports")) == [4789, 8472]
    assert {e["concat"][0] for e in _elements(cmd, "vx_peers4")} == {"10.88.0.2", "10.88.0.3"}
    assert _elements(cmd, "vx_peers6") == [{"concat": ["fd88::2", 8472]}]
    text = repr(cmd)
    assert "from_underlay" in text and "not a peer" in text


def test_evpn_on_a_port_leaves_it_unfiltered():
    from vnetd.backends import firewall as fw

    cmd = fw.render_ruleset([_fwnet("vnet7", "172.16.17.0/24", 4789, ["10.88.0.2"]),
                             _fwnet("vnet8", "172.16.18.0/24", 4789, evpn=True)])
    assert _elements(cmd, "vx_ports") == []


# --- FRR fragment ----------------------------------------------------------------------------
def _evpn_net(local, peers, rr=False, asn=65000, name="vnet7"):
    from vnetd.model import Network

    opts = {"vni": 5007, "local": local, "peers": peers, "control": "evpn", "asn": asn,
            "route-reflector": rr}
    return Network.from_options(name, {"overlay": opts})


def test_frr_fragment_and_commands():
    from vnetd.backends import frr

    f = frr.fragment([_evpn_net("10.88.0.2", ["10.88.0.1", "10.88.0.3"])])
    assert f == frr.Fragment(65000, "10.88.0.2", ("10.88.0.1", "10.88.0.3"))
    text = f.render()
    for line in ("router bgp 65000", " bgp router-id 10.88.0.2", " no bgp default ipv4-unicast",
                 " neighbor 10.88.0.1 remote-as 65000", " address-family l2vpn evpn",
                 "  neighbor 10.88.0.3 activate", "  advertise-all-vni"):
        assert line in text.splitlines()
    assert frr.Fragment.parse(f.dumps()) == f
    assert frr.fragment([]) is None


def test_frr_diff_is_incremental_for_neighbours():
    from vnetd.backends import frr

    a = frr.Fragment(65000, "10.88.0.2", ("10.88.0.1", "10.88.0.3"))
    b = frr.Fragment(65000, "10.88.0.2", ("10.88.0.1", "10.88.0.4"))
    cmds = frr.diff(a, b)
    assert cmds[0] == "router bgp 65000" and " no neighbor 10.88.0.3" in cmds
    assert " neighbor 10.88.0.4 remote-as 65000" in cmds and "  neighbor 10.88.0.4 activate" in cmds
    assert not any("10.88.0.1" in c for c in cmds)
    assert frr.diff(a, a) == []
    assert frr.diff(a, None) == ["no router bgp 65000"]
    assert frr.diff(None, a) == a.commands()
    c = frr.Fragment(65001, "10.88.0.2", ("10.88.0.1",))
    assert frr.diff(a, c)[0] == "no router bgp 65000" and "router bgp 65001" in frr.diff(a, c)


def test_frr_fragment_refuses_mixed_instances():
    from vnetd.backends import frr

    with pytest.raises(InvalidArgument, match="AS numbers"):
        frr.fragment([_evpn_net("10.88.0.2", ["10.88.0.1"]),
                      _evpn_net("10.88.0.2", ["10.88.0.1"], asn=65001, name="vnet8")])
    with pytest.raises(InvalidArgument, match="local addresses"):
        frr.fragment([_evpn_net("10.88.0.2", ["10.88.0.1"]),
                      _evpn_net("10.88.0.5", ["10.88.0.1"], name="vnet8")])


def test_frr_summary_parsing():
    from vnetd.backends import frr

    text = ('{"routerId":"10.88.0.2","as":65000,"peers":{"10.88.0.1":{"state":"Established",'
            '"pfxRcd":2}}}')
    assert frr.parse_summary(text) == {"router-id": "10.88.0.2", "as": 65000,
                                       "peers": {"10.88.0.1": "Established"}}
    assert frr.parse_summary("% BGP not running") == {"frr": "no answer in JSON"}


def test_member_rules():
    from vnetd.model import Network

    n = Network.from_options("vnet7", {"overlay": {**BASE, "role": "member"}})
    assert n.dhcp == "none" and n.mtu_auto
    with pytest.raises(InvalidArgument, match="DHCP"):
        Network.from_options("vnet7", {"dhcp": "dnsmasq", "overlay": {**BASE, "role": "member"}})
    with pytest.raises(InvalidArgument, match="bridged"):
        Network.from_options("vnet7", {"mode": "bridged", "if": "eth0", "overlay": BASE})
    a = Network.from_options("vnet7", {"overlay": BASE})
    b = Network.from_options("vnet7", {"overlay": {**BASE, "local": "10.77.0.2"}})
    assert a.mac != b.mac  # each host's bridge differs on the shared LAN
    assert "mtu" not in a.to_dict()
    assert Network.from_options("vnet7", {"mtu": 1400, "overlay": BASE}).to_dict()["mtu"] == 1400
