"""vnet_client.minibus: the standard-library D-Bus client of vnet-bridge-helper, against a real
private dbus-daemon and, for fd passing, a dbus-fast service on that bus in a thread.

Rules under test: calls return the body and the fds that came with the reply, `h` values are
those fds; error replies raise DBusError with the error's name and close their fds; signals and
other messages met while waiting are skipped and their fds closed; the marshaller follows the
D-Bus alignment rules (it round-trips and dbus-fast reads what it writes); malformed input from
the bus is a DBusError, never another exception; importing the module stays cheap.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from hypothesis import given, settings
from hypothesis import strategies as st
from vnet_client import minibus
from vnet_client.minibus import ALLOW_INTERACTIVE_AUTHORIZATION, DBusError, MiniBus

DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
NAME, PATH, IFACE = (
    "org.qemuvnet.MiniBusTest",
    "/org/qemuvnet/MiniBusTest",
    "org.qemuvnet.MiniBusTest",
)
TEST = (NAME, PATH, IFACE)
MINIBUS_PY = Path(minibus.__file__)

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={path}</listen>
  <listen>unix:abstract={abstract}</listen>
  <policy context="default">
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@pytest.fixture(scope="module")
def bus(tmp_path_factory):
    """A private dbus-daemon: (path of its socket, its abstract name, the address it printed)."""
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    tmp = tmp_path_factory.mktemp("minibus")
    path, abstract = tmp / "bus", f"qemu-vnet-minibus-test-{os.getpid()}"
    (tmp / "bus.conf").write_text(CONFIG.format(path=path, abstract=abstract))
    daemon = subprocess.Popen(
        ["dbus-daemon", f"--config-file={tmp / 'bus.conf'}", "--nofork", "--print-address"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        printed = daemon.stdout.readline().decode().strip()
        assert printed.startswith("unix:"), "dbus-daemon did not start"
        yield path, abstract, printed
    finally:
        daemon.terminate()
        daemon.wait(10)


@pytest.fixture(scope="module")
def address(bus):
    return f"unix:path={bus[0]}"


class Service:
    """The test's peer, on dbus-fast's low-level handler API (the bus calls `handle`)."""

    def __init__(self, bus: MessageBus):
        self.bus, self.held, self.flags = bus, [], {}

    def handle(self, msg: Message):
        if msg.message_type is not MessageType.METHOD_CALL or msg.interface != IFACE:
            return None
        self.flags[msg.member] = int(msg.flags)
        if msg.member == "GetFds":  # -> a{sv}ahah: two ends of a pipe, and no fds
            r, w = os.pipe()
            self.held += [r, w]
            info = {
                "name": Variant("s", "tap0"),
                "mtu": Variant("u", 1500),
                "up": Variant("b", True),
                "more": Variant("a{sv}", {"ids": Variant("ai", [1, -2])}),
            }
            return Message.new_method_return(msg, "a{sv}ahah", [info, [0, 1], []], [r, w])
        if msg.member == "Echo":
            return Message.new_method_return(msg, msg.signature, msg.body)
        if msg.member == "WriteTo":  # (h fd, s text) -> u: writes text into the fd
            fd = msg.unix_fds[msg.body[0]]
            written = os.write(fd, msg.body[1].encode())
            os.close(fd)
            return Message.new_method_return(msg, "u", [written])
        if msg.member == "Bounce":  # (h fd, s how): hands the fd back in a signal or an error
            fd = msg.unix_fds[msg.body[0]]
            self.held.append(fd)
            if msg.body[1] == "signal":
                self.bus.send(
                    Message(
                        destination=msg.sender,
                        path=PATH,
                        interface=IFACE,
                        member="Noise",
                        message_type=MessageType.SIGNAL,
                        signature="h",
                        body=[0],
                        unix_fds=[fd],
                    )
                )
                return Message.new_method_return(msg, "s", ["ok"])
            return Message(
                destination=msg.sender,
                message_type=MessageType.ERROR,
                error_name="org.qemuvnet.MiniBusTest.Error.Bounced",
                reply_serial=msg.serial,
                signature="sh",
                body=["bounced with an fd", 0],
                unix_fds=[fd],
            )
        if msg.member == "Release":  # closes every fd the service holds
            for fd in self.held:
                os.close(fd)
            self.held.clear()
            return Message.new_method_return(msg)
        if msg.member == "Ignore":
            return True  # handled, never answered
        return None


@pytest.fixture(scope="module")
def service(address):
    started, state = threading.Event(), {}

    async def main():
        dbus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
        state["service"] = svc = Service(dbus)
        dbus.add_message_handler(svc.handle)
        await dbus.request_name(NAME)
        state["loop"], state["stop"] = asyncio.get_running_loop(), asyncio.Event()
        started.set()
        await state["stop"].wait()
        dbus.disconnect()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10), "the dbus-fast service did not start"
    yield state["service"]
    state["loop"].call_soon_threadsafe(state["stop"].set)
    thread.join(10)


@pytest.fixture
def mb(address):
    with MiniBus(address, timeout=5) as conn:
        yield conn


def test_get_id_and_list_names(mb):
    (bus_id,), fds = mb.call(*DBUS, "GetId")
    assert len(bus_id) == 32 and int(bus_id, 16) >= 0 and fds == []
    (names,), _ = mb.call(*DBUS, "ListNames")
    assert "org.freedesktop.DBus" in names and mb.unique_name in names
    assert mb.unique_name.startswith(":") and mb.unix_fd


def test_connection_unix_user_is_our_uid(mb):
    assert mb.call(*DBUS, "GetConnectionUnixUser", "s", [mb.unique_name]) == ([os.geteuid()], [])
    (creds,), _ = mb.call(*DBUS, "GetConnectionCredentials", "s", [mb.unique_name])
    assert creds["UnixUserID"] == os.geteuid() and creds["ProcessID"] == os.getpid()


def test_unknown_method_raises_its_error_name(mb):
    with pytest.raises(DBusError) as e:
        mb.call(*DBUS, "NoSuchMethod")
    assert e.value.name == "org.freedesktop.DBus.Error.UnknownMethod"
    assert "NoSuchMethod" in e.value.message
    with pytest.raises(DBusError) as e:
        mb.call("org.qemuvnet.Nobody", "/", None, "Hi")
    assert e.value.name == "org.freedesktop.DBus.Error.ServiceUnknown"
    assert mb.call(*DBUS, "GetId")[0]  # the connection survives error replies


def test_fds_in_the_reply_are_working_fds(mb, service):
    (info, pipe, empty), fds = mb.call(*TEST, "GetFds", flags=ALLOW_INTERACTIVE_AUTHORIZATION)
    try:
        assert info == {"name": "tap0", "mtu": 1500, "up": True, "more": {"ids": [1, -2]}}
        assert empty == [] and pipe == fds and len(fds) == 2
        assert all(os.get_inheritable(fd) is False for fd in fds)  # MSG_CMSG_CLOEXEC
        os.write(fds[1], b"through the bus")
        assert os.read(fds[0], 100) == b"through the bus"
        assert service.flags["GetFds"] & ALLOW_INTERACTIVE_AUTHORIZATION
    finally:
        minibus._close_all(fds)
        mb.call(*TEST, "Release")


def test_fds_can_be_sent(mb, service):
    r, w = os.pipe()
    try:
        assert mb.call(*TEST, "WriteTo", "hs", [0, "hello"], fds=[w]) == ([5], [])
        assert os.read(r, 100) == b"hello"
    finally:
        minibus._close_all([r, w])


@pytest.mark.parametrize("how", ["signal", "error"])
def test_fds_of_signals_and_errors_are_closed(mb, service, how, monkeypatch):
    closed = []
    real_close_all = minibus._close_all
    monkeypatch.setattr(
        minibus, "_close_all", lambda fds: (closed.extend(fds), real_close_all(fds))
    )
    r, w = os.pipe()
    try:
        if how == "signal":  # the signal with the fd comes first and is skipped
            assert mb.call(*TEST, "Bounce", "hs", [0, how], fds=[w]) == (["ok"], [])
        else:
            with pytest.raises(DBusError) as e:
                mb.call(*TEST, "Bounce", "hs", [0, how], fds=[w])
            assert e.value.name == "org.qemuvnet.MiniBusTest.Error.Bounced"
            assert e.value.message == "bounced with an fd"
        assert len(closed) == 1  # the fd came, and minibus closed it
        os.close(w)
        w = None
        mb.call(*TEST, "Release")
        # Every write end is closed, ours included: the read end sees EOF.
        assert select.select([r], [], [], 5)[0] and os.read(r, 1) == b""
    finally:
        minibus._close_all([r] + ([w] if w is not None else []))


ECHO = [
    (
        "a{sv}(ybnqiuxtd)asaoagaya(ii)a{s(iai)}v",
        [
            {"s": ("s", "x"), "nested": ("a{sv}", {"n": ("(ub)", (7, False))}), "d": ("d", 0.5)},
            (255, True, -(2**15), 2**16 - 1, -(2**31), 2**32 - 1, -(2**63), 2**64 - 1, -1.25),
            ["", "é", "a" * 300],
            ["/", "/org/qemuvnet/a_1"],
            ["", "a{sv}", "(ii)"],
            b"\0\1\2",
            [(1, 2), (3, 4)],
            {"k": (9, [1, 2, 3]), "e": (0, [])},
            ("at", [1, 2]),
        ],
        [
            {"s": "x", "nested": {"n": (7, False)}, "d": 0.5},
            (255, True, -(2**15), 2**16 - 1, -(2**31), 2**32 - 1, -(2**63), 2**64 - 1, -1.25),
            ["", "é", "a" * 300],
            ["/", "/org/qemuvnet/a_1"],
            ["", "a{sv}", "(ii)"],
            b"\0\1\2",
            [(1, 2), (3, 4)],
            {"k": (9, [1, 2, 3]), "e": (0, [])},
            [1, 2],
        ],
    ),
    ("yaxa(t)", [1, [], []], [1, [], []]),  # empty arrays of 8-aligned elements still pad
    ("yat", [1, [5]], [1, [5]]),
    ("ya{yy}", [1, {}], [1, {}]),
    ("", [], []),
]


@pytest.mark.parametrize(("sig", "body", "expected"), ECHO)
def test_marshal_round_trip(sig, body, expected):
    assert minibus.unmarshal(sig, minibus.marshal(sig, body)) == expected


@pytest.mark.parametrize(("sig", "body", "expected"), ECHO)
def test_dbus_fast_reads_what_minibus_writes(mb, service, sig, body, expected):
    assert mb.call(*TEST, "Echo", sig, body) == (expected, [])


def test_alignment_bytes():
    # y, then an array of t: length 8 at offset 4, padding to 8, the element at 8.
    assert minibus.marshal("yat", [1, [2]]) == bytes([1, 0, 0, 0, 8, 0, 0, 0, 2] + [0] * 7)
    # An empty array of structs: length 0, yet the padding to 8 is there.
    assert minibus.marshal("ya(y)", [1, []]) == bytes([1, 0, 0, 0, 0, 0, 0, 0])
    assert minibus.marshal("g", ["ai"]) == b"\x02ai\x00"
    assert minibus.unmarshal("ay", b"\3\0\0\0abc") == [b"abc"]
    assert minibus.unmarshal("i", b"\0\0\0\1", endian=">") == [1]


@pytest.mark.parametrize(
    ("sig", "body"),
    [
        ("i", [2**31]),
        ("s", ["a\0b"]),
        ("o", ["no/slash"]),
        ("o", ["/trailing/"]),
        ("v", [("ii", (1, 2))]),
        ("(ii)", [(1,)]),
        ("a{vs}", [{}]),
        ("a{sv}", [{"a": 1}]),
        ("i", []),
        ("()", [()]),
        ("ai)", [[]]),
        ("a" * 33 + "i", [[]]),
    ],
)
def test_bad_values_to_send_raise_invalid_args(sig, body):
    with pytest.raises(DBusError) as e:
        minibus.marshal(sig, body)
    assert e.value.name == "org.freedesktop.DBus.Error.InvalidArgs"


@pytest.mark.parametrize(
    ("sig", "data"),
    [
        ("i", b"\1\0\0"),  # truncated
        ("s", b"\3\0\0\0abc"),  # no NUL
        ("s", b"\2\0\0\0\xff\xfe\0"),  # not UTF-8
        ("s", b"\3\0\0\0a\0b\0"),  # NUL inside
        ("b", b"\2\0\0\0"),
        ("o", b"\1\0\0\0x\0"),
        ("g", b"\2a{\0"),
        ("v", b"\2ii\0\1\0\0\0\2\0\0\0"),  # two types in a variant
        ("yi", b"\1\1\0\0\5\0\0\0"),  # non-zero padding
        ("ai", b"\5\0\0\0\1\0\0\0\2\0\0\0"),  # array length splits an element
        ("ai", b"\0\0\0\x10"),  # 256 MiB array
        ("h", b"\0\0\0\0"),  # fd index without fds
        ("y", b"\1\2"),  # trailing bytes
        ("v", b"\1v\0" * 70 + b"\1y\0\1"),  # variants nested too deeply
    ],
)
def test_malformed_bodies_raise(sig, data):
    with pytest.raises(DBusError) as e:
        minibus.unmarshal(sig, data)
    assert e.value.name == "org.freedesktop.DBus.Error.InconsistentMessage"


FUZZ_SIG = "a{sv}(yq)asaya(ii)v"
FUZZ_BODY = minibus.marshal(
    FUZZ_SIG,
    [{"a": ("s", "b"), "c": ("ai", [1])}, (1, 2), ["x", "yz"], b"ab", [(1, 2)], ("g", "s")],
)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_bodies_never_crash(data):
    body = bytearray(FUZZ_BODY)
    for _ in range(data.draw(st.integers(1, 4))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    body = body[: data.draw(st.integers(0, len(body)))]
    try:
        minibus.unmarshal(FUZZ_SIG, bytes(body))
    except DBusError as e:
        assert e.name == "org.freedesktop.DBus.Error.InconsistentMessage"


def test_addresses(bus, service):
    path, abstract, printed = bus
    escaped = "".join(f"%{b:02x}" for b in str(path).encode())
    for address in (
        printed,  # "unix:abstract=...,guid=...;unix:path=...,guid=..."
        f"unix:abstract={abstract}",
        f"unix:path={escaped},guid=0123",
        f"tcp:host=localhost,port=1;unix:path={path}.missing;unix:path={path}",
    ):
        with MiniBus(address, timeout=5) as conn:
            assert conn.call(*DBUS, "NameHasOwner", "s", [NAME]) == ([True], [])


def test_default_address_comes_from_the_environment(monkeypatch, address):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
    with MiniBus() as conn:
        assert conn.call(*DBUS, "GetId")[0]


@pytest.mark.parametrize(
    ("address", "name"),
    [
        ("unix:path=/nonexistent/bus", "org.freedesktop.DBus.Error.NoServer"),
        ("tcp:host=localhost,port=1", "org.freedesktop.DBus.Error.NoServer"),
        ("unix:path=%zz", "org.freedesktop.DBus.Error.BadAddress"),
    ],
)
def test_unreachable_buses(address, name):
    with pytest.raises(DBusError) as e:
        MiniBus(address, timeout=2)
    assert e.value.name == name


def test_timeout_and_closed_connection(address, service):
    conn = MiniBus(address, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(DBusError) as e:
        conn.call(*TEST, "Ignore")
    assert e.value.name == "org.freedesktop.DBus.Error.NoReply"
    assert 0.25 < time.monotonic() - start < 3
    with pytest.raises(DBusError) as e:  # a timed-out connection is closed
        conn.call(*DBUS, "GetId")
    assert e.value.name == "org.freedesktop.DBus.Error.Disconnected"


def fake_bus(tmp_path, *answers: bytes) -> str:
    """A one-connection server that swallows the client's auth and sends `answers`."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "fake"))
    server.listen(1)

    def serve():
        with server, server.accept()[0] as conn:
            conn.recv(4096)
            for answer in answers:
                conn.sendall(answer)
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(5)
            while conn.recv(4096):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return f"unix:path={tmp_path / 'fake'}"


