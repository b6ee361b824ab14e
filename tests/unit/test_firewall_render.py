"""The firewall backend's pure render half: structure, determinism, forward and port elements,
validation, and that nothing outside our two tables is ever named."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress as ia
import json

import pytest
from vnetd.render import nft as fw
from vnetd.render.nft import FwForward, FwNetwork, FwPort


def net(name="vnet2", mode="nat", n=12, v6=None, **kw) -> FwNetwork:
    s6 = ia.ip_network(v6) if v6 else None
    return FwNetwork(name, mode, ia.ip_network(f"172.16.{n}.0/24"), ia.ip_address(f"172.16.{n}.1"),
                     s6, (s6.network_address + 1) if s6 else None, **kw)


NETS = [
    net("vnet2", v6="fd00:12::/64", routed_with=("vnet4", "absent")),
    net("vnet3", "host-only", 13, v6="2001:db8:13::/64"),
    net("vnet4", n=14, v6="2001:db8:14::/64", spoof_protection=False),
    net("vnet5", "host-only", 15, allow_host=True),
]
FWDS = [
    FwForward("vnet2", "tcp", 4, None, 8080, 8080, "172.16.12.50", 80),
    FwForward("vnet2", "udp", 4, "10.77.0.1", 6000, 6002, "172.16.12.50", 7000, iface="eth0"),
    FwForward("vnet2", "tcp", 6, None, 8080, 8080, "fd00:12::50", 80),
    FwForward("vnet3", "tcp", 4, None, 2000, 2001, "172.16.13.9", 2000, iface="eth1"),
]
PORTS = [
    FwPort("vnet2-a", "vnet2", "52:54:00:00:00:aa", "172.16.12.60"),
    FwPort("vnet2-b", "vnet2", None),
    FwPort("vnet4-a", "vnet4", "52:54:00:00:00:bb"),
]


def cmds(doc):
    return doc["nftables"]


def elements(doc, verb="add", family=None):
    """{set name: [elements]} of the element commands of a transaction."""
    out: dict[str, list] = {}
    for c in cmds(doc):
        (v, body), = c.items()
        if v == verb and "element" in body and family in (None, body["element"]["family"]):
            out.setdefault(body["element"]["name"], []).extend(body["element"]["elem"])
    return out


def objects(doc, kind):
    return [body[kind] for c in cmds(doc) for v, body in c.items() if kind in body and v == "add"]


def walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def assert_only_our_tables(doc):
    fw.check_scope(doc)
    for node in walk(doc):
        if isinstance(node, dict):
            assert "ruleset" not in node
            if "family" in node and ("table" in node or "name" in node):
                assert node["family"] in ("inet", "bridge"), node
                assert node.get("table", fw.TABLE) == fw.TABLE, node
                if "table" not in node:  # a table object itself
                    assert node["name"] == fw.TABLE, node


# --- the whole ruleset ------------------------------------------------------------------------


BRIDGE_T = {"family": "bridge", "name": "qemu_vnet"}
INET_T = {"family": "inet", "name": "qemu_vnet"}
# the sets the JSON ruleset declares in the bridge table; the raw ones and spoof are text-made
BRIDGE_JSON_SETS = {"guarded", "pending", "seg", "locked", "unlocked", "bridged", "v4_bound",
                    "v4_sub", "port_mac", "port_ip4", "port_sub4", "port_ip6", "taken", "claimed4",
                    "claimed6"}
RAW = ("port_mac_raw", "port_t6", "claimed6_raw", "taken_raw")


def test_ruleset_flushes_both_tables_in_place_and_never_the_spoof_counts():
    doc = fw.render_ruleset(NETS, FWDS, PORTS)
    c = cmds(doc)
    assert c[0] == {"add": {"table": INET_T}}
    assert c[1] == {"flush": {"table": INET_T}}
    i = c.index({"add": {"table": BRIDGE_T}})
    assert c[i + 1] == {"flush": {"table": BRIDGE_T}}
    # neither table is deleted: the bridge table keeps its text-made sets and the drop counts
    assert not any("delete" in x and "table" in x["delete"] for x in c)
    # every set and map of both tables is flushed right after being added, so stale
    # elements go
    for k, c0 in enumerate(c):
        for kind in ("set", "map"):
            if "add" in c0 and kind in c0["add"]:
                o = c0["add"][kind]
                assert c[k + 1] == {"flush": {kind: {"family": o["family"],
                                                     "table": "qemu_vnet", "name": o["name"]}}}
    bsets = {o["name"]: o for o in objects(doc, "set") if o["family"] == "bridge"}
    assert set(bsets) == BRIDGE_JSON_SETS
    assert not [o for o in objects(doc, "map") if o["family"] == "bridge"]
    assert bsets["port_mac"]["type"] == ["ifname", "ether_addr"]
    assert bsets["port_ip4"]["type"] == ["ifname", "ipv4_addr"]
    assert bsets["port_sub4"]["type"] == ["ifname", "ipv4_addr"]
    assert bsets["port_sub4"]["flags"] == ["interval"]
    assert bsets["port_ip6"]["type"] == ["ifname", "ipv6_addr"]
    # the text-made typeof sets are flushed (not declared) before any element goes in;
    # spoof is never flushed (its elements hold each port's drop count)
    first_elem = min(k for k, x in enumerate(c) if "element" in x.get("add", {})
                     and x["add"]["element"]["family"] == "bridge")
    for name in RAW:
        f = {"flush": {"set": {"family": "bridge", "table": "qemu_vnet", "name": name}}}
        assert f in c and c.index(f) < first_elem
    assert not any(body.get("name") == "spoof" for x in c if "flush" in x
                   for body in x["flush"].values())
    assert not ({"spoof", *RAW} & {o["name"] for o in objects(doc, "set")})


def test_fresh_ruleset_recreates_the_inet_table_and_bridge_text_the_bridge_table():
    c = cmds(fw.render_ruleset(NETS, FWDS, PORTS, fresh=True))
    assert c[:3] == [{"add": {"table": INET_T}}, {"delete": {"table": INET_T}},
                     {"add": {"table": INET_T}}]
    i = c.index({"add": {"table": BRIDGE_T}})
    assert not any("flush" in x for x in c[:i])  # a new inet table has nothing to flush
    assert c[i + 1] == {"flush": {"table": BRIDGE_T}}
    assert {"delete": {"table": BRIDGE_T}} not in c
    # the bridge table is deleted and made again by the text applied before the ruleset
    assert fw.bridge_text(["guarded", "spoof"], fresh=True) == (
        "add table bridge qemu_vnet\ndelete table bridge qemu_vnet\n" + fw.BRIDGE_TEXT_SETS)


def test_base_chains_hooks_priorities_and_accept_policy():
    doc = fw.render_ruleset(NETS, FWDS, PORTS)
    base = {(ch["family"], ch["name"]): (ch["type"], ch["hook"], ch["prio"], ch["policy"])
            for ch in objects(doc, "chain") if "hook" in ch}
    assert base == {
        ("inet", "input"): ("filter", "input", 0, "accept"),
        ("inet", "forward"): ("filter", "forward", 0, "accept"),
        ("inet", "prerouting"): ("nat", "prerouting", -100, "accept"),
        ("inet", "output"): ("nat", "output", -100, "accept"),
        ("inet", "postrouting"): ("nat", "postrouting", 100, "accept"),
        ("bridge", "prerouting"): ("filter", "prerouting", -200, "accept"),
        ("bridge", "forward"): ("filter", "forward", 0, "accept"),
        ("bridge", "input"): ("filter", "input", 0, "accept"),
        ("bridge", "output"): ("filter", "output", 0, "accept"),
    }


def test_rules_and_chains_do_not_grow_with_networks_forwards_or_ports():
    def nrules(doc):
        return len(objects(doc, "rule")), len(objects(doc, "chain"))

    small = fw.render_ruleset([NETS[0]])
    many_nets = [net(f"big{i}", "nat" if i % 2 else "host-only", 100 + i) for i in range(40)]
    many_fwds = [FwForward("vnet2", "tcp", 4, None, 10000 + i, 10000 + i, "172.16.12.50", 80)
                 for i in range(500)]
    big = fw.render_ruleset([NETS[0], *many_nets], many_fwds,
                            [FwPort(f"t{i}", "vnet2", f"52:54:00:00:01:{i:02x}")
                             for i in range(50)])
    assert nrules(small) == nrules(big)
    assert len(elements(big)["fwd4_ip"]) == 500
    assert len(elements(big)["guarded"]) == 50


def test_empty_ruleset_still_creates_both_tables_chains_and_sets():
    doc = fw.render_ruleset([])
    assert_only_our_tables(doc)
    assert {(c["family"], c["name"]) for c in objects(doc, "table")} == {
        ("inet", "qemu_vnet"), ("bridge", "qemu_vnet")}
    assert len([c for c in objects(doc, "chain") if "hook" in c]) == 9
    assert elements(doc) == {}


def test_render_is_deterministic_and_independent_of_input_order():
    a = fw.render_ruleset(NETS, FWDS, PORTS)
    b = fw.render_ruleset(list(reversed(NETS)), FWDS, list(reversed(PORTS)))
    assert json.dumps(a, sort_keys=True) == json.dumps(fw.render_ruleset(NETS, FWDS, PORTS),
                                                        sort_keys=True)
    assert a == b
    json.dumps(a)  # plain JSON types only


def test_network_sets():
    el = elements(fw.render_ruleset(NETS))
    assert sorted(el["bridges"]) == ["vnet2", "vnet3", "vnet4", "vnet5"]
    assert sorted(el["nat_out"]) == ["vnet2", "vnet4"]
    assert sorted(el["host_ok"]) == ["vnet2", "vnet4", "vnet5"]  # nat, or host-only + allow_host
    assert el["masq4"] == [{"prefix": {"addr": "172.16.12.0", "len": 24}},
                           {"prefix": {"addr": "172.16.14.0", "len": 24}}]
    # only the ULA prefix of a nat network is masqueraded; the global one is routed
    assert el["masq6"] == [{"prefix": {"addr": "fd00:12::", "len": 64}}]
    pairs = sorted(tuple(e["concat"]) for e in el["pass"])
    assert pairs == sorted([("vnet2", "vnet2"), ("vnet3", "vnet3"), ("vnet4", "vnet4"),
                            ("vnet5", "vnet5"), ("vnet2", "vnet4"), ("vnet4", "vnet2")])
    assert {"concat": ["vnet3", "172.16.13.1"]} in el["gw4"]
    assert {"concat": ["vnet3", "2001:db8:13::1"]} in el["gw6"]
    s = {"prefix": {"addr": "172.16.13.0", "len": 24}}
    assert {"concat": [s, s]} in el["intra4"]


def test_masquerade_and_hairpin_rules():
    rules = [r for r in objects(fw.render_ruleset(NETS), "rule") if r["chain"] == "postrouting"]
    masq = [r for r in rules if {"masquerade": None} in r["expr"]]
    hairpin = [r for r in masq if {"match": {"op": "in", "left": {"ct": {"key": "status"}},
                                             "right": "dnat"}} in r["expr"]]
    assert len(hairpin) == 2 and len(masq) == 4
    # the hairpin masquerade comes before the intra-subnet return
    first_return = next(i for i, r in enumerate(rules) if {"return": None} in r["expr"])
    assert all(rules.index(h) < first_return for h in hairpin)


def test_forward_chain_accepts_dnat_and_drops_the_rest_of_ours():
    rules = [r["expr"] for r in objects(fw.render_ruleset(NETS), "rule")
             if r["chain"] == "forward" and r["family"] == "inet"]
    assert rules[0][-1] == {"return": None}  # not ours: not judged
    # after established/related and the connection limits (v4, v6)
    assert {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}} in rules[4]
    assert rules[-1] == [{"counter": {"packets": 0, "bytes": 0}}, {"drop": None}]


# --- forwards ---------------------------------------------------------------------------------


def test_forward_single_port_elements():
    f = FWDS[0]
    doc = fw.render_forward_add(f)
    assert_only_our_tables(doc)
    assert elements(doc) == {
        "fwd4_ip": [[{"concat": ["tcp", 8080]}, "172.16.12.50"]],
        "fwd4_port": [[{"concat": ["tcp", 8080]}, 80]],
    }


def test_forward_range_is_one_element_per_port_shifted():
    f = FWDS[1]
    el = elements(fw.render_forward_add(f))
    keys = [{"concat": ["eth0", "10.77.0.1", "udp", p]} for p in (6000, 6001, 6002)]
    assert el["fwd4_ia_ip"] == [[k, "172.16.12.50"] for k in keys]
    assert el["fwd4_ia_port"] == [[k, p] for k, p in zip(keys, (7000, 7001, 7002), strict=True)]


def test_forward_shapes_and_ipv6():
    assert fw.forward_shape(FWDS[0]) == ""
    assert fw.forward_shape(FWDS[1]) == "_ia"
    assert fw.forward_shape(FWDS[3]) == "_i"
    f = dataclasses.replace(FWDS[2], ext_addr="2001:db8::1")
    assert fw.forward_shape(f) == "_a"
    el = elements(fw.render_forward_add(f))
    assert el["fwd6_a_ip"] == [[{"concat": ["2001:db8::1", "tcp", 8080]}, "fd00:12::50"]]
    # an address is written in its canonical form
    f2 = dataclasses.replace(FWDS[2], target="fd00:0012:0::0050")
    assert elements(fw.render_forward_add(f2))["fwd6_ip"][0][1] == "fd00:12::50"


def test_forward_add_and_remove_touch_only_map_elements_and_are_inverse():
    for f in FWDS:
        add, rem = fw.render_forward_add(f), fw.render_forward_remove(f)
        for doc in (add, rem):
            assert_only_our_tables(doc)
            assert all(set(body) == {"element"} for c in cmds(doc) for body in c.values())
        assert [next(iter(c)) for c in cmds(add)] == ["add"] * 2
        assert [next(iter(c)) for c in cmds(rem)] == ["delete"] * 2
        assert elements(add) == elements(rem, "delete")


def test_forward_size_does_not_depend_on_other_forwards():
    f = FWDS[0]
    assert len(json.dumps(fw.render_forward_add(f))) < 400


def test_ruleset_contains_the_forward_elements():
    el = elements(fw.render_ruleset(NETS, FWDS))
    for f in FWDS:
        for name, elems in elements(fw.render_forward_add(f)).items():
            assert all(e in el[name] for e in elems)
    # every forward map exists (empty or not) so that add/remove never has to create one
    maps = {m["name"] for m in objects(fw.render_ruleset([]), "map")}
    for fam in (4, 6):
        for shape in fw.SHAPES:
            assert set(fw.forward_maps(fam, shape)) <= maps


@pytest.mark.parametrize("bad, message", [
    (dict(proto="sctp"), "protocol"),
    (dict(family=5), "family"),
    (dict(port_lo=90, port_hi=80), "reversed"),
    (dict(port_lo=0, port_hi=0), "port number"),
    (dict(port_hi=70000), "port number"),
    (dict(port_lo=65000, port_hi=65010, target_port=65530), "beyond 65535"),
    (dict(target="fd00::1"), "IPv4"),
    (dict(target="not-an-ip"), "not an IP"),
    (dict(ext_addr="::1"), "IPv4"),
    (dict(iface="eth*"), "interface name"),  # '*' would be an nft wildcard
    (dict(iface="a" * 16), "interface name"),
    (dict(network=".."), "interface name"),
    (dict(port_lo=True), "port number"),
])
def test_forward_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        fw.render_forward_add(dataclasses.replace(FWDS[0], **bad))


def test_ruleset_validates_forwards_against_networks():
    with pytest.raises(ValueError, match="not in the subnet"):
        fw.render_ruleset(NETS, [dataclasses.replace(FWDS[0], target="172.16.99.5")])
    with pytest.raises(ValueError, match="not among the networks"):
        fw.render_ruleset(NETS, [dataclasses.replace(FWDS[0], network="vnet9")])
    with pytest.raises(ValueError, match="not in the subnet"):  # vnet5 has no IPv6
        fw.render_ruleset(NETS, [FwForward("vnet5", "tcp", 6, None, 1, 1, "fd00::5", 1)])
    with pytest.raises(ValueError, match="Two forwards"):
        fw.render_ruleset(NETS, [FWDS[0], dataclasses.replace(FWDS[0], target="172.16.12.51")])
    # same port on a specific address and on any address: different maps, allowed
    fw.render_ruleset(NETS, [FWDS[0], dataclasses.replace(FWDS[0], ext_addr="10.77.0.1")])


def test_network_validation():
    with pytest.raises(ValueError, match="mode"):
        fw.render_ruleset([net(mode="bridged")])
    with pytest.raises(ValueError, match="not in"):
        fw.render_ruleset([dataclasses.replace(net(), gateway=ia.ip_address("10.0.0.1"))])
    with pytest.raises(ValueError, match="interface name"):
        fw.render_ruleset([net(name="vnet*")])
    with pytest.raises(ValueError, match="twice"):
        fw.render_ruleset([net(), net()])
    with pytest.raises(ValueError, match="go together"):
        fw.render_ruleset([dataclasses.replace(net(v6="fd00::/64"), gateway6=None)])


# --- ports ------------------------------------------------------------------------------------


IIF = {"meta": {"key": "iifname"}}
OIF = {"meta": {"key": "oifname"}}
DROP_IN = [{"set": {"op": "update", "elem": IIF, "set": "@spoof"}}, {"drop": None}]
DROP_OUT = [{"set": {"op": "update", "elem": OIF, "set": "@spoof"}}, {"drop": None}]
MAC_A, LL_A = "52:54:00:00:00:aa", "fe80::5054:ff:fe00:aa"
LL_A_RAW = "0xfe80000000000000505400fffe0000aa"
BRIDGE_CHAINS = {"prerouting", "forward", "input", "output", "from_any_port", "guard_in",
                 "guard_out", "seg_in", "nd_options"}


def rules_of(doc, chain):
    return [r for r in objects(doc, "rule") if r["family"] == "bridge" and r["chain"] == chain]


def text(rules):
    return json.dumps([r["expr"] for r in rules])


def m(left, right, op="=="):
    return {"match": {"op": op, "left": left, "right": right}}


def pl(protocol, field):
    return {"payload": {"protocol": protocol, "field": field}}


def th(offset_bits, len_bits):
    return {"payload": {"base": "th", "offset": offset_bits, "len": len_bits}}


def cat(*x):
    return {"concat": list(x)}


def raw6(addr):
    """An IPv6 address as the 128-bit integer the raw sets hold."""
    return f"0x{int(ia.ip_address(addr)):032x}"


def rule(doc, chain, comment):
    """The expressions of the one rule of a bridge chain with this comment."""
    found = [r["expr"] for r in rules_of(doc, chain) if r.get("comment") == comment]
    assert len(found) == 1, (chain, comment, found)
    return found[0]


def pairs(doc, verb="add"):
    """{(set name, element as JSON)} of a transaction's element commands."""
    return {(name, json.dumps(e, sort_keys=True))
            for name, elems in elements(doc, verb).items() for e in elems}


