"""vnetd's bus reader: messages framed by their header, those past the limit dropped unread."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest
from dbus_fast import Message, MessageFlag, Variant
from vnetd import busreader
from vnetd.busreader import BoundedReader, Unreadable, header_of, sender_of

LIMIT = 4096


def with_sender(raw: bytes, sender: str) -> bytes:
    """A little-endian message as dbus-daemon passes it on: the SENDER field added last."""
    (fields_len,) = struct.unpack_from("<I", raw, 12)
    fields = raw[16:16 + fields_len]
    body = raw[16 + fields_len + (-fields_len & 7):]
    name = sender.encode()
    fields += b"\0" * (-len(fields) & 7) + bytes([7, 1]) + b"s\0" + struct.pack("<I", len(name))
    fields += name + b"\0"
    return raw[:12] + struct.pack("<I", len(fields)) + fields + b"\0" * (-len(fields) & 7) + body


def call(serial: int, n: int = 0, sender: str = ":1.42", **kw) -> bytes:
    """A call of `n` variants from `sender`, as dbus-daemon passes it on."""
    msg = Message(destination="org.qemuvnet.Vnet1", path="/org/qemuvnet/Vnet1",
                  interface="org.qemuvnet.Vnet1.Manager", member="ListNetworks",
                  signature="av", body=[[Variant("y", 7)] * n], serial=serial, **kw)
    return with_sender(bytes(msg._marshall(False)), sender)


class Harness:
    def __init__(self, limit: int = LIMIT):
        self.ours, self.bus = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ours.setblocking(False)
        self.got: list[Message] = []
        self.refused: list[tuple[int, str, str, str]] = []
        self.ended: list[Exception | None] = []
        self.reader = BoundedReader(self.ours, self.got.append, self.ended.append,
                                    lambda *a: self.refused.append(a), limit=limit)
        self.loop = asyncio.new_event_loop()

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            socket.send_fds(self.bus, [data], fds)
        else:
            self.bus.sendall(data)
        self.pump()

    def pump(self) -> None:
        """A readable socket's turn, and the turns it schedules."""
        async def turns() -> None:
            self.reader()
            for _ in range(50):
                await asyncio.sleep(0)
        self.loop.run_until_complete(turns())

    def close(self) -> None:
        self.loop.close()
        self.ours.close()
        self.bus.close()


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


def test_messages_within_the_limit_are_read_in_order_whole_or_in_pieces(h):
    a, b = call(1, 10), call(2, 20)
    h.send(a + b[:7])
    assert [m.serial for m in h.got] == [1]
    h.send(b[7:50])
    h.send(b[50:])
    assert [m.serial for m in h.got] == [1, 2]
    assert len(h.got[1].body[0]) == 20 and h.got[1].sender == ":1.42"
    assert not h.refused and not h.ended


def test_the_loop_turns_between_two_messages_that_came_in_one_read(h):
    order: list[str] = []

    def process(msg: Message) -> None:
        order.append(f"message {msg.serial}")
        # what the first message starts runs before the second message is decoded
        asyncio.get_running_loop().call_soon(order.append, f"after {msg.serial}")

    h.reader.process = process
    h.send(call(1, 10) + call(2, 10) + call(3, 10))
    assert order == ["message 1", "after 1", "message 2", "after 2", "message 3", "after 3"]


def test_a_message_past_the_limit_is_dropped_and_its_caller_answered(h):
    big = call(7, 5000)  # 20 kB
    assert len(big) > LIMIT
    h.send(big[:3000])
    h.send(big[3000:] + call(8, 1))
    assert h.refused == [(7, ":1.42", "org.freedesktop.DBus.Error.LimitsExceeded",
                          f"A call of {len(big)} bytes is longer than vnetd takes (4096 bytes); "
                          "it was not read.")]
    assert [m.serial for m in h.got] == [8]  # the next message is read as it should be
    assert h.reader.dropped == 1 and not h.reader.buf and not h.ended


def test_a_dropped_message_is_never_held_whole(h):
    big = call(3, 60000)  # 240 kB, sent in pieces
    for i in range(0, len(big), 8192):
        h.send(big[i:i + 8192])
        assert len(h.reader.buf) <= 8192 + busreader.MAX_FIELDS
    assert [r[:2] for r in h.refused] == [(3, ":1.42")] and not h.got and not h.reader.buf


def test_a_call_that_wants_no_answer_is_dropped_silently(h):
    h.send(call(4, 5000, flags=MessageFlag.NO_REPLY_EXPECTED) + call(5, 1))
    assert h.refused == [] and [m.serial for m in h.got] == [5]


