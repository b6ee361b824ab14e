"""Closing fds off the event loop: vnetd's own taps, and whatever fds callers send it.

A close can wait, and the event loop must never wait for one:

- **A tap's last close** makes the kernel remove it: about 15 ms here (48 ms seen under
  load), under the kernel's network lock. A port's fds that vnetd made and never handed over
  (a call that wants no reply, a reply that could not be made or written) are vnetd's alone.
  `close_later` closes them on a thread of its own. What it has yet to close is bounded by
  the ports' quotas: a port stays its holder's (and counts for it) until its tap is gone.
- **fds a caller sent.** No method takes fds, but anyone may attach them to a call (on the
  bus or on a session), and they arrive open in vnetd. Whoever drops the last copy of one
  pays for its release, and a caller chooses what that costs. A TCP socket with unsent data
  and SO_LINGER set makes its last close wait for up to the linger time (any local user can
  make one: a connection to a port of her own that never reads). dbus-daemon drops its copy
  once it has passed the call on, so the last copy is usually vnetd's. Closed on the loop,
  one such message held every caller up for its linger time. `discard` closes them on
  another thread, and turns lingering off on each socket first.

The two threads are separate, so that a close a caller made slow never holds up the removal
of a port's tap.
"""

from __future__ import annotations

import os
import queue
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterable

from vnet_common.frames import close_fds

NO_LINGER = struct.pack("ii", 0, 0)


class _Closer:
    """One thread that closes batches of fds in the order given, started on first use."""

    def __init__(self, name: str, close: Callable[[list[int]], None]):
        self.name = name
        self._close = close
        self._queue: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __call__(self, fds: Iterable[int]) -> None:
        batch = list(fds)
        if not batch:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._forever, name=self.name,
                                                daemon=True)
                self._thread.start()
        self._queue.put(batch)

    def _forever(self) -> None:
        while True:
            self._close(self._queue.get())


def unlinger(fd: int) -> None:
    """If `fd` is a socket, make its close return at once (SO_LINGER off: the kernel sends
    what is left, if it can, after the close). Anything else is left as it is."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return
        s = socket.socket(fileno=fd)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, NO_LINGER)
        finally:
            s.detach()  # (the fd stays open: it is closed with the rest)
    except OSError:  # not a socket after all, or one that takes no options: close it as is
        pass


def _close_received(fds: list[int]) -> None:
    for fd in fds:
        unlinger(fd)
    close_fds(fds)


# vnetd's own fds nobody else holds (their last close may remove a tap)
close_later = _Closer("vnetd-close", close_fds)
# fds callers sent with a call: never taken, closed without lingering
discard = _Closer("vnetd-discard", _close_received)