def pe(name, elem):
    return name, json.dumps(elem, sort_keys=True)


def port_elems(p):
    return pairs(fw.render_port_update(p, None))


SEG = FwPort("vnet2_9", "vnet2", None, segment=True)
SIX = FwPort("vnet2-c", "vnet2", "52:54:00:00:00:cc", "172.16.12.61",
             ipv4_also=("172.16.12.99",), ipv6=("fd00:12::61", "fd00:12::62"))
MEMBER = FwPort("vnet2-m", "vnet2", "52:54:00:00:00:dd", unbound_in="172.16.12.0/24")
BRIDGED = FwPort("br0-a", "lan0", "52:54:00:00:00:ee", bridged=True)
KINDS = [*PORTS, SEG, SIX, MEMBER, BRIDGED,
         dataclasses.replace(BRIDGED, ifname="br0-b", mac=None)]


def test_ruleset_port_elements_and_no_chain_or_counter_of_a_port():
    doc = fw.render_ruleset(NETS, (), PORTS)
    el = elements(doc, family="bridge")
    assert sorted(el["guarded"]) == ["vnet2-a", "vnet2-b"]
    assert sorted(el["spoof"]) == ["vnet2-a", "vnet2-b"]
    assert el["locked"] == ["vnet2-a"] and el["unlocked"] == ["vnet2-b"]
    assert el["port_mac"] == [cat("vnet2-a", MAC_A)]
    assert el["port_mac_raw"] == [cat("vnet2-a", "0x5254000000aa")]
    assert el["port_ip4"] == [cat("vnet2-a", "172.16.12.60")]
    assert el["port_ip6"] == [cat("vnet2-a", LL_A)]
    assert el["port_t6"] == [cat("vnet2-a", LL_A_RAW)]
    # vnet4 has no spoof protection: neither its port nor its gateway is there
    assert "vnet4-a" not in json.dumps(el) and "172.16.14.1" not in json.dumps(el)
    assert el["taken"] == [MAC_A]
    assert sorted(el["claimed4"]) == ["172.16.12.1", "172.16.12.60", "172.16.13.1",
                                      "172.16.15.1"]
    assert LL_A in el["claimed6"] and "fd00:12::1" in el["claimed6"]
    assert LL_A_RAW in el["claimed6_raw"]
    assert "0xfd000012000000000000000000000001" in el["claimed6_raw"]
    # the guard is only elements: no counter, no map, and the chains are the fixed ones
    assert objects(doc, "counter") == []
    assert [o for o in objects(doc, "map") if o["family"] == "bridge"] == []
    assert {c["name"] for c in objects(doc, "chain") if c["family"] == "bridge"} == \
        BRIDGE_CHAINS


