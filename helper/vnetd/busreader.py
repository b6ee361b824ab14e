"""vnetd's reader of the system bus: each message framed by its fixed header first, one
longer than a session takes (frames.MAX_MESSAGE, 1 MiB) dropped unread, one that cannot be
decoded dropped alone.

dbus-daemon passes on messages of up to 32 MiB, and anyone may send vnetd one. dbus-fast's
own reader turns each whole message into Python values, on the event loop, before any of
vnetd's code sees it: a call whose argument is an array of eight million variants held the
loop, and every caller behind it on the bus, for 5 s here. And dbus-daemon passes on nesting
that libdbus allows and dbus-fast refuses (64 variants around an array of bytes: 352 bytes),
which dbus-fast's reader took for a broken connection: anyone could end vnetd's bus
connection, and vnetd with it.

This reader takes the bytes off the socket as they come (no more than one read's worth at a
time for a message it drops) and decodes only messages within the limit (dbus-fast's
Unmarshaller on the framed bytes, as sessions do: some 0.1 s here for 1 MiB of the smallest
values), one per turn of the loop, so that what else waits (sessions, the kernel's events)
goes between two. A message it cannot decode is dropped, never the connection. A call it
drops gets an error (LimitsExceeded, or InvalidArgs), when its caller wants an answer and
its header's fields, where dbus-daemon writes the caller's bus name last, fit in MAX_FIELDS.
No message vnetd is sent takes fds: those that come are closed as they come, off the loop.

`install` makes dbus-fast's MessageBus use it: dbus-fast builds its reader in `connect`
through the module-level `build_message_reader` of `dbus_fast.aio.message_bus`, which this
replaces (for vnetd's own process only). Standard library and dbus-fast only.
"""

from __future__ import annotations

import array
import asyncio
import io
import logging
import socket
import struct
import time
from collections.abc import Callable

from dbus_fast import Message, MessageType
from dbus_fast._private.unmarshaller import Unmarshaller
from vnet_common.frames import HEADER, MAX_FDS, MAX_MESSAGE, PROTOCOL_VERSION

from .errors import LimitsExceeded
from .kernel import closing

log = logging.getLogger("vnetd.bus")

READ_CHUNK = 1 << 16  # bytes one read takes
DROP_CHUNK = 1 << 20  # bytes one read takes of a message being dropped
MAX_FIELDS = 1 << 12  # bytes of header fields read to answer a message that is dropped
LOG_EVERY = 10.0  # seconds between log lines about dropped messages
METHOD_CALL, NO_REPLY_EXPECTED = 1, 0x1
FIELD_SENDER = 7


class Unreadable(ValueError):
    """The bus sent bytes that are not a D-Bus message: the connection cannot go on."""


def header_of(head: bytes | bytearray | memoryview) -> tuple[str, int, int, int, int]:
    """(byte order, message type, flags, serial, whole length) from a message's first
    HEADER bytes."""
    order = {0x6C: "<", 0x42: ">"}.get(head[0])  # 'l' little, 'B' big endian
    if order is None:
        raise Unreadable(f"byte {head[0]:#04x} does not say a byte order ('l' or 'B')")
    if head[3] != PROTOCOL_VERSION:
        raise Unreadable(f"D-Bus protocol version {head[3]} is not {PROTOCOL_VERSION}")
    body, serial, fields = struct.unpack_from(order + "III", head, 4)
    return order, head[1], head[2], serial, HEADER + fields + (-fields & 7) + body


def sender_of(order: str, fields: bytes | bytearray | memoryview) -> str | None:
    """The SENDER field (a string) of a header's field array, or None where the fields do
    not say it in the plain form dbus-daemon writes (each field a byte code and a variant of
    a basic type)."""
    pos, end = 0, len(fields)
    sizes = {"u": 4, "i": 4, "y": 1, "b": 4, "n": 2, "q": 2, "x": 8, "t": 8, "d": 8, "h": 4}
    try:
        for _ in range(16):  # (nine codes are defined; an unknown one is skipped)
            pos += -pos & 7
            if pos >= end:
                return None
            code, siglen = fields[pos], fields[pos + 1]
            sig = bytes(fields[pos + 2:pos + 2 + siglen]).decode("ascii")
            pos += 3 + siglen
            if sig in ("s", "o"):
                pos += -pos & 3
                (n,) = struct.unpack_from(order + "I", fields, pos)
                value = bytes(fields[pos + 4:pos + 4 + n])
                if pos + 4 + n > end:
                    return None
                if code == FIELD_SENDER:
                    return value.decode("utf-8")
                pos += 4 + n + 1
            elif sig == "g":
                pos += 1 + fields[pos] + 1
            elif sig in sizes:
                size = sizes[sig]
                pos += (-pos & (size - 1)) + size
            else:
                return None
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


