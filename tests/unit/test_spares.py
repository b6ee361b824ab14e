"""Spare taps' stocking (vnetd.subsystems.spares) against a firewall that records what it is
told and a tap maker held at will: no root, no kernel. The kernel side (taps, the pending
set, a holder's reads) is tests/system/test_spares.py."""

from __future__ import annotations

import asyncio
import os
import threading

from vnetd.model import Network
from vnetd.networks import Running
from vnetd.subsystems import spares as spares_mod
from vnetd.subsystems.spares import Spare, Spares

from tests.harness.fdkinds import is_open


class Firewall:
    def __init__(self):
        self.pending: set[str] = set()
        self.log: list[tuple[str, tuple[str, ...]]] = []

    async def spares_added(self, names):
        self.pending.update(names)
        self.log.append(("added", tuple(names)))

    async def spares_gone(self, names):
        self.pending.difference_update(names)
        self.log.append(("gone", tuple(names)))


def _run() -> Running:
    return Running(Network.from_options("sp1", {"subnet": "10.77.0.0/24"}), 7)


async def _settle():
    for _ in range(50):
        await asyncio.sleep(0.01)


def test_a_stop_while_a_spare_is_made_waits_for_it_and_leaves_nothing(monkeypatch):
    """The network stops while a worker thread is making a spare: the stop returns only
    once that thread is done, closes the tap it made and lets its pending hold go; nothing
    of it is left in the stock or the firewall, and the filler does not touch it again."""
    go = threading.Event()
    made: list[int] = []

    def make(self, run, ifname):
        go.wait(10)
        r, w = os.pipe()
        os.close(w)
        made.append(r)
        return Spare(ifname, r, 99, None)

    monkeypatch.setattr(Spares, "_make", make)

    async def main():
        fw = Firewall()
        sp = Spares(fw, lambda coro: None, size=2, lock=asyncio.Lock())
        await sp.apply(_run())
        assert sp.take("sp1") is None  # the first attach: stocking starts
        sp.restock("sp1")  # (the engine says so once the attach's port has its guard)
        await asyncio.sleep(0.05)
        assert len(fw.pending) == 1  # held as pending, its tap being made
        stop = asyncio.ensure_future(sp.remove("sp1"))
        await asyncio.sleep(0.1)
        assert not stop.done()  # waits for the thread
        go.set()
        await asyncio.wait_for(stop, 5)
        await _settle()
        assert made and not any(is_open(fd) for fd in made)
        assert not fw.pending and sp.count("sp1") == 0
        assert not sp._making
        gone = [names for what, names in fw.log if what == "gone"]
        assert len(gone) == 1  # let go once, by the stop
    asyncio.run(main())


def test_names_taken_again_and_again_end_the_stocking_with_a_warning(monkeypatch, caplog):
    tries = []

    def make(self, run, ifname):
        tries.append(ifname)
        raise spares_mod._NameTaken(ifname)

    monkeypatch.setattr(Spares, "_make", make)

    async def main():
        fw = Firewall()
        sp = Spares(fw, lambda coro: None, size=2, lock=asyncio.Lock())
        await sp.apply(_run())
        sp.take("sp1")
        sp.restock("sp1")
        await _settle()
        await _settle()
        assert len(tries) == spares_mod.NAME_TRIES  # then it stops trying
        assert not fw.pending  # every hold let go
        assert sp.count("sp1") == 0
    asyncio.run(main())
    assert any("names in a row were taken" in r.getMessage() for r in caplog.records)


def test_an_attach_restocks_after_its_guard_or_at_the_latest_after_a_second(monkeypatch):
    made = []

    def make(self, run, ifname):
        made.append(ifname)
        r, w = os.pipe()
        os.close(w)
        return Spare(ifname, r, 99, None)

    monkeypatch.setattr(Spares, "_make", make)
    monkeypatch.setattr(spares_mod, "RESTOCK_LATEST", 0.3)

    async def main():
        sp = Spares(Firewall(), lambda coro: None, size=1, lock=asyncio.Lock())
        await sp.apply(_run())
        assert sp.take("sp1") is None
        await asyncio.sleep(0.05)
        assert made == []  # nothing is made before the attach's guard is in
        sp.restock("sp1")
        await _settle()
        assert len(made) == 1 and sp.count("sp1") == 1
        spare = sp.take("sp1")
        assert spare is not None
        os.close(spare.fd)
        await asyncio.sleep(0.4)  # no restock() came (a guard that never ran): on time anyway
        await _settle()
        assert len(made) == 2 and sp.count("sp1") == 1
        await sp.remove("sp1")
    asyncio.run(main())
