"""The nf_tables element encoder (vnetd.kernel.nftnl): byte layout of keys and batches, and
what it leaves to libnftables."""

from __future__ import annotations

import struct

import pytest
from vnetd.kernel import nftnl
from vnetd.render import nft as fw


def test_keys_are_what_the_kernel_stores():
    assert nftnl.encode_key(("ifname",), "t1-a") == b"t1-a" + bytes(12)
    assert nftnl.encode_key(("ether_addr",), "52:54:00:12:34:56") == bytes.fromhex("525400123456")
    # a concatenation pads each field to four bytes: ifname 16, MAC 6 -> 8, IPv4 4
    key = nftnl.encode_key(("ifname", "ether_addr"),
                           {"concat": ["p1", "52:54:00:12:34:56"]})
    assert key == b"p1" + bytes(14) + bytes.fromhex("525400123456") + bytes(2)
    assert nftnl.encode_key(("ifname", "ipv4_addr"), {"concat": ["p1", "10.0.0.5"]})[16:] \
        == bytes([10, 0, 0, 5])
    assert nftnl.encode_key(("raw128",), "0x" + "00" * 15 + "01") == bytes(15) + b"\1"
    assert nftnl.encode_key(("ifname", "raw48"), {"concat": ["p1", "0x525400123456"]})[16:] \
        == bytes.fromhex("525400123456") + bytes(2)


@pytest.mark.parametrize("kinds, value", [
    (("ifname",), "x" * 16),  # longer than IFNAMSIZ - 1
    (("ifname",), ""),
    (("ether_addr",), "52:54:00"),
    (("ifname", "ether_addr"), "p1"),  # not a concatenation
    (("ifname", "ether_addr"), {"concat": ["p1"]}),
    (("ifname",), {"concat": ["p1"]}),
    (("raw48",), "525400123456"),
])
def test_bad_keys_are_refused(kinds, value):
    with pytest.raises(ValueError):
        nftnl.encode_key(kinds, value)


def _msgs(batch: bytes) -> list[tuple[int, int, int]]:
    out, off = [], 0
    while off < len(batch):
        length, kind, flags, seq, _ = struct.unpack_from("=IHHII", batch, off)
        out.append((kind, flags, seq))
        off += length
    assert off == len(batch)
    return out


def test_a_ports_guard_is_one_batch_of_element_messages():
    port = fw.FwPort(ifname="t1-aaaaaa", network="t1", mac="52:54:00:12:34:56",
                     ipv4="10.9.0.5")
    cmd = fw.render_port_update(port, None)
    batch, names = nftnl.encode_batch(cmd, fw.SET_FIELDS, fw.TABLE, seq=10)
    msgs = _msgs(batch)
    assert msgs[0] == (nftnl.NFNL_MSG_BATCH_BEGIN, nftnl.NLM_F_REQUEST, 10)
    assert msgs[-1][0] == nftnl.NFNL_MSG_BATCH_END
    body = msgs[1:-1]
    assert len(body) == len(cmd["nftables"]) == len(names)
    new = (nftnl.NFNL_SUBSYS_NFTABLES << 8) | nftnl.NFT_MSG_NEWSETELEM
    assert all(k == new and f & nftnl.NLM_F_ACK and f & nftnl.NLM_F_CREATE
               for k, f, _ in body)
    assert [s for _, _, s in body] == sorted(names)
    assert any(v.endswith(" port_mac") for v in names.values())
    gone = nftnl.encode_batch(fw.render_port_remove(port), fw.SET_FIELDS, fw.TABLE)
    assert gone is not None
    delete = (nftnl.NFNL_SUBSYS_NFTABLES << 8) | nftnl.NFT_MSG_DELSETELEM
    assert all(k == delete for k, _, _ in _msgs(gone[0])[1:-1])


@pytest.mark.parametrize("cmd", [
    {"nftables": [{"add": {"element": {"family": "bridge", "table": "other",
                                       "name": "guarded", "elem": ["x"]}}}]},
    {"nftables": [{"add": {"element": {"family": "inet", "table": fw.TABLE,
                                       "name": "guarded", "elem": ["x"]}}}]},
    {"nftables": [{"add": {"element": {"family": "bridge", "table": fw.TABLE,
                                       "name": "port_sub4", "elem": ["x"]}}}]},
    {"nftables": [{"flush": {"set": {"family": "bridge", "table": fw.TABLE,
                                     "name": "guarded"}}}]},
    {"nftables": [{"add": {"rule": {}}}]},
    {"nftables": [{"add": {"element": {"family": "bridge", "table": fw.TABLE,
                                       "name": "guarded", "elem": ["x" * 20]}}}]},
])
def test_what_it_cannot_encode_is_left_to_libnftables(cmd):
    assert nftnl.encode_batch(cmd, fw.SET_FIELDS, fw.TABLE) is None


def test_replies_are_read_by_sequence_number():
    ack = struct.pack("=IHHIIi", 36, nftnl.NLMSG_ERROR, 0, 7, 0, 0) + bytes(16)
    err = struct.pack("=IHHIIi", 36, nftnl.NLMSG_ERROR, 0, 8, 0, -2) + bytes(16)
    assert nftnl.parse_acks([ack + err]) == {7: 0, 8: 2}