def test_a_rebuild_keeps_the_spoof_counts_and_deletes_those_of_ports_gone():
    counters = {"vnet2-a": {"packets": 7, "bytes": 420}, "gone-1": {"packets": 1, "bytes": 60},
                "vnet4-a": {"packets": 2, "bytes": 120}}
    doc = fw.render_ruleset(NETS, (), PORTS, counters=counters)
    # a port no longer guarded (gone, or its network's protection off) loses its count; the
    # others keep theirs, since spoof is neither flushed nor declared in the ruleset
    assert elements(doc, "delete") == {"spoof": ["gone-1", "vnet4-a"]}
    assert sorted(elements(doc)["spoof"]) == ["vnet2-a", "vnet2-b"]
    c = cmds(doc)
    dele = c.index(next(x for x in c if "delete" in x))
    assert dele > c.index({"flush": {"table": BRIDGE_T}})
    assert all(not x.get("add", {}).get("element") or x["add"]["element"]["family"] != "bridge"
               for x in c[:dele])
    assert objects(doc, "counter") == []
    # without counters nothing is deleted
    assert elements(fw.render_ruleset(NETS, (), PORTS), "delete") == {}
    assert elements(fw.render_ruleset(NETS, (), PORTS, counters={"vnet2-a": {}}), "delete") == {}


