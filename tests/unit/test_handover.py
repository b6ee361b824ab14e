"""A bus reply that carries fds is written in two parts, vnetd's copies closed in between
(vnetd.handover): dbus-daemon cannot pass on a message it does not have whole, so the
caller never holds a port's fds before vnetd has closed its own, and the caller's close,
never vnetd's, is the last (the one that waits for the kernel to remove the tap).

This drives dbus-fast's own writer (the one vnetd's bus uses) over a socket pair."""

from __future__ import annotations

import asyncio
import os
import socket

from dbus_fast import Message, MessageType
from dbus_fast.aio.message_bus import _MessageWriter
from vnetd import handover

from tests.harness.fdkinds import is_open


class _Bus:
    """What dbus-fast's writer reads of its bus, on one end of a socket pair."""

    def __init__(self, sock: socket.socket, negotiate: bool = True):
        self._negotiate_unix_fd = negotiate
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self.unique_name = ":1.7"
        self._user_disconnect = False
        self._serial = 0
        self._writer = _MessageWriter(self)
        self.sent: list[Message] = []

    def next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def send(self, msg: Message) -> asyncio.Future:  # what the fallback uses
        self.sent.append(msg)
        fut = self._loop.create_future()
        fut.set_result(None)
        return fut


def _reply(fds: list[int]) -> Message:
    return Message(message_type=MessageType.METHOD_RETURN, reply_serial=5,
                   destination=":1.9", signature="sah", body=["tap0", list(range(len(fds)))],
                   unix_fds=fds)


def test_the_fds_go_with_the_first_byte_and_vnetds_copies_are_closed_before_the_rest():
    async def main() -> None:
        here, peer = socket.socketpair()
        here.setblocking(False)
        bus = _Bus(here)
        assert handover.writer_of(bus) is bus._writer
        pipes = [os.pipe(), os.pipe()]
        fds = [pipes[0][0], pipes[1][0]]
        reply = _reply(fds)
        same = _reply(list(fds))
        same.serial = 1  # (the serial the bus gives it)
        whole = bytes(same._marshall(True))
        seen_open: list[bool] = []
        # what the peer can read the moment the first part is written
        real = os.close
        os.close = lambda fd: (seen_open.append(bool(peer.recv(1 << 16, socket.MSG_PEEK
                                                               | socket.MSG_DONTWAIT))),
                               real(fd))[1]
        try:
            await handover.send_handing_over(bus, reply, fds)
        finally:
            os.close = real
        assert fds == []  # handed over: nothing left for the caller to close
        assert reply.serial == 1
        assert not any(is_open(fd) for fd in (pipes[0][0], pipes[1][0]))
        # closed when only the first byte was there to read
        assert seen_open == [True, True]
        first, anc, _flags, _addr = peer.recvmsg(1 << 16, socket.CMSG_SPACE(8 * 4))
        assert len(first) == 1  # the first byte alone carries the fds
        got = [int.from_bytes(d[i:i + 4], "little") for _l, _t, d in anc
               for i in range(0, len(d), 4)]
        assert len(got) == 2
        rest = peer.recv(1 << 16)
        assert first + rest == whole
        for fd in got:  # the peer's copies are the ends of the pipes
            os.write(pipes[got.index(fd)][1], b"x")
            assert os.read(fd, 1) == b"x"
            os.close(fd)
        for _r, w in pipes:
            os.close(w)
        here.close()
        peer.close()

    asyncio.run(main())


def test_a_writer_it_does_not_know_gets_the_reply_whole_and_the_fds_closed_once_written():
    async def main() -> None:
        here, peer = socket.socketpair()
        bus = _Bus(here, negotiate=False)  # (a writer this was not written for)
        assert handover.writer_of(bus) is None
        r, w = os.pipe()
        fds = [r]
        reply = _reply(fds)
        await handover.send_handing_over(bus, reply, fds)
        await asyncio.sleep(0)  # (the done callback's turn)
        assert bus.sent == [reply] and reply.unix_fds == [] and fds == []
        assert not is_open(r)
        os.close(w)
        here.close()
        peer.close()

    asyncio.run(main())
