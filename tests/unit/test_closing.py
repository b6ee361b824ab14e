"""fds vnetd closes off its event loop (kernel/closing.py): its own that nobody else holds
(a tap's last close waits for the kernel to remove it), and those a caller sent (whose last
close the caller chose the cost of)."""

from __future__ import annotations

import array
import os
import socket
import struct
import threading
import time

from vnetd.kernel import closing


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _wait_closed(fds: list[int], seconds: float = 5) -> None:
    end = time.monotonic() + seconds
    while not all(_closed(fd) for fd in fds) and time.monotonic() < end:
        time.sleep(0.01)
    still = [fd for fd in fds if not _closed(fd)]
    assert not still, f"fds {still} are still open"


def test_fds_given_to_close_later_are_closed_off_the_calling_thread():
    fds = [fd for _ in range(3) for fd in os.pipe()]
    seen: list[bool] = []
    real_close = os.close

    def close(fd):
        seen.append(threading.current_thread() is threading.main_thread())
        real_close(fd)

    os.close = close
    try:
        closing.close_later(fds)
        end = time.monotonic() + 5
        while len(seen) < len(fds) and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        os.close = real_close
    assert seen == [False] * len(fds)  # every one, and none on the caller's thread
    _wait_closed(fds)
    closing.close_later([])  # nothing to close: no batch at all


def _lingering(seconds: int) -> tuple[socket.socket, socket.socket]:
    """A TCP connection whose peer never reads, its send queue full, SO_LINGER set: its
    last close waits `seconds` for the queue to drain, which it never does."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)  # (never accepted)
    s = socket.socket()
    s.connect(srv.getsockname())
    s.setblocking(False)
    try:
        while True:
            s.send(b"x" * 65536)
    except BlockingIOError:
        pass
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, seconds))
    return srv, s


def test_a_lingering_socket_a_caller_sent_is_closed_without_waiting():
    srv, s = _lingering(30)
    fd = s.detach()  # (what vnetd has: the number, the last copy)
    r, w = os.pipe()
    try:
        t = time.monotonic()
        closing.discard([fd, r, w])
        assert time.monotonic() - t < 0.5  # (the caller never waits)
        after = list(os.pipe())
        closing.discard(after)
        # the thread is done with the socket's close within seconds, not 30 s: lingering was
        # turned off first (an fd's number is free as its close begins; a later batch is
        # closed only once that close has returned)
        _wait_closed([fd, r, w, *after], seconds=3)
    finally:
        srv.close()


def test_unlinger_leaves_anything_but_a_socket_as_it_is():
    r, w = os.pipe()
    try:
        closing.unlinger(r)  # no error, nothing changed
        os.write(w, b"x")
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.close(w)
    closing.unlinger(r)  # closed already: no error either


def test_a_slow_discard_does_not_hold_up_closing_vnetds_own_fds(monkeypatch):
    """The two threads are separate: a caller's fd whose close waits (here: one made to
    wait on purpose) never delays the close of a port's tap."""
    gate = threading.Event()
    monkeypatch.setattr(closing, "unlinger", lambda fd: gate.wait(10))
    held = list(os.pipe())
    try:
        closing.discard(held)
        mine = list(os.pipe())
        closing.close_later(mine)
        _wait_closed(mine, seconds=3)
        assert not any(_closed(fd) for fd in held)
    finally:
        gate.set()
    _wait_closed(held)


def test_a_close_that_waits_is_interrupted_and_the_fds_after_it_are_closed():
    """A unix socket whose queue holds the only copy of a lingering socket: turning its own
    lingering off does nothing for that one, whose last close comes with this one's. The
    wait is interrupted after PATIENCE, and what was sent after it is closed then."""
    closing.arm()
    srv, s = _lingering(30)
    x, y = socket.socketpair()
    x.sendmsg([b"."], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))])
    s.close()
    x.close()
    held = y.detach()
    after = list(os.pipe())
    try:
        before = closing.discard.interrupted
        t = time.monotonic()
        closing.discard([held])
        closing.discard(after)
        _wait_closed(after, seconds=closing.PATIENCE * 4)
        took = time.monotonic() - t
        assert closing.discard.interrupted > before
        assert took >= closing.PATIENCE * 0.9  # (it did wait, until interrupted)
    finally:
        srv.close()