def raw_message(mtype=2, fields=((5, ("u", 1)),), sig="s", body=(":1.9",), data=None):
    """A little-endian message (by default the reply to Hello, serial 1)."""
    data = minibus.marshal(sig, body) if data is None else data
    fields = list(fields) + ([(8, ("g", sig))] if sig else [])
    head = minibus.marshal("yyyyuua(yv)", (ord("l"), mtype, 0, 1, len(data), 7, fields))
    return head + bytes(-len(head) % 8) + data


def big_endian_hello():
    fields = b"\5\1u\0" + struct.pack(">I", 1) + b"\x08\1g\0\1s\0"  # REPLY_SERIAL, SIGNATURE
    body = struct.pack(">I", 4) + b":1.9\0"
    head = b"B\2\0\1" + struct.pack(">III", len(body), 7, len(fields)) + fields
    return head + bytes(-len(head) % 8) + body


OK = b"OK 0123456789abcdef0123456789abcdef\r\nAGREE_UNIX_FD\r\n"


@pytest.mark.parametrize(
    ("answers", "name"),
    [
        ((b"REJECTED EXTERNAL\r\n",), "org.freedesktop.DBus.Error.AuthFailed"),
        ((b"OK 01",), "org.freedesktop.DBus.Error.AuthFailed"),
        ((OK, b"x" * 16), "org.freedesktop.DBus.Error.InconsistentMessage"),
        (
            (OK, b"l\2\0\1\0\0\0\x10\1\0\0\0\0\0\0\0"),
            "org.freedesktop.DBus.Error.InconsistentMessage",
        ),
        (
            (OK, raw_message(fields=((5, ("s", "1")),))),
            "org.freedesktop.DBus.Error.InconsistentMessage",
        ),
        ((OK, raw_message(fields=())), "org.freedesktop.DBus.Error.InconsistentMessage"),
        ((OK, raw_message(mtype=9)), "org.freedesktop.DBus.Error.InconsistentMessage"),
        ((OK, raw_message(data=b"\1\0\0\0")), "org.freedesktop.DBus.Error.InconsistentMessage"),
        (
            (OK, raw_message(fields=((5, ("u", 1)), (9, ("u", 1))))),
            "org.freedesktop.DBus.Error.InconsistentMessage",
        ),
        ((OK, raw_message()[:20]), "org.freedesktop.DBus.Error.AuthFailed"),
    ],
)
def test_malformed_bus_input_raises(tmp_path, answers, name):
    with pytest.raises(DBusError) as e:
        MiniBus(fake_bus(tmp_path, *answers), timeout=5)
    assert e.value.name == name


def test_a_reply_after_signals_and_big_endian(tmp_path):
    signal = raw_message(mtype=4, fields=((1, ("o", "/")), (2, ("s", "a.b")), (3, ("s", "C"))))
    other = raw_message(fields=((5, ("u", 99)),))
    with MiniBus(fake_bus(tmp_path, OK + signal + other, big_endian_hello()), timeout=5) as conn:
        assert conn.unique_name == ":1.9"


def test_import_is_cheap():
    code = (
        "import sys, importlib.util\n"
        "before = set(sys.modules)\n"
        f"spec = importlib.util.spec_from_file_location('minibus', {str(MINIBUS_PY)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert not loaded & {"asyncio", "dbus_fast", "socket", "selectors", "enum", "typing"}, loaded
