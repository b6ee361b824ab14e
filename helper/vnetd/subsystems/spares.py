"""Spare taps: a few taps per running network made ahead of attaches, so that an attach
hands one out instead of making it.

Making a tap and putting it on its bridge is most of an attach's own time (the kernel
registers a network device, the bridge takes a port: about half a millisecond, more the more
ports the bridge has). A spare is made while nobody waits: created with the flags an attach
uses, held as ``pending`` by the firewall (nothing passes to or from it), then put on the
bridge with the network's alias and MTU, its host IPv6 off, and up. vnetd holds its only
fd, so a crash takes it with it (the kernel removes a tap whose last fd closes).

An attach takes one (`take`): the tap is given to its holder (TUNSETOWNER) and the port's
guard replaces ``pending`` in one transaction before the fd is handed out, so the guard is
never less than complete and a spare's queue holds nothing from before. The network is
stocked again in the background, one tap at a time: the engine's lock is held only to hold
the new name as pending and to add the tap to the stock, while the tap is made and put on the
bridge in a worker thread, so attaches go on meanwhile.

A network keeps spares from its first attach on (or, after a restart, when VMs are attached
to it): one nobody attaches to costs no tap, nor their making while networks start, nor their
removal (some 20 ms each: the kernel waits for a tap's references) when it stops. Only networks
whose ports are guarded (``spoof_protection``) have spares: on another, a tap up on the bridge
would queue the LAN's frames for its future holder. Each spare costs one
fd and one network device (a few kilobytes of kernel memory); ``--spare-taps`` sets how
many a network keeps (0: none).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import model
from ..errors import VnetError
from ..fairlock import FairLock, caller_key
from ..kernel import tap as tapdev
from ..kernel.links import FastLinkSetter
from ..ports import read_tap_mac

if TYPE_CHECKING:
    from ..networks import Running
    from .firewall import Firewall

log = logging.getLogger("vnetd.spares")

DEFAULT = 2
RESTOCK_LATEST = 1.0  # seconds: a network an attach took from is stocked again by then
MOST = 16  # a network's spares at most (--spare-taps)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


NAME_TRIES = 16  # names in a row found taken before a network's stocking gives up


class _NameTaken(Exception):
    """The random name of a spare is another interface's."""


@dataclass
class _Making:
    """A spare a worker thread is making now: its name and the thread's future."""
    ifname: str
    future: asyncio.Future
    taken: bool = False  # the network stopped meanwhile: remove() deals with it


@dataclass(frozen=True)
class Spare:
    ifname: str
    fd: int
    index: int
    tap_mac: str | None


