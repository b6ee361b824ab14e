"""The firewall as the engine sees it: what must be in the kernel, and the one transaction
that puts it there.

The ruleset is rendered from the running networks, their forwards (with VM-name targets
resolved through static hosts and current leases) and the ports on them, by the pure
`render.nft` renderer, and applied through libnftables in JSON: all or nothing.
Starting and stopping a network re-renders our two tables whole; a forward, a port or a lease
changes only map and set elements, so its cost does not grow with the number of forwards.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import Failed
from ..kernel import nftnl
from ..model import Forward, Network
from ..render import nft as fw

if TYPE_CHECKING:
    from ..kernel.links import Links
    from ..networks import Running
    from ..ports import Port, Ports
    from ..resolver import Resolver

log = logging.getLogger("vnetd.firewall")

IPV4_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
IPV6_FORWARD = Path("/proc/sys/net/ipv6/conf/all/forwarding")
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100
RTM_NEWADDR, RTM_DELADDR = 20, 21


class View(Protocol):
    """What the firewall may know of the networks: read-only, from the engine."""

    links: Links
    ports: Ports
    resolver: Resolver

    def network(self, name: str) -> Network | None:
        """A network's definition in force (with its run-time MTU while it runs)."""

    def running(self) -> list[Network]:
        """The running networks' definitions in force, by name."""

    def is_running(self, name: str) -> bool: ...

    def schedule(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` later, under the engine's lock (for events from the kernel)."""


class Firewall:
    name = "firewall"

    def __init__(self, view: View):
        self.view = view
        # a forward is one FwForward, or one per address of its addr-of interface
        self.applied_forwards: dict[tuple[str, Forward], tuple[fw.FwForward, ...]] = {}
        # the addresses of the interfaces addr-of forwards name, as last read from the kernel
        self.iface_addrs: dict[str, tuple[str, ...]] = {}
        self._addr_sock: socket.socket | None = None
        self._addr_pending = False
        self.applied_ports: dict[str, fw.FwPort] = {}
        # spare taps made ahead of attaches (subsystems/spares.py): nothing passes to or
        # from them until a port's guard replaces this
        self.pending: set[str] = set()
        self.applied_nets: dict[str, fw.FwNetwork] = {}  # the routed networks in the ruleset
        # how many applied ports and gateways hold each host-wide identity element (the
        # taken/claimed sets): one is deleted only when nothing holds it any more
        self._held: Counter = Counter()
        self._nft = None
        # one libnftables context, used from worker threads: one at a time (libnftables is
        # not thread-safe, and its netlink errors can end the whole process)
        self._nft_lock = threading.Lock()
        self._elements = nftnl.Elements()
        # reads for callers (GetNetwork is open to everyone) have a context, a socket and a
        # lock of their own: however many wait to read, a change (taken on the event loop for
        # a port) never waits behind them. Concurrent reads of the same thing are one read.
        self._read_nft = None
        self._read_lock = threading.Lock()
        self._read_elements = nftnl.Elements()
        self._reader: ThreadPoolExecutor | None = None  # their one thread (made on first use)
        self._reading: dict[tuple, asyncio.Future] = {}  # what is being read -> its read
        self._forwarding_before: dict[Path, str] = {}
        self.flowtables = False

    @property
    def nft(self):
        if self._nft is None:
            import nftables  # libnftables; imported late so the client never needs it

            self._nft = nftables.Nftables()
            self._nft.set_json_output(True)
            self.flowtables = fw.kernel_supports_flowtables(self._nft)
            if not self.flowtables:
                log.info("nftables flowtables are not supported by this kernel: forwarded "
                         "flows take the normal path")
        return self._nft

    def _shared(self, what: tuple, read: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
        """One read of `what` at a time: callers that ask while it is under way share it
        (one that gives up cancels nothing for the others)."""
        reading = self._reading.get(what)
        if reading is None:
            reading = self._reading[what] = asyncio.ensure_future(read())
            reading.add_done_callback(lambda _f: self._reading.pop(what, None))
        return asyncio.shield(reading)

    async def _read(self, fn, *args):
        """Run a read in the readers' own thread: however many callers read, they never
        take the event loop's shared workers from the changes that need them."""
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nft-read")
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    @property
    def read_nft(self):
        if self._read_nft is None:
            import nftables

            self._read_nft = nftables.Nftables()
            self._read_nft.set_json_output(True)
        return self._read_nft

    def _apply(self, cmd: dict, what: str) -> None:
        try:
            with self._nft_lock:
                # set elements of the bridge table (a port's guard) go straight to the
                # kernel; anything else, or a kernel that refuses the batch, through
                # libnftables (whose error text is the one users see)
                try:
                    if self._elements.apply(cmd, fw.SET_FIELDS, fw.TABLE):
                        return
                except RuntimeError as e:
                    log.debug("element batch refused (%s); trying libnftables", e)
                fw.apply(cmd, self.nft)
        except RuntimeError as e:
            raise Failed(f"The firewall refused to {what}; nothing was changed ({e}).") from None

    async def _change(self, what: str, render, *args, in_loop: bool = False, **kw) -> None:
        """Render (pure; a ValueError means vnetd asked for something impossible) and apply
        as one transaction, off the event loop; `in_loop` for a change of a few set elements
        (well under a millisecond whatever the host holds), where a thread's hand-off would
        cost as much again."""
        try:
            cmd = render(*args, **kw)
        except ValueError as e:
            raise Failed(f"The firewall cannot {what}: {e}") from None
        if in_loop:
            self._apply(cmd, what)
        else:
            await asyncio.to_thread(self._apply, cmd, what)

    # --- the subsystem protocol (subsystems/__init__.py) ---------------------------------
    async def apply(self, run: Running) -> None:
        """A network joins: its elements, its forwards', its gateway's identity and its
        taps' guards, in one transaction whose cost does not grow with the host. The first
        network, an overlay (rules of its own) and a bridged network load the whole ruleset;
        so does any trouble with the elements (the whole ruleset is always right)."""
        net = run.net
        if (net.mode == "bridged" or not self.applied_nets or net.name in self.applied_nets
                or not fw.incremental(self._fw_network(net))):
            return await self.sync_all()
        try:
            await self._join(net)
        except Failed as e:
            log.warning("%s; loading the whole ruleset instead", e.message)
            await self.sync_all()

    async def remove(self, name: str) -> None:
        """A network leaves (its links are gone): the same elements out, in one transaction;
        the last network, an overlay and a bridged network reload the whole ruleset."""
        old = self.applied_nets.get(name)
        if old is None or len(self.applied_nets) == 1 or not fw.incremental(old):
            return await self.sync_all()
        try:
            await self._leave(name, old)
        except Failed as e:
            log.warning("%s; loading the whole ruleset instead", e.message)
            await self.sync_all()

    async def _join(self, net: Network) -> None:
        fwn = self._fw_network(net)
        cmds = fw.render_network_change(fwn, self.applied_nets.values(), add=True)["nftables"]
        if any(f.addr_of for f in net.forwards):
            self._watch_addresses()
            await self._read_iface_addrs(self._addr_of_ifaces())
        forwards = {}
        for f in net.forwards:
            ff = self._fw_forward(net, f)
            if ff:
                forwards[(net.name, f)] = ff
                for x in ff:
                    cmds += fw.render_forward_add(x)["nftables"]
        gateway = fw.network_elems(fwn) if fwn.spoof_protection else []
        cmds += fw.render_elements("add", gateway)["nftables"]
        ports = {p.ifname: self._fw_port(p) for p in self.view.ports.on_network(net.name)}
        # a port attached just before its network stopped got no guard meanwhile (parked), and
        # is still pending: its guard replaces that here
        held = {name for name in ports if name in self.pending} if fwn.spoof_protection else set()
        if fwn.spoof_protection:
            for fp in ports.values():
                cmds += fw.render_port_update(fp, None, pending=fp.ifname in held)["nftables"]
        await asyncio.to_thread(self._apply, {"nftables": cmds}, f"let {net.name} in")
        log.debug("%s joined the ruleset: %d command(s)", net.name, len(cmds))
        self.applied_nets[net.name] = fwn
        self.applied_forwards.update(forwards)
        self._held.update(fw._keyed(e) for e in gateway)
        self.pending.difference_update(held)
        for fp in ports.values():
            self.applied_ports[fp.ifname] = fp
            if fwn.spoof_protection:
                self._hold(fp, 1)
        await self._host_settings()

    async def _leave(self, name: str, old: fw.FwNetwork) -> None:
        others = [n for k, n in self.applied_nets.items() if k != name]
        cmds = fw.render_network_change(old, others, add=False)["nftables"]
        forwards = [k for k in self.applied_forwards if k[0] == name]
        for k in forwards:
            for x in self.applied_forwards[k]:
                cmds += fw.render_forward_remove(x)["nftables"]
        held = Counter(self._held)  # a copy: counted down as elements go
        gateway = []
        if old.spoof_protection:
            for e in fw.network_elems(old):
                held[fw._keyed(e)] -= 1
                if held[fw._keyed(e)] <= 0:
                    gateway.append(e)
        cmds += fw.render_elements("delete", gateway)["nftables"]
        ports = [fp for fp in self.applied_ports.values() if fp.network == name]
        for fp in ports:
            keep = frozenset(e for e in fw.shared_elems(fp) if held[e] > 1)
            cmds += fw.render_port_remove(fp, spoof_protection=old.spoof_protection,
                                          keep=keep)["nftables"]
            if old.spoof_protection:
                held.subtract(fw.shared_elems(fp))
        await asyncio.to_thread(self._apply, {"nftables": cmds}, f"let {name} out")
        log.debug("%s left the ruleset: %d command(s)", name, len(cmds))
        del self.applied_nets[name]
        for k in forwards:
            del self.applied_forwards[k]
        for fp in ports:
            del self.applied_ports[fp.ifname]
        self._held = Counter({k: v for k, v in held.items() if v > 0})
        await self._host_settings()

    async def _host_settings(self) -> None:
        """IP forwarding while a nat network runs; Docker's DOCKER-USER accepts our bridges."""
        nets = list(self.applied_nets.values())
        self._forwarding(any(n.mode == "nat" for n in nets),
                         any(n.mode == "nat" and n.subnet6 for n in nets))
        await asyncio.to_thread(self._docker_user, sorted(self.applied_nets))

    async def adopt(self, run: Running) -> None:
        pass  # one sync_all after every network is adopted

    async def sync(self) -> None:
        await self.sync_all()

    async def status(self, name: str) -> dict[str, dict[str, int]]:
        """The anti-spoofing drop counters of the network's ports, by port; callers that ask
        while they are being read share that read."""
        return await self._shared(("counters", name), lambda: self._status(name))

    async def _status(self, name: str) -> dict[str, dict[str, int]]:
        mine = [p.ifname for p in self.view.ports.on_network(name)
                if p.ifname in self.applied_ports]
        if not mine or not self.protects(name):
            return {}

        def read() -> dict[str, dict[str, int]]:
            with self._read_lock:
                try:  # straight from the kernel, these elements alone
                    got = self._read_elements.counters(fw.TABLE, "spoof", [nftnl.encode_key(
                        fw.SET_FIELDS["spoof"], n) for n in mine])
                    return {k.rstrip(b"\0").decode(): {"packets": p, "bytes": b}
                            for k, (p, b) in got.items()}
                except RuntimeError as e:
                    log.debug("counters by netlink failed (%s); asking libnftables", e)
                return fw.get_spoof_counters(mine, self.read_nft)

        try:  # these ports' elements only: the cost of one network, not of the host
            return await self._read(read)
        except (RuntimeError, ValueError):
            pass  # one of them has no element (going meanwhile): read the whole set
        wanted = set(mine)
        return {k: v for k, v in (await self.spoof_counters()).items() if k in wanted}

    def protects(self, network: str) -> bool:
        net = self.view.network(network)
        return net is None or net.spoof_protection

    async def spoof_counters(self) -> dict[str, dict[str, int]]:
        try:
            listing = await self._read(self._query, fw.render_counters_query())
        except (RuntimeError, ValueError) as e:
            log.warning("could not read the anti-spoofing counters: %s", e)
            return {}
        return fw.parse_spoof_counters(listing)

    def _query(self, cmd: dict) -> dict:
        with self._read_lock:
            return fw.query(cmd, self.read_nft)

    async def current_warnings(self) -> list[str]:
        """warnings(), read in a thread, one read at a time whoever asks (GetNetwork is open
        to everyone): callers that ask while it is under way share it."""
        return await self._shared(("warnings",), lambda: self._read(self.warnings))

    def warnings(self) -> list[str]:
        """Sentences for `show`: other tables whose drop policy also drops our traffic."""
        try:
            chains = fw.foreign_drop_chains(self._query(fw.render_chains_query()))
        except (RuntimeError, ValueError) as e:
            return [f"the ruleset could not be read: {e}"]
        docker = set()
        for family in ("ip", "ip6"):
            try:
                self._query(fw.docker_user_query(family))
                docker.add(f"{family} filter")
            except (RuntimeError, ValueError):
                pass
        return [f"{c} drops forwarded traffic of vnetd's bridges too: add accept rules for "
                "them there (e.g. 'iifname \"vnet2\" accept' and 'oifname \"vnet2\" ct state "
                "established,related accept')" for c in chains
                if not any(c.startswith(d + " ") for d in docker)]

    # --- what should be there -----------------------------------------------------------
    def resolve(self, net: Network, f: Forward) -> str | None:
        """The address a forward's target is now: itself, or a VM's static host or lease."""
        return self.view.resolver.address(net, f.target, f.family)

    def _fw_forward(self, net: Network, f: Forward) -> tuple[fw.FwForward, ...]:
        """What the kernel holds for a forward: nothing while its target is unresolved; one
        element set per address of its addr-of interface (none while it has none)."""
        target = self.resolve(net, f)
        if target is None:
            return ()
        addrs: list[str | None]
        if f.addr_of is not None:
            addrs = [a for a in self.iface_addrs.get(f.addr_of, ())
                     if ipaddress.ip_address(a).version == f.family]
        else:
            addrs = [f.ext_addr]
        return tuple(fw.FwForward(network=net.name, proto=f.proto, family=f.family,
                                  ext_addr=a, port_lo=f.port_lo, port_hi=f.port_hi,
                                  target=target, target_port=f.target_port, iface=f.iface)
                     for a in addrs)

    # --- addr-of forwards: the interfaces' addresses, followed ---------------------------
    def _addr_of_ifaces(self) -> set[str]:
        return {f.addr_of for net in self.view.running() for f in net.forwards
                if f.addr_of is not None}

    async def _read_iface_addrs(self, names: set[str]) -> bool:
        """Read the addresses of `names` (global scope: no link-local, no loopback's own
        127/8 beyond what it has); True when any changed."""
        changed = False
        for name in sorted(names):
            link = await self.view.links.get(name)
            addrs: tuple[str, ...] = ()
            if link is not None:
                addrs = tuple(sorted(str(a.ip) for a in await self.view.links.addresses(
                    link.index) if not a.ip.is_link_local))
            if self.iface_addrs.get(name) != addrs:
                self.iface_addrs[name] = addrs
                changed = True
        for gone in set(self.iface_addrs) - names:
            del self.iface_addrs[gone]
        return changed

    def _watch_addresses(self) -> None:
        """Address changes on any interface (RTM_NEWADDR/RTM_DELADDR): re-read the ones
        addr-of forwards name and move their elements. One socket, read on the loop."""
        if self._addr_sock is not None:
            return
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                 socket.NETLINK_ROUTE)
            sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        except OSError as e:
            log.warning("cannot follow address changes (forwards to an interface's "
                        "addresses keep the addresses of their start): %s", e)
            return
        self._addr_sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._addr_event)

    def _addr_event(self) -> None:
        relevant = False
        try:
            while True:
                data = self._addr_sock.recv(65536)  # type: ignore[union-attr]
                off = 0
                while off + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, off)
                    relevant = relevant or kind in (RTM_NEWADDR, RTM_DELADDR)
                    off += max((length + 3) & ~3, 16)
        except BlockingIOError:
            pass
        except OSError as e:  # ENOBUFS: events were lost; re-read the addresses anyway
            log.warning("address events: %s", e)
            relevant = True
        if relevant and not self._addr_pending and self._addr_of_ifaces():
            self._addr_pending = True
            self.view.schedule(self._addresses_moved())

    async def _addresses_moved(self) -> None:
        self._addr_pending = False
        if await self._read_iface_addrs(self._addr_of_ifaces()):
            for net in self.view.running():
                if any(f.addr_of for f in net.forwards):
                    await self.leases_changed(net.name)

    def _fw_network(self, net: Network) -> fw.FwNetwork:
        ov = net.overlay
        static = ov is not None and ov.control == "static"
        # a member host routes nothing for the LAN (the gateway host does): no NAT here, even
        # for bridged frames that br_netfilter shows to the inet hooks
        mode = "host-only" if ov is not None and ov.is_member else net.mode
        return fw.FwNetwork(name=net.name, mode=mode, subnet=net.subnet,
                            gateway=net.gateway, subnet6=net.subnet6, gateway6=net.gateway6,
                            allow_host=net.allow_host, routed_with=net.routed_with,
                            spoof_protection=net.spoof_protection,
                            overlay_port=ov.port if ov is not None else None,
                            overlay_vni=ov.vni if ov is not None else None,
                            overlay_peers=(tuple(str(p) for p in ov.peers)
                                           if ov is not None and static else ()),
                            overlay_evpn=ov is not None and not static,
                            mac=net.mac)

    def _fw_port(self, port: Port) -> fw.FwPort:
        """What a port may be: its MAC, the IPv4 address bound to it (a static host, else its
        lease: the lease of its own MAC, which DHCP only gives to that client hardware
        address), and its IPv6 addresses (SLAAC from its MAC, DHCPv6 leases)."""
        net = self.view.network(port.network)
        bridged = net is not None and net.mode == "bridged"
        if port.kind == "vde":
            return fw.FwPort(ifname=port.ifname, network=port.network, mac=None, segment=True,
                             bridged=bridged)
        if bridged:
            return fw.FwPort(ifname=port.ifname, network=port.network,
                             mac=port.mac if port.mac_known else None, bridged=True)
        ipv4: str | None = None
        ipv4_also: tuple[str, ...] = ()
        ipv6: list[str] = []
        if net is not None and port.mac_known:
            ipv4, ipv4_also, leased6 = self.view.resolver.port_addresses(net, port.mac)
            if net.subnet6 is not None:
                if net.subnet6.prefixlen == 64:
                    ipv6.append(fw.eui64_in(net.subnet6, port.mac))
                ipv6 += leased6
        member = net is not None and net.overlay is not None and net.overlay.is_member
        return fw.FwPort(ifname=port.ifname, network=port.network,
                         mac=port.mac if port.mac_known else None, ipv4=ipv4,
                         ipv4_also=ipv4_also, ipv6=tuple(sorted(set(ipv6))),
                         unbound_in=(str(net.subnet) if net is not None and member
                                     and ipv4 is None else None))

    def _hold(self, port: fw.FwPort | None, n: int) -> None:
        if port is not None:
            for e in fw.shared_elems(port):
                self._held[e] += n
                if self._held[e] <= 0:
                    del self._held[e]

    def _keep(self, old: fw.FwPort | None) -> frozenset:
        """The elements of `old` that something else still holds."""
        if old is None:
            return frozenset()
        return frozenset(e for e in fw.shared_elems(old) if self._held[e] > 1)

    # --- whole-ruleset changes (network start/stop, start-up) ---------------------------
    async def sync_all(self) -> None:
        every = self.view.running()
        running = [n for n in every if n.mode != "bridged"]
        forwards: dict[tuple[str, Forward], tuple[fw.FwForward, ...]] = {}
        if any(f.addr_of for net in running for f in net.forwards):
            self._watch_addresses()
            await self._read_iface_addrs(self._addr_of_ifaces())
        for net in running:
            for f in net.forwards:
                ff = self._fw_forward(net, f)
                if ff:
                    forwards[(net.name, f)] = ff
        # ports of bridged networks are guarded too (their MAC only)
        ours = {n.name for n in every}
        ports = {p.ifname: self._fw_port(p) for p in self.view.ports.by_name.values()
                 if p.network in ours}
        fw_nets = [self._fw_network(n) for n in running]
        if not ours and not ports:  # nothing runs: leave no table of ours behind
            await self._change("remove its tables", fw.render_delete_all)
        else:
            counters = await asyncio.to_thread(self._bridge_sets_made)
            await self._change("load the ruleset", fw.render_ruleset, fw_nets,
                               [x for ff in forwards.values() for x in ff],
                               list(ports.values()), counters=counters,
                               pending=self.pending)
        self.applied_forwards, self.applied_ports = forwards, ports
        self.applied_nets = {n.name: n for n in fw_nets}
        self._held = Counter()
        for n in fw_nets:
            if n.spoof_protection:
                self._held.update(fw._keyed(e) for e in fw.network_elems(n))
        for p in ports.values():
            if self.protects(p.network):
                self._hold(p, 1)
        self._forwarding(any(n.mode == "nat" for n in running),
                         any(n.mode == "nat" and n.subnet6 for n in running))
        await asyncio.to_thread(self._docker_user, [n.bridge for n in running])

    def _bridge_sets_made(self) -> dict[str, dict[str, int]]:
        """The bridge table's text-made sets (made where missing), and the drop counts."""
        try:
            with self._nft_lock:
                return fw.prepare_bridge(self.nft)
        except RuntimeError as e:
            raise Failed(f"The firewall refused to make its bridge sets ({e}).") from None

    def _docker_user(self, bridges: list[str]) -> None:
        """Where Docker's DOCKER-USER chain exists, accept our bridges' traffic there (its
        forward policy is drop). A host without Docker is left alone."""
        for family in ("ip", "ip6"):
            try:
                listing = self._query(fw.docker_user_query(family))
            except (RuntimeError, ValueError):
                continue  # no such chain: nothing to do
            try:
                with self._nft_lock:
                    fw.apply_docker_user(fw.render_docker_user(family, listing, bridges),
                                         self.nft)
                log.info("DOCKER-USER (%s): accept rules for %s", family,
                         ", ".join(bridges) or "no bridges")
            except (RuntimeError, ValueError) as e:
                log.warning("could not update %s filter DOCKER-USER: %s", family, e)

    def _forwarding(self, v4: bool, v6: bool) -> None:
        """IP forwarding on while a nat network runs; the previous value back afterwards."""
        for path, want in ((IPV4_FORWARD, v4), (IPV6_FORWARD, v6)):
            try:
                now = path.read_text().strip()
                if want and now != "1":
                    self._forwarding_before.setdefault(path, now)
                    path.write_text("1\n")
                    log.info("enabled %s for nat networks", path)
                elif not want and path in self._forwarding_before:
                    path.write_text(self._forwarding_before.pop(path) + "\n")
                    log.info("restored %s", path)
            except OSError as e:
                log.warning("could not set %s: %s", path, e)

    # --- element changes ----------------------------------------------------------------
    async def forward_added(self, net: Network, f: Forward) -> None:
        if f.addr_of is not None:
            self._watch_addresses()
            await self._read_iface_addrs(self._addr_of_ifaces() | {f.addr_of})
        ff = self._fw_forward(net, f)
        if ff:
            await self._move((), ff, "add the forward")
            self.applied_forwards[(net.name, f)] = ff

    async def forward_removed(self, net: Network, f: Forward) -> None:
        ff = self.applied_forwards.get((net.name, f))
        if ff:
            await self._move(ff, (), "remove the forward")
            del self.applied_forwards[(net.name, f)]

    async def _move(self, old: tuple[fw.FwForward, ...], new: tuple[fw.FwForward, ...],
                    what: str) -> None:
        """Remove `old` and add `new` elements in one transaction: never half moved."""
        cmds: list = []
        try:
            for o in old:
                cmds += fw.render_forward_remove(o)["nftables"]
            for n in new:
                cmds += fw.render_forward_add(n)["nftables"]
        except ValueError as e:
            raise Failed(f"The firewall cannot {what}: {e}") from None
        if cmds:
            await asyncio.to_thread(self._apply, {"nftables": cmds}, what)

    async def port_attached(self, port: Port) -> None:
        """A new port, or one whose MAC was just learned. One that went (or whose name a
        new port took) before this ran has nothing to guard: its elements are gone or
        the new port's."""
        if self.view.ports.by_name.get(port.ifname) is not port:
            return
        new = self._fw_port(port)
        await self._update(port.network, new)

    async def _update(self, network: str, new: fw.FwPort) -> None:
        old = self.applied_ports.get(new.ifname)
        protects = self.protects(network)
        spare = new.ifname in self.pending
        self._hold(new, 1)
        try:
            await self._change("protect the port", fw.render_port_update, new, old,
                               spoof_protection=protects, keep=self._keep(old),
                               pending=spare, in_loop=True)
        except BaseException:
            self._hold(new, -1)
            raise
        self._hold(old, -1)
        self.pending.discard(new.ifname)
        self.applied_ports[new.ifname] = new

    async def spares_added(self, names: list[str]) -> None:
        """Taps made ahead of attaches: nothing to or from them (before they go up)."""
        await self._change("hold the spare taps", fw.render_pending, "add", names,
                           in_loop=True)
        self.pending.update(names)

    async def spares_gone(self, names: list[str]) -> None:
        """Spare taps closed (their elements go; a tap that is gone may keep one)."""
        names = [n for n in names if n in self.pending]
        if not names:
            return
        try:
            await self._change("let the spare taps go", fw.render_pending, "delete", names,
                               in_loop=True)
        except Failed as e:  # a stale element of a tap that is gone blocks nothing
            log.warning("%s", e.message)
        self.pending.difference_update(names)

    async def port_gone(self, port: Port) -> None:
        now = self.view.ports.by_name.get(port.ifname)
        if now is not None and now is not port:
            # a new port took the name first (the same VM again): its update replaced this
            # one's elements already, and they are its own now
            return
        old = self.applied_ports.pop(port.ifname, None)
        if old is not None:
            try:
                await self._change("forget the port", fw.render_port_remove, old,
                                   spoof_protection=self.protects(port.network),
                                   keep=self._keep(old))
            except Failed as e:
                log.warning("%s", e.message)
            self._hold(old, -1)

    async def leases_changed(self, network: str) -> None:
        """A lease came, changed or went: re-resolve VM-name forwards and port addresses."""
        net = self.view.network(network)
        if net is None or not self.view.is_running(network):
            return
        for f in net.forwards:
            old = self.applied_forwards.get((network, f), ())
            new = self._fw_forward(net, f)
            if old == new:
                continue
            await self._move(old, new, "move the forward")
            if not new:
                self.applied_forwards.pop((network, f), None)
            else:
                self.applied_forwards[(network, f)] = new
                log.info("forward %s now goes to %s%s", f.describe(), new[0].target,
                         f" for {', '.join(str(x.ext_addr) for x in new)}" if f.addr_of
                         else "")
        changed = []
        with self.view.resolver.one_reading():  # (the lease file once, not once a port)
            for p in self.view.ports.on_network(network):
                old_p = self.applied_ports.get(p.ifname)
                new_p = self._fw_port(p)
                if old_p is not None and old_p != new_p:
                    changed.append(new_p)
        for new_p in changed:
            await self._update(network, new_p)