def test_a_header_past_what_is_looked_into_gets_no_answer(h):
    msg = Message(destination="org.qemuvnet.Vnet1", path="/x/" + "y" * 9000,
                  interface="a.b", member="M", serial=9)
    h.send(with_sender(bytes(msg._marshall(False)), ":1.9") + call(10, 1))
    assert h.refused == [] and [m.serial for m in h.got] == [10]


def widowed(r: int) -> bool:
    """Whether every copy of the pipe's write end is closed (within 5 s)."""
    import select

    readable, _, _ = select.select([r], [], [], 5.0)
    return bool(readable) and os.read(r, 1) == b""


@pytest.mark.parametrize("n", [1, 5000])  # one that is read, one that is dropped
def test_fds_sent_with_a_message_are_closed_and_it_is_read_without_them(h, n):
    r, w = os.pipe()
    try:
        h.send(call(6, n), fds=[w])
        os.close(w)
        w = -1
        # the reader's copy went too (closing.discard, on its own thread): no method takes fds
        assert widowed(r)
        assert [m.unix_fds for m in h.got] == ([[]] if n == 1 else [])
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_fds_that_come_with_the_next_message_are_closed_too(h):
    r, w = os.pipe()
    try:
        a, b = call(11, 1), call(12, 1)
        h.bus.sendall(a + b[:20])
        socket.send_fds(h.bus, [b[20:]], [w])
        os.close(w)
        w = -1
        h.pump()
        assert [m.serial for m in h.got] == [11, 12]
        assert all(m.unix_fds == [] for m in h.got)
        assert widowed(r)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_a_call_that_cannot_be_decoded_is_dropped_alone_and_answered(h):
    """64 variants around an array of bytes: libdbus (dbus-daemon) takes that nesting,
    dbus-fast does not. dbus-fast's reader took it for a broken connection."""
    v = Variant("ay", b"")
    for _ in range(63):
        v = Variant("v", v)
    msg = Message(destination="org.qemuvnet.Vnet1", path="/org/qemuvnet/Vnet1",
                  interface="org.qemuvnet.Vnet1.Manager", member="ListNetworks",
                  signature="v", body=[v], serial=30)
    h.send(with_sender(bytes(msg._marshall(False)), ":1.30") + call(31, 1))
    assert not h.ended
    assert [m.serial for m in h.got] == [31]
    assert len(h.refused) == 1
    serial, sender, error, text = h.refused[0]
    assert (serial, sender, error) == (30, ":1.30", "org.freedesktop.DBus.Error.InvalidArgs")
    assert text.startswith("The call could not be decoded (") and "nesting" in text, text


def test_a_readable_socket_while_a_turn_is_due_takes_no_second_message(h):
    async def go() -> list[int]:
        h.bus.sendall(call(1, 1) + call(2, 1) + call(3, 1))
        h.reader()  # the socket is readable: message 1, and a turn is due for the next
        h.reader()  # readable again in the same turn of the loop: nothing more
        first = [m.serial for m in h.got]
        for _ in range(10):
            await asyncio.sleep(0)
        return first

    assert h.loop.run_until_complete(go()) == [1]
    assert [m.serial for m in h.got] == [1, 2, 3]


def test_a_dropped_call_waits_for_its_fields_without_turning_idly(h):
    big = call(40, 5000)
    h.bus.sendall(big[:20])  # the fixed header, and only part of the fields
    h.pump()
    assert not h.reader.due and not h.reader._complete()  # nothing to do until more comes
    h.send(big[20:])
    assert [r[:2] for r in h.refused] == [(40, ":1.42")]


def be_field(code: int, sig: str, value: str) -> bytes:
    raw = value.encode()
    if sig == "g":
        return bytes([code, 1]) + b"g\0" + bytes([len(raw)]) + raw + b"\0"
    return bytes([code, 1]) + sig.encode() + b"\0" + struct.pack(">I", len(raw)) + raw + b"\0"


def be_call(serial: int, text: str, sender: str = ":1.88") -> bytes:
    """A big-endian call of one string, as a big-endian peer sends it and dbus-daemon passes
    it on, built by hand (dbus-fast writes little-endian only)."""
    fields = b""
    for code, sig, value in ((1, "o", "/org/qemuvnet/Vnet1"),
                             (2, "s", "org.qemuvnet.Vnet1.Manager"), (3, "s", "GetMac"),
                             (8, "g", "s"), (7, "s", sender)):
        fields += b"\0" * (-len(fields) & 7) + be_field(code, sig, value)
    body = struct.pack(">I", len(text)) + text.encode() + b"\0"
    head = b"B" + bytes([1, 0, 1]) + struct.pack(">III", len(body), serial, len(fields))
    return head + fields + b"\0" * (-len(fields) & 7) + body


