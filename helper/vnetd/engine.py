"""The one place that changes state.

The engine holds the declared state (definitions from the store) and makes the kernel match
it. Every operation that makes kernel objects records how to undo each step and unwinds on any
failure, so nothing half-made is left behind. At start-up it reconciles (reconcile.py): it
adopts what carries its alias and is still wanted, restarts autostart networks, and removes only
objects carrying its alias that no definition wants. Interfaces it did not make are never touched.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import logging
import pwd
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

from . import macs as macs_mod
from . import model, revise
from .definitions import Definitions
from .errors import (
    Busy,
    Exists,
    InvalidArgument,
    NotFound,
    NotRunning,
    QuotaExceeded,
    VnetError,
)
from .fairlock import FairLock, caller_key
from .forwards import Forwards
from .hosts import Hosts
from .kernel import links as links_mod
from .kernel.links import Link, Links
from .macs import MacRegistry
from .model import Network
from .networks import Context, Rollback, Running, driver_for
from .peers import Peers
from .ports import Port, Ports, parse_attach_options
from .queries import Queries
from .reconcile import Reconciler
from .resolver import Resolver
from .store import Store
from .subsystems import Subsystem
from .subsystems import spares as spares_mod
from .subsystems.dhcp import DhcpServers
from .subsystems.evpn import Evpn
from .subsystems.firewall import Firewall
from .subsystems.spares import Spares
from .subsystems.vde import VdeSwitches
from .vms import Vms

log = logging.getLogger("vnetd")

ADOPT_WAIT = 60  # seconds a change waits for the networks a restart found running
# seconds from a change of a network's VMs to its DHCP server re-reading their DNS names (a
# guest asks for its lease seconds after its VM's first attach)
NAMES_DELAY = 0.05


class View:
    """The firewall's read-only view of the networks (firewall.View)."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self.links = engine.links
        self.ports = engine.ports
        self.resolver = engine.resolver

    def network(self, name: str) -> Network | None:
        return self._engine.network(name)

    def running(self) -> list[Network]:
        return [r.net for _, r in sorted(self._engine.running.items())]

    def is_running(self, name: str) -> bool:
        return name in self._engine.running

    def schedule(self, coro: Coroutine[Any, Any, None]) -> None:
        self._engine.schedule(coro)


def tap_exists(port: Port) -> bool:
    """The port's tap is still there (its name still names its interface)."""
    try:
        return socket.if_nametoindex(port.ifname) == port.ifindex
    except OSError:
        return False


