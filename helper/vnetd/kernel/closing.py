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

Turning lingering off is not always possible: a unix socket's queue may hold the only copy
of a lingering socket (sent through it and never read), and its last close then drops that
copy, which waits out the linger time. A close of a caller's fd that takes longer than
PATIENCE is interrupted with a signal (SIGURG, which vnetd catches and ignores: `arm`), which
ends a linger wait. The two threads are separate, so that a close a caller made slow never
holds up the removal of a port's tap.

What no signal ends: a file whose close waits for another process to answer (a FUSE file's
flush). dbus-daemon would wait on such a file too (it closes its copy of every fd it passes
on). Meanwhile the fds sent after it stay open, a session's at most MAX_FDS per call.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable

from vnet_common.frames import close_fds

log = logging.getLogger("vnetd.closing")

NO_LINGER = struct.pack("ii", 0, 0)
PATIENCE = 1.0  # seconds a caller's fd may take to close before the close is interrupted
INTERRUPT = signal.SIGURG  # (caught and ignored once armed: it only ends a wait)
_armed = False


def arm() -> None:
    """Catch INTERRUPT (and do nothing with it), so that sending it to the thread that closes
    callers' fds ends a wait in a close. From the main thread, at start-up."""
    global _armed
    signal.signal(INTERRUPT, lambda _sig, _frame: None)
    _armed = True


class _Closer:
    """One thread that closes fds in the order given, started on first use. With `patience`,
    a close that takes longer is interrupted (see arm), by a watchdog thread of its own."""

    def __init__(self, name: str, close: Callable[[int], None], patience: float | None = None):
        self.name = name
        self._close = close
        self.patience = patience
        self._queue: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.busy_since: float | None = None  # when the close going on now began
        self.interrupted = 0

    def __call__(self, fds: Iterable[int]) -> None:
        batch = list(fds)
        if not batch:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._forever, name=self.name,
                                                daemon=True)
                self._thread.start()
                if self.patience is not None:
                    threading.Thread(target=self._watch, args=(self._thread, self.patience),
                                     name=f"{self.name}-watch", daemon=True).start()
        self._queue.put(batch)

    def _forever(self) -> None:
        while True:
            batch = self._queue.get()
            for fd in batch:
                self.busy_since = time.monotonic()
                try:
                    self._close(fd)
                finally:
                    self.busy_since = None

    def _watch(self, thread: threading.Thread, patience: float) -> None:
        told = None  # the close last logged (one that no signal ends is logged once)
        while True:
            time.sleep(patience / 2)
            since = self.busy_since
            if since is None or time.monotonic() - since < patience or not _armed:
                continue
            self.interrupted += 1
            if since != told:
                told = since
                log.warning("an fd a caller sent has taken %.1f s to close; interrupting it",
                            time.monotonic() - since)
            try:
                signal.pthread_kill(thread.ident or 0, INTERRUPT)
            except (OSError, ValueError):  # the thread is gone: nothing to interrupt
                return


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


def _close(fd: int) -> None:
    close_fds((fd,))


def _close_received(fd: int) -> None:
    unlinger(fd)
    close_fds((fd,))


# vnetd's own fds nobody else holds (their last close may remove a tap)
close_later = _Closer("vnetd-close", _close)
# fds callers sent with a call: never taken, closed without lingering, never for long
discard = _Closer("vnetd-discard", _close_received, patience=PATIENCE)
