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


def test_ruleset_flushes_inet_in_place_and_makes_the_bridge_table_anew():
    doc = fw.render_ruleset(NETS, FWDS, PORTS)
    c = cmds(doc)
    assert c[0] == {"add": {"table": {"family": "inet", "name": "qemu_vnet"}}}
    assert c[1] == {"flush": {"table": {"family": "inet", "name": "qemu_vnet"}}}
    t = {"family": "bridge", "name": "qemu_vnet"}
    i = c.index({"add": {"table": t}})
    # no chain of a port that is gone survives
    assert c[i:i + 3] == [{"add": {"table": t}}, {"delete": {"table": t}}, {"add": {"table": t}}]
    # every inet set and map is flushed right after being added, so stale elements go
    for k, c0 in enumerate(c[:i]):
        for kind in ("set", "map"):
            if "add" in c0 and kind in c0["add"]:
                name = c0["add"][kind]["name"]
                assert c[k + 1] == {"flush": {kind: {"family": c0["add"][kind]["family"],
                                                     "table": "qemu_vnet", "name": name}}}


def test_fresh_ruleset_deletes_and_recreates_the_tables():
    c = cmds(fw.render_ruleset(NETS, FWDS, PORTS, fresh=True))
    t = {"family": "inet", "name": "qemu_vnet"}
    assert c[:3] == [{"add": {"table": t}}, {"delete": {"table": t}}, {"add": {"table": t}}]
    assert not any("flush" in x for x in c)


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


def test_rules_do_not_grow_with_networks_or_forwards_and_ports_cost_their_own_chains():
    def nrules(doc):
        return len([r for r in objects(doc, "rule") if not r["chain"].startswith(("in_",
                                                                                  "out_"))])

    small = fw.render_ruleset([NETS[0]])
    many_nets = [net(f"big{i}", "nat" if i % 2 else "host-only", 100 + i) for i in range(40)]
    many_fwds = [FwForward("vnet2", "tcp", 4, None, 10000 + i, 10000 + i, "172.16.12.50", 80)
                 for i in range(500)]
    big = fw.render_ruleset([NETS[0], *many_nets], many_fwds,
                            [FwPort(f"t{i}", "vnet2", f"52:54:00:00:01:{i:02x}")
                             for i in range(50)])
    assert nrules(small) == nrules(big)
    assert len(elements(big)["fwd4_ip"]) == 500


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
    assert {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}} in rules[2]
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


def rules_of(doc, chain):
    return [r for r in objects(doc, "rule") if r["family"] == "bridge" and r["chain"] == chain]


def text(rules):
    return json.dumps([r["expr"] for r in rules])


def test_ruleset_port_elements_chains_and_counters():
    doc = fw.render_ruleset(NETS, (), PORTS)
    el = elements(doc, family="bridge")
    assert sorted(el["guard_in"]) == [["vnet2-a", {"jump": {"target": "in_vnet2-a"}}],
                                      ["vnet2-b", {"jump": {"target": "in_vnet2-b"}}]]
    assert sorted(el["guard_out"]) == [["vnet2-a", {"jump": {"target": "out_vnet2-a"}}],
                                       ["vnet2-b", {"jump": {"target": "out_vnet2-b"}}]]
    # vnet4 has no spoof protection: neither its port nor its gateway is there
    assert el["taken"] == ["52:54:00:00:00:aa"]
    assert sorted(el["claimed4"]) == ["172.16.12.1", "172.16.12.60", "172.16.13.1",
                                      "172.16.15.1"]
    assert "fe80::5054:ff:fe00:aa" in el["claimed6"] and "fd00:12::1" in el["claimed6"]
    assert sorted(el["port_ctr"]) == [["vnet2-a", "spoof_vnet2-a"], ["vnet2-b", "spoof_vnet2-b"]]
    names = [c["name"] for c in objects(doc, "counter")]
    assert names == ["spoof_vnet2-a", "spoof_vnet2-b"]
    chains = {c["name"] for c in objects(doc, "chain") if c["family"] == "bridge"}
    assert {"in_vnet2-a", "out_vnet2-a", "in_vnet2-b", "out_vnet2-b"} <= chains
    assert "in_vnet4-a" not in chains
    # counters are added before the map that refers to them
    c = cmds(doc)
    first_ctr = min(i for i, x in enumerate(c) if "counter" in x.get("add", {}))
    ctr_map = next(i for i, x in enumerate(c) if x.get("add", {}).get("element", {}).get(
        "name") == "port_ctr")
    assert first_ctr < ctr_map


