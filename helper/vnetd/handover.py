"""A bus reply that hands over fds (a port's tap) is written so that vnetd never holds the
last copy of one.

Closing the last copy of a tap's fd makes the kernel remove the tap: some 15 ms here, up to
50 ms under load, under its network lock. Whoever closes last waits for that. Sent as any
other message, the reply was written whole, and vnetd closed its copies after that; if the
caller had the reply by then and had closed its fds already, vnetd's close was the last, and
its event loop waited. A caller can win that race on purpose, at every attach: dbus-daemon
may run (and forward the reply) before vnetd does again after writing it.

So the reply goes to dbus-daemon in two writes, as a session's answer does (vnetd.session):
its first byte with the fds, then the rest. vnetd closes its copies between the two, in the
same turn of its event loop. dbus-daemon cannot pass on a message it does not have whole, so
nobody can hold the fds before vnetd has closed its own.

dbus-fast has no way to run code between two writes of its queue, so this puts the two
writes in its writer's queue itself (`writer_of` says whether the writer is the one this was
written for; if not, the reply goes as any other, and vnetd closes its copies once it is
written, as it did before).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from dbus_fast import Message
from dbus_fast.aio import MessageBus
from vnet_common.frames import close_fds


class _CloseOnWrite:
    """Stands in the writer's queue where a future would: the writer 'completes' it once the
    bytes before it are written (or fails it if the connection broke), and either way it
    closes vnetd's copies of the fds there and then."""

    __slots__ = ("fds",)

    def __init__(self, fds: list[int]):
        self.fds = fds

    def done(self) -> bool:
        return not self.fds

    def _close(self) -> None:
        fds, self.fds = self.fds, []
        close_fds(fds)

    def set_result(self, _result: object) -> None:
        self._close()

    def set_exception(self, _exc: BaseException) -> None:
        self._close()


def writer_of(bus: MessageBus) -> Any:
    """`bus`'s writer if it is dbus-fast's queue of (bytes, fds, future) entries, which
    send_handing_over writes to; None otherwise."""
    w = getattr(bus, "_writer", None)
    ok = (w is not None and isinstance(getattr(w, "messages", None), deque)
          and hasattr(w, "buf") and callable(getattr(w, "write_callback", None))
          and callable(getattr(w, "schedule_write", None))
          and getattr(w, "negotiate_unix_fd", False) is True)
    return w if ok else None


def send_handing_over(bus: MessageBus, reply: Message, fds: list[int]) -> asyncio.Future:
    """Write `reply`, which carries `fds`; they are vnetd's to close, and this closes them:
    once its first byte is written (or at once, if the bus cannot take it). The future is
    done once the whole reply is written. `fds` is emptied (none is closed twice)."""
    mine = list(fds)
    w = writer_of(bus)
    if w is None:  # another dbus-fast: as before, closed once written
        fut = bus.send(reply)  # (marshalled here and now, with the fds)
        fut.add_done_callback(lambda _f: close_fds(mine))
        fds.clear()  # (the reply's own list, as often as not: only once it is marshalled)
        return fut
    if not reply.serial:
        reply.serial = bus.next_serial()
    data = reply._marshall(True)
    fds.clear()
    written = asyncio.get_running_loop().create_future()
    idle = w.buf is None and not w.messages
    w.messages.append((bytearray(data[:1]), mine, _CloseOnWrite(mine)))
    w.messages.append((bytearray(data[1:]), None, written))
    if idle:  # as dbus-fast itself does with a message to an idle writer: write it now
        w.write_callback(remove_writer=False)
    w.schedule_write()  # (the socket's turn for what is left, if anything)
    return written