def test_a_bound_port_may_send_only_as_itself():
    el = port_elems(SIX)
    assert {pe("v4_bound", "vnet2-c"), pe("port_ip4", cat("vnet2-c", "172.16.12.61")),
            pe("port_ip4", cat("vnet2-c", "172.16.12.99")), pe("claimed4", "172.16.12.61"),
            pe("locked", "vnet2-c"), pe("port_mac", cat("vnet2-c", "52:54:00:00:00:cc")),
            pe("port_mac_raw", cat("vnet2-c", "0x5254000000cc"))} <= el
    six = ["fe80::5054:ff:fe00:cc", "fd00:12::61", "fd00:12::62"]
    assert {e for e in el if e[0] == "port_ip6"} == {pe("port_ip6", cat("vnet2-c", a))
                                                     for a in six}
    assert {e for e in el if e[0] == "port_t6"} == {
        pe("port_t6", cat("vnet2-c", raw6(a))) for a in six}
    assert not {e for e in el if e[0] in ("unlocked", "v4_sub", "port_sub4", "seg")}

    doc = fw.render_ruleset(NETS, (), [SIX])
    locked, bound = m(IIF, "@locked"), m(IIF, "@v4_bound")
    assert rule(doc, "guard_in", "source MAC") == [
        locked, m(cat(IIF, pl("ether", "saddr")), "@port_mac", "!="), *DROP_IN]
    assert rule(doc, "guard_in", "ARP sender MAC") == [
        locked, m(cat(IIF, pl("arp", "saddr ether")), "@port_mac", "!="), *DROP_IN]
    assert rule(doc, "guard_in", "DHCP client hardware address") == [
        locked, m(pl("udp", "dport"), 67), m(cat(IIF, th(288, 48)), "@port_mac_raw", "!="),
        *DROP_IN]
    assert rule(doc, "guard_in", "ARP sender IP") == [
        bound, m(pl("arp", "saddr ip"), "0.0.0.0", "!="),
        m(cat(IIF, pl("arp", "saddr ip")), "@port_ip4", "!="), *DROP_IN]
    assert rule(doc, "guard_in", "source IPv4") == [
        bound, m(cat(IIF, pl("ip", "saddr")), "@port_ip4", "!="), *DROP_IN]
    assert rule(doc, "guard_in", "source IPv6") == [
        m(pl("ip6", "saddr"), "::", "!="), m(cat(IIF, pl("ip6", "saddr")), "@port_ip6", "!="),
        *DROP_IN]
    assert rule(doc, "guard_in", "NA target") == [
        m(pl("icmpv6", "type"), "nd-neighbor-advert"),
        m(cat(IIF, th(64, 128)), "@port_t6", "!="), *DROP_IN]
    # ND link-layer options carry its MAC
    assert rule(doc, "nd_options", "NA target link-layer address") == [
        m(pl("icmpv6", "type"), "nd-neighbor-advert"), m(pl("ip6", "length"), 32),
        m(cat(IIF, th(208, 48)), "@port_mac_raw", "!="), *DROP_IN]
    assert rule(doc, "nd_options", "NS source link-layer address")[-3:] == [
        m(cat(IIF, th(208, 48)), "@port_mac_raw", "!="), *DROP_IN]
    assert rules_of(doc, "guard_in")[-1]["expr"] == [locked, {"jump": {"target": "nd_options"}}]
    # frames to it: unicast only for its own MAC
    assert rule(doc, "guard_out", "unicast for another MAC") == [
        m(OIF, "@locked"), m({"&": [pl("ether", "daddr"), "01:00:00:00:00:00"]},
                             "00:00:00:00:00:00"),
        m(cat(OIF, pl("ether", "daddr")), "@port_mac", "!="), *DROP_OUT]
    # its MAC is checked before anything may leave it early (DHCP without an address)
    order = [r.get("comment") for r in rules_of(doc, "guard_in")]
    dhcp = order.index("DHCP client without an address")
    assert order.index("source MAC") < order.index("DHCP client hardware address") < dhcp
    assert dhcp < order.index("source IPv4")


def test_an_overlay_member_may_use_only_free_addresses_of_its_subnet():
    el = port_elems(MEMBER)
    assert {pe("v4_sub", "vnet2-m"),
            pe("port_sub4", cat("vnet2-m", {"prefix": {"addr": "172.16.12.0", "len": 24}}))} <= el
    assert not {e for e in el if e[0] in ("v4_bound", "port_ip4", "claimed4")}
    doc = fw.render_ruleset(NETS, (), [MEMBER])
    sub = m(IIF, "@v4_sub")
    assert rule(doc, "guard_in", "source IPv4 outside the subnet") == [
        sub, m(pl("ip", "saddr"), "0.0.0.0", "!="),
        m(cat(IIF, pl("ip", "saddr")), "@port_sub4", "!="), *DROP_IN]
    assert rule(doc, "guard_in", "source IPv4 held here") == [
        sub, m(pl("ip", "saddr"), "@claimed4"), *DROP_IN]
    assert rule(doc, "guard_in", "ARP for an address held here") == [
        sub, m(pl("arp", "saddr ip"), "@claimed4"), *DROP_IN]


def test_a_bridged_port_is_held_to_its_mac_only():
    el = port_elems(BRIDGED)
    assert {n for n, _ in el} == {"guarded", "spoof", "bridged", "locked", "taken", "taken_raw",
                                  "port_mac", "port_mac_raw", "claimed6", "claimed6_raw"}
    doc = fw.render_ruleset(NETS, (), [BRIDGED])
    rules = rules_of(doc, "guard_in")
    ret = rules.index(next(r for r in rules if r["expr"] == [m(IIF, "@bridged"),
                                                             {"return": None}]))
    nd = rules.index(next(r for r in rules if r["expr"] == [
        m(IIF, "@bridged"), m(IIF, "@locked"), {"jump": {"target": "nd_options"}}]))
    order = [r.get("comment") for r in rules]
    # its MAC is checked first, then it leaves the guard before the address rules
    assert max(order.index(c) for c in ("source MAC", "ARP sender MAC",
                                        "DHCP client hardware address",
                                        "MAC of a port or the gateway")) < nd
    assert nd == ret - 1
    assert ret < min(order.index(c) for c in ("ARP sender IP", "ARP before an address",
                                              "IPv4 before an address", "source IPv6"))


def test_no_bridge_rule_depends_on_the_ports():
    """The guard's rules are the same with any ports or none: a port is only set elements,
    so nothing in a rule (an anonymous set, a constant) varies with a port."""
    with_ports = fw.render_ruleset(NETS, (), KINDS)
    without = fw.render_ruleset(NETS)
    bridge = [r for r in objects(with_ports, "rule") if r["family"] == "bridge"]
    assert bridge == [r for r in objects(without, "rule") if r["family"] == "bridge"]
    assert [c for c in objects(with_ports, "chain") if c["family"] == "bridge"] == \
        [c for c in objects(without, "chain") if c["family"] == "bridge"]
    t = text(bridge)
    for p in KINDS:
        assert p.ifname not in t
        if p.mac:
            assert p.mac not in t and p.mac.replace(":", "") not in t
            assert fw.eui64_ll(p.mac) not in t
        for a in (p.ipv4, *p.ipv4_also, *p.ipv6):
            if a:
                assert a not in t
    # the anonymous sets left are constants no guest may use, whoever it is
    anon = [n["match"]["right"]["set"] for n in walk(bridge) if isinstance(n, dict) and "match" in n
            and isinstance(n["match"]["right"], dict) and "set" in n["match"]["right"]]
    assert sorted(map(json.dumps, anon)) == sorted(map(json.dumps, [
        ["ip", "arp", "ip6"], [67, 547], [67, 547], [67, 547],
        ["nd-router-advert", "nd-redirect"]]))


def test_dhcp_from_a_port_is_limited_per_port():
    """A guest's DHCP client messages beyond DHCP_RATE a second (DHCP_BURST at once) are
    dropped and counted, by a limiter per port (a dynamic set keyed by the port: one guest's
    flood does not use another's share); a VDE segment, many guests, gets ten times that.
    Before the guard's other checks, so that no DHCP message escapes it."""
    rules = [r for r in objects(fw.render_ruleset(NETS, (), KINDS), "rule")
             if r["family"] == "bridge" and r["chain"] == "guard_in"]
    limited = [r for r in rules if r.get("comment") == "DHCP faster than a client asks"]
    assert len(limited) == 2
    got = {}
    for r in limited:
        upd = next(e["set"] for e in r["expr"] if "set" in e and e["set"].get("op") == "update"
                   and e["set"]["set"] == "@dhcp_rate")
        assert upd["elem"] == {"meta": {"key": "iifname"}}
        (lim,) = upd["stmt"]
        seg = next(e["match"]["op"] for e in r["expr"] if "match" in e
                   and e["match"]["right"] == "@seg")
        got[seg] = (lim["limit"]["rate"], lim["limit"]["burst"], lim["limit"]["inv"])
        assert r["expr"][-1] == {"drop": None}
    assert got == {"==": (10 * fw.DHCP_RATE, 10 * fw.DHCP_BURST, True),
                   "!=": (fw.DHCP_RATE, fw.DHCP_BURST, True)}
    first = [r.get("comment") for r in rules]
    assert first.index("DHCP faster than a client asks") == 1  # right after from_any_port
    assert "dhcp_rate" in fw.BRIDGE_TEXT_SETS and "timeout 1m" in fw.BRIDGE_TEXT_SETS
    # router solicitations (each makes the server advertise to everyone) likewise
    rs = [r for r in rules if r.get("comment") == "router solicitations faster than a host asks"]
    assert len(rs) == 2
    for r in rs:
        assert {"match": {"op": "==", "left": {"payload": {"protocol": "icmpv6", "field": "type"}},
                          "right": "nd-router-solicit"}} in r["expr"]
        upd = next(e["set"] for e in r["expr"] if "set" in e and e["set"]["set"] == "@rs_rate")
        assert upd["stmt"][0]["limit"]["rate"] in (fw.RS_RATE, 10 * fw.RS_RATE)