def test_counters_carry_over_a_rebuild():
    doc = fw.render_ruleset(NETS, (), PORTS, counters={"vnet2-a": {"packets": 7, "bytes": 420}})
    ctrs = {c["name"]: (c.get("packets", 0), c.get("bytes", 0))
            for c in objects(doc, "counter")}
    assert ctrs == {"spoof_vnet2-a": (7, 420), "spoof_vnet2-b": (0, 0)}


def test_a_bound_port_may_send_only_as_itself():
    doc = fw.render_ruleset(NETS, (), PORTS)
    t = text(rules_of(doc, "in_vnet2-a"))
    assert '"right": "52:54:00:00:00:aa"' in t  # source MAC and ARP sender MAC
    assert '"0x5254000000aa"' in t  # DHCP chaddr and ND link-layer options
    arp = next(r for r in rules_of(doc, "in_vnet2-a") if r.get("comment") == "ARP sender IP")
    assert [m["match"]["right"] for m in arp["expr"] if "match" in m] == ["0.0.0.0",
                                                                          "172.16.12.60"]
    assert '"right": "172.16.12.60"' in t
    assert "fe80::5054:ff:fe00:aa" in t
    out = text(rules_of(doc, "out_vnet2-a"))
    assert '"daddr"' in out and "52:54:00:00:00:aa" in out


def test_port_chains_hold_no_anonymous_sets():
    """libnftables reads every set of the table before each transaction: a set per port
    would make each port's change cost more with every port there is."""
    seg = FwPort("vnet2_9", "vnet2", None, segment=True)
    six = FwPort("vnet2-c", "vnet2", "52:54:00:00:00:cc", "172.16.12.61",
                 ipv6=("fd00:12::61", "fd00:12::62"))
    doc = fw.render_ruleset(NETS, (), [*PORTS, seg, six])
    chains = [c for c in (o["add"]["chain"]["name"] for o in doc["nftables"]
                          if "chain" in o.get("add", {})) if c[:3] in ("in_", "out")]
    assert len(chains) == 2 * (len(PORTS) + 2)
    for c in chains:
        assert '{"set":' not in text(rules_of(doc, c)).replace(" ", ""), c


def test_an_unbound_learning_port_sends_only_dhcp_and_probes():
    doc = fw.render_ruleset(NETS, (), PORTS)
    rules = rules_of(doc, "in_vnet2-b")
    t = text(rules)
    assert '"right": "@taken"' in t  # never the gateway's or another port's MAC
    assert any(r.get("comment") == "ARP before an address" for r in rules)
    assert any(r.get("comment") == "IPv4 before an address" for r in rules)
    assert any(r.get("comment") == "NA before an address" for r in rules)


def test_a_segment_may_not_claim_anyone_elses_identity():
    p = FwPort("vnet2_1", "vnet2", None, segment=True)
    doc = fw.render_ruleset(NETS, (), [p])
    t = text(rules_of(doc, "in_vnet2_1"))
    for s_ in ("@taken", "@claimed4", "@claimed6"):
        assert s_ in t
    assert "IPv4 before an address" not in t


def test_common_checks_come_first_and_drop_what_no_guest_may_send():
    doc = fw.render_ruleset(NETS, (), PORTS)
    assert rules_of(doc, "in_vnet2-a")[0]["expr"] == [{"jump": {"target": "from_any_port"}}]
    t = text(rules_of(doc, "from_any_port"))
    for what in ("nd-router-advert", "nd-redirect", "redirect", "[67, 547]",
                 '["ip", "arp", "ip6"]', "01:00:00:00:00:00"):
        assert what in t


def test_ruleset_rejects_ports_of_unknown_networks_and_bad_macs():
    with pytest.raises(ValueError, match="not among"):
        fw.render_ruleset(NETS, (), [FwPort("t1", "vnet9", None)])
    with pytest.raises(ValueError, match="unicast MAC"):
        fw.render_ruleset(NETS, (), [FwPort("t1", "vnet2", "01:00:5e:00:00:01")])
    with pytest.raises(ValueError, match="unicast MAC"):
        fw.render_ruleset(NETS, (), [FwPort("t1", "vnet2", "52:54:00:00:00")])
    with pytest.raises(ValueError, match="twice"):
        fw.render_ruleset(NETS, (), [PORTS[1], PORTS[1]])
    with pytest.raises(ValueError, match="zone"):
        fw.render_ruleset(NETS, (), [FwPort("t1", "vnet2", None, ipv6=("fe80::1%eth0",))])


