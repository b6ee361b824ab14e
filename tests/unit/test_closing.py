"""fds vnetd closes off its event loop (kernel/closing.py): its own that nobody else holds
(a tap's last close waits for the kernel to remove it), and those a caller sent (whose last
close the caller chose the cost of)."""

from __future__ import annotations

import os
import threading
import time

from vnetd.kernel import closing

from tests.harness.fdkinds import is_open, lingering, nested


def _wait_closed(fds: list[int], seconds: float = 5) -> None:
    end = time.monotonic() + seconds
    while any(is_open(fd) for fd in fds) and time.monotonic() < end:
        time.sleep(0.01)
    still = [fd for fd in fds if is_open(fd)]
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


def test_a_lingering_socket_a_caller_sent_is_closed_without_waiting():
    keep: list = []
    s = lingering(keep, 30)
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
        keep[0].close()


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
        assert all(is_open(fd) for fd in held)
    finally:
        gate.set()
    _wait_closed(held)


def test_a_close_that_waits_is_interrupted_and_the_fds_after_it_are_closed():
    """A unix socket whose queue holds the only copy of a lingering socket: turning its own
    lingering off does nothing for that one, whose last close comes with this one's. The
    wait is interrupted after PATIENCE, and what was sent after it is closed then."""
    closing.arm()
    keep: list = []
    held = nested(keep, 30).detach()
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
        keep[0].close()