def test_a_port_change_is_set_elements_only():
    """No command rendered for a port adds a chain, a rule, a counter or a map: a port's
    change costs the same however many ports there are."""
    names = BRIDGE_JSON_SETS | {"spoof", *RAW}
    learnt = dataclasses.replace(PORTS[1], mac="52:54:00:00:00:cd", ipv4="172.16.12.70")
    docs = [fw.render_port_update(p, None) for p in KINDS]
    docs += [fw.render_port_update(p, p) for p in KINDS]
    docs += [fw.render_port_remove(p) for p in KINDS]
    docs += [fw.render_port_update(learnt, PORTS[1]), fw.render_port_update(PORTS[1], learnt),
             fw.render_port_update(SIX, dataclasses.replace(SIX, segment=True)),
             fw.render_port_update(PORTS[0], PORTS[0], spoof_protection=False)]
    for d in docs:
        assert_only_our_tables(d)
        assert cmds(d)
        for c in cmds(d):
            (verb, body), = c.items()
            assert verb in ("add", "delete") and set(body) == {"element"}, c
            assert body["element"]["family"] == "bridge"
            assert body["element"]["name"] in names
    # the elements keyed by a port name are that port's only
    for p in KINDS:
        for name, e in port_elems(p):
            e = json.loads(e)
            if name in ("guarded", "spoof", "seg", "locked", "unlocked", "bridged",
                        "v4_bound", "v4_sub"):
                assert e == p.ifname
            elif isinstance(e, dict):
                assert e["concat"][0] == p.ifname


def test_an_unbound_learning_port_sends_only_dhcp_and_probes():
    # its MAC unknown: learning, with no MAC, IPv4 or IPv6 of its own
    assert port_elems(PORTS[1]) == {pe("guarded", "vnet2-b"), pe("spoof", "vnet2-b"),
                                    pe("unlocked", "vnet2-b")}
    doc = fw.render_ruleset(NETS, (), PORTS)
    unlocked = m(IIF, "@unlocked")
    no_v4 = [m(IIF, "@v4_bound", "!="), m(IIF, "@v4_sub", "!=")]
    # never the gateway's or another port's MAC
    assert rule(doc, "guard_in", "MAC of a port or the gateway") == [
        unlocked, m(pl("ether", "saddr"), "@taken"), *DROP_IN]
    assert rule(doc, "guard_in", "ARP sender MAC of a port or the gateway") == [
        unlocked, m(pl("arp", "saddr ether"), "@taken"), *DROP_IN]
    # IPv4: ARP probes and DHCP only
    assert rule(doc, "guard_in", "ARP before an address") == [
        *no_v4, m(pl("arp", "saddr ip"), "0.0.0.0", "!="), *DROP_IN]
    assert rule(doc, "guard_in", "IPv4 before an address") == [
        *no_v4, m(pl("ether", "type"), "ip"), *DROP_IN]
    order = [r.get("comment") for r in rules_of(doc, "guard_in")]
    assert order.index("DHCP client without an address") < order.index("IPv4 before an address")
    # IPv6: with no element in @port_ip6 / @port_t6, only '::' (DAD, MLD) passes, and no
    # NA nor DAD for any target
    assert rule(doc, "guard_in", "source IPv6") == [
        m(pl("ip6", "saddr"), "::", "!="), m(cat(IIF, pl("ip6", "saddr")), "@port_ip6", "!="),
        *DROP_IN]
    assert rule(doc, "guard_in", "NA target")[-3:] == [
        m(cat(IIF, th(64, 128)), "@port_t6", "!="), *DROP_IN]
    assert rule(doc, "guard_in", "DAD target") == [
        m(pl("ip6", "saddr"), "::"), m(pl("icmpv6", "type"), "nd-neighbor-solicit"),
        m(cat(IIF, th(64, 128)), "@port_t6", "!="), *DROP_IN]
    assert rule(doc, "guard_in", "neighbour discovery with unexpected options")[0] == unlocked
    # its DHCP reaches nobody before its MAC is locked; to it only what is nobody's unicast
    for hook in ("forward", "input"):
        assert [r["expr"] for r in rules_of(doc, hook) if r.get("comment") != "a spare tap"
                ][0] == [unlocked, m(pl("udp", "dport"), 67), {"drop": None}]
    assert rule(doc, "guard_out", "unicast for another port") == [
        m(OIF, "@locked", "!="), m({"&": [pl("ether", "daddr"), "01:00:00:00:00:00"]},
                                   "00:00:00:00:00:00"),
        m(pl("ether", "daddr"), "@taken"), *DROP_OUT]


def test_a_segment_may_not_claim_anyone_elses_identity():
    # many guests behind one port: no identity of its own, only the segment checks
    assert port_elems(SEG) == {pe("guarded", "vnet2_9"), pe("spoof", "vnet2_9"),
                               pe("seg", "vnet2_9")}
    doc = fw.render_ruleset([dataclasses.replace(NETS[0], mac="52:54:00:12:00:01")], (),
                            [SEG, PORTS[0]])
    gin = rules_of(doc, "guard_in")
    # it leaves guard_in for good (goto) before any per-port check
    # (after the DHCP and router solicitation limiters, which hold a segment to ten times a
    # port's rate)
    assert [r.get("comment") for r in gin[1:5]] == ["DHCP faster than a client asks"] * 2 + \
        ["router solicitations faster than a host asks"] * 2
    assert gin[5]["expr"] == [m(IIF, "@seg"), {"goto": {"target": "seg_in"}}]
    assert gin[0]["expr"] == [{"jump": {"target": "from_any_port"}}]
    seg = [r["expr"] for r in rules_of(doc, "seg_in")]
    assert seg == [
        [m(pl("ether", "saddr"), "@taken"), *DROP_IN],
        [m(pl("arp", "saddr ether"), "@taken"), *DROP_IN],
        [m(pl("arp", "saddr ip"), "@claimed4"), *DROP_IN],
        [m(pl("udp", "dport"), 67), m(th(288, 48), "@taken_raw"), *DROP_IN],
        [m(pl("ip", "saddr"), "@claimed4"), *DROP_IN],
        [m(pl("ip6", "saddr"), "@claimed6"), *DROP_IN],
        [m(pl("icmpv6", "type"), "nd-neighbor-advert"), m(th(64, 128), "@claimed6_raw"),
         *DROP_IN],
        [m(pl("ip6", "saddr"), "::"), m(pl("icmpv6", "type"), "nd-neighbor-solicit"),
         m(th(64, 128), "@claimed6_raw"), *DROP_IN],
    ]
    # what those sets hold: the gateway's identity and the ports'
    el = elements(doc)
    assert sorted(el["taken"]) == [MAC_A, "52:54:00:12:00:01"]
    assert sorted(el["taken_raw"]) == ["0x5254000000aa", "0x525400120001"]
    assert {"172.16.12.1", "172.16.12.60"} <= set(el["claimed4"])
    gw_ll = fw.eui64_ll("52:54:00:12:00:01")
    assert {"fd00:12::1", gw_ll, LL_A} <= set(el["claimed6"])
    assert {raw6(a) for a in ("fd00:12::1", gw_ll, LL_A)} <= set(el["claimed6_raw"])
    assert fw.network_elems(NETS[0]) == [("claimed4", "172.16.12.1"),
                                         ("claimed6", "fd00:12::1"),
                                         ("claimed6_raw", "0xfd000012000000000000000000000001")]
    assert fw.claimed6(LL_A) == [("claimed6", LL_A), ("claimed6_raw", LL_A_RAW)]


def test_common_checks_come_first_and_drop_what_no_guest_may_send():
    doc = fw.render_ruleset(NETS, (), PORTS)
    # a spare tap (made ahead of an attach) first: nothing from it, nothing to it
    assert [r["expr"] for r in rules_of(doc, "prerouting")] == [
        [m(IIF, "@pending"), {"drop": None}],
        [m(IIF, "@guarded"), {"jump": {"target": "guard_in"}}]]
    for hook in ("forward", "output"):
        assert rules_of(doc, hook)[0]["expr"] == [m(OIF, "@pending"), {"drop": None}]
        assert rules_of(doc, hook)[-1]["expr"] == [m(OIF, "@guarded"),
                                                   {"jump": {"target": "guard_out"}}]
    assert rules_of(doc, "guard_in")[0]["expr"] == [{"jump": {"target": "from_any_port"}}]
    rules = rules_of(doc, "from_any_port")
    assert rules and all(r["expr"][-2:] == DROP_IN for r in rules)
    t = text(rules)
    for what in ("nd-router-advert", "nd-redirect", "redirect", "[67, 547]",
                 '["ip", "arp", "ip6"]', "01:00:00:00:00:00", '"htype"'):
        assert what in t