def test_port_update_learning_the_mac_rewrites_its_chains():
    old, new = PORTS[1], dataclasses.replace(PORTS[1], mac="52:54:00:00:00:CC")
    doc = fw.render_port_update(new, old)
    assert_only_our_tables(doc)
    assert elements(doc, "delete") == {"unlocked": ["vnet2-b"]}  # its DHCP now reaches others
    assert elements(doc)["taken"] == ["52:54:00:00:00:cc"]
    assert {"flush": {"chain": {"family": "bridge", "table": "qemu_vnet",
                                "name": "in_vnet2-b"}}} in cmds(doc)
    assert "52:54:00:00:00:cc" in text(rules_of(doc, "in_vnet2-b"))
    assert objects(doc, "counter") == [{"family": "bridge", "table": "qemu_vnet",
                                        "name": "spoof_vnet2-b"}]


def test_port_update_deletes_only_what_went_and_what_no_one_else_holds():
    old = PORTS[0]
    new = dataclasses.replace(old, ipv4="172.16.12.61")
    doc = fw.render_port_update(new, old)
    assert elements(doc, "delete") == {"claimed4": ["172.16.12.60"]}
    assert "172.16.12.61" in elements(doc)["claimed4"]
    doc = fw.render_port_update(new, old, keep=frozenset({("claimed4", "172.16.12.60")}))
    assert elements(doc, "delete") == {}
    with pytest.raises(ValueError, match="rename"):
        fw.render_port_update(dataclasses.replace(old, ifname="x"), old)


def test_port_update_new_port_and_without_protection():
    doc = fw.render_port_update(PORTS[0], None)
    assert elements(doc, "delete") == {}
    assert set(elements(doc)) == {"guard_in", "guard_out", "port_ctr", "taken", "claimed4",
                                  "claimed6"}
    assert fw.render_port_update(PORTS[2], None, spoof_protection=False) == {"nftables": []}
    assert fw.render_port_update(PORTS[2], PORTS[2], spoof_protection=False) == \
        fw.render_port_remove(PORTS[2])


def test_port_remove_deletes_elements_then_chains_then_counter():
    doc = fw.render_port_remove(PORTS[0])
    assert_only_our_tables(doc)
    c = cmds(doc)
    assert c[-1] == {"delete": {"counter": {"family": "bridge", "table": "qemu_vnet",
                                            "name": "spoof_vnet2-a"}}}
    assert set(elements(doc, "delete")) == {"guard_in", "guard_out", "port_ctr", "taken",
                                            "claimed4", "claimed6"}
    assert {"delete": {"chain": {"family": "bridge", "table": "qemu_vnet",
                                 "name": "in_vnet2-a"}}} in c
    assert fw.render_port_remove(PORTS[2], spoof_protection=False) == {"nftables": []}


def test_spoof_rules_count_into_the_port_counter():
    doc = fw.render_ruleset(NETS, (), PORTS)
    rules = [r for r in objects(doc, "rule") if r["family"] == "bridge"
             and r["chain"] in ("from_any_port", "in_vnet2-a", "in_vnet2-b")]
    drops = [r["expr"] for r in rules if {"drop": None} in r["expr"]]
    ctr = {"counter": {"map": {"key": {"meta": {"key": "iifname"}}, "data": "@port_ctr"}}}
    assert drops and all(e[-2:] == [ctr, {"drop": None}] for e in drops)


def test_eui64_addresses():
    assert fw.eui64_ll("52:54:00:12:34:56") == "fe80::5054:ff:fe12:3456"
    assert fw.eui64_in(ia.ip_network("fd00:12::/64"), "52:54:00:12:34:56") == \
        "fd00:12::5054:ff:fe12:3456"


def test_counters_query_and_parse():
    q = fw.render_counters_query()
    assert q == {"nftables": [{"list": {"counters": {"family": "bridge",
                                                     "table": "qemu_vnet"}}}]}
    listing = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"counter": {"family": "bridge", "table": "qemu_vnet", "name": "spoof_vnet2-a",
                     "handle": 3, "packets": 4, "bytes": 240}},
        {"counter": {"family": "inet", "table": "other", "name": "spoof_x", "packets": 1}},
    ]}
    assert fw.parse_spoof_counters(listing) == {"vnet2-a": {"packets": 4, "bytes": 240}}


# --- scope ------------------------------------------------------------------------------------


def test_every_render_names_only_our_tables():
    docs = [fw.render_ruleset(NETS, FWDS, PORTS), fw.render_ruleset([]),
            fw.render_ruleset(NETS, FWDS, PORTS, fresh=True), fw.render_delete_all(),
            fw.render_flowtable_probe(), fw.render_counters_query(),
            fw.render_port_update(PORTS[0], PORTS[0]), fw.render_port_remove(PORTS[0])]
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
