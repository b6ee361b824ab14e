"""vnetd's journal handler: the native protocol's encoding, without journald (a datagram
socket of the test's own stands in for /run/systemd/journal/socket)."""

from __future__ import annotations

import array
import io
import logging
import os
import socket
import struct

import pytest
from vnetd import journal


def decode(data: bytes) -> dict[str, bytes]:
    """The native protocol as journald reads it."""
    out: dict[str, bytes] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            out[k.decode()] = v
            i = nl + 1
        else:
            n = struct.unpack("<Q", data[nl + 1:nl + 9])[0]
            out[line.decode()] = data[nl + 9:nl + 9 + n]
            assert data[nl + 9 + n:nl + 10 + n] == b"\n"
            i = nl + 10 + n
    return out


def test_simple_field():
    assert journal.encode_field("MESSAGE", "hello") == b"MESSAGE=hello\n"
    assert journal.encode_field("VNET_UID", 1000) == b"VNET_UID=1000\n"


def test_value_with_newline_uses_the_binary_form():
    v = "line one\nline two"
    enc = journal.encode_field("MESSAGE", v)
    assert enc == b"MESSAGE\n" + struct.pack("<Q", len(v)) + v.encode() + b"\n"
    assert decode(enc) == {"MESSAGE": v.encode()}


def test_value_with_equals_and_utf8_stays_plain():
    enc = journal.encode_field("VNET_NETWORK", "a=b é")
    assert enc == "VNET_NETWORK=a=b é\n".encode()
    assert decode(enc) == {"VNET_NETWORK": "a=b é".encode()}


def test_field_names():
    assert journal.field_name("VNET_METHOD") == "VNET_METHOD"
    assert journal.field_name("vnet_method") == "VNET_METHOD"
    assert journal.field_name("_PID") is None  # journald's own, not ours to set
    assert journal.field_name("VNET-X") is None
    assert journal.field_name("V" * 65) is None


@pytest.mark.parametrize("level,prio", [(logging.DEBUG, 7), (logging.INFO, 6),
                                        (logging.WARNING, 4), (logging.ERROR, 3),
                                        (logging.CRITICAL, 2)])
def test_priorities(level, prio):
    assert journal.priority(level) == prio


@pytest.fixture
def receiver(tmp_path):
    path = str(tmp_path / "journal.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    yield path, s
    s.close()


def make_logger(handler: logging.Handler) -> logging.Logger:
    lg = logging.getLogger(f"vnetd.test.{id(handler)}")
    lg.propagate = False
    lg.setLevel(logging.DEBUG)
    lg.addHandler(handler)
    return lg


def test_record_with_audit_fields(receiver):
    path, s = receiver
    h = journal.JournalHandler(address=path)
    h.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    lg = make_logger(h)
    lg.info("uid=%d %s: ok", 1000, "Attach", extra={
        "VNET_METHOD": "Attach", "VNET_UID": 1000, "VNET_PID": 42, "VNET_SENDER": ":1.7",
        "VNET_NETWORK": "vnet2", "VNET_RESULT": "ok", "VNET_SKIPPED": None, "other": "x"})
    got = decode(s.recv(65536))
    assert got["MESSAGE"] == f"{lg.name}: uid=1000 Attach: ok".encode()
    assert got["PRIORITY"] == b"6"
    assert got["SYSLOG_IDENTIFIER"] == b"vnetd"
    assert got["LOGGER"] == lg.name.encode()
    assert got["CODE_FUNC"] == b"test_record_with_audit_fields"
    assert got["VNET_METHOD"] == b"Attach"
    assert got["VNET_UID"] == b"1000"
    assert got["VNET_PID"] == b"42"
    assert got["VNET_SENDER"] == b":1.7"
    assert got["VNET_NETWORK"] == b"vnet2"
    assert got["VNET_RESULT"] == b"ok"
    assert "VNET_SKIPPED" not in got and "OTHER" not in got
    h.close()


def test_traceback_travels_in_the_binary_form(receiver):
    path, s = receiver
    h = journal.JournalHandler(address=path)
    lg = make_logger(h)
    try:
        raise ValueError("boom")
    except ValueError:
        lg.exception("failed")
    got = decode(s.recv(65536))
    assert got["PRIORITY"] == b"3"
    assert got["MESSAGE"].startswith(b"failed\nTraceback")
    assert b"ValueError: boom" in got["MESSAGE"]
    h.close()


def test_too_large_for_a_datagram_goes_as_a_memfd(receiver):
    path, s = receiver
    h = journal.JournalHandler(address=path)
    h.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    lg = make_logger(h)
    big = "x" * 300_000
    lg.warning(big)
    msg, anc, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(4))
    assert msg == b""
    fds = array.array("i")
    for level, kind, data in anc:
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds.frombytes(data[:4])
    with os.fdopen(fds[0], "rb") as f:
        f.seek(0)  # the sender's offset: journald maps the whole memfd
        got = decode(f.read())
    assert got["MESSAGE"] == big.encode()
    assert got["PRIORITY"] == b"4"
    h.close()


def test_unreachable_journal_falls_back(tmp_path):
    out = io.StringIO()
    h = journal.JournalHandler(address=str(tmp_path / "absent.sock"), fallback=out)
    lg = make_logger(h)
    lg.error("still %s", "kept")
    assert out.getvalue() == f"ERROR {lg.name}: still kept\n"
    assert not journal.available(str(tmp_path / "absent.sock"))
    h.close()


def test_available(receiver):
    path, _ = receiver
    assert journal.available(path)