LEARNT_B = dataclasses.replace(PORTS[1], mac="52:54:00:00:00:CC")
LL_C = "fe80::5054:ff:fe00:cc"
LL_C_RAW = "0xfe80000000000000505400fffe0000cc"


def test_learning_its_mac_moves_a_port_from_unlocked_to_locked():
    before, after = port_elems(PORTS[1]), port_elems(LEARNT_B)
    assert before - after == {pe("unlocked", "vnet2-b")}
    assert after - before == {
        pe("locked", "vnet2-b"), pe("taken", "52:54:00:00:00:cc"),
        pe("taken_raw", "0x5254000000cc"),
        pe("port_mac", cat("vnet2-b", "52:54:00:00:00:cc")),
        pe("port_mac_raw", cat("vnet2-b", "0x5254000000cc")),
        pe("port_ip6", cat("vnet2-b", LL_C)), pe("port_t6", cat("vnet2-b", LL_C_RAW)),
        pe("claimed6", LL_C), pe("claimed6_raw", LL_C_RAW)}


def test_port_update_learning_the_mac_is_one_transaction_of_elements():
    doc = fw.render_port_update(LEARNT_B, PORTS[1])
    assert_only_our_tables(doc)
    # its DHCP now reaches others; its drop count (its spoof element) stays
    assert elements(doc, "delete") == {"unlocked": ["vnet2-b"]}
    assert elements(doc)["taken"] == ["52:54:00:00:00:cc"]
    assert pairs(doc) == port_elems(LEARNT_B)
    verbs = [next(iter(c)) for c in cmds(doc)]
    assert verbs == sorted(verbs, key=lambda v: v != "delete")  # deletes first, then adds
    assert all(set(body) == {"element"} for c in cmds(doc) for body in c.values())
    # and back (a port that loses its MAC): learning again, its MAC no longer held
    back = fw.render_port_update(PORTS[1], LEARNT_B)
    assert pairs(back, "delete") == port_elems(LEARNT_B) - port_elems(PORTS[1])
    assert pairs(back) == port_elems(PORTS[1])


def test_port_update_deletes_only_what_went_and_what_no_one_else_holds():
    old = PORTS[0]
    new = dataclasses.replace(old, ipv4="172.16.12.61")
    doc = fw.render_port_update(new, old)
    assert elements(doc, "delete") == {"port_ip4": [cat("vnet2-a", "172.16.12.60")],
                                       "claimed4": ["172.16.12.60"]}
    assert "172.16.12.61" in elements(doc)["claimed4"]
    assert cat("vnet2-a", "172.16.12.61") in elements(doc)["port_ip4"]
    # another port or a gateway still holds the old address: only the port's own goes
    doc = fw.render_port_update(new, old, keep=frozenset({("claimed4", "172.16.12.60")}))
    assert elements(doc, "delete") == {"port_ip4": [cat("vnet2-a", "172.16.12.60")]}
    # a new MAC: the old one's host-wide identities go unless kept
    new_mac = dataclasses.replace(old, mac="52:54:00:00:00:ab")
    gone = elements(fw.render_port_update(new_mac, old), "delete")
    assert gone["taken"] == [MAC_A] and gone["claimed6"] == [LL_A]
    assert gone["taken_raw"] == ["0x5254000000aa"]
    assert gone["claimed6_raw"] == [LL_A_RAW]
    kept = elements(fw.render_port_update(new_mac, old, keep=frozenset(fw.shared_elems(old))),
                    "delete")
    assert not {"taken", "taken_raw", "claimed4", "claimed6", "claimed6_raw"} & set(kept)
    assert kept["port_mac"] == [cat("vnet2-a", MAC_A)]
    assert fw.shared_elems(old) == {("taken", MAC_A), ("taken_raw", "0x5254000000aa"),
                                    ("claimed4", "172.16.12.60"),
                                    ("claimed6", LL_A), ("claimed6_raw", LL_A_RAW)}
    with pytest.raises(ValueError, match="rename"):
        fw.render_port_update(dataclasses.replace(old, ifname="x"), old)


def test_port_update_new_port_and_without_protection():
    doc = fw.render_port_update(PORTS[0], None)
    assert elements(doc, "delete") == {}
    assert set(elements(doc)) == {"guarded", "spoof", "locked", "taken", "taken_raw", "port_mac",
                                  "port_mac_raw", "v4_bound", "port_ip4", "claimed4",
                                  "port_ip6", "port_t6", "claimed6", "claimed6_raw"}
    assert fw.render_port_update(PORTS[2], None, spoof_protection=False) == {"nftables": []}
    assert fw.render_port_update(PORTS[2], PORTS[2], spoof_protection=False) == \
        fw.render_port_remove(PORTS[2])


def test_port_remove_deletes_all_its_elements_and_only_elements():
    for p in KINDS:
        doc = fw.render_port_remove(p)
        assert_only_our_tables(doc)
        assert all(next(iter(c)) == "delete" and set(c["delete"]) == {"element"}
                   for c in cmds(doc))
        # the inverse of adding it, its drop count (spoof) included
        assert pairs(doc, "delete") == port_elems(p)
        assert pe("spoof", p.ifname) in pairs(doc, "delete")
    # what other ports or gateways still hold stays
    keep = frozenset(fw.shared_elems(PORTS[0]))
    left = pairs(fw.render_port_remove(PORTS[0], keep=keep), "delete")
    assert left == {e for e in port_elems(PORTS[0])
                    if e[0] not in ("taken", "taken_raw", "claimed4", "claimed6", "claimed6_raw")}
    assert fw.render_port_remove(PORTS[2], spoof_protection=False) == {"nftables": []}


def test_every_bridge_drop_counts_into_the_ports_spoof_element():
    doc = fw.render_ruleset(NETS, (), KINDS)
    rules = [r for r in objects(doc, "rule") if r["family"] == "bridge"]
    drops = [r for r in rules if {"drop": None} in r["expr"]]
    by_chain = {}
    for r in drops:
        by_chain.setdefault(r["chain"], []).append(r)
    assert set(by_chain) == {"from_any_port", "guard_in", "guard_out", "seg_in", "nd_options",
                             "forward", "input", "prerouting", "output"}
    for r in drops:
        e = r["expr"]
        assert e.index({"drop": None}) == len(e) - 1  # the drop ends the rule
        if r.get("comment") == "a spare tap":
            # not counted either: nobody holds a spare tap yet
            key = IIF if r["chain"] == "prerouting" else OIF
            assert e == [m(key, "@pending"), {"drop": None}]
        elif r.get("comment") == "to a link-local group":
            assert r["chain"] == "input" and e[-2:] == DROP_IN
        elif r["chain"] in ("forward", "input"):
            # the only drops not counted: a learning port's DHCP before its MAC is locked
            # (every learning port's first DISCOVER meets it; it is not spoofing)
            assert r["comment"] == "DHCP before the MAC is locked"
            assert e == [m(IIF, "@unlocked"), m(pl("udp", "dport"), 67), {"drop": None}]
        elif r["chain"] == "guard_out":
            assert e[-2:] == DROP_OUT  # frames to a port count into that port's element
        else:
            assert e[-2:] == DROP_IN
    assert len(by_chain["guard_out"]) == 2
    # each raw lookup uses a payload as long as its set's typeof key
    for r in rules:
        for n in walk(r["expr"]):
            if isinstance(n, dict) and "match" in n and n["match"]["right"] in (
                    "@port_mac_raw", "@port_t6", "@claimed6_raw"):
                left, right = n["match"]["left"], n["match"]["right"]
                key = left["concat"][-1] if "concat" in left else left
                assert key["payload"]["base"] == "th"
                assert key["payload"]["len"] == (48 if right == "@port_mac_raw" else 128)
                assert ("concat" in left) == (right != "@claimed6_raw")
                if "concat" in left:
                    assert left["concat"][0] == IIF


def test_eui64_addresses():
    assert fw.eui64_ll("52:54:00:12:34:56") == "fe80::5054:ff:fe12:3456"
    assert fw.eui64_in(ia.ip_network("fd00:12::/64"), "52:54:00:12:34:56") == \
        "fd00:12::5054:ff:fe12:3456"


