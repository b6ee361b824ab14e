"""Start-up: reconcile and adoption after a restart.

Before vnetd answers, the links it made are reconciled with the definitions: what a crash cut
short goes, held ports are adopted with their records, what no definition wants is removed (only
objects carrying vnetd's alias: interfaces it did not make are never touched), and the bridges
of networks still wanted are noted as `adopting`. Once vnetd answers, `settle` adopts those
networks, reaps the servers a crash left for networks that do not run, starts the autostart
networks and loads the whole ruleset once.

The engine keeps the lock, the definitions in force and what runs, the networks still being
adopted (`Engine.adopting`) and the wait for them (`Engine._adopted`), and starting and tearing
down a network (`Engine._start`, `Engine._teardown`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from . import model
from .children.supervisor import reap
from .errors import VnetError
from .kernel.links import Link
from .model import Network
from .networks import driver_for
from .operations import Operations
from .subsystems.dhcp import DHCPD_PID, DNSMASQ_PID

if TYPE_CHECKING:
    pass

log = logging.getLogger("vnetd")

ADOPT_PARALLEL = 8  # DHCP servers replaced at once after a restart


class Reconciler(Operations):
    """What vnetd finds at start-up, reconciled and adopted (`engine.reconcile`)."""

    async def startup(self) -> None:
        """What must be done before vnetd answers: the definitions, the links vnetd made
        (what a crash cut short goes, held ports are adopted with their records, what no
        definition wants is removed) and the netlink monitor. Networks found running are
        adopted by `settle`, which runs once vnetd answers; on a fresh boot there are none,
        and the autostart networks start here, before vnetd is ready."""
        self.engine.defs, problems = self.store.load_all()
        self.engine.problems[:] = problems
        self.engine.forwards.reindex()
        for p in self.engine.problems:
            log.error("definition problem: %s", p)
        async with self.engine.lock:
            self.ports.open_monitor()  # before the links are listed: no change is missed
            self.ports.begin_reconcile()
            # what adopted ports put back into the MAC registry (their records kept what a
            # crash kept from being written) is written once per network, off the event
            # loop, while vnetd answers: one durable write per port here held the first
            # answer after a crash 3 s at 5,000 ports (the records stay until then)
            with self.engine.macs_written_after():
                await self._reconcile_links()
            self.ports.end_reconcile()
        await self.ports.start_monitor()
        if not self.engine.adopting:
            await self.settle()

    async def settle(self) -> None:
        """Adopt the networks found running, one at a time under the lock (calls for a
        network already adopted go on between them), then start the autostart networks
        that do not run and load the whole ruleset once. Until then the ruleset the kernel
        kept across the restart guards every port; a network being adopted shows
        `adopting`, and calls that change it wait (`Engine._adopted`). A network whose
        DHCP/DNS servers still run (the previous vnetd's, found by their records) is adopted
        with them serving, and they are replaced afterwards in the background, one network
        at a time under the lock (`_replace_inherited`); a network without them gets new
        ones before it counts as adopted, several networks at a time."""
        await self.ports.forward_adopted_link_local()
        links_done = []
        for name in sorted(self.engine.adopting):
            async with self.engine.lock:
                try:
                    await self._adopt(self.engine.defs[name], self.engine.adopting[name])
                    links_done.append(name)
                except VnetError as e:
                    await self._adopt_failed(name, e)
        sem = asyncio.Semaphore(ADOPT_PARALLEL)

        async def servers(name: str) -> None:
            run = self.engine.running.get(name)
            if run is not None and self.dhcp.inherit(run.net):
                log.info("reconcile: adopted running network %s (its servers go on)", name)
                self._adopt_done(name)
                return
            async with sem:
                try:
                    if run is not None:
                        await self.dhcp.adopt(run)
                    log.info("reconcile: adopted running network %s", name)
                    self._adopt_done(name)
                except VnetError as e:
                    async with self.engine.lock:
                        await self._adopt_failed(name, e)

        await asyncio.gather(*(servers(n) for n in links_done))
        async with self.engine.lock:
            try:  # once, with every adopted network
                await self.evpn.sync()
            except VnetError as e:
                self.engine.problems.append(f"evpn (reconcile): {e.message}")
                log.error("evpn (reconcile): %s", e.message)
            await self._reap_orphan_children()
        for name, net in sorted(self.engine.defs.items()):
            if net.autostart and name not in self.engine.running:
                try:
                    async with self.engine.lock:
                        if name in self.engine.running or self.engine.defs.get(name) is not net:
                            continue  # started or changed meanwhile
                        await self.engine._start(net)
                    log.info("autostart %s: started", name)
                    self.engine._changed(name, "running")
                except VnetError as e:
                    log.error("autostart %s failed: %s", name, e.message)
        async with self.engine.lock:
            try:
                await self.firewall.sync()
            except VnetError as e:  # keep serving: show and the log say why
                log.error("firewall: %s", e.message)
                self.engine.problems.append(f"firewall: {e.message}")
            # ports a stop had parked when a crash cut it short, their network still up
            for name in sorted({p.network for p in self.ports.by_name.values() if p.parked}):
                run = self.engine.running.get(name)
                if run is not None:
                    self.ports.unpark(run.net, run.bridge, marked_only=True)
        await self._replace_inherited()

    async def _replace_inherited(self) -> None:
        """The servers a previous vnetd left serving, replaced by this vnetd's own (whose
        output it logs and whose exit it sees), one network at a time under the lock, so
        that calls go on between them and none of them meets a half-replaced network."""
        for name in sorted(self.dhcp.inherited):
            async with self.engine.lock:
                run = self.engine.running.get(name)
                if run is None or name not in self.dhcp.inherited:
                    continue  # stopped, changed or replaced meanwhile
                try:
                    await self.dhcp.replace_inherited(run.net)
                except VnetError as e:  # show says so; a start or change tries again
                    log.error("%s: replacing its DHCP/DNS servers: %s", name, e.message)
                    self.engine.problems.append(f"{name}: its DHCP/DNS servers: {e.message}")

    async def _reconcile_links(self) -> None:
        for name in self.store.intents():  # creations a crash cut short
            lk = await self.links.get(name)
            if lk is not None and not lk.alias:
                log.info("reconcile: removing %s: its creation was cut short", name)
                await self.links.delete(lk.index)
            self.store.clear_intent(name)
        ours = await self.links.dump_ours()
        bridges = [lk for lk in ours if lk.kind == "bridge"]
        others = [lk for lk in ours if lk.kind != "bridge"]
        for lk in others:
            net = self.engine.defs.get(model.network_of_alias(lk.alias) or "")
            if net is not None and lk.ifname in net.tap_names:
                await self.ports.adopt(lk)
                continue
            if net is not None and net.overlay is not None and lk.ifname == net.overlay.ifname:
                continue
            if net is not None and await self.ports.adopt(lk):
                continue
            await self._remove_unwanted(lk)
        for lk in bridges:
            owner = model.network_of_alias(lk.alias)
            net = self.engine.defs.get(owner or "")
            if net is None or lk.ifname != net.bridge:
                await self._remove_unwanted(lk)
                continue
            self.engine.adopting[net.name] = lk

    async def _adopt(self, net: Network, bridge: Link) -> None:
        """A network found running: its driver makes it match the definition (idempotent),
        then each subsystem takes it over; the DHCP servers are `settle`'s to replace."""
        run = await driver_for(net).adopt(self.ctx, net, bridge)
        self.engine.running[net.name] = run
        for sub in self.engine.services:
            if sub is not self.dhcp:
                await sub.adopt(run)
        self.engine._guard_taps(run.net)
        await self.firewall.adopt(run)

    def _adopt_done(self, name: str) -> None:
        self.engine.adopting.pop(name, None)
        self.engine._changed(name, "running" if name in self.engine.running else "stopped")

    async def _adopt_failed(self, name: str, e: VnetError) -> None:
        log.error("reconcile: could not adopt %s (%s); removing it", name, e.message)
        try:
            await self.engine._teardown(self.engine.defs[name])
        finally:
            self._adopt_done(name)

    async def _reap_orphan_children(self) -> None:
        """Servers a crashed vnetd left for networks that are not running (their start was
        cut short, or they were stopped): only the processes that the records next to their
        pid files name, in directories only root writes, never found by command line
        (children/supervisor.py); pid files and records go too."""
        run = self.store.runtime_dir
        for d in run.iterdir():
            if d.is_dir() and not d.is_symlink() and d.name not in self.engine.running:
                for pidfile in (DNSMASQ_PID, DHCPD_PID):
                    await reap(d / pidfile)
        for net in self.engine.defs.values():
            if net.name not in self.engine.running:
                for tap in net.tap_names:
                    await reap(self.vde.pidfile(tap))

    async def _remove_unwanted(self, lk: Link) -> None:
        log.info("reconcile: removing %s (alias %s): no definition wants it", lk.ifname, lk.alias)
        await self.links.delete(lk.index)
