"""vnetd's copies of fds it could not close as its reply was written are closed on a thread
of their own (a tap's last close waits for the kernel to remove it)."""

from __future__ import annotations

import os
import threading
import time

from vnetd.kernel import tap


def test_fds_given_to_close_later_are_closed_off_the_calling_thread():
    fds = [fd for _ in range(3) for fd in os.pipe()]
    seen: list[bool] = []
    real_close = os.close

    def close(fd):
        seen.append(threading.current_thread() is threading.main_thread())
        real_close(fd)

    os.close = close
    try:
        tap.close_later(fds)
        end = time.monotonic() + 5
        while len(seen) < len(fds) and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        os.close = real_close
    assert seen == [False] * len(fds)  # every one, and none on the caller's thread
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError:
            continue
        raise AssertionError(f"fd {fd} is still open")
    tap.close_later([])  # nothing to close: no batch at all