def test_counters_query_and_parse():
    q = fw.render_counters_query()
    assert q == {"nftables": [{"list": {"set": {"family": "bridge", "table": "qemu_vnet",
                                                "name": "spoof"}}}]}
    listing = {"nftables": [  # as libnftables 1.0.6 lists it
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"set": {"family": "bridge", "name": "spoof", "table": "qemu_vnet", "type": "ifname",
                 "handle": 1, "size": 65535, "stmt": [{"counter": None}], "elem": [
                     {"elem": {"val": "vnet2-a", "counter": {"packets": 4, "bytes": 240}}},
                     {"elem": {"val": "vnet2-b", "counter": {"packets": 0, "bytes": 0}}},
                     "vnet2-c"]}},
        {"set": {"family": "inet", "table": "other", "name": "spoof",
                 "elem": [{"elem": {"val": "x", "counter": {"packets": 1, "bytes": 1}}}]}},
        {"set": {"family": "bridge", "table": "qemu_vnet", "name": "guarded",
                 "elem": ["vnet2-d"]}},
    ]}
    assert fw.parse_spoof_counters(listing) == {"vnet2-a": {"packets": 4, "bytes": 240},
                                                "vnet2-b": {"packets": 0, "bytes": 0},
                                                "vnet2-c": {"packets": 0, "bytes": 0}}
    assert fw.parse_spoof_counters({"nftables": [{"set": {
        "family": "bridge", "table": "qemu_vnet", "name": "spoof"}}]}) == {}
    assert fw.parse_spoof_counters({}) == {}


# --- the bridge table's text-made sets --------------------------------------------------------

RECREATE = "add table bridge qemu_vnet\ndelete table bridge qemu_vnet\n"


def test_bridge_text_makes_the_typeof_sets_and_recreates_an_older_table():
    t = fw.BRIDGE_TEXT_SETS
    lines = t.splitlines()
    assert lines[0] == "add table bridge qemu_vnet"
    assert all(ln.startswith("add set bridge qemu_vnet ") for ln in lines[1:])
    decl = {ln.split()[4]: ln.split(None, 5)[5] for ln in lines[1:]}
    assert set(decl) == {*RAW, "spoof", "dhcp_rate", "rs_rate"}
    assert "typeof @th,288,48;" in decl["taken_raw"]
    assert "flags dynamic,timeout;" in decl["dhcp_rate"]
    assert "typeof iifname . @th,288,48;" in decl["port_mac_raw"]
    assert "typeof iifname . @th,64,128;" in decl["port_t6"]
    assert "typeof @th,64,128;" in decl["claimed6_raw"]
    assert "type ifname;" in decl["spoof"] and "flags dynamic;" in decl["spoof"]
    assert "counter;" in decl["spoof"]
    current = ["guarded", "spoof", *RAW]
    assert fw.bridge_text(None) == t  # no table yet
    assert fw.bridge_text(None, fresh=True) == t  # nothing to delete
    assert fw.bridge_text(current) == t  # a table of this layout keeps its counts
    # a table an older vnetd made (per-port chains, verdict maps, named counters) or fresh:
    # deleted and made again
    assert fw.bridge_text(["guard_in", "guard_out", "taken", "port_ctr"]) == RECREATE + t
    assert fw.bridge_text([]) == RECREATE + t
    assert fw.bridge_text(current, fresh=True) == RECREATE + t
    for line in (RECREATE + t).splitlines():
        assert line.split()[2:4] == ["bridge", "qemu_vnet"]


def test_set_names_reads_a_listing():
    assert fw.render_bridge_sets_query() == {"nftables": [{"list": {"sets": {
        "family": "bridge", "table": "qemu_vnet"}}}]}
    listing = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"set": {"family": "bridge", "name": "guarded", "table": "qemu_vnet", "type": "ifname"}},
        {"map": {"family": "bridge", "name": "guard_in", "table": "qemu_vnet", "type": "ifname",
                 "map": "verdict"}},
        {"set": {"family": "bridge", "table": "qemu_vnet"}},
        {"chain": {"family": "bridge", "name": "in_vnet2-a", "table": "qemu_vnet"}},
    ]}
    assert fw.set_names(listing) == ["guarded", "guard_in"]
    assert fw.set_names({}) == [] and fw.set_names(None) == []
    # an older table (only its verdict maps) is recreated
    old = {"nftables": [{"map": {"family": "bridge", "name": "guard_in", "table": "qemu_vnet"}}]}
    assert fw.bridge_text(fw.set_names(old)) == RECREATE + fw.BRIDGE_TEXT_SETS


class FakeNft:
    def __init__(self, rc=0, err="", listings=()):
        self.rc, self.err, self.listings, self.seen = rc, err, list(listings), []

    def cmd(self, text):
        self.seen.append(text)
        return self.rc, "", self.err

    def json_cmd(self, cmd):
        self.seen.append(cmd)
        rc, out = self.listings.pop(0)
        return rc, out, "" if rc == 0 else "Error: No such file or directory"


def test_apply_text_applies_only_the_bridge_tables_own_text():
    ok = FakeNft()
    fw.apply_text(fw.BRIDGE_TEXT_SETS, nft=ok)
    fw.apply_text(RECREATE + fw.BRIDGE_TEXT_SETS, nft=ok)
    assert ok.seen == [fw.BRIDGE_TEXT_SETS, RECREATE + fw.BRIDGE_TEXT_SETS]
    for bad in ("flush ruleset\n", "delete table inet filter\n", RECREATE, "",
                fw.BRIDGE_TEXT_SETS + "flush ruleset\n", fw.BRIDGE_TEXT_SETS.replace(
                    "add table", "delete table"), fw.BRIDGE_TEXT_SETS.strip()):
        with pytest.raises(ValueError, match="own text"):
            fw.apply_text(bad, nft=ok)
    assert len(ok.seen) == 2  # refused before reaching libnftables
    with pytest.raises(RuntimeError, match="Could not process"):
        fw.apply_text(fw.BRIDGE_TEXT_SETS, nft=FakeNft(1, "Error: Could not process rule\n"))


def test_prepare_bridge_makes_the_sets_then_reads_the_counts():
    spoof = {"nftables": [{"set": {"family": "bridge", "table": "qemu_vnet", "name": "spoof",
                                   "elem": [{"elem": {"val": "vnet2-a", "counter": {
                                       "packets": 3, "bytes": 180}}}]}}]}
    sets = {"nftables": [{"set": {"family": "bridge", "table": "qemu_vnet", "name": n}}
                         for n in ("guarded", "spoof")]}
    old = {"nftables": [{"map": {"family": "bridge", "table": "qemu_vnet", "name": "guard_in"}}]}
    for listing, fresh, text_ in ((None, False, fw.BRIDGE_TEXT_SETS),  # no table
                                  (sets, False, fw.BRIDGE_TEXT_SETS),
                                  (sets, True, RECREATE + fw.BRIDGE_TEXT_SETS),
                                  (old, False, RECREATE + fw.BRIDGE_TEXT_SETS)):
        nft = FakeNft(listings=[(1, None) if listing is None else (0, listing), (0, spoof)])
        assert fw.prepare_bridge(nft, fresh=fresh) == {"vnet2-a": {"packets": 3, "bytes": 180}}
        assert nft.seen == [fw.render_bridge_sets_query(), text_, fw.render_counters_query()]


# --- scope ------------------------------------------------------------------------------------


def test_every_render_names_only_our_tables():
    docs = [fw.render_ruleset(NETS, FWDS, PORTS), fw.render_ruleset([]),
            fw.render_ruleset(NETS, FWDS, PORTS, fresh=True), fw.render_delete_all(),
            fw.render_flowtable_probe(), fw.render_counters_query(),
            fw.render_port_update(PORTS[0], PORTS[0]), fw.render_port_remove(PORTS[0]),
            fw.render_bridge_sets_query(), fw.render_elements("add", fw.network_elems(NETS[0]))]
    docs += [fw.render_forward_add(f) for f in FWDS] + [fw.render_forward_remove(f) for f in FWDS]
    for d in docs:
        assert_only_our_tables(d)


