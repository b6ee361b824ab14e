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
def _fwnet(name, subnet, port=None, peers=(), evpn=False, vni=5007):
    from vnetd.render import nft as fw

    net = ipaddress.ip_network(subnet)
    return fw.FwNetwork(name=name, mode="nat", subnet=net, gateway=net[1], overlay_port=port,
                        overlay_vni=vni if port else None, overlay_peers=tuple(peers),
                        overlay_evpn=evpn)


def _elements(cmd, name):
    return [e for c in cmd["nftables"] if "add" in c and "element" in c["add"]
            and c["add"]["element"]["name"] == name for e in c["add"]["element"]["elem"]]


def _underlay_rules(cmd):
    return [c["add"]["rule"]["expr"] for c in cmd["nftables"] if "add" in c
            and "rule" in c["add"] and c["add"]["rule"]["chain"] == "from_underlay"]


def test_each_vni_is_accepted_only_from_its_own_peers():
    from vnetd.render import nft as fw

    cmd = fw.render_ruleset([_fwnet("vnet7", "172.16.17.0/24", 4789, ["10.88.0.2"], vni=7),
                             _fwnet("vnet8", "172.16.18.0/24", 4789, ["10.88.0.3"], vni=8),
                             _fwnet("vnet9", "172.16.19.0/24", 8472, ["fd88::2"], vni=9)])
    assert sorted(_elements(cmd, "vx_ports")) == [4789, 8472]
    rules = _underlay_rules(cmd)
    assert len(rules) == 4 and "drop" in rules[-1][-1]
    by_vni = {r[1]["match"]["right"]: r for r in rules[:-1]}
    assert by_vni[7][2]["match"]["right"] == {"set": ["10.88.0.2"]}
    assert by_vni[8][2]["match"]["right"] == {"set": ["10.88.0.3"]}  # not vnet7's peer
    assert by_vni[9][2]["match"]["left"] == {"payload": {"protocol": "ip6", "field": "saddr"}}


def test_an_evpn_vni_is_open_but_a_static_one_on_the_same_port_stays_filtered():
    from vnetd.render import nft as fw

    cmd = fw.render_ruleset([_fwnet("vnet7", "172.16.17.0/24", 4789, ["10.88.0.2"], vni=7),
                             _fwnet("vnet8", "172.16.18.0/24", 4789, evpn=True, vni=8)])
    rules = _underlay_rules(cmd)
    assert len(rules) == 3
    assert rules[0][2]["match"]["right"] == {"set": ["10.88.0.2"]}
    assert rules[1][1]["match"]["right"] == 8 and "accept" in rules[1][-1]
    with pytest.raises(ValueError, match="zone"):
        fw.render_ruleset([_fwnet("vnet7", "172.16.17.0/24", 4789, ["fe80::1%eth0"])])


# --- FRR fragment ----------------------------------------------------------------------------
def _evpn_net(local, peers, rr=False, asn=65000, name="vnet7"):
    from vnetd.model import Network

    opts = {"vni": 5007, "local": local, "peers": peers, "control": "evpn", "asn": asn,
            "route-reflector": rr}
    return Network.from_options(name, {"overlay": opts})


def test_frr_fragment_and_commands():
    from vnetd.render import frr

    f = frr.fragment([_evpn_net("10.88.0.2", ["10.88.0.1", "10.88.0.3"])])
    assert f == frr.Fragment(65000, "10.88.0.2", ("10.88.0.1", "10.88.0.3"))
    text = f.render()
    for line in ("router bgp 65000", " bgp router-id 10.88.0.2", " no bgp default ipv4-unicast",
                 " neighbor 10.88.0.1 remote-as 65000", " address-family l2vpn evpn",
                 "  neighbor 10.88.0.3 activate", "  advertise-all-vni"):
        assert line in text.splitlines()
    assert frr.Fragment.parse(f.dumps()) == f
    assert frr.fragment([]) is None


def test_frr_diff_removes_what_went_and_resends_the_whole_fragment():
    from vnetd.render import frr

    a = frr.Fragment(65000, "10.88.0.2", ("10.88.0.1", "10.88.0.3"))
    b = frr.Fragment(65000, "10.88.0.2", ("10.88.0.1", "10.88.0.4"))
    cmds = frr.diff(a, b)
    assert cmds[:2] == ["router bgp 65000", " no neighbor 10.88.0.3"]
    assert cmds[2:] == b.commands()  # idempotent: an FRR that lost it gets it all back
    assert frr.diff(a, a) == a.commands()
    assert frr.diff(a, None) == ["no router bgp 65000"]
    assert frr.diff(None, a) == a.commands()
    assert frr.diff(None, None) == []
    c = frr.Fragment(65001, "10.88.0.2", ("10.88.0.1",))
    assert frr.diff(a, c)[0] == "no router bgp 65000" and "router bgp 65001" in frr.diff(a, c)


def test_frr_fragment_in_an_admins_instance_leaves_the_instance_alone():
    from vnetd.render import frr

    f = frr.Fragment(65000, "10.88.0.2", ("10.88.0.1",), owned=False)
    assert not any("router-id" in c or "default ipv4-unicast" in c for c in f.commands())
    assert f.removal() == ["router bgp 65000", " no neighbor 10.88.0.1",
                           " address-family l2vpn evpn", "  no advertise-all-vni",
                           " exit-address-family"]
    assert frr.Fragment.parse(f.dumps()) == f
    assert frr.instances("router bgp 65000\n neighbor x\nrouter bgp 65001 vrf red\n") == [65000]
    have = frr.Fragment(65000, "10.88.0.2", ("10.88.0.1",), owned=False)
    want = frr.Fragment(65000, "10.88.0.2", ("10.88.0.3",))
    assert frr.merged(have, want).neighbors == ("10.88.0.1", "10.88.0.3")
    assert frr.merged(have, want).owned is False


def test_frr_refuses_addresses_that_could_carry_commands():
    from vnetd.render import frr

    with pytest.raises(InvalidArgument):
        frr.Fragment(65000, "10.88.0.2", ("fe80::1%x\nip route 0.0.0.0/0 1.1.1.1",))


def test_frr_fragment_refuses_mixed_instances():
    from vnetd.render import frr

    with pytest.raises(InvalidArgument, match="AS numbers"):
        frr.fragment([_evpn_net("10.88.0.2", ["10.88.0.1"]),
                      _evpn_net("10.88.0.2", ["10.88.0.1"], asn=65001, name="vnet8")])
    with pytest.raises(InvalidArgument, match="local addresses"):
        frr.fragment([_evpn_net("10.88.0.2", ["10.88.0.1"]),
                      _evpn_net("10.88.0.5", ["10.88.0.1"], name="vnet8")])


def test_frr_summary_parsing():
    from vnetd.render import frr

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


@pytest.mark.parametrize("bad", ["fe80::1%eth0",
                                 "2001:db8::2%x peer-group\n exit\nip route 0.0.0.0/0 1.1.1.1"])
def test_zoned_addresses_are_refused(bad):
    """A %zone may carry any text, newlines included: it must never reach vtysh or nft."""
    with pytest.raises(InvalidArgument, match="zone|not an IP address"):
        ov(local="fd00::1", peers=[bad])


def test_evpn_needs_an_ipv4_underlay():
    with pytest.raises(InvalidArgument, match="IPv4"):
        ov(local="fd00::1", control="evpn")
