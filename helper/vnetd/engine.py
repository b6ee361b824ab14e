"""The one place that changes state.

The engine holds the declared state (definitions from the store) and makes the kernel match
it. Every operation that makes kernel objects records how to undo each step and unwinds on any
failure, so nothing half-made is left behind. At start-up it reconciles: it adopts what carries
its alias and is still wanted, restarts autostart networks, and removes only objects carrying
its alias that no definition wants. Interfaces it did not make are never touched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import ipaddress
import json
import logging
import os
import pwd
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vnet_common.names import split_key

from . import macs as macs_mod
from . import model
from . import overlay as overlay_mod
from .backends import tap as tapdev
from .backends.links import Link, Links
from .backends.supervisor import reap
from .dhcp import DhcpServers
from .errors import (
    Busy,
    Exists,
    Failed,
    InvalidArgument,
    NotFound,
    NotRunning,
    QuotaExceeded,
    VnetError,
)
from .evpn import Evpn
from .firewall import Firewall
from .macs import MacRegistry
from .model import Network
from .ports import Port, Ports, parse_attach_options
from .store import Store
from .vde import VdeSwitches

log = logging.getLogger("vnetd")


@dataclass
class Rollback:
    """Undo steps, run newest first, when an operation fails part-way."""

    steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = field(default_factory=list)

    def add(self, what: str, fn: Callable[[], Awaitable[Any]]) -> None:
        self.steps.append((what, fn))

    async def run(self) -> None:
        for what, fn in reversed(self.steps):
            try:
                await fn()
            except Exception as e:  # keep unwinding; report what could not be undone
                log.error("rollback: could not %s: %s", what, e)
        self.steps.clear()


def _same(running: Network | None, stored: Network) -> bool:
    """A definition unchanged by its file (an overlay's computed MTU is not a change)."""
    if running is not None and running.mtu_auto and stored.mtu_auto:
        running = running.with_changes(mtu=stored.mtu)
    return running == stored


def _overlay_moved(old: Network, new: Network) -> bool:
    """Overlay settings that need the VXLAN device made again (all but the peers)."""
    a, b = old.overlay, new.overlay
    if a is None or b is None:
        return a is not b
    return dataclasses.replace(a, peers=()) != dataclasses.replace(b, peers=())


def _who(uid: int) -> str:
    """A user as a sentence names them: 'alice (uid 1000)', or 'uid 1000'."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


class Engine:
    def __init__(self, store: Store, links: Links, max_ports_per_user: int = 64,
                 max_networks_per_user: int = 8, max_forwards_per_user: int = 64,
                 max_macs_per_network: int = macs_mod.DEFAULT_LIMIT,
                 max_macs: int = macs_mod.DEFAULT_TOTAL,
                 max_macs_per_user: int = macs_mod.DEFAULT_PER_USER,
                 frr_pathspace: str | None = None):
        self.store = store
        self.links = links
        self.max_networks_per_user = max_networks_per_user
        self.max_forwards_per_user = max_forwards_per_user
        self.macs = MacRegistry(
            store.load_json(MacRegistry.FILE, {}, valid=macs_mod.valid),
            lambda data: store.save_json(MacRegistry.FILE, data),
            limit=max_macs_per_network,
            creators=store.load_json(MacRegistry.CREATORS, {}, valid=macs_mod.valid_creators),
            save_creators=lambda data: store.save_json(MacRegistry.CREATORS, data),
            total_limit=max_macs, per_user=max_macs_per_user,
        )
        self.ports = Ports(links, self.macs, store, max_ports_per_user)
        self.dhcp = DhcpServers(store.runtime_dir, store.state_dir,
                                lambda name: self.defs.get(name))
        self.firewall = Firewall(self)
        self.fwd_index = model.ForwardIndex()
        self.vde = VdeSwitches(store.runtime_dir)
        self.evpn = Evpn(store.runtime_dir, frr_pathspace)
        self.ports.listeners.append(self._port_event)
        self.ports.identity_owner = self._identity_owner
        self.dhcp.listeners.append(self._lease_event)
        self.defs: dict[str, Network] = {}
        self.running: set[str] = set()
        self.lock = asyncio.Lock()
        self.problems: list[str] = []
        self.listeners: list[Callable[[str, str], None]] = []

    # --- events -------------------------------------------------------------------------
    def _changed(self, name: str, state: str) -> None:
        for fn in self.listeners:
            fn(name, state)

    # --- start-up -----------------------------------------------------------------------
    async def startup(self) -> None:
        self.defs, self.problems = self.store.load_all()
        self._index_forwards()
        for p in self.problems:
            log.error("definition problem: %s", p)
        async with self.lock:
            self.ports.begin_reconcile()
            await self._reconcile()
            self.ports.end_reconcile()
        await self.ports.start_monitor()
        for name, net in sorted(self.defs.items()):
            if net.autostart and name not in self.running:
                try:
                    async with self.lock:
                        await self._start(net)
                    log.info("autostart %s: started", name)
                except VnetError as e:
                    log.error("autostart %s failed: %s", name, e.message)
        async with self.lock:
            try:
                await self.firewall.sync_all()
            except VnetError as e:  # keep serving: show and the log say why
                log.error("firewall: %s", e.message)
                self.problems.append(f"firewall: {e.message}")

    # --- events from ports and leases ---------------------------------------------------
    def _port_event(self, port: Port, state: str) -> None:
        if state == "detached":
            asyncio.get_running_loop().create_task(self._locked(self.firewall.port_gone(port)))
        elif state == "cut":
            asyncio.get_running_loop().create_task(self._locked(self._cut_off(port)))
        elif state == "learned":
            asyncio.get_running_loop().create_task(
                self._locked(self.firewall.port_attached(port)))

    def _lease_event(self, network: str, lease, event: str) -> None:
        asyncio.get_running_loop().create_task(
            self._locked(self.firewall.leases_changed(network)))

    async def _cut_off(self, port: Port) -> None:
        """A port's holder changed its tap's own address (or sent as another VM): off the
        bridge at once (which also drops the bridge's entries for it), and a tap vnetd
        handed out is deleted."""
        await self.firewall.port_gone(port)
        try:
            if port.kind == "attach":
                await self.links.delete(port.ifindex)
            else:
                await self.links.set(port.ifindex, master=0)
        except Exception as e:  # gone meanwhile
            log.info("cutting off %s: %s", port.ifname, e)

    def _identity_owner(self, network: str, mac: str) -> str | None:
        """The VM (or the gateway) a MAC belongs to on a network, if any."""
        net = self.defs.get(network)
        if net is not None:
            if mac == net.mac:
                return "the gateway"
            for h in net.hosts:
                if h.mac == mac:
                    return h.vm
        for p in self.ports.on_network(network):
            if p.mac_known and p.mac == mac and p.kind != "vde":
                return p.vm
        k = self.macs.owner_of(network, mac)
        return split_key(k)[0] if k else None

    def _guard_taps(self, net: Network) -> None:
        """The taps a network brings (`-n` taps, VDE switches' taps) are guarded as ports:
        a `-n` tap carries the MAC of VM <tap name> (ether.conf), a VDE tap is a segment."""
        for tname in net.tap_names:
            if net.vde:
                self.ports.guard_tap(net, tname, "vde", 0, None)
            else:
                self.ports.guard_tap(net, tname, "tap", 0,
                                     self.macs.get(net.name, tname, 0))

    async def _locked(self, coro) -> None:
        async with self.lock:
            try:
                await coro
            except VnetError as e:
                log.error("firewall: %s", e.message)

    async def _reconcile(self) -> None:
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
            net = self.defs.get(model.network_of_alias(lk.alias) or "")
            if net is not None and lk.ifname in net.tap_names:
                await self.ports.adopt(lk)
                continue
            if net is not None and net.overlay is not None and lk.ifname == net.overlay.ifname:
                continue
            if net is not None and await self.ports.adopt(lk):
                continue
            await self._remove_unwanted(lk)
        for lk in bridges:
            name = model.network_of_alias(lk.alias)
            net = self.defs.get(name or "")
            if net is None or lk.ifname != net.bridge:
                await self._remove_unwanted(lk)
                continue
            try:
                await self._ensure_running(net, lk)
                await self.vde.start(net)
                await self.dhcp.start(net)
                self._guard_taps(net)
                self.running.add(net.name)
                log.info("reconcile: adopted running network %s", net.name)
            except VnetError as e:
                log.error("reconcile: could not adopt %s (%s); removing it", net.name, e.message)
                await self._teardown(net)
        await self._apply_evpn("reconcile")  # once, with every adopted network
        await self._reap_orphan_children()

    async def _reap_orphan_children(self) -> None:
        """Servers a crashed vnetd left for networks that are not running (their start was
        cut short, or they were stopped): only the processes that the records next to their
        pid files name, in directories only root writes, never found by command line
        (backends/supervisor.py); pid files and records go too."""
        run = self.store.runtime_dir
        for d in run.iterdir():
            if d.is_dir() and not d.is_symlink() and d.name not in self.running:
                for pidfile in ("dnsmasq.pid", "dhcpd.pid"):  # dnsmasq, dhcpd
                    await reap(d / pidfile)
        for net in self.defs.values():
            if net.name not in self.running:
                for tap in net.tap_names:
                    await reap(self.vde.pidfile(tap))

    async def _remove_unwanted(self, lk: Link) -> None:
        log.info("reconcile: removing %s (alias %s): no definition wants it", lk.ifname, lk.alias)
        await self.links.delete(lk.index)

    async def _ensure_running(self, net: Network, bridge: Link) -> None:
        """Make an adopted network match its definition (idempotent)."""
        if net.overlay is not None:
            net = await self._ensure_overlay(net, bridge)
        if bridge.mtu != net.mtu and net.mode != "bridged":
            await self.links.set(bridge.index, mtu=net.mtu)
        if net.mode == "bridged":  # finish a move a crash may have cut short
            try:
                record = json.loads(self._uplink_record_path(net).read_text())
            except (OSError, ValueError):
                raise Failed(f"There is no record of what {net.uplink} had.") from None
            nic = await self.links.get(record["nic"])
            if nic is None:
                raise NotFound(f"The bridged interface {record['nic']} is gone.")
            if nic.master != bridge.index:
                await self.links.set(nic.index, master=bridge.index)
            await self.links.move_addresses(record["addresses"], nic.index, bridge.index)
            await self.links.add_routes(record["routes"], bridge.index)
        for want in self._gateway_ifaces(net):  # one that is there already is no error: no
            await self.links.add_address(bridge.index, want)  # dump of every address first
        gid = self._tap_gid(net) if net.taps else None
        for tname in net.tap_names:
            lk = await self.links.get(tname)
            if lk is None:
                await self._make_tap(net, tname, bridge.index, gid, Rollback())
            elif lk.master != bridge.index or not lk.up:
                await self.links.set(lk.index, master=bridge.index, state="up")
        if not bridge.up:
            await self.links.up(bridge.index)

    # --- queries ------------------------------------------------------------------------
    def get(self, name: str) -> Network:
        model.validate_network_name(name)
        net = self.defs.get(name)
        if net is None:
            raise NotFound(f"There is no network named '{name}'. 'vnet-client list' shows them.")
        return net

    def summary(self, net: Network) -> dict[str, Any]:
        d = net.to_dict()
        d["mtu"] = net.mtu
        d["owner"] = net.owner
        d["state"] = "running" if net.name in self.running else "stopped"
        d["gateway"] = str(net.gateway)
        if net.gateway6:
            d["gateway6"] = str(net.gateway6)
        d["bridge"] = net.bridge
        d["tap-names"] = net.tap_names
        return d

    def list(self) -> list[dict[str, Any]]:
        return [self.summary(n) for _, n in sorted(self.defs.items())]

    async def show(self, name: str) -> dict[str, Any]:
        net = self.get(name)
        d = self.summary(net)
        if net.name in self.running:
            lk = await self.links.get(net.bridge)
            if lk is not None:
                d["ifindex"] = lk.index
                d["mac"] = lk.address
                d["addresses"] = [str(a) for a in await self.links.addresses(lk.index)]
            d["servers"] = self.dhcp.status(net.name)
            if net.vde:
                d["vde"] = await asyncio.to_thread(self.vde.status, net)
            counters = await self.firewall.spoof_counters()
            d["ports"] = [{"ifname": p.ifname, "vm": p.vm, "nic": p.nic,
                           "mac": p.mac if p.mac_known else "(learning)", "uid": p.uid,
                           "spoof-drops": counters.get(p.ifname, {}).get("packets", 0)}
                          for p in sorted(self.ports.on_network(net.name),
                                          key=lambda p: p.ifname)]
            if net.overlay is not None:
                d["overlay-state"] = await self._overlay_state(net)
            warnings = await asyncio.to_thread(self.firewall.warnings)
            if warnings:
                d["firewall-warnings"] = warnings
        d["dhcp-range"] = [str(a) for a in net.dhcp_range]
        d["domain"] = net.dns_domain
        return d

    # --- definitions --------------------------------------------------------------------
    async def check_new_name(self, name: str) -> None:
        """Refuse a name already defined or taken by an interface vnetd did not make."""
        if name in self.defs:
            raise Exists(f"A network named '{name}' is already defined.")
        if await self.links.get(name) is not None:
            raise Exists(
                f"An interface named '{name}' already exists on this host and was not "
                "made by qemu-vnet; choose another network name."
            )

    async def define(self, net: Network, uid: int = 0, dry_run: bool = False) -> Network:
        """Define a network owned by `uid` (its inline forwards too), within uid's limits;
        with `dry_run`, only check all that and change nothing."""
        net = net.with_changes(owner=uid, forwards=tuple(
            dataclasses.replace(f, owner=uid) for f in net.forwards))
        async with self.lock:
            await self.check_new_name(net.name)
            self._check_network_quota(uid)
            self._check_forward_quota(uid, len(net.forwards))
            for tname in net.tap_names:
                if await self.links.get(tname) is not None:
                    raise Exists(f"An interface named '{tname}' already exists on this host.")
            await self._check_subnets(net)
            self._check_vni(net)
            for f in net.forwards:
                clash = self.fwd_index.clash(f)
                if clash is not None:
                    raise Exists(f"{f.proto} {f.external} is already forwarded to "
                                 f"'{clash[1].target}' ({clash[1].describe()}) on network "
                                 f"'{clash[0]}'.")
            if dry_run:
                return net
            self.store.save(net)
            try:
                for f in net.forwards:  # kept one per file, as AddForward keeps them
                    self.store.save_forward(net.name, f)
            except OSError:
                self.store.delete(net.name)
                raise
            self.defs[net.name] = net
            for f in net.forwards:
                self.fwd_index.add(net.name, f)
        self._changed(net.name, "defined")
        return net

    def _check_vni(self, net: Network) -> None:
        if net.overlay is None:
            return
        for other in self.defs.values():
            if other.name != net.name and other.overlay and other.overlay.vni == net.overlay.vni:
                raise Exists(f"The VNI {net.overlay.vni} already belongs to network "
                             f"'{other.name}' on this host: one network per VNI.")

    def _check_network_quota(self, uid: int) -> None:
        if uid == 0:
            return
        owned = sum(1 for n in self.defs.values() if n.owner == uid)
        if owned >= self.max_networks_per_user:
            raise QuotaExceeded(
                f"{_who(uid)} already owns {owned} networks and the limit is "
                f"{self.max_networks_per_user} per user: undefine one first, or ask the "
                "administrator to raise vnetd's --max-networks-per-user.")

    def _check_forward_quota(self, uid: int, adding: int = 1) -> None:
        if uid == 0 or not adding:
            return
        owned = self.fwd_index.owned_by(uid)
        if owned + adding > self.max_forwards_per_user:
            more = f" and would add {adding}" if adding > 1 else ""
            raise QuotaExceeded(
                f"{_who(uid)} already owns {owned} port forwards{more}, and the limit is "
                f"{self.max_forwards_per_user} per user: remove one first (vnet-client "
                "forward remove), or ask the administrator to raise vnetd's "
                "--max-forwards-per-user.")

    async def _check_subnets(self, net: Network, ignore: str | None = None) -> None:
        for other in self.defs.values():
            if other.name in (net.name, ignore):
                continue
            for a, b in ((net.subnet, other.subnet), (net.subnet6, other.subnet6)):
                if a is not None and b is not None and model.overlapping(a, b):
                    raise InvalidArgument(
                        f"The subnet {a} overlaps {b} of network '{other.name}'."
                    )
        ours = {n for n in self.running}
        for index, iface in await self.links.all_addresses():
            for mine in (net.subnet, net.subnet6):
                if mine is None or iface.version != mine.version or iface.is_loopback:
                    continue
                if iface.network.overlaps(mine) and not iface.ip.is_link_local:
                    lk = await self.links.get(index=index)
                    if lk is not None and model.network_of_alias(lk.alias) in ours:
                        continue
                    raise InvalidArgument(
                        f"The subnet {mine} overlaps {iface} already on interface "
                        f"'{lk.ifname if lk else index}' of this host."
                    )

    async def undefine(self, name: str) -> None:
        async with self.lock:
            self.get(name)
            if name in self.running:
                raise Busy(f"The network '{name}' is running: stop it first.")
            self.store.delete(name)
            for f in self.defs[name].forwards:
                self.fwd_index.remove(name, f)
            del self.defs[name]
            self.dhcp.forget(name)  # its runtime and state directories, old leases too
        self._changed(name, "undefined")

    async def set_autostart(self, name: str, enabled: bool) -> Network:
        async with self.lock:
            net = self.get(name).with_changes(autostart=bool(enabled))
            self.store.save(net)
            self.defs[name] = net
        return net

    async def reload(self) -> list[str]:
        """Re-read the definition files an admin may have edited by hand."""
        async with self.lock:
            defs, problems = self.store.load_all()
            for name in list(self.defs):
                if name not in defs and name in self.running:
                    problems.append(f"{name}: its file is gone but it is running: kept until stopped.")
                    defs[name] = self.defs[name]
            changed = [n for n in defs if not _same(self.defs.get(n), defs[n])]
            for name in changed:
                old = self.defs.get(name)
                if name in self.running and old is not None and _overlay_moved(old, defs[name]):
                    problems.append(f"{name}: its overlay settings (other than peers) changed "
                                    "while it runs: stop and start it to apply them.")
                    defs[name] = defs[name].with_changes(overlay=old.overlay)
            self.defs = defs
            self.problems = problems
            self._index_forwards()
            for name in changed:
                if name in self.running:
                    lk = await self.links.get(name)
                    if lk is not None:
                        try:
                            await self._ensure_running(defs[name], lk)
                        except VnetError as e:
                            problems.append(f"{name}: {e.message}")
                            continue
                        await self.dhcp.stop(name)
                        await self.dhcp.start(self.defs[name])
            await self._apply_evpn("reload")  # also gives back what an FRR restart lost
            await self.firewall.sync_all()  # also re-checks a DOCKER-USER chain
        for name in changed:
            self._changed(name, "reloaded")
        return problems

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self, name: str) -> None:
        async with self.lock:
            net = self.get(name)
            if name in self.running:
                raise Busy(f"The network '{name}' is already running.")
            await self._start(net)
        self._changed(name, "running")

    def _gateway_ifaces(self, net: Network) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        if net.mode == "bridged":
            return []  # the bridge carries the NIC's own addresses
        if net.overlay is not None and net.overlay.is_member:
            return []  # the gateway host holds the gateway address
        out: list[Any] = [ipaddress.ip_interface(f"{net.gateway}/{net.subnet.prefixlen}")]
        if net.subnet6 is not None:
            out.append(ipaddress.ip_interface(f"{net.gateway6}/{net.subnet6.prefixlen}"))
        return out

    def _tap_gid(self, net: Network) -> int:
        try:
            return grp.getgrnam(net.tap_group).gr_gid
        except KeyError:
            raise InvalidArgument(
                f"The group '{net.tap_group}' for the taps of '{net.name}' does not exist on this "
                "host (make install creates group 'vnet')."
            ) from None

    async def _make_tap(self, net: Network, tname: str, master: int, gid: int | None,
                        rb: Rollback) -> None:
        with self.store.intent(tname):
            try:
                await asyncio.to_thread(tapdev.make_persistent_tap, tname, net.tap_user, gid)
            except OSError as e:
                raise Failed(f"Could not create tap '{tname}': {e.strerror}.") from None
            index = socket.if_nametoindex(tname)
            rb.add(f"delete tap {tname}", lambda idx=index: self.links.delete(idx))
            self.links.fast.set(index, alias=model.alias_for(net.name), master=master,
                                mtu=net.mtu)

    async def _start(self, net: Network) -> None:
        existing = await self.links.get(net.bridge)
        if existing is not None:
            raise Exists(f"An interface named '{net.bridge}' already exists and was not made "
                         "by qemu-vnet for this network.")
        if net.mode == "bridged":
            return await self._start_bridged(net)
        await self._check_subnets(net)
        underlay = None
        if net.overlay is not None:
            underlay, net = await self._underlay(net)
            self.defs[net.name] = net
        gid = self._tap_gid(net) if net.taps else None
        rb = Rollback()
        try:
            with self.store.intent(net.bridge):
                br = await self.links.create_bridge(net.bridge, net.mac, net.mtu,
                                                    model.alias_for(net.name))
            rb.add(f"delete bridge {net.bridge}", lambda: self.links.delete(br.index))
            if net.subnet6 is not None:
                # the gateway owns its prefix: no SLAAC from its own router advertisements
                self.links.sysctl_ipv6(net.bridge, accept_ra=0, autoconf=0)
            for iface in self._gateway_ifaces(net):
                await self.links.add_address(br.index, iface)
            for tname in net.tap_names:
                if await self.links.get(tname) is not None:
                    raise Exists(f"An interface named '{tname}' already exists on this host.")
                await self._make_tap(net, tname, br.index, gid, rb)
            if net.overlay is not None:
                await self._start_overlay(net, br.index, underlay, rb)
            await self.links.up(br.index)
            await self.vde.start(net)
            await self.dhcp.start(net)
            self._guard_taps(net)
            self.running.add(net.name)
            await self.firewall.sync_all()
        except BaseException:
            self.running.discard(net.name)
            for p in self.ports.on_network(net.name):
                self.ports.forget(p)
            await self.dhcp.stop(net.name)
            await self.vde.stop(net)
            await rb.run()
            raise

    # --- VXLAN overlay ------------------------------------------------------------------
    async def _underlay(self, net: Network) -> tuple[Link, Network]:
        """The interface the overlay leaves through (it must hold `local`), and the network
        with its MTU: the underlay's minus VXLAN's overhead unless the definition says."""
        ov = net.overlay
        holder = await self.links.link_of_address(str(ov.local))
        if holder is None:
            raise InvalidArgument(
                f"The overlay's local address {ov.local} is not an address of this host: "
                "give this host's own underlay address.")
        dev = holder
        if ov.dev is not None:
            dev = await self.links.get(ov.dev)
            if dev is None:
                raise NotFound(f"The underlay interface '{ov.dev}' (overlay dev) does not "
                               "exist on this host.")
            if dev.index != holder.index:
                raise InvalidArgument(f"The local address {ov.local} is on '{holder.ifname}', "
                                      f"not on the underlay interface '{ov.dev}'.")
        if not dev.up:
            raise InvalidArgument(f"The underlay interface '{dev.ifname}' is down: the "
                                  "overlay's peers cannot be reached through it.")
        if net.mtu_auto:
            mtu = min(dev.mtu - ov.overhead, model.MAX_MTU)
            if mtu < model.MIN_MTU:
                raise InvalidArgument(f"The underlay '{dev.ifname}' has MTU {dev.mtu}: too "
                                      f"small to carry VXLAN ({ov.overhead} bytes overhead).")
            net = net.with_changes(mtu=mtu)
        return dev, net

    async def _start_overlay(self, net: Network, bridge: int, dev: Link, rb: Rollback) -> None:
        vx = await self._create_vx(net, dev)
        rb.add(f"delete {net.overlay.ifname}", lambda: self.links.delete(vx.index))
        await self._overlay_plumbing(net, bridge, vx)
        if net.overlay.control == "evpn":
            rb.add("withdraw from FRR",
                   lambda: self.evpn.apply(self._evpn_networks(gone=net.name)))
            await self.evpn.apply(self._evpn_networks(net))

    async def _create_vx(self, net: Network, dev: Link) -> Link:
        ov = net.overlay
        taken = await self.links.get(ov.ifname)
        if taken is not None:
            owner = model.network_of_alias(taken.alias)
            raise Exists(f"An interface named '{ov.ifname}' already exists on this host, so "
                         f"VNI {ov.vni} is taken" + (f" (by network '{owner}')." if owner else
                                                      " (not by qemu-vnet)."))
        with self.store.intent(ov.ifname):
            return await self.links.create_vxlan(
                ov.ifname, ov.vni, str(ov.local), ov.port,
                dev.index if ov.dev is not None else None, learning=ov.control == "static",
                mtu=net.mtu, alias=model.alias_for(net.name))

    async def _ensure_overlay(self, net: Network, bridge: Link) -> Network:
        """An adopted overlay network (vnetd restart, reload): kept running through passing
        trouble (underlay not up yet, FRR restarting), which is reported, not punished by
        tearing the guests' LAN down. A missing VXLAN device is made again."""
        try:
            dev, net = await self._underlay(net)
        except VnetError as e:
            dev = None
            self.problems.append(f"{net.name}: {e.message} (the network keeps running)")
            log.error("overlay %s: %s", net.name, e.message)
            if net.mtu_auto:
                net = net.with_changes(mtu=bridge.mtu)
        self.defs[net.name] = net
        vx = await self.links.get(net.overlay.ifname)
        if vx is None:
            if dev is None:
                raise NotFound(f"The VXLAN device {net.overlay.ifname} is gone and cannot be "
                               "made again without its underlay.")
            vx = await self._create_vx(net, dev)
        await self._overlay_plumbing(net, bridge.index, vx)
        return net

    async def _overlay_plumbing(self, net: Network, bridge: int, vx: Link) -> None:
        """Idempotent: the VXLAN port on the bridge, its flags, and (static) the flood list,
        exactly the peers: entries for hosts no longer listed are removed."""
        ov = net.overlay
        await self.links.set(vx.index, master=bridge, mtu=net.mtu, state="up")
        await self.links.vxlan_port_flags(vx.index, evpn=ov.control == "evpn")
        if ov.control == "static":
            want = {str(p) for p in ov.peers}
            for e in await self.links.fdb(vx.index):
                if e["mac"] == "00:00:00:00:00:00" and e["dst"] not in want:
                    await self.links.flood_to(vx.index, e["dst"], add=False)
                    await self.links.forget_remote(vx.index, e["dst"])
            for peer in sorted(want):
                await self.links.flood_to(vx.index, peer)

    async def _apply_evpn(self, why: str) -> None:
        """FRR gets the fragment for the running EVPN networks (after reconcile, on reload):
        trouble is reported, and the networks keep running."""
        try:
            await self.evpn.apply(self._evpn_networks())
        except VnetError as e:
            self.problems.append(f"evpn ({why}): {e.message}")
            log.error("evpn (%s): %s", why, e.message)

    def _evpn_networks(self, changed: Network | None = None, gone: str | None = None
                       ) -> list[Network]:
        nets = {n: self.defs[n] for n in self.running if n in self.defs}
        if changed is not None:
            nets[changed.name] = changed
        nets.pop(gone or "", None)
        return [n for _, n in sorted(nets.items())
                if n.overlay is not None and n.overlay.control == "evpn"]

    async def _overlay_state(self, net: Network) -> dict[str, Any]:
        ov = net.overlay
        d: dict[str, Any] = {"device": ov.ifname, "mtu": net.mtu,
                             "mtu-source": "underlay minus VXLAN overhead" if net.mtu_auto
                             else "definition"}
        vx = await self.links.get(ov.ifname)
        if vx is not None:
            d["fdb"] = await self.links.fdb(vx.index)
            d["underlay-mtu"] = net.mtu + ov.overhead if net.mtu_auto else None
        if ov.control == "evpn":
            d["evpn"] = await self.evpn.status()
        return {k: v for k, v in d.items() if v is not None}

    async def set_peer(self, network: str, address: str, add: bool) -> Network:
        """Add or remove an overlay peer, live: the flood entry (static) or the BGP
        neighbour (evpn), the VXLAN filter and the stored definition change together, or
        nothing does."""
        async with self.lock:
            net = self.get(network)
            if net.overlay is None:
                raise InvalidArgument(f"The network '{network}' has no overlay: define it with "
                                      "--vni, --local and --peer.")
            peer = overlay_mod.parse_address(address, "peer address")
            ov = net.overlay.with_peer(peer) if add else net.overlay.without_peer(peer)
            new = net.with_changes(overlay=ov)
            running = network in self.running
            vx = await self.links.get(ov.ifname) if running else None

            async def kernel(n: Network, adding: bool) -> None:
                if vx is None:
                    return
                if ov.control == "static":
                    await self.links.flood_to(vx.index, str(peer), add=adding)
                else:
                    await self.evpn.apply(self._evpn_networks(n))

            await kernel(new, add)
            try:
                self.defs[network] = new
                if running:
                    await self.firewall.sync_all()  # the VNI takes only the peers
                self.store.save(new)
            except BaseException:
                self.defs[network] = net
                await kernel(net, not add)
                if running:
                    await self.firewall.sync_all()
                raise
            if vx is not None and ov.control == "static" and not add:
                try:  # tidying: the MACs learned behind the removed host
                    await self.links.forget_remote(vx.index, str(peer))
                except VnetError as e:
                    log.warning("overlay %s: %s", network, e.message)
        self._changed(network, "peers")
        return new

    async def _teardown_bridged(self, net: Network) -> None:
        await self.vde.stop(net)
        await self._remove_links(net)
        path = self._uplink_record_path(net)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = None
            log.error("bridged %s: no record of %s's addresses; nothing to give back",
                      net.name, net.uplink)
        if record is not None:
            await self._restore_uplink(record)()
            path.unlink(missing_ok=True)
        was_running = net.name in self.running
        self.running.discard(net.name)
        if was_running:
            await self.firewall.sync_all()  # its ports' guards go
        log.info("bridged %s: %s has its addresses and routes back", net.name, net.uplink)

    async def stop(self, name: str) -> None:
        async with self.lock:
            net = self.get(name)
            if name not in self.running:
                raise Busy(f"The network '{name}' is not running.")
            await self._teardown(net)
        self._changed(name, "stopped")

    # --- bridged mode -------------------------------------------------------------------
    def _uplink_record_path(self, net: Network):
        return self.store.runtime_dir / f"bridged-{net.name}.json"

    async def _start_bridged(self, net: Network) -> None:
        """Enslave the physical NIC; its addresses and routes move to the bridge (which takes
        the NIC's MAC, so upstream DHCP and ARP keep working) and move back exactly on stop.
        What the NIC had is written down first, so a restarted vnetd can still put it back."""
        nic = await self.links.get(net.uplink)
        if nic is None:
            raise NotFound(f"There is no interface named '{net.uplink}' to bridge.")
        if nic.master is not None:
            master = await self.links.get(index=nic.master)
            raise Busy(f"'{net.uplink}' is already in bridge "
                       f"'{master.ifname if master else nic.master}'; take it out first.")
        if nic.kind in ("bridge", "tun") or model.network_of_alias(nic.alias):
            raise InvalidArgument(f"'{net.uplink}' is not a physical NIC (it is a "
                                  f"{nic.kind or 'virtual'} interface).")
        sysfs = f"/sys/class/net/{net.uplink}"
        if os.path.exists(f"{sysfs}/wireless") or os.path.exists(f"{sysfs}/phy80211"):
            raise InvalidArgument(f"'{net.uplink}' is a wireless NIC: Wi-Fi cannot be put in "
                                  "a bridge (the access point drops other MACs); use a nat "
                                  "network instead.")
        addrs = await self.links.address_records(nic.index)
        routes = await self.links.route_records(nic.index)
        defaults = [r for r in routes if r["dst_len"] == 0]
        if defaults and not net.force:
            raise InvalidArgument(
                f"'{net.uplink}' carries this host's default route: bridging moves its "
                "addresses and routes to the bridge, and a mistake would cut the host off. "
                "Define the network with --force if you mean it.")
        record = {"nic": net.uplink, "up": nic.up, "mtu": nic.mtu, "addresses": addrs,
                  "routes": routes}
        path = self._uplink_record_path(net)
        self.store.write_runtime_file(path, json.dumps(record).encode())
        rb = Rollback()
        rb.add("forget the uplink record", self._forget_uplink(path))
        try:
            with self.store.intent(net.bridge):
                br = await self.links.create_bridge(net.bridge, nic.address, nic.mtu,
                                                    model.alias_for(net.name))
            rb.add(f"give {net.uplink} back its addresses", self._restore_uplink(record))
            rb.add(f"delete bridge {net.bridge}", lambda: self.links.delete(br.index))
            await self.links.set(nic.index, master=br.index)
            await self.links.up(br.index)
            await self.links.move_addresses(addrs, nic.index, br.index)
            await self.links.add_routes(routes, br.index)
            gid = self._tap_gid(net) if net.taps else None
            for tname in net.tap_names:
                await self._make_tap(net, tname, br.index, gid, rb)
            await self.vde.start(net)
            self._guard_taps(net)
            self.running.add(net.name)
            await self.firewall.sync_all()  # its taps are guarded ports too
        except BaseException:
            self.running.discard(net.name)
            for p in self.ports.on_network(net.name):
                self.ports.forget(p)
            await self.vde.stop(net)
            await rb.run()
            raise
        log.info("bridged %s: %s with %d address(es) and %d route(s) moved to the bridge",
                 net.name, net.uplink, len(addrs), len(routes))

    def _forget_uplink(self, path):
        async def forget() -> None:
            path.unlink(missing_ok=True)
        return forget

    def _restore_uplink(self, record: dict):
        async def restore() -> None:
            nic = await self.links.get(record["nic"])
            if nic is None:
                log.error("bridged: %s is gone; cannot give its addresses back", record["nic"])
                return
            if nic.master is not None:
                await self.links.set(nic.index, master=0)
            await self.links.move_addresses(record["addresses"], None, nic.index)
            await self.links.add_routes(record["routes"], nic.index)
            if record["up"] and not nic.up:
                await self.links.up(nic.index)
        return restore

    async def _remove_links(self, net: Network) -> None:
        """The network's ports, pre-created taps and bridge: only those carrying its alias."""
        await self.ports.remove_network_ports(net.name)
        vx = [net.overlay.ifname] if net.overlay is not None else []
        for name in [*net.tap_names, *vx, net.bridge]:
            lk = await self.links.get(name)
            if lk is not None and model.network_of_alias(lk.alias) == net.name:
                await self.links.delete(lk.index)

    async def _teardown(self, net: Network) -> None:
        if net.mode == "bridged":
            return await self._teardown_bridged(net)
        if net.overlay is not None and net.overlay.control == "evpn":
            try:
                await self.evpn.apply(self._evpn_networks(gone=net.name))
            except VnetError as e:  # the network goes anyway; show says what FRR has
                log.error("evpn: %s", e.message)
        await self.dhcp.stop(net.name)
        await self.vde.stop(net)
        await self._remove_links(net)
        was_running = net.name in self.running
        self.running.discard(net.name)
        if was_running:
            await self.firewall.sync_all()

    # --- ports --------------------------------------------------------------------------
    def _running_bridge(self, net: Network) -> int:
        """The running network's bridge ifindex (an ioctl, not a netlink round trip)."""
        if net.name not in self.running:
            raise NotRunning(f"The network '{net.name}' is not running: start it first "
                             f"(vnet-client start {net.name}).")
        try:
            return socket.if_nametoindex(net.bridge)
        except OSError:
            raise NotRunning(f"The bridge of '{net.name}' is gone; restart the network.") from None

    async def attach(self, network: str, vm: str, uid: int, pid: int | None,
                     options: dict[str, Any]) -> tuple[Port, list[int], list[int], dict]:
        net = self.get(network)
        model.validate_vm_name(vm)
        opts = parse_attach_options(options)
        async with self.lock:
            port, fds, vhostfds, info = await self.ports.attach(
                net, self._running_bridge(net), vm, uid, pid, opts)
            if net.spoof_protection:
                try:
                    await self.firewall.port_attached(port)
                except BaseException:
                    for fd in fds + vhostfds:
                        os.close(fd)
                    await self.ports.detach(port)
                    raise
            return port, fds, vhostfds, info

    async def detach(self, port: Port) -> None:
        async with self.lock:
            await self.ports.detach(port)

    async def enslave(self, ifname: str, uid: int, release: bool = False) -> str:
        """vnet-ifup/-ifdown: put a tap the caller owns on (or off) the bridge its name says."""
        model.validate_ifname(ifname, "interface name")
        if "_" not in ifname:
            raise InvalidArgument(
                f"'{ifname}' does not name its network: taps for vnet-ifup are called "
                "<network>_<n>, e.g. vnet2_1.")
        network = ifname.rsplit("_", 1)[0]
        net = self.get(network)
        async with self.lock:
            lk = await self.links.get(ifname)
            if lk is None:
                raise NotFound(f"There is no interface named '{ifname}'.")
            if lk.kind != "tun":
                raise InvalidArgument(f"'{ifname}' is not a tap device.")
            if uid != 0 and lk.tun_owner != uid:
                raise InvalidArgument(f"The tap '{ifname}' does not belong to you (uid {uid}).")
            if release:
                port = self.ports.by_name.get(ifname)
                if lk.master is not None:
                    await self.links.set(lk.index, master=0)
                if port is not None and port.kind == "ifup":
                    self.ports.forget(port)
                    await self.firewall.port_gone(port)
                return net.name
            if uid != 0 and len(self.ports.of_uid(uid)) >= self.ports.max_per_user:
                raise QuotaExceeded(f"You already hold {self.ports.max_per_user} ports, the "
                                    "most one user may; detach some first.")
            bridge = self._running_bridge(net)
            port = self.ports.guard_tap(net, ifname, "ifup", uid, None)
            if port is None:
                raise NotFound(f"There is no interface named '{ifname}'.")
            try:
                if net.spoof_protection:  # guarded before it reaches the bridge
                    await self.firewall.port_attached(port)
                await self.links.set(lk.index, master=bridge, mtu=net.mtu, state="up")
            except BaseException:
                self.ports.forget(port)
                await self.firewall.port_gone(port)
                raise
            return net.name

    def get_mac(self, network: str, vm: str, nic: int, uid: int = 0) -> str:
        self.get(network)
        return self.macs.get(network, vm, nic, uid)

    def export_macs(self, network: str) -> dict[str, str]:
        self.get(network)
        return self.macs.export(network)

    def import_macs(self, network: str, entries: dict[str, str]) -> int:
        self.get(network)
        return self.macs.import_macs(network, entries)

    async def forget_mac(self, network: str, vm: str) -> int:
        """Drop a VM's MACs on a network (defined or not: an undefined network's MACs stay
        remembered until forgotten), unless one of its NICs is attached there now."""
        model.validate_network_name(network)
        model.validate_vm_name(vm)
        async with self.lock:  # attach gives out MACs under it
            self._refuse_attached(network, vm)
            return self.macs.forget(network, vm)

    def _refuse_attached(self, network: str, vm: str) -> None:
        held = sorted(p.ifname for p in self.ports.on_network(network) if p.vm == vm)
        if held:
            raise Busy(f"VM '{vm}' is attached to {network} now (port "
                       f"{', '.join(held)}): detach it (or stop the VM) first.")

    async def transfer_vm(self, network: str, vm: str, uid: int) -> int | None:
        """Give a VM name on a network (and its MACs) to another uid; the uid that had it.
        Refused while a NIC of the VM is attached there (the port belongs to its holder)."""
        model.validate_network_name(network)
        model.validate_vm_name(vm)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            raise InvalidArgument(f"There is no user with uid {uid} on this host.") from None
        async with self.lock:  # attach checks owners under it
            self._refuse_attached(network, vm)
            return self.macs.transfer(network, vm, uid)

    # --- static hosts and leases --------------------------------------------------------
    async def add_host(self, network: str, vm: str, options: dict[str, Any]) -> model.StaticHost:
        unknown = sorted(model._printable(k) for k in options if k not in ("ip", "mac"))
        if unknown:
            raise InvalidArgument(f"Unknown host option(s): {', '.join(unknown)}. Known: ip, mac.")
        async with self.lock:
            net = self.get(network)
            model.validate_vm_name(vm)
            model.validate_hostname(vm)
            if net.host(vm) is not None:
                raise Exists(f"VM '{vm}' already has a static host on {network} "
                             f"({net.host(vm).ip}); remove it first.")
            if options.get("mac") is not None:
                mac = model.validate_mac(options["mac"])
            else:
                mac = self.macs.lookup(network, vm, 0)
                if mac is None:
                    raise InvalidArgument(f"VM '{vm}' has no MAC on {network} yet: give --mac "
                                          "(or attach it once, or 'vnet-client mac').")
            if options.get("ip") is not None:
                ip = model.parse_ip4(options["ip"], "address")
                model.check_host_ip(net.subnet, ip)
            else:
                ip = self._free_static_ip(net)
            for h in net.hosts:
                if h.ip == ip:
                    raise Exists(f"The address {ip} is already given to '{h.vm}' on {network}.")
                if h.mac == mac:
                    raise Exists(f"The MAC {mac} is already given to '{h.vm}' on {network}.")
            host = model.StaticHost(vm=vm, mac=mac, ip=ip)
            new = net.with_changes(hosts=(*net.hosts, host))
            self.store.save(new)
            self.defs[network] = new
            await self.dhcp.apply_hosts(new)
            await self.firewall.leases_changed(network)
        return host

    def _free_static_ip(self, net: Network):
        used = {h.ip for h in net.hosts} | {net.gateway}
        start, _ = net.dhcp_range
        ip = net.subnet.network_address + 2
        while ip < start and ip < net.subnet.broadcast_address:
            if ip not in used:
                return ip
            ip += 1
        raise InvalidArgument(f"No free static address left in {net.subnet.network_address + 2}-"
                              f"{start - 1} on {net.name}: give --ip.")

    async def remove_host(self, network: str, vm: str) -> None:
        async with self.lock:
            net = self.get(network)
            model.validate_vm_name(vm)
            if net.host(vm) is None:
                raise NotFound(f"VM '{vm}' has no static host on {network}.")
            new = net.with_changes(hosts=tuple(h for h in net.hosts if h.vm != vm))
            self.store.save(new)
            self.defs[network] = new
            await self.dhcp.apply_hosts(new)
            await self.firewall.leases_changed(network)

    def leases(self, network: str) -> list[dict[str, Any]]:
        net = self.get(network)
        by_mac = {p.mac: p for p in self.ports.on_network(network)}
        statics = {h.mac: h for h in net.hosts}
        out = []
        for le in self.dhcp.leases(net):
            d: dict[str, Any] = {"mac": le.mac, "ip": le.ip, "hostname": le.hostname,
                                 "expiry": le.expiry}
            port = by_mac.get(le.mac)
            if port is not None:
                d["vm"], d["port"] = port.vm, port.ifname
            elif le.mac in statics:
                d["vm"] = statics[le.mac].vm
            else:
                owner = self.macs.owner_of(network, le.mac)
                if owner:
                    d["vm"] = split_key(owner)[0]
            out.append(d)
        return sorted(out, key=lambda d: tuple(int(x) for x in d["ip"].split(".")))

    # --- port forwarding ----------------------------------------------------------------
    def _index_forwards(self) -> None:
        self.fwd_index = model.ForwardIndex()
        for net in self.defs.values():
            for f in net.forwards:
                self.fwd_index.add(net.name, f)

    async def add_forward(self, network: str, spec: dict[str, Any],
                          uid: int = 0) -> model.Forward:
        """Add a forward owned by `uid`, within uid's limit."""
        async with self.lock:
            net = self.get(network)
            if net.overlay is not None and net.overlay.is_member:
                raise InvalidArgument(f"'{network}' is a member of an overlay here: port "
                                      "forwards live on the overlay's gateway host.")
            fwd = dataclasses.replace(
                model.parse_forward(net, model.expand_forward_words(spec)), owner=uid)
            self._check_forward_quota(uid)
            if not self._knows_vm(net, fwd.target):
                raise InvalidArgument(
                    f"'{fwd.target}' is neither an address nor a known VM on {network} (an "
                    "unknown VM name): give it a static host or attach it once first.")
            clash = self.fwd_index.clash(fwd)
            if clash is not None:
                owner, other = clash
                raise Exists(f"{fwd.proto} {fwd.external} is already forwarded to "
                             f"'{other.target}' ({other.describe()}) on network '{owner}'.")
            new = net.with_changes(forwards=(*net.forwards, fwd))
            if net.name in self.running:
                await self.firewall.forward_added(new, fwd)
            try:
                self.store.save_forward(network, fwd)
            except OSError:
                if net.name in self.running:
                    await self.firewall.forward_removed(new, fwd)
                raise
            self.defs[network] = new
            self.fwd_index.add(network, fwd)
        return fwd

    async def remove_forward(self, network: str, spec: dict[str, Any]) -> model.Forward:
        """Remove the forward of PROTO [EXT_ADDR:]PORT[-PORT] (family from spec)."""
        async with self.lock:
            net = self.get(network)
            spec = model.expand_forward_words(spec)
            probe = model.parse_forward(net, {**spec, "target": spec.get("target") or "x",
                                              "target-port": spec.get("target-port", 1)})
            match = self.fwd_index.find(network, probe.proto, probe.family, probe.port_lo,
                                        probe.port_hi, probe.ext_addr)
            if match is None:
                raise NotFound(f"There is no forward of {probe.proto} {probe.external} on "
                               f"{network}. 'vnet-client forward list {network}' shows them.")
            if net.name in self.running:
                await self.firewall.forward_removed(net, match)
            self.store.delete_forward(network, match)
            self.defs[network] = net.with_changes(
                forwards=tuple(f for f in net.forwards if f is not match))
            self.fwd_index.remove(network, match)
        return match

    def _knows_vm(self, net: Network, target: str) -> bool:
        try:
            ipaddress.ip_address(target)
            return True
        except ValueError:
            pass
        if net.host(target) is not None:
            return True
        if any(split_key(k)[0] == target for k in self.macs.data.get(net.name, {})):
            return True
        return any(le.hostname.lower() == target.lower() for le in self.dhcp.leases(net))

    def list_forwards(self, network: str) -> list[dict[str, Any]]:
        net = self.get(network)
        out = []
        for f in net.forwards:
            d = self.forward_info(f)
            d["resolved"] = self.firewall.resolve(net, f) or ""
            out.append(d)
        return out

    @staticmethod
    def forward_info(f: model.Forward) -> dict[str, Any]:
        """A forward as callers see it: its table, with its owner even when that is root."""
        return {**f.to_dict(), "owner": f.owner}

    def vde_socket(self, network: str, vm: str, nic: int, uid: int = 0) -> tuple[str, str]:
        """A VDE switch socket with a free port, and the VM's stable MAC."""
        net = self.get(network)
        if not net.vde:
            raise InvalidArgument(f"The network '{network}' has no VDE switches (define it "
                                  "with --vde).")
        if network not in self.running:
            raise NotRunning(f"The network '{network}' is not running: start it first.")
        return self.vde.free_socket(net), self.get_mac(network, vm, nic, uid)
