"""vnetd's netlink monitor under a flood: a port's holder decides how many link events its
tap makes (each TUNSETOFFLOAD on its fd is one, about 90,000 a second from one process), so
the monitor must give the event loop back between batches, and re-check every port after
lost events at most once a second."""

from __future__ import annotations

import asyncio
import errno
import struct

from vnetd import ports as ports_mod
from vnetd.macs import MacRegistry
from vnetd.ports import MONITOR_BATCHES, RTM_NEWLINK, Ports
from vnetd.store import Store


class Flood:
    """A monitor socket that always has more: a link event of an interface that is no
    port (what a flood looks like to vnetd), or ENOBUFS."""

    def __init__(self, lost: bool = False):
        self.recvs = 0
        self.lost = lost

    def recv(self, size: int) -> bytes:
        self.recvs += 1
        if self.recvs > 10_000:
            raise AssertionError("the monitor never gave the loop back")
        if self.lost:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        msg = struct.pack("=BxHiII", 0, 0, 4242, 0, 0)
        return struct.pack("=IHHII", 16 + len(msg), RTM_NEWLINK, 0, 0, 0) + msg


def ports(tmp_path) -> Ports:
    store = Store(tmp_path / "etc", tmp_path / "var", tmp_path / "run")
    return Ports(None, MacRegistry({}, lambda *written: None), store)


async def test_a_flood_of_link_events_gives_the_loop_back(tmp_path):
    p = ports(tmp_path)
    p._monitor_sock = flood = Flood()
    p._on_netlink()
    assert flood.recvs == MONITOR_BATCHES


async def test_lost_events_recheck_the_ports_at_most_once_a_second(tmp_path, monkeypatch):
    monkeypatch.setattr(ports_mod, "RESCAN_EVERY", 0.2)
    p = ports(tmp_path)
    checks = []
    real = p._recheck
    monkeypatch.setattr(p, "_recheck", lambda: checks.append(1) or real())
    p._monitor_sock = Flood(lost=True)
    for _ in range(5):  # five turns of the loop, each with nothing but lost events
        p._on_netlink()
        await asyncio.sleep(0.01)
    assert len(checks) == 1  # the first at once; the next waits
    await asyncio.sleep(0.3)
    assert len(checks) == 2  # ... and comes, once
