"""Port guards written straight through nf_tables netlink (vnetd.kernel.nftnl) leave the
kernel holding exactly what libnftables would have made of the same JSON: compared set by
set, in a network namespace made here, for every kind of port; and a refused batch changes
nothing."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from tests.harness.scratch import run_in

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

SCRIPT = textwrap.dedent(r'''
    import ipaddress, json, sys
    sys.path[:0] = [sys.argv[1] + "/helper", sys.argv[1] + "/common"]
    import nftables
    from vnetd.render import nft as fw
    from vnetd.kernel import nftnl
    n = nftables.Nftables()
    n.set_json_output(True)
    fw.prepare_bridge(n)
    net = fw.FwNetwork(name="t1", mode="host-only", subnet=ipaddress.IPv4Network("10.9.0.0/24"),
                       gateway=ipaddress.IPv4Address("10.9.0.1"),
                       subnet6=ipaddress.IPv6Network("fd00:9::/64"),
                       gateway6=ipaddress.IPv6Address("fd00:9::1"), allow_host=False,
                       routed_with=(), spoof_protection=True, overlay_port=None,
                       overlay_vni=None, overlay_peers=(), overlay_evpn=False,
                       mac="52:54:00:00:00:01")
    fw.apply(fw.render_ruleset([net], [], [], counters={}), n)
    P = fw.FwPort
    ports = [P(ifname="t1-aaaaaa", network="t1", mac="52:54:00:12:34:56", ipv4="10.9.0.5",
               ipv4_also=("10.9.0.6",), ipv6=("fd00:9::5",)),
             P(ifname="t1-bbbbbb", network="t1", mac=None),
             P(ifname="t1-cccccc", network="t1", mac=None, segment=True),
             P(ifname="t1-dddddd", network="t1", mac="52:54:00:ab:cd:ef", bridged=True),
             P(ifname="t1-eeeeee", network="t1", mac="52:54:00:ab:cd:01")]
    moved = P(ifname="t1-eeeeee", network="t1", mac="52:54:00:ab:cd:01", ipv4="10.9.0.7")

    def listing():
        out = {}
        for name in fw.SET_FIELDS:
            rc, o, e = n.cmd(f"list set bridge qemu_vnet {name}")
            assert rc == 0, e
            for x in json.loads(o)["nftables"]:
                if "set" in x:
                    out[name] = sorted(json.dumps(el, sort_keys=True)
                                       for el in x["set"].get("elem", []))
        return out

    el = nftnl.Elements()
    result = {"base": listing()}
    for how in ("raw", "json"):
        def run(cmd):
            if how == "raw":
                assert el.apply(cmd, fw.SET_FIELDS, fw.TABLE), "not encodable"
            else:
                fw.apply(cmd, n)
        for p in ports:
            run(fw.render_port_update(p, None))
        result[how + "_added"] = listing()
        run(fw.render_port_update(moved, ports[-1]))
        result[how + "_moved"] = listing()
        for p in ports[:-1] + [moved]:
            run(fw.render_port_remove(p))
        result[how + "_removed"] = listing()
    # a batch the kernel refuses (its last command deletes what is not there) changes nothing
    bad = fw.render_port_update(ports[0], None)
    bad["nftables"] += fw.render_port_remove(ports[1])["nftables"]
    try:
        el.apply(bad, fw.SET_FIELDS, fw.TABLE)
        result["refused"] = None
    except RuntimeError as e:
        result["refused"] = str(e)
    result["after_refused"] = listing()
    # what it cannot encode, it leaves to libnftables (returns False, sends nothing)
    result["interval"] = el.apply({"nftables": [{"add": {"element": {
        "family": "bridge", "table": "qemu_vnet", "name": "port_sub4",
        "elem": [{"concat": ["x", {"prefix": {"addr": "10.0.0.0", "len": 8}}]}]}}}]},
        fw.SET_FIELDS, fw.TABLE)
    result["inet"] = el.apply({"nftables": [{"add": {"element": {
        "family": "inet", "table": "qemu_vnet", "name": "guarded", "elem": ["x"]}}}]},
        fw.SET_FIELDS, fw.TABLE)
    print(json.dumps(result))
''')



def test_raw_element_batches_match_libnftables_and_refusals_change_nothing(netns):
    r = run_in(netns, SCRIPT)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for stage in ("added", "moved", "removed"):
        assert res[f"raw_{stage}"] == res[f"json_{stage}"], stage
    assert res["raw_added"] != res["base"]  # the comparison compared something
    assert res["raw_added"]["port_mac_raw"] and res["raw_added"]["port_t6"]
    assert res["raw_added"]["claimed6_raw"] and res["raw_added"]["spoof"]
    assert res["raw_moved"] != res["raw_added"]
    assert res["raw_removed"] == res["base"]
    assert res["refused"] is not None
    assert "delete element bridge qemu_vnet" in res["refused"]
    assert "No such file or directory" in res["refused"]
    assert res["after_refused"] == res["base"]
    assert res["interval"] is False and res["inet"] is False


COUNTERS = textwrap.dedent(r'''
    import ipaddress, json, sys
    sys.path[:0] = [sys.argv[1] + "/helper", sys.argv[1] + "/common"]
    import nftables
    from vnetd.render import nft as fw
    from vnetd.kernel import nftnl
    n = nftables.Nftables()
    fw.prepare_bridge(n)
    fw.apply(fw.render_ruleset([], [], [], counters={}), n)
    # three ports' drop counters as the kernel holds them, one of them never hit
    for name, packets, nbytes in (("t1-aaaaaa", 7, 420), ("t1-bbbbbb", 2**33 + 5, 2**40 + 1),
                                  ("t1-cccccc", 0, 0)):
        rc, _, err = n.cmd(f'add element bridge qemu_vnet spoof {{ "{name}" counter packets '
                           f'{packets} bytes {nbytes} }}')
        assert rc == 0, err
    names = ["t1-aaaaaa", "t1-bbbbbb", "t1-cccccc"]
    el = nftnl.Elements()
    raw = el.counters(fw.TABLE, "spoof", [nftnl.encode_key(("ifname",), x) for x in names])
    out = {"raw": {k.rstrip(b"\0").decode(): list(v) for k, v in raw.items()},
           "libnftables": {k: [v["packets"], v["bytes"]]
                           for k, v in fw.get_spoof_counters(names, n).items()},
           "one": {k.rstrip(b"\0").decode(): list(v) for k, v in el.counters(
               fw.TABLE, "spoof", [nftnl.encode_key(("ifname",), "t1-aaaaaa")]).items()}}
    # more than one request's worth (and more than the socket's buffer would hold at once)
    many = [f"t2-{i:06x}" for i in range(1000)]
    for at in range(0, len(many), 200):
        rc, _, err = n.cmd("add element bridge qemu_vnet spoof { " + ", ".join(
            f'"{x}" counter packets {i} bytes {2 * i}' for i, x in enumerate(many[at:at + 200],
                                                                             at)) + " }")
        assert rc == 0, err
    got = el.counters(fw.TABLE, "spoof", [nftnl.encode_key(("ifname",), x) for x in many])
    out["many"] = sorted(v[0] for v in got.values()) == list(range(1000)) and all(
        v[1] == 2 * v[0] for v in got.values())
    try:
        el.counters(fw.TABLE, "spoof", [nftnl.encode_key(("ifname",), x)
                                        for x in ("t1-aaaaaa", "t1-nonono")])
        out["missing"] = None
    except RuntimeError as e:
        out["missing"] = str(e)
    print(json.dumps(out))
''')


def test_drop_counters_read_for_some_ports_alone_match_libnftables(netns):
    """`show` reads its network's ports' drop counters straight from the kernel, for those
    elements alone: the same figures libnftables reads (also past 32 bits), only the ports
    asked for, and a port with no element is an error (the caller then reads the set)."""
    r = run_in(netns, COUNTERS)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["raw"] == res["libnftables"] == {
        "t1-aaaaaa": [7, 420], "t1-bbbbbb": [2**33 + 5, 2**40 + 1], "t1-cccccc": [0, 0]}
    assert res["one"] == {"t1-aaaaaa": [7, 420]}
    assert res["many"] is True
    assert res["missing"] and "No such file or directory" in res["missing"]