class Spares:
    name = "spare taps"

    def __init__(self, firewall: Firewall,
                 schedule: Callable[[Coroutine[Any, Any, None]], None], size: int = DEFAULT,
                 has_ports: Callable[[str], bool] = lambda network: False,
                 lock: asyncio.Lock | FairLock | None = None):
        self.firewall = firewall
        self.schedule = schedule  # runs a coroutine soon, under the engine's lock
        self.size = size
        self.has_ports = has_ports
        self.spares: dict[str, list[Spare]] = {}
        self._runs: dict[str, Running] = {}  # the running networks that may have spares
        self._stocked: set[str] = set()  # those that keep them: a VM attached since start
        self._restock: set[str] = set()  # those an attach took from, until restock()
        self.lock = lock or asyncio.Lock()  # the engine's
        self.setter = FastLinkSetter()  # its own socket: used in the filler's thread
        self._wanted: dict[str, None] = {}  # networks to stock, in turn
        self._making: dict[str, _Making] = {}  # network -> the spare being made for it
        self._collisions: dict[str, int] = {}  # network -> names found taken in a row
        self._filler: asyncio.Task | None = None

    # --- the subsystem protocol ----------------------------------------------------------
    async def apply(self, run: Running) -> None:
        """A network may keep spares once a VM attaches to it: one nobody uses costs no tap
        (nor their making while networks start, nor their removal when it stops)."""
        if self.size <= 0 or not run.net.spoof_protection:
            await self.remove(run.name)
            return
        self._runs[run.name] = run
        if run.name in self._stocked:
            self._soon(run.name)

    async def adopt(self, run: Running) -> None:
        """A network found running: stocked if VMs are attached to it."""
        await self.apply(run)
        if run.name in self._runs and self.has_ports(run.name):
            self._stocked.add(run.name)
            self._soon(run.name)

    async def sync(self) -> None:
        pass

    async def remove(self, name: str) -> None:
        """The network's spares go, also one being made right now (the stop waits for its
        thread): when the network is gone, so is every tap of its."""
        self._runs.pop(name, None)
        self._stocked.discard(name)
        self._wanted.pop(name, None)
        self._collisions.pop(name, None)
        gone = self.spares.pop(name, [])
        names = [s.ifname for s in gone]
        making = self._making.pop(name, None)
        if making is not None:
            making.taken = True  # its filler leaves the rest to this
            names.append(making.ifname)  # its pending hold, made or not
            try:
                gone.append(await asyncio.shield(making.future))
            except (OSError, VnetError, _NameTaken):
                pass
        # the kernel removes a tap with its last fd, waiting for its references to go (some
        # 20 ms): each in a thread of its own, so those waits overlap and the loop runs on
        await asyncio.gather(*(asyncio.to_thread(_close, s.fd) for s in gone))
        if names:
            await self.firewall.spares_gone(names)

    async def status(self, name: str) -> Any:
        return None

    # --- attaches ------------------------------------------------------------------------
    def take(self, network: str) -> Spare | None:
        """A spare tap of the network (its fd is the caller's from now on), if one is ready.
        The network is stocked again at restock(), which the engine calls once the attach's
        port has its guard (making a spare takes the engine's lock, and the guard comes
        first); at the latest after RESTOCK_LATEST seconds."""
        stock = self.spares.get(network)
        if not stock:
            if network in self._runs:  # the first attach (or more than spares were ready)
                self._stocked.add(network)
                self._due(network)
            return None
        spare = stock.pop()
        self._due(network)
        return spare

    def _due(self, network: str) -> None:
        if network not in self._restock:
            self._restock.add(network)
            asyncio.get_running_loop().call_later(RESTOCK_LATEST, self.restock, network)

    def restock(self, network: str) -> None:
        """Stock the network again, if an attach took from it (or found it empty)."""
        if network in self._restock:
            self._restock.discard(network)
            self._soon(network)

    def discard(self, spare: Spare) -> None:
        """A spare taken for an attach that failed: it goes (its tap with its fd)."""
        with contextlib.suppress(OSError):
            os.close(spare.fd)
        self.schedule(self.firewall.spares_gone([spare.ifname]))

    def count(self, network: str) -> int:
        return len(self.spares.get(network, ()))

    # --- stocking ------------------------------------------------------------------------
    def _soon(self, name: str) -> None:
        if self.count(name) < self.size:
            self._wanted[name] = None
            if self._filler is None or self._filler.done():
                self._filler = asyncio.get_running_loop().create_task(self._fill())

    async def _fill(self) -> None:
        """Stock the networks that want spares, one tap at a time, in turn."""
        caller_key.set(None)  # vnetd's own work, whoever's attach asked for it
        while self._wanted:
            name = next(iter(self._wanted))
            del self._wanted[name]
            try:
                await self._fill_one(name)
            except Exception:  # never seen; the stock must not stop for good
                log.exception("%s: making a spare tap failed", name)

    async def _fill_one(self, name: str) -> None:
        """One spare for the network. The engine's lock is held to hold its name as pending
        (before the tap exists, so that every spare tap there is, is pending) and to add it
        to the stock; the tap is made and put on the bridge in a thread, without the lock,
        so that attaches go on meanwhile (the kernel's work runs on another core). A stop
        meanwhile (`remove`) waits for that thread and lets the tap go itself."""
        async with self.lock:
            run = self._runs.get(name)
            if run is None or name not in self._stocked or self.count(name) >= self.size:
                return
            ifname = f"{run.net.name[:8]}-{secrets.token_hex(3)}"  # the shape of a port's name
            try:
                await self.firewall.spares_added([ifname])
            except VnetError as e:
                log.warning("%s: no spare tap (attaches make their own): %s", name, e.message)
                return
            making = _Making(ifname, asyncio.ensure_future(
                asyncio.to_thread(self._make, run, ifname)))
            self._making[name] = making
        try:
            spare = await asyncio.shield(making.future)
        except (OSError, VnetError, _NameTaken) as e:
            async with self.lock:
                if making.taken:  # the network stopped: remove() let its hold go
                    return
                self._making.pop(name, None)
                await self.firewall.spares_gone([ifname])
            if isinstance(e, _NameTaken):
                tries = self._collisions[name] = self._collisions.get(name, 0) + 1
                if tries < NAME_TRIES:
                    self._soon(name)  # another name next time
                    return
                self._collisions.pop(name, None)
                log.warning("%s: no spare tap (attaches make their own): %d names in a row "
                            "were taken", name, NAME_TRIES)
                return
            msg = e.message if isinstance(e, VnetError) else (e.strerror or str(e))
            log.warning("%s: no spare tap (attaches make their own): %s", name, msg)
            return
        async with self.lock:
            if making.taken:  # the network stopped: remove() closed it
                return
            self._making.pop(name, None)
            self._collisions.pop(name, None)
            kept = self._runs.get(name) is run and name in self._stocked
            if kept:
                self.spares.setdefault(name, []).append(spare)
        if not kept:  # its network was applied anew meanwhile (a live change): the tap, then
            # its hold (a stop takes it in remove())
            await asyncio.to_thread(_close, spare.fd)
            async with self.lock:
                await self.firewall.spares_gone([ifname])
            return
        self._soon(name)

    def _make(self, run: Running, ifname: str) -> Spare:
        """The tap, on its bridge with the network's alias and MTU, its host IPv6 off, up (in
        a worker thread: only this thread uses `setter`, one tap at a time)."""
        net = run.net
        try:
            fd = tapdev.open_tap(ifname, tapdev.HANDOFF_FLAGS)
        except OSError as e:
            if e.errno in (errno.EBUSY, errno.EEXIST, errno.EINVAL):
                raise _NameTaken(ifname) from None  # another interface has the name
            raise
        try:
            index = socket.if_nametoindex(ifname)
            tap_mac = read_tap_mac(fd=fd, ifname=ifname)
            self.setter.set(index, alias=model.alias_for(net.name), master=run.bridge,
                            mtu=net.mtu, port=ifname, guarded=net.spoof_protection)
        except BaseException:
            os.close(fd)
            raise
        return Spare(ifname, fd, index, tap_mac)
