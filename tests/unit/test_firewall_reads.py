"""The firewall's reads for callers (GetNetwork is open to everyone): callers that ask while
a read is under way share it, and a read never holds the lock that changes take on the event
loop."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from vnetd.subsystems.firewall import Firewall


def make() -> Firewall:
    return Firewall(SimpleNamespace())


def test_warnings_are_read_once_for_every_caller_meanwhile():
    f = make()
    reads = []

    def warnings():
        reads.append(threading.get_ident())
        time.sleep(0.05)  # a slow ruleset listing
        return ["x drops forwarded traffic"]

    f.warnings = warnings

    async def main():
        got = await asyncio.gather(*[f.current_warnings() for _ in range(50)])
        assert all(g == ["x drops forwarded traffic"] for g in got)
        assert len(reads) == 1
        assert await f.current_warnings() == ["x drops forwarded traffic"]
        assert len(reads) == 2  # a caller after the read gets a read of its own: fresh
    asyncio.run(main())


def test_counters_of_one_network_are_one_read_for_every_caller_meanwhile():
    f = make()
    calls = []

    async def status(name):
        calls.append(name)
        await asyncio.sleep(0.05)
        return {f"{name}-p": {"packets": 1, "bytes": 60}}

    f._status = status

    async def main():
        got = await asyncio.gather(*[f.status("a") for _ in range(30)],
                                   *[f.status("b") for _ in range(30)])
        assert calls == ["a", "b"]
        assert got[0] == {"a-p": {"packets": 1, "bytes": 60}} and got[-1] == {
            "b-p": {"packets": 1, "bytes": 60}}
        await f.status("a")  # a new read once the last one is done
        assert calls == ["a", "b", "a"]
    asyncio.run(main())


def test_a_caller_that_gives_up_does_not_cancel_the_read_for_the_others():
    f = make()

    async def status(name):
        await asyncio.sleep(0.05)
        return {"p": {"packets": 2, "bytes": 1}}

    f._status = status

    async def main():
        first = asyncio.ensure_future(f.status("a"))
        second = asyncio.ensure_future(f.status("a"))
        await asyncio.sleep(0.01)
        first.cancel()
        assert await second == {"p": {"packets": 2, "bytes": 1}}
    asyncio.run(main())


def test_reads_do_not_take_the_lock_of_changes():
    f = make()
    with f._nft_lock:  # a change under way cannot stall a read, nor a read a change
        assert f._read_lock.acquire(timeout=1)
        f._read_lock.release()
    assert f._read_lock is not f._nft_lock and f._read_elements is not f._elements


def test_a_learned_mac_of_a_port_that_went_meanwhile_adds_nothing():
    """A port's learned MAC is guarded by a change that waits its turn for the engine's
    lock; the port may be gone (or its name a new port's) by then: nothing is added for
    it, or its elements would outlive it."""
    from vnetd.ports import Port

    gone = Port(ifname="vnet3-web", ifindex=9, network="vnet3", vm="web", nic=0, uid=1000,
                mac="52:54:00:00:00:01", mac_known=False, holder_pid=None, queues=1,
                created=0.0, kind="attach")
    f = Firewall(SimpleNamespace(ports=SimpleNamespace(by_name={})))
    changes = []

    async def change(*args, **kw):
        changes.append(args)

    f._change = change
    asyncio.run(f.port_attached(gone))
    assert changes == [] and "vnet3-web" not in f.applied_ports
