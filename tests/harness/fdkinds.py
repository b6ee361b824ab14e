"""fds whose close costs what their sender chose, for the attacks on vnetd's closes, and a
check whether an fd number is still open.

The functions are plain Python run in the test process (unit tests) and, as `SOURCE`, at
the top of scripts run as the test users (who cannot import the tests)."""

from __future__ import annotations

import inspect
import os
import socket
import struct


def lingering(keep: list, seconds: int) -> socket.socket:
    """A TCP socket whose last close waits `seconds`: its peer (kept in `keep`) never
    accepts or reads, and its send queue is full."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    s = socket.socket()
    s.connect(srv.getsockname())
    s.setblocking(False)
    try:
        while True:
            s.send(b"x" * 65536)
    except BlockingIOError:
        pass
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, seconds))
    keep.append(srv)
    return s


def nested(keep: list, seconds: int) -> socket.socket:
    """A unix socket whose own queue holds the only copy of a lingering socket: its last
    close drops that copy, and that is the lingering socket's last close (turning lingering
    off on the unix socket does nothing for it)."""
    ls = lingering(keep, seconds)
    x, y = socket.socketpair()
    x.sendmsg([b"."], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                        struct.pack("i", ls.fileno()))])
    ls.close()
    x.close()
    return y


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


SOURCE = ("import os, socket, struct\n" + inspect.getsource(lingering)
          + inspect.getsource(nested))