def test_a_big_endian_message_is_read_whole_and_answered_when_too_long():
    small = Harness()
    try:
        small.send(be_call(77, "net") + be_call(78, "x" * 5000) + be_call(79, "end"))
        assert [(m.serial, m.body) for m in small.got] == [(77, ["net"]), (79, ["end"])]
        assert [r[:3] for r in small.refused] == [
            (78, ":1.88", "org.freedesktop.DBus.Error.LimitsExceeded")]
    finally:
        small.close()


def test_a_turn_after_the_connection_was_closed_does_nothing(h):
    h.bus.sendall(call(1, 1) + call(2, 1))
    h.ours.close()  # (as dbus-fast's _finalize does)
    h.pump()
    assert h.got == [] and h.ended == []


def test_the_end_of_the_connection_and_bytes_that_are_no_message_end_it(h):
    h.bus.close()
    h.pump()
    assert len(h.ended) == 1 and isinstance(h.ended[0], EOFError)
    other = Harness()
    try:
        other.send(b"X" + call(1, 1)[1:])
        assert len(other.ended) == 1 and isinstance(other.ended[0], Unreadable)
    finally:
        other.close()


def test_big_endian_headers_are_framed_and_their_sender_found():
    # the fixed header and the fields of a big-endian call, built by hand: a path, the
    # sender and a member
    def field(code: int, sig: str, value: str) -> bytes:
        raw = value.encode()
        return bytes([code, 1]) + sig.encode() + b"\0" + struct.pack(">I", len(raw)) + raw + b"\0"

    fields = b""
    for code, sig, value in ((1, "o", "/p"), (7, "s", ":1.77"), (3, "s", "Member")):
        fields += b"\0" * (-len(fields) & 7) + field(code, sig, value)
    head = b"B" + bytes([1, 0, 1]) + struct.pack(">III", 100000, 55, len(fields))
    order, kind, flags, serial, length = header_of(head)
    assert (order, kind, flags, serial) == (">", 1, 0, 55)
    assert length == 16 + len(fields) + (-len(fields) & 7) + 100000
    assert sender_of(order, fields) == ":1.77"


@pytest.mark.parametrize("fields", [
    b"",  # no fields at all
    bytes([7, 1]) + b"s\0" + struct.pack("<I", 500) + b"short",  # a length past the end
    bytes([9, 2]) + b"as\0",  # a container: not what dbus-daemon writes
    bytes([7, 1]) + b"s\0" + struct.pack("<I", 2) + b"\xff\xfe\0",  # not UTF-8
])
def test_fields_that_do_not_say_a_sender_plainly_say_none(fields):
    assert sender_of("<", fields) is None


def test_an_unknown_field_of_a_basic_type_is_skipped():
    fields = bytes([42, 1]) + b"t\0" + b"\0" * 4 + struct.pack("<Q", 1)
    fields += b"\0" * (-len(fields) & 7)
    fields += bytes([7, 1]) + b"s\0" + struct.pack("<I", 4) + b":1.5\0"
    assert sender_of("<", fields) == ":1.5"


def test_the_reader_answers_a_dropped_call_on_the_bus_it_reads():
    """install() replaces dbus-fast's reader builder; the one it builds answers a dropped
    call with LimitsExceeded, sent on the MessageBus whose reader it is."""
    from dbus_fast.aio import message_bus as aio_bus

    before = aio_bus.build_message_reader
    sent: list[Message] = []

    class Bus:
        def send(self, msg):
            sent.append(msg)

            class Done:
                def add_done_callback(self, _cb):
                    pass
            return Done()

        def _process_message(self, msg):
            pass

    a, b = socket.socketpair()
    try:
        busreader.install()
        reader = aio_bus.build_message_reader(a, Bus()._process_message, lambda e: None, True)
        a.setblocking(False)
        data = call(21, 300000)

        async def feed() -> None:
            for i in range(0, len(data), 1 << 16):  # (the socket holds less than the call)
                b.sendall(data[i:i + (1 << 16)])
                reader()
                await asyncio.sleep(0)
        asyncio.run(feed())
    finally:
        aio_bus.build_message_reader = before
        a.close()
        b.close()
    assert len(sent) == 1
    err = sent[0]
    assert err.error_name == "org.freedesktop.DBus.Error.LimitsExceeded"
    assert err.reply_serial == 21 and err.destination == ":1.42"
    assert "longer than vnetd takes (1048576 bytes)" in err.body[0]


def test_install_refuses_a_dbus_fast_whose_reader_is_built_otherwise():
    from dbus_fast.aio import message_bus as aio_bus

    before = aio_bus.build_message_reader
    aio_bus.build_message_reader = lambda stream, sock, process, finalize: None
    try:
        with pytest.raises(RuntimeError, match=r"does not build its bus reader as "
                           r"build_message_reader\(sock, process, finalize"):
            busreader.install()
    finally:
        aio_bus.build_message_reader = before