@pytest.mark.parametrize("cmd", [
    {"nftables": [{"flush": {"ruleset": None}}]},
    {"nftables": [{"add": {"table": {"family": "inet", "name": "filter"}}}]},
    {"nftables": [{"delete": {"table": {"family": "ip", "name": "qemu_vnet"}}}]},
    {"nftables": [{"add": {"rule": {"family": "inet", "table": "admin", "chain": "c",
                                    "expr": [{"accept": None}]}}}]},
    {"nftables": [{"add": {"element": {"family": "netdev", "table": "qemu_vnet", "name": "s",
                                       "elem": [1]}}}]},
    {"nftables": [{"add": {"table": {"family": "inet", "name": "qemu_vnet"}}, "flush": {}}]},
    {"nftables": [{"frobnicate": {"table": {"family": "inet", "name": "qemu_vnet"}}}]},
    {"commands": []},
])
def test_check_scope_refuses_other_tables(cmd):
    with pytest.raises(ValueError):
        fw.check_scope(cmd)
    with pytest.raises(ValueError):  # apply() checks before it even loads libnftables
        fw.apply(cmd, nft=object())


def test_delete_all_is_add_then_delete_of_both_tables():
    assert cmds(fw.render_delete_all()) == [
        {"add": {"table": {"family": "inet", "name": "qemu_vnet"}}},
        {"delete": {"table": {"family": "inet", "name": "qemu_vnet"}}},
        {"add": {"table": {"family": "bridge", "name": "qemu_vnet"}}},
        {"delete": {"table": {"family": "bridge", "name": "qemu_vnet"}}},
    ]


def test_render_does_not_mutate_inputs():
    nets, fwds, ports = copy.deepcopy(NETS), copy.deepcopy(FWDS), copy.deepcopy(PORTS)
    fw.render_ruleset(nets, fwds, ports)
    assert (nets, fwds, ports) == (NETS, FWDS, PORTS)


def test_foreign_drop_chains():
    listing = {"nftables": [
        {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "hook": "forward",
                   "type": "filter", "prio": 0, "policy": "drop"}},
        {"chain": {"family": "inet", "table": "admin", "name": "in", "hook": "input",
                   "prio": 0, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "qemu_vnet", "name": "forward",
                   "hook": "forward", "prio": 0, "policy": "drop"}},
        {"chain": {"family": "inet", "table": "admin", "name": "helper"}},
    ]}
    assert fw.foreign_drop_chains(listing) == ["ip filter FORWARD (hook forward, policy drop)"]


def test_apply_with_a_fake_context_raises_the_error_text():
    class Fake:
        def __init__(self, rc, err):
            self.rc, self.err, self.seen = rc, err, []

        def json_cmd(self, cmd):
            self.seen.append(cmd)
            return self.rc, "", self.err

    ok = Fake(0, "")
    fw.apply(fw.render_forward_add(FWDS[0]), nft=ok)
    assert ok.seen == [fw.render_forward_add(FWDS[0])]
    fw.apply({"nftables": []}, nft=ok)  # nothing to do: no call
    assert len(ok.seen) == 1
    with pytest.raises(RuntimeError, match="File exists"):
        fw.apply(fw.render_forward_add(FWDS[0]),
                 nft=Fake(1, "Error: Could not process rule: File exists\n"))
    with pytest.raises(ValueError, match="only lists"):
        fw.query(fw.render_delete_all(), nft=ok)


def test_a_guest_address_holds_at_most_ct_per_guest_connections():
    """The host's connection tracking table is one for all: in from_bridge (to the host) and
    forward, a guest's new connection beyond CT_PER_GUEST of its source address is dropped
    and counted, right after established traffic is let through (nothing a guest starts
    passes before it, port forwards' hairpin included). The count is a meter (a dynamic set
    its rule declares: libnftables 1.0.6 cannot declare one in JSON)."""
    doc = fw.render_ruleset(NETS)
    for chain in ("from_bridge", "forward"):
        rules = [r for r in objects(doc, "rule") if r["family"] == "inet" and r["chain"] == chain]
        first = next(i for i, r in enumerate(rules)
                     if r.get("comment") == "more connections than a guest may hold")
        limits = rules[first:first + 2]
        assert rules[first - 1]["expr"][-1] == {"accept": None}  # established/related only
        assert {"ct": {"key": "state"}} == rules[first - 1]["expr"][0]["match"]["left"]
        for r, (fam, proto) in zip(limits, ((4, "ip"), (6, "ip6")), strict=True):
            assert r["expr"][0] == {"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                                              "right": "@bridges"}}
            assert r["expr"][2]["match"]["op"] == "!="  # not 0.0.0.0 / :: (DHCP clients)
            meter = r["expr"][3]["meter"]
            assert meter["name"] == f"ct{fam}_{chain}" and meter["size"] == fw.CT_GUESTS
            assert meter["key"] == {"payload": {"protocol": proto, "field": "saddr"}}
            assert meter["stmt"] == {"ct count": {"val": fw.CT_PER_GUEST, "inv": True}}
            assert r["expr"][-1] == {"drop": None}


def test_a_guest_address_holds_at_most_dns_tcp_per_guest_dns_connections_over_tcp():
    """dnsmasq serves at most 20 DNS connections over TCP at once: in from_bridge, right
    after the connection limit, a guest address's new one to port 53 beyond
    DNS_TCP_PER_GUEST is reset and counted (a meter per family, as for connections)."""
    doc = fw.render_ruleset(NETS)
    rules = [r for r in objects(doc, "rule")
             if r["family"] == "inet" and r["chain"] == "from_bridge"]
    first = next(i for i, r in enumerate(rules)
                 if r.get("comment") == "more DNS connections over TCP than a guest may hold")
    assert rules[first - 1].get("comment") == "more connections than a guest may hold"
    for r, (fam, proto) in zip(rules[first:first + 2], ((4, "ip"), (6, "ip6")), strict=True):
        assert r["expr"][0]["match"]["right"] == "new"
        assert r["expr"][1] == {"match": {"op": "==", "right": 53, "left": {
            "payload": {"protocol": "tcp", "field": "dport"}}}}
        assert r["expr"][2]["match"]["op"] == "!="  # not 0.0.0.0 / ::
        assert r["expr"][3]["match"]["right"] == f"@gw{fam}"  # its gateway's DNS only
        meter = r["expr"][4]["meter"]
        assert meter["name"] == f"dns{fam}_from_bridge" and meter["size"] == fw.CT_GUESTS
        assert meter["key"] == {"payload": {"protocol": proto, "field": "saddr"}}
        assert meter["stmt"] == {"ct count": {"val": fw.DNS_TCP_PER_GUEST, "inv": True}}
        assert r["expr"][-1] == {"reject": {"type": "tcp reset"}}
    # before anything that accepts DNS
    dns = next(i for i, r in enumerate(rules) if r.get("comment") == "DNS")
    assert first + 1 < dns


def test_traffic_routed_back_into_its_own_network_is_dropped():
    """A guest's subnet is on its link: sent to the gateway's MAC for an address of its own
    network, a frame only makes the host look for addresses nobody holds (a neighbour entry
    each, in the table every interface shares). Dropped after port forwards (hairpin DNAT
    goes back into the same network too) and before the same-network pair (what
    br_netfilter hands over from guest to guest, to another guest's MAC)."""
    net = dataclasses.replace(NETS[0], mac="52:54:00:12:00:01")
    doc = fw.render_ruleset([net, *NETS[1:]])
    el = elements(doc)
    assert el["routed_back"] == [cat(net.name, net.name, "52:54:00:12:00:01")]
    rules = [r for r in objects(doc, "rule") if r["family"] == "inet" and r["chain"] == "forward"]
    comments = [r.get("comment") for r in rules]
    back = comments.index("routed back into its own network")
    assert comments.index("port forwards") < back
    assert rules[back + 2]["expr"][0]["match"]["right"] == "@pass"
    for r, (p, intra) in zip(rules[back:back + 2], (("ip", "@intra4"), ("ip6", "@intra6")),
                             strict=True):
        assert r["expr"][0]["match"]["left"] == {"concat": [
            {"meta": {"key": "iifname"}}, {"meta": {"key": "oifname"}},
            {"payload": {"protocol": "ether", "field": "daddr"}}]}
        # only within its subnet: a route through a guest, beyond it, still passes
        assert r["expr"][1]["match"] == {"op": "==", "left": {"concat": [
            {"payload": {"protocol": p, "field": "saddr"}},
            {"payload": {"protocol": p, "field": "daddr"}}]}, "right": intra}
    # a network joining alone brings its element, and leaving takes it
    add = elements(fw.render_network_change(net, [], add=True))
    assert add["routed_back"] == el["routed_back"]
    assert elements(fw.render_network_change(net, [], add=False), "delete")["routed_back"] == \
        el["routed_back"]