class BoundedReader:
    """Reads vnetd's bus connection (see the module's text). `process` takes each message
    read whole; `finalize` is told once the connection ends; `refuse(serial, sender, error,
    text)` answers a call that was dropped or could not be decoded."""

    def __init__(self, sock: socket.socket, process: Callable[[Message], None],
                 finalize: Callable[[Exception | None], None],
                 refuse: Callable[[int, str, str, str], None] | None = None,
                 limit: int = MAX_MESSAGE):
        self.sock, self.process, self.finalize = sock, process, finalize
        self.refuse, self.limit = refuse, limit
        self.buf = bytearray()
        self.drop = 0  # bytes of a message too long still to come, dropped as they come
        self.dropped = 0  # messages dropped (too long, or not decodable), in all
        self.due = False  # a turn is scheduled
        self.ended = False
        self._logged = 0.0

    def __call__(self) -> None:
        """The socket is readable: a turn, unless one is scheduled already (it reads when
        it has no whole message to take)."""
        if not self.due:
            self._turn()

    def _scheduled(self) -> None:
        self.due = False
        self._turn()

    def _turn(self) -> None:
        """The next message read whole is decoded and processed, after a read if none is.
        A turn takes at most one message, and another turn follows while more are here, so
        the loop turns between two: a burst of calls never holds it for more than one."""
        if self.ended or self.sock.fileno() < 0:  # (dbus-fast ended the connection)
            return
        try:
            if not self._deliver_one() and self._read_once():
                self._deliver_one()
            if not self.due and self._complete():
                self.due = True
                asyncio.get_running_loop().call_soon(self._scheduled)
        except Exception as e:  # the bus connection is over: dbus-fast ends it
            self.ended = True
            self.finalize(e)

    def _complete(self) -> bool:
        """Whether a whole message, or one to drop whose fields are here, waits."""
        if len(self.buf) < HEADER:
            return False
        order, kind, flags, _serial, length = header_of(self.buf[:HEADER])
        if length > self.limit:
            return self._fields_here(order, kind, flags)
        return len(self.buf) >= length

    def _fields_here(self, order: str, kind: int, flags: int) -> bool:
        """Whether what a message too long needs before it is dropped is here: the header's
        fields, where it is a call that wants an answer and they fit in MAX_FIELDS."""
        (fields_len,) = struct.unpack_from(order + "I", self.buf, 12)
        if kind == METHOD_CALL and not flags & NO_REPLY_EXPECTED and fields_len <= MAX_FIELDS:
            return len(self.buf) >= HEADER + fields_len
        return True

    def _read_once(self) -> bool:
        """One read (a larger one while a message is being dropped); False when the socket
        has nothing more for now. No message vnetd is sent takes fds: those that come are
        closed at once, off the loop (a sender chooses what their last close costs:
        kernel/closing.py)."""
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(
                DROP_CHUNK if self.drop > READ_CHUNK else READ_CHUNK,
                socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return False
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                closing.discard(array.array("i", raw[:len(raw) - len(raw) % 4]))
        if not data:
            raise EOFError("the bus closed vnetd's connection")
        view = memoryview(data)
        if self.drop:
            n = min(self.drop, len(view))
            self.drop -= n
            view = view[n:]
        self.buf += view
        return True

    def _deliver_one(self) -> bool:
        """Decode and process the first message in the buffer, if it is all here (dropping
        the ones too long before it, and one that cannot be decoded); False if none is."""
        while len(self.buf) >= HEADER:
            order, kind, flags, serial, length = header_of(self.buf[:HEADER])
            if length > self.limit:
                if not self._fields_here(order, kind, flags):
                    return False
                self._drop_long(order, kind, flags, serial, length)
                continue
            if len(self.buf) < length:
                return False
            data = bytes(self.buf[:length])
            del self.buf[:length]
            try:
                msg = Unmarshaller(stream=io.BytesIO(data)).unmarshall()  # type: ignore[arg-type]
                if msg is None:
                    raise ValueError("it ends before its length says")
            except Exception as e:
                # dbus-daemon passes on messages that dbus-fast cannot decode (nesting
                # that libdbus allows and dbus-fast does not): the message goes, never the
                # connection
                self._refuse(order, kind, flags, serial, data[:HEADER + MAX_FIELDS],
                             len(data), "org.freedesktop.DBus.Error.InvalidArgs",
                             f"The call could not be decoded ({_clip(str(e))}); it was "
                             "not read.")
                continue
            try:
                self.process(msg)
            except Exception:
                log.exception("processing a message from the bus")
            return True
        return False

    def _drop_long(self, order: str, kind: int, flags: int, serial: int,
                   length: int) -> None:
        """A message longer than the limit: answered if it is a call that wants an answer
        and its fields (its caller's name) are within MAX_FIELDS (_fields_here), then dropped
        as its bytes come."""
        head = bytes(self.buf[:HEADER + MAX_FIELDS])
        here = min(length, len(self.buf))
        del self.buf[:here]
        self.drop = length - here
        self._refuse(order, kind, flags, serial, head, length, LimitsExceeded.dbus_name,
                     f"A call of {length} bytes is longer than vnetd takes ({self.limit} "
                     "bytes); it was not read.")

    def _refuse(self, order: str, kind: int, flags: int, serial: int, head: bytes,
                length: int, error: str, text: str) -> None:
        """A message that is not processed (`head`: its first bytes): a line in the log (one
        per LOG_EVERY), and an answer to its caller if it is a call that wants one and its
        fields, within MAX_FIELDS, name it."""
        sender = None
        if kind == METHOD_CALL and not flags & NO_REPLY_EXPECTED:
            (fields_len,) = struct.unpack_from(order + "I", head, 12)
            if fields_len <= MAX_FIELDS and len(head) >= HEADER + fields_len:
                sender = sender_of(order, memoryview(head)[HEADER:HEADER + fields_len])
        self.dropped += 1
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY:
            self._logged = now
            log.warning("dropped a message of %d bytes from %s: %s (%d dropped since vnetd "
                        "started)", length, sender or "a caller", text, self.dropped)
        if sender is not None and self.refuse is not None:
            try:
                self.refuse(serial, sender, error, text)
            except Exception as e:  # (a name dbus-daemon would not have written)
                log.info("could not answer the message dropped from %r: %s", sender, e)


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[:n] + "..."


def install() -> None:
    """Make every MessageBus this process connects from now on read through BoundedReader,
    its dropped calls answered with LimitsExceeded."""
    import inspect

    from dbus_fast.aio import message_bus as aio_bus

    was = getattr(aio_bus, "build_message_reader", None)
    try:
        params = list(inspect.signature(was).parameters) if callable(was) else []
    except (TypeError, ValueError):
        params = []
    if params != ["sock", "process", "finalize", "negotiate_unix_fd"]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            have = version("dbus-fast")
        except PackageNotFoundError:  # (bundled without its metadata)
            have = "here"
        raise RuntimeError(
            f"dbus-fast {have} does not build its bus "
            "reader as build_message_reader(sock, process, finalize, negotiate_unix_fd), "
            "which vnetd replaces with its own: install the dbus-fast vnetd is tested with "
            "(5.2.0, as debian/bundled.txt says)")

    def build(sock: socket.socket | None, process: Callable[[Message], None],
              finalize: Callable[[Exception | None], None],
              negotiate_unix_fd: bool) -> Callable[[], None]:
        if sock is None:
            raise RuntimeError("vnetd's bus connection must be a socket")
        owner: list = []

        def refuse(serial: int, sender: str, error: str, text: str) -> None:
            if owner:
                sent = owner[0](Message(
                    message_type=MessageType.ERROR, reply_serial=serial, destination=sender,
                    error_name=error, signature="s", body=[text]))
                sent.add_done_callback(lambda f: f.cancelled() or f.exception())

        reader = BoundedReader(sock, process, finalize, refuse)
        bus = getattr(process, "__self__", None)
        if bus is not None:
            owner.append(bus.send)
        return reader

    aio_bus.build_message_reader = build
