"""Set elements of the bridge table straight through nf_tables netlink: one batch, one
transaction, no libnftables.

libnftables reads every table's chains, sets and named objects before each transaction (its
cache) and parses JSON: about a millisecond for the few elements of one port's guard, most
of an attach's time. The elements of a port's guard are plain keys of hash sets whose types
vnetd declared itself (``render.nft.SET_FIELDS``), so they are written here as what the
kernel stores: NFT_MSG_NEWSETELEM / NFT_MSG_DELSETELEM messages between a batch's begin and
end, which the kernel applies all or nothing, as libnftables would.

Pure encoding (:func:`encode_batch`, unit-tested against the byte layout) and one small
socket class (:class:`Elements`). A command this module cannot encode (another table, an
interval set, a verdict) makes :func:`encode_batch` return None, and the caller uses
libnftables as before.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 12, 13, 14
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_EXPR, NFTA_SET_ELEM_EXPRESSIONS = 7, 10
NFTA_DATA_VALUE = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
FAMILIES = {"bridge": 7, "inet": 1, "ip": 2, "ip6": 10}
IFNAMSIZ = 16
COUNTERS_PER_REQUEST = 128  # elements asked for at once (each answer some 100 bytes)

# field kind -> (bytes in the kernel's key, encoder of the JSON value)


def _ifname(v: Any) -> bytes:
    if not isinstance(v, str) or not v or len(v) >= IFNAMSIZ:
        raise ValueError(f"not an interface name: {v!r}")
    return v.encode().ljust(IFNAMSIZ, b"\0")


def _mac(v: Any) -> bytes:
    b = bytes.fromhex(str(v).replace(":", ""))
    if len(b) != 6:
        raise ValueError(f"not a MAC address: {v!r}")
    return b


def _raw(n: int):
    def enc(v: Any) -> bytes:
        if not isinstance(v, str) or not v.startswith("0x"):
            raise ValueError(f"not a raw {n * 8}-bit value: {v!r}")
        return int(v, 16).to_bytes(n, "big")
    return enc


FIELDS = {
    "ifname": _ifname,
    "ether_addr": _mac,
    "ipv4_addr": lambda v: ipaddress.IPv4Address(v).packed,
    "ipv6_addr": lambda v: ipaddress.IPv6Address(v).packed,
    "raw48": _raw(6),
    "raw128": _raw(16),
}


def encode_key(kinds: tuple[str, ...], value: Any) -> bytes:
    """A set element's key as the kernel stores it: one field as it is, the fields of a
    concatenation each padded to a multiple of four bytes."""
    if len(kinds) == 1:
        if isinstance(value, dict):
            raise ValueError(f"a concatenation for a one-field set: {value!r}")
        return FIELDS[kinds[0]](value)
    if not isinstance(value, dict) or set(value) != {"concat"} \
            or len(value["concat"]) != len(kinds):
        raise ValueError(f"not a concatenation of {len(kinds)} fields: {value!r}")
    out = b""
    for kind, v in zip(kinds, value["concat"], strict=True):
        b = FIELDS[kind](v)
        out += b + bytes(-len(b) % 4)
    return out


def _attr(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + bytes(-len(payload) % 4)


def _msg(kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _element_list(table: str, set_name: str, keys: Iterable[bytes]) -> bytes:
    """The attributes naming a set's elements by their keys (a batch's commands, a read)."""
    elems = b"".join(_attr(NFTA_LIST_ELEM | NLA_F_NESTED,
                           _attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, k)))
                     for k in keys)
    return (_attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
            + _attr(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0")
            + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, elems))


def encode_batch(cmd: Mapping[str, Any], fields: Mapping[str, tuple[str, ...]],
                 table: str, seq: int = 1, family: str = "bridge"
                 ) -> tuple[bytes, dict[int, str]] | None:
    """``{"nftables": [{"add"|"delete": {"element": {family, table, name, elem}}}, ...]}`` as
    one nf_tables batch, and the sequence numbers that must be acknowledged (with what each
    does, for errors); None when a
    command is anything else (another family or table, a set not in ``fields``)."""
    parts = [_msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, b"")]
    acked: dict[int, str] = {}
    for c in cmd.get("nftables", ()):
        if not isinstance(c, dict) or len(c) != 1:
            return None
        (op, body), = c.items()
        if op not in ("add", "delete") or not isinstance(body, dict) \
                or set(body) != {"element"}:
            return None
        e = body["element"]
        kinds = fields.get(e.get("name", ""))
        if kinds is None or e.get("table") != table or e.get("family") != family:
            return None
        try:
            attrs = _element_list(table, e["name"], [encode_key(kinds, v) for v in e["elem"]])
        except (ValueError, TypeError, KeyError):
            return None
        seq += 1
        kind = NFT_MSG_NEWSETELEM if op == "add" else NFT_MSG_DELSETELEM
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if op == "add" else 0)
        parts.append(_msg((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq,
                          FAMILIES[family], 0, attrs))
        acked[seq] = f"{op} element {family} {table} {e['name']}"
    seq += 1
    parts.append(_msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, b""))
    return b"".join(parts), acked


def _messages(data: Iterable[bytes]) -> Iterator[tuple[int, int, bytes, int, int]]:
    """(type, sequence number, the chunk, the message's offset and length) of each netlink
    message in the chunks read."""
    for chunk in data:
        off = 0
        while off + 16 <= len(chunk):
            length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", chunk, off)
            if length < 16:
                break
            yield kind, seq, chunk, off, length
            off += (length + 3) & ~3


def _error(chunk: bytes, off: int, length: int) -> int | None:
    """An NLMSG_ERROR's errno (0: an acknowledgement)."""
    return -struct.unpack_from("=i", chunk, off + 16)[0] if length >= 20 else None


def parse_acks(data: Iterable[bytes]) -> dict[int, int]:
    """{sequence number: errno (0: done)} from the NLMSG_ERROR messages of the replies."""
    out: dict[int, int] = {}
    for kind, seq, chunk, off, length in _messages(data):
        err = _error(chunk, off, length) if kind == NLMSG_ERROR else None
        if err is not None:
            out[seq] = err
    return out


def _attr_items(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, the nested flag masked off; payload) of each attribute of one level."""
    off = 0
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        if length < 4:
            break
        yield kind & 0x3FFF, data[off + 4:off + length]
        off += (length + 3) & ~3


def _attrs(data: bytes) -> dict[int, bytes]:
    """The attributes of one level, by type; the last wins."""
    return dict(_attr_items(data))


def _attr_list(data: bytes) -> list[bytes]:
    """The payloads of a nested list (NFTA_LIST_ELEM, ...), in order."""
    return [payload for _kind, payload in _attr_items(data)]


def encode_get_elements(table: str, set_name: str, keys: Iterable[bytes], seq: int,
                        family: str = "bridge") -> bytes:
    """NFT_MSG_GETSETELEM for these keys only (a read: no batch, no transaction)."""
    return _msg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_ACK,
                seq, FAMILIES[family], 0, _element_list(table, set_name, keys))


def _counter(expr: bytes) -> tuple[int, int] | None:
    a = _attrs(expr)
    if a.get(NFTA_EXPR_NAME, b"").rstrip(b"\0") != b"counter":
        return None
    d = _attrs(a.get(NFTA_EXPR_DATA, b""))
    if NFTA_COUNTER_PACKETS not in d or NFTA_COUNTER_BYTES not in d:
        return None
    return (int.from_bytes(d[NFTA_COUNTER_PACKETS][:8], "big"),
            int.from_bytes(d[NFTA_COUNTER_BYTES][:8], "big"))


def parse_element_counters(data: Iterable[bytes], seq: int
                           ) -> tuple[dict[bytes, tuple[int, int]], int | None]:
    """({key: (packets, bytes)} of the elements in the replies to request `seq`, and its
    errno once acknowledged (0: done; None: not yet)."""
    found: dict[bytes, tuple[int, int]] = {}
    done: int | None = None
    for kind, mseq, chunk, off, length in _messages(data):
        if mseq != seq:
            continue
        if kind == NLMSG_ERROR:
            done = _error(chunk, off, length)
        elif kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM:
            top = _attrs(chunk[off + 20:off + length])  # after the nfgenmsg
            for elem in _attr_list(top.get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
                e = _attrs(elem)
                key = _attrs(e.get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE)
                exprs = ([e[NFTA_SET_ELEM_EXPR]] if NFTA_SET_ELEM_EXPR in e else
                         _attr_list(e.get(NFTA_SET_ELEM_EXPRESSIONS, b"")))
                for x in exprs:
                    c = _counter(x)
                    if key is not None and c is not None:
                        found[key] = c
    return found, done


class Elements:
    """One nf_tables netlink socket for element batches (not thread-safe: the caller holds
    the firewall's lock). :meth:`apply` raises RuntimeError with the kernel's errno text
    when the batch is refused (and then nothing of it was applied)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = int.from_bytes(os.urandom(3), "big")

    def _socket(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                              NETLINK_NETFILTER)
            s.bind((0, 0))
            s.settimeout(5)
            self._sock = s
        return self._sock

    def apply(self, cmd: Mapping[str, Any], fields: Mapping[str, tuple[str, ...]],
              table: str) -> bool:
        """Apply ``cmd`` (element commands only); False if it is not one this module can
        encode (nothing was sent)."""
        if not cmd.get("nftables"):
            return True
        if not isinstance(cmd.get("nftables"), list):
            return False
        self._seq = (self._seq + 1000) & 0x7FFFFFFF
        enc = encode_batch(cmd, fields, table, self._seq)
        if enc is None:
            return False
        batch, names = enc
        want = set(names)
        s = self._socket()
        try:
            s.send(batch)
            got: dict[int, int] = {}
            while not want <= got.keys():
                # the kernel answers before send returns; the timeout only guards a kernel
                # that would not
                acks = parse_acks([s.recv(65536)])
                got.update(acks)
                if any(acks.values()):
                    break  # refused: the kernel acknowledges nothing more of the batch
        except OSError as e:
            self.close()  # a socket in an unknown state is not used again
            raise RuntimeError(f"nf_tables netlink: {e.strerror or e}") from None
        errs = [(q, err) for q, err in sorted(got.items()) if err]
        if errs:
            self.close()  # what else the kernel answers to it is not read from a next one
            q, err = errs[0]
            what = names.get(q, "the batch")
            raise RuntimeError(f"{what}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")
        return True

    def counters(self, table: str, set_name: str, keys: list[bytes],
                 family: str = "bridge") -> dict[bytes, tuple[int, int]]:
        """{key: (packets, bytes)} of these elements of a set with counters, read from the
        kernel for them alone (libnftables would read every element of every set first);
        RuntimeError if one of them is not in the set."""
        found: dict[bytes, tuple[int, int]] = {}
        s = self._socket()
        # the kernel answers each element at once, before the first recv: a request at a
        # time of so many that their answers fit the socket's buffer
        for at in range(0, len(keys), COUNTERS_PER_REQUEST):
            self._seq = (self._seq + 1000) & 0x7FFFFFFF
            seq = self._seq
            try:
                s.send(encode_get_elements(table, set_name, keys[at:at + COUNTERS_PER_REQUEST],
                                           seq, family))
                while True:
                    got, err = parse_element_counters([s.recv(1 << 16)], seq)
                    found.update(got)
                    if err is not None:
                        break
            except OSError as e:
                self.close()
                raise RuntimeError(f"nf_tables netlink: {e.strerror or e}") from None
            if err:
                raise RuntimeError(f"get element {family} {table} {set_name}: "
                                   f"{os.strerror(err)}")
        return found

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