def _who(uid: int) -> str:
    """A user as a sentence names them: 'alice (uid 1000)', or 'uid 1000'."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


class Engine:
    """The lock, the definitions in force and what runs, the quotas, the wait for the
    networks a restart found running, starting and stopping networks, attaching ports, and
    the one event stream. Reconcile and adoption at start-up (`reconcile`), defining and
    changing networks (`definitions`), port forwards (`forwards`), static hosts and leases
    (`hosts`), VMs' MACs (`vms`), overlay peers (`peers`) and what `list` and `show` say
    (`queries`) are classes of their own, each given this engine."""

    def __init__(self, store: Store, links: Links, max_ports_per_user: int = 64,
                 max_networks_per_user: int = 8, max_forwards_per_user: int = 64,
                 max_macs_per_network: int = macs_mod.DEFAULT_LIMIT,
                 max_macs: int = macs_mod.DEFAULT_TOTAL,
                 max_macs_per_user: int = macs_mod.DEFAULT_PER_USER,
                 frr_pathspace: str | None = None, spare_taps: int = spares_mod.DEFAULT):
        self.store = store
        self.links = links
        self.max_networks_per_user = max_networks_per_user
        self.max_forwards_per_user = max_forwards_per_user
        entries, owners = macs_mod.load(store)
        self.macs = MacRegistry(entries, macs_mod.saver(store), limit=max_macs_per_network,
                                creators=owners, total_limit=max_macs,
                                per_user=max_macs_per_user)
        self.defs: dict[str, Network] = {}  # as declared: never holds run-time facts
        self.running: dict[str, Running] = {}
        self.lock = FairLock()  # waiters served by caller in turn (fairlock.py)
        self._macs_writer: asyncio.Task | None = None
        self._leases_due: set[str] = set()  # networks whose lease pass waits to run
        # rounds of the registry's writer: each takes every change marked before it, and
        # GetMac waits for the round that takes its own (not for the writer to run dry)
        self._macs_taken = 0
        self._macs_waiters: list[tuple[int, asyncio.Future[None]]] = []
        # networks found running at start-up that `settle` has not adopted yet
        self.adopting: dict[str, Link] = {}
        self.problems: list[str] = []
        # the one event stream (the bus's signals): ("network", name, state),
        # ("port", port, state), ("lease", network, lease, event)
        self.listeners: list[Callable[..., None]] = []
        self.ports = Ports(links, self.macs, store, max_ports_per_user)
        self.dhcp = DhcpServers(store.runtime_dir, store.state_dir, self.network,
                                self.macs.dns_names)
        self.resolver = Resolver(self.network, self.macs, self.ports, self.dhcp)
        self.firewall = Firewall(View(self))
        self.vde = VdeSwitches(store.runtime_dir)
        self.evpn = Evpn(store.runtime_dir, frr_pathspace)
        # applied in this order after a network's driver made its links, removed in the
        # reverse order before the driver removes them; the firewall (its ports' guards) is
        # applied last and removed last, after the links are gone
        # taps made ahead of attaches (stocked after the rest, in the background)
        self.spares = Spares(self.firewall, self.schedule, spare_taps,
                             has_ports=lambda name: bool(self.ports.on_network(name)),
                             lock=self.lock)
        self.services: list[Subsystem] = [self.vde, self.dhcp, self.evpn, self.spares]
        self.ctx = Context(links, store, self.ports, self.problems)
        # what callers ask for beside attaching and starting, a class each over the engine's
        # lock, definitions and quotas (the bus calls them as engine.<part>.<method>)
        self.definitions = Definitions(self)
        self.forwards = Forwards(self)
        self.hosts = Hosts(self)
        self.vms = Vms(self)
        self.peers = Peers(self)
        self.queries = Queries(self)
        self.reconcile = Reconciler(self)
        self.ports.listeners.append(self._port_event)
        self.ports.spares = self.spares
        self.ports.firewall = self.firewall  # a tap made at attach is held as a spare is
        self.ports.identity_owner = self.resolver.owner_of_mac
        self.macs.holder = self.resolver.owner_of_mac
        self.macs.on_change = self._names_changed
        self._names_due: set[str] = set()  # networks whose DNS names wait to be re-read
        self.dhcp.listeners.append(self._lease_event)

    def network(self, name: str) -> Network | None:
        """A network's definition in force: while it runs, with what only run time knows."""
        run = self.running.get(name)
        return run.net if run is not None else self.defs.get(name)

    def _names_changed(self, network: str) -> None:
        """The MAC registry changed a network's VMs: its DHCP server re-reads their DNS
        names NAMES_DELAY later, once for all the changes made until then (a burst of new
        VMs costs one), under the lock and off every answer's way."""
        if network in self._names_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (start-up, before the loop: the server starts with them)
            return
        self._names_due.add(network)

        async def reread() -> None:
            self._names_due.discard(network)
            try:
                await self.dhcp.names_changed(network)
            except (OSError, VnetError) as e:
                log.error("%s: the DHCP server's names stay as they were: %s", network, e)
        loop.call_later(NAMES_DELAY, lambda: self.schedule(reread()))

    def schedule(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` soon, under the lock (for events from the kernel and the servers)."""
        asyncio.get_running_loop().create_task(self._locked(coro))

    def _put(self, net: Network) -> None:
        """Record a definition; a running network's record takes its live settings and keeps
        those it was started with that only a restart changes (revise.in_force: its MTU from
        the underlay too, when the definition leaves the MTU to it)."""
        self.defs[net.name] = net
        run = self.running.get(net.name)
        if run is not None:
            run.net = revise.in_force(run.net, net)

    # --- events -------------------------------------------------------------------------
    def _emit(self, *event: Any) -> None:
        for fn in self.listeners:
            fn(*event)

    def _changed(self, name: str, state: str) -> None:
        self._emit("network", name, state)

    # --- adoption after a restart (reconcile.py) ----------------------------------------
    async def _adopted(self, name: str | None = None) -> None:
        """Wait until the network `name` (None: every network) is adopted after a
        restart; a change that loads the whole ruleset waits for every network, so that no
        network's guards go while it is still being adopted."""
        deadline = asyncio.get_running_loop().time() + ADOPT_WAIT
        while self.adopting if name is None else name in self.adopting:
            if asyncio.get_running_loop().time() > deadline:
                raise Busy("vnetd is still adopting the networks it found running after its "
                           "restart; try again in a moment.")
            await asyncio.sleep(0.01)

    # --- events from ports and leases ---------------------------------------------------
    def _port_event(self, port: Port, state: str) -> None:
        self._emit("port", port, state)
        if state == "detached":
            self.schedule(self.firewall.port_gone(port))
        elif state == "cut":
            self.schedule(self._cut_off(port))
        elif state == "learned":
            self.schedule(self.firewall.port_attached(port))

    def _lease_event(self, network: str, lease, event: str) -> None:
        """Guests decide how often leases change: the events of a network that come while
        its last pass waits (for the lock) join that pass, so that renewals from many
        guests cost one pass over the network's ports, not one each."""
        self._emit("lease", network, lease, event)
        if network not in self._leases_due:
            self._leases_due.add(network)
            self.schedule(self._leases_changed(network))

    async def _leases_changed(self, network: str) -> None:
        self._leases_due.discard(network)  # (events from now on come to the next pass)
        await self.firewall.leases_changed(network)

    async def _cut_off(self, port: Port) -> None:
        """A port's holder changed its tap's own address (or sent as another VM): off the
        bridge at once (which also drops the bridge's entries for it), and a tap vnetd
        handed out is deleted. Its guard (or its pending hold, if it had no guard yet) goes
        only then: until the tap is off the bridge, the guard is all that stops its
        frames."""
        try:
            if port.kind == "attach":
                await self.links.delete(port.ifindex)
            else:
                await self.links.set(port.ifindex, master=0)
        except Exception as e:  # gone meanwhile
            log.info("cutting off %s: %s", port.ifname, e)
        await self._unguard(port)

    async def _unguard(self, port: Port) -> None:
        """The firewall's elements of a port whose tap is gone or off its bridge: its guard,
        and the pending hold of one that went before its guard was in."""
        await self.firewall.port_gone(port)
        if port.ifname not in self.ports.by_name:  # (else a new port took the name)
            await self.firewall.spares_gone([port.ifname])

    def _guard_taps(self, net: Network) -> None:
        """The taps a network brings (`-n` taps, VDE switches' taps) are guarded as ports:
        a `-n` tap carries the MAC of VM <tap name> (ether.conf), a VDE tap is a segment."""
        for tname in net.tap_names:
            if net.vde:
                self.ports.guard_tap(net, tname, "vde", 0, None)
            else:
                owner = self.macs.reclaim(net.name, tname)
                if owner is not None:  # registered before its network said so
                    log.warning("VM name %s on %s belonged to uid %s: it is the name of a "
                                "pre-created tap, the network's now", tname, net.name, owner)
                self.ports.guard_tap(net, tname, "tap", 0,
                                     self.macs.get(net.name, tname, 0))

    async def _locked(self, coro) -> None:
        caller_key.set(None)  # vnetd's own work, whoever's call or event scheduled it
        async with self.lock:
            try:
                await coro
            except VnetError as e:
                log.error("firewall: %s", e.message)

    # --- queries ------------------------------------------------------------------------
    def get(self, name: str) -> Network:
        model.validate_network_name(name)
        net = self.defs.get(name)
        if net is None:
            raise NotFound(f"There is no network named '{name}'. 'vnet-client list' shows them.")
        return net

    # --- quotas -------------------------------------------------------------------------
    def check_network_quota(self, uid: int) -> None:
        if uid == 0:
            return
        owned = sum(1 for n in self.defs.values() if n.owner == uid)
        if owned >= self.max_networks_per_user:
            raise QuotaExceeded(
                f"{_who(uid)} already owns {owned} networks and the limit is "
                f"{self.max_networks_per_user} per user: undefine one first, or ask the "
                "administrator to raise vnetd's --max-networks-per-user.")

    def check_forward_quota(self, uid: int, adding: int = 1) -> None:
        if uid == 0 or not adding:
            return
        owned = self.forwards.index.owned_by(uid)
        if owned + adding > self.max_forwards_per_user:
            more = f" and would add {adding}" if adding > 1 else ""
            raise QuotaExceeded(
                f"{_who(uid)} already owns {owned} port forwards{more}, and the limit is "
                f"{self.max_forwards_per_user} per user: remove one first (vnet-client "
                "forward remove), or ask the administrator to raise vnetd's "
                "--max-forwards-per-user.")

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self, name: str) -> None:
        await self._adopted()
        async with self.lock:
            net = self.get(name)
            if name in self.running:
                raise Busy(f"The network '{name}' is already running.")
            await self._start(net)
        self._changed(name, "running")

    async def _start(self, net: Network) -> None:
        """The driver makes the network's links; then each subsystem, the firewall last.
        Any failure undoes every step, newest first."""
        existing = await self.links.get(net.bridge)
        if existing is not None:
            raise Exists(f"An interface named '{net.bridge}' already exists and was not made "
                         "by qemu-vnet for this network.")
        if net.mode != "bridged":
            await self.definitions.check_subnets(net)
        rb = Rollback()
        try:
            run = await driver_for(net).start(self.ctx, net, rb)
            self.running[net.name] = run
            rb.add(f"forget {net.name}'s ports", lambda: self._forget_ports(net.name))
            for sub in self.services:
                rb.add(f"remove {net.name} from {sub.name}",
                       functools.partial(sub.remove, net.name))
                await sub.apply(run)
            self._guard_taps(run.net)
            await self.firewall.apply(run)  # one transaction: all of it, or none
        except BaseException:
            await rb.run()
            raise
        # the ports that waited for it (a stop with VMs attached), guarded by now
        self.ports.unpark(run.net, run.bridge)

    async def _forget_ports(self, name: str) -> None:
        self.running.pop(name, None)
        for p in self.ports.on_network(name):
            if p.kind != "attach":  # attached VMs' ports go on waiting for the network
                self.ports.forget(p)

    async def stop(self, name: str) -> None:
        await self._adopted()
        async with self.lock:
            net = self.get(name)
            if name not in self.running:
                raise Busy(f"The network '{name}' is not running.")
            await self._teardown(net)
        self._changed(name, "stopped")

    async def _teardown(self, net: Network) -> None:
        """Each subsystem lets go of the network, the driver removes its links (and gives
        back what it took), and the firewall drops its guards last, once no port is left."""
        run = self.running.get(net.name) or Running(net, 0)
        for sub in reversed(self.services):
            try:
                await sub.remove(net.name)
            except VnetError as e:  # the network goes anyway; show says what is left
                log.error("%s: %s", sub.name, e.message)
        await driver_for(net).stop(self.ctx, run)
        if self.running.pop(net.name, None) is not None:
            await self.firewall.remove(net.name)

    # --- ports --------------------------------------------------------------------------
    def _running_bridge(self, net: Network) -> int:
        """The running network's bridge ifindex (an ioctl, not a netlink round trip)."""
        if net.name not in self.running:
            raise NotRunning(f"The network '{net.name}' is not running: start it first "
                             f"(vnet-client start {net.name}).")
        try:
            return links_mod.ifindex(net.bridge)
        except OSError:
            raise NotRunning(f"The bridge of '{net.name}' is gone; restart the network.") from None

    async def attach(self, network: str, vm: str, uid: int, pid: int | None,
                     options: dict[str, Any]
                     ) -> tuple[Port, builtins.list[int], builtins.list[int], dict,
                                Callable[[], Awaitable[None]] | None]:
        net = self.get(network)
        model.validate_vm_name(vm)
        opts = parse_attach_options(options)
        await self._adopted(network)
        async with self.lock:
            bridge = self._running_bridge(net)
            # a new VM's MAC and owner are written right after the answer, not before it
            # (its port's runtime record holds them meanwhile: see Ports.adopt)
            with self.macs_written_after():
                port, fds, vhostfds, info = await self.ports.attach(
                    self.running[network].net, bridge, vm, uid, pid, opts)
            guard = None
            if net.spoof_protection:
                guard = functools.partial(self.guard_port, port)
            return port, fds, vhostfds, info, guard

    async def guard_port(self, port: Port) -> None:
        """An attached port's guard, in one transaction (a spare's replaces its pending
        hold). It follows the answer that handed the port out: until it is in, the tap is
        pending (held on the bridge: nothing passes to or from it), as every tap vnetd makes
        is from before it exists, so a guest gets through nothing meanwhile. A port that went
        meanwhile leaves only its pending hold to drop (unless a new port has taken its name,
        whose hold it then is); a guard the kernel refuses cuts the
        port (its tap is deleted, the holder's fd is dead) rather than let it pass unguarded
        or stay silently held."""
        try:
            async with self.lock:
                now = self.ports.by_name.get(port.ifname)
                if now is not port:
                    # a port cut off before its guard keeps its pending hold until its tap is
                    # off the bridge (_cut_off lets it go then); one whose tap is gone has
                    # nothing left to hold (a port that took the name since holds its own)
                    if now is None and not tap_exists(port):
                        await self.firewall.spares_gone([port.ifname])
                    return
                if port.parked:  # its network stopped first: its guard comes with its return
                    return
                try:
                    await self.firewall.port_attached(port)
                except VnetError as e:
                    log.error("port %s (%s/%s, uid %d) is cut off: %s", port.ifname,
                              port.network, port.vm, port.uid, e.message)
                    await self.ports.detach(port)
                    await self.firewall.spares_gone([port.ifname])
                    self._emit("port", port, "detached")
        finally:
            self.spares.restock(port.network)  # after the guard: making a spare takes the lock

    async def macs_written(self) -> None:
        """Until what the registry holds now is on disk (off the event loop: see write_macs):
        the writer's next round takes it, and only that round is waited for, however many
        changes others make meanwhile. A write that fails is logged and tried again with
        the next change, as after an attach; the MAC given out stays the VM's (it is
        derived from its name)."""
        target = self._macs_taken + 1
        fut = asyncio.get_running_loop().create_future()
        self._macs_waiters.append((target, fut))
        self._write_macs_soon()
        await fut

    def _round_done(self, done: int) -> None:
        """The writer's round `done` is over: whoever waited for it (or an earlier one) goes
        on."""
        waiting = []
        for target, fut in self._macs_waiters:
            if target > done:
                waiting.append((target, fut))
            elif not fut.done():
                fut.set_result(None)
        self._macs_waiters = waiting

    @contextlib.contextmanager
    def macs_written_after(self) -> Iterator[None]:
        """What the registry takes meanwhile is written once the block is over, off the
        event loop (write_macs), once per network changed, not durably change by change."""
        self.macs.defer += 1
        try:
            yield
        finally:
            self.macs.defer -= 1
            if self.macs.dirty:
                self._write_macs_soon()

    def _write_macs_soon(self) -> None:
        if self._macs_writer is None or self._macs_writer.done():
            self._macs_writer = asyncio.get_running_loop().create_task(self.write_macs())

    async def write_macs(self) -> None:
        """Write what the attach path left for later, off the event loop (fsync and all),
        until nothing is left: one writer at a time, so a later state never loses to an
        earlier one."""
        while True:
            jobs = self.macs.take_dirty()
            if not jobs:  # nothing left unwritten: no one waits for anything more
                for _target, fut in self._macs_waiters:
                    if not fut.done():
                        fut.set_result(None)
                self._macs_waiters = []
                return
            self._macs_taken += 1
            done = self._macs_taken
            try:
                for job in jobs:
                    await asyncio.to_thread(job)
            except Exception as e:  # (any: the marks are put back, whatever went wrong)
                log.error("could not write the MAC registry (will try again with the next "
                          "change): %s", e)
                self.macs.dirty.update(job.network for job in jobs)
                self._round_done(done)
                return
            self._round_done(done)

    async def flush(self) -> None:
        """Before vnetd exits: whatever is still to be written (also what a call made while
        the last round was being written), trying a failing write a few times."""
        for _ in range(3):
            writer = self._macs_writer
            if writer is None or writer.done():
                if not self.macs.dirty:
                    return
                self._write_macs_soon()
                writer = self._macs_writer
            if writer is not None:
                await asyncio.shield(writer)

    async def detach(self, port: Port) -> None:
        """Remove a port now: its tap first (or off the bridge), then its guard. The kernel's
        event of the tap's removal finds the port gone already, so its guard goes here."""
        async with self.lock:
            await self.ports.detach(port)
            await self._unguard(port)

    async def enslave(self, ifname: str, uid: int, release: bool = False) -> str:
        """vnet-ifup/-ifdown: put a tap the caller owns on (or off) the bridge its name says."""
        model.validate_ifname(ifname, "interface name")
        if "_" not in ifname:
            raise InvalidArgument(
                f"'{ifname}' does not name its network: taps for vnet-ifup are called "
                "<network>_<n>, e.g. vnet2_1.")
        network = ifname.rsplit("_", 1)[0]
        net = self.get(network)
        await self._adopted(net.name)
        async with self.lock:
            lk = await self.links.get(ifname)
            if lk is None:
                raise NotFound(f"There is no interface named '{ifname}'.")
            if lk.kind != "tun":
                raise InvalidArgument(f"'{ifname}' is not a tap device.")
            if uid != 0 and lk.tun_owner != uid:
                raise InvalidArgument(f"The tap '{ifname}' does not belong to you (uid {uid}).")
            port = self.ports.by_name.get(ifname)
            if port is not None and (port.kind not in ("ifup", "tap")
                                     or port.network != net.name):
                # a port handed out by Attach (or a VDE switch's tap) stays where vnetd put
                # it: `lab_x-1a2b3c` of network lab_x reads as a tap of network lab
                raise InvalidArgument(
                    f"'{ifname}' is a port vnetd handed out on network '{port.network}'; "
                    "vnet-ifup and vnet-ifdown move only your own <network>_<n> taps (close "
                    "the port's descriptor or detach it instead).")
            if release:
                if lk.master is not None:  # and down: off the bridge, an interface of the
                    # host's that no rule of the bridges' covers
                    await self.links.set(lk.index, master=0, state="down")
                if port is not None and port.kind == "ifup":
                    self.ports.forget(port)
                    await self.firewall.port_gone(port)
                return net.name
            self.ports.check_quota(uid)
            bridge = self._running_bridge(net)
            if uid != 0 and ifname not in net.tap_names:  # (a pre-created tap's is root's)
                # the port is VM <tap name> (qemu-vlan's NAME_<n>, whose MAC ether.conf gave):
                # that VM is the tap owner's, as any VM name is its first registrant's, so that
                # no one else attaches as it (with the MAC the port learned) or reads its leases
                with self.macs_written_after():
                    self.macs.claim(net.name, ifname, uid)
            port = self.ports.guard_tap(net, ifname, "ifup", uid, None)
            if port is None:
                raise NotFound(f"There is no interface named '{ifname}'.")
            try:
                if net.spoof_protection:  # guarded before it reaches the bridge
                    await self.firewall.port_attached(port)
                # as every port: no IPv6 of the host's on it, its link-local groups to
                # the guard (kernel/links.py)
                self.links.fast.set(lk.index, master=bridge,
                                    mtu=self.running[net.name].net.mtu, port=ifname,
                                    guarded=net.spoof_protection)
            except BaseException:
                self.ports.forget(port)
                await self.firewall.port_gone(port)
                raise
            return net.name

    async def vde_socket(self, network: str, vm: str, nic: int, uid: int = 0) -> tuple[str, str]:
        """A VDE switch socket with a free port (the switches are asked in a thread), and
        the VM's stable MAC (the registry is only ever changed on the event loop)."""
        net = self.get(network)
        if not net.vde:
            raise InvalidArgument(f"The network '{network}' has no VDE switches (define it "
                                  "with --vde).")
        if network not in self.running:
            raise NotRunning(f"The network '{network}' is not running: start it first.")
        sock = await self.vde.free_socket(net)
        return sock, await self.vms.get_mac(network, vm, nic, uid)
