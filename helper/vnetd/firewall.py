"""The firewall as the engine sees it: what must be in the kernel, and the one transaction
that puts it there.

The ruleset is rendered from the running networks, their forwards (with VM-name targets
resolved through static hosts and current leases) and the ports on them, by the pure
`backends.firewall` renderer, and applied through libnftables in JSON: all or nothing.
Starting and stopping a network re-renders our two tables whole; a forward, a port or a lease
changes only map and set elements, so its cost does not grow with the number of forwards.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .backends import firewall as fw
from .errors import Failed
from .model import Forward, Network

if TYPE_CHECKING:
    from .engine import Engine
    from .ports import Port

log = logging.getLogger("vnetd.firewall")

IPV4_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
IPV6_FORWARD = Path("/proc/sys/net/ipv6/conf/all/forwarding")


class Firewall:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.applied_forwards: dict[tuple[str, Forward], fw.FwForward] = {}
        self.applied_ports: dict[str, fw.FwPort] = {}
        self._nft = None
        # one libnftables context, used from worker threads: one at a time (libnftables is
        # not thread-safe, and its netlink errors can end the whole process)
        self._nft_lock = threading.Lock()
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

    def _apply(self, cmd: dict, what: str) -> None:
        try:
            with self._nft_lock:
                fw.apply(cmd, self.nft)
        except RuntimeError as e:
            raise Failed(f"The firewall refused to {what}; nothing was changed ({e}).") from None

    async def _change(self, what: str, render, *args, **kw) -> None:
        """Render (pure; a ValueError means vnetd asked for something impossible) and apply
        as one transaction, off the event loop."""
        try:
            cmd = render(*args, **kw)
        except ValueError as e:
            raise Failed(f"The firewall cannot {what}: {e}") from None
        await asyncio.to_thread(self._apply, cmd, what)

    def _protects(self, network: str) -> bool:
        net = self.engine.defs.get(network)
        return net is None or net.spoof_protection

    async def spoof_counters(self) -> dict[str, dict[str, int]]:
        try:
            listing = await asyncio.to_thread(self._query, fw.render_counters_query())
        except (RuntimeError, ValueError) as e:
            log.warning("could not read the anti-spoofing counters: %s", e)
            return {}
        return fw.parse_spoof_counters(listing)

    def _query(self, cmd: dict) -> dict:
        with self._nft_lock:
            return fw.query(cmd, self.nft)

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
        try:
            return str(ipaddress.ip_address(f.target))
        except ValueError:
            pass  # a VM name
        host = net.host(f.target)
        if host is not None and f.family == 4:
            return str(host.ip)
        macs = {m for k, m in self.engine.macs.data.get(net.name, {}).items()
                if k.rsplit("/", 1)[0] == f.target}
        for le in self.engine.dhcp.leases(net):
            if le.mac in macs or le.hostname.lower() == f.target.lower():
                if (":" in le.ip) == (f.family == 6):
                    return le.ip
        return None

    def _fw_forward(self, net: Network, f: Forward) -> fw.FwForward | None:
        target = self.resolve(net, f)
        if target is None:
            return None
        return fw.FwForward(network=net.name, proto=f.proto, family=f.family,
                            ext_addr=f.ext_addr, port_lo=f.port_lo, port_hi=f.port_hi,
                            target=target, target_port=f.target_port, iface=f.iface)

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
                            overlay_peers=tuple(str(p) for p in ov.peers) if static else (),
                            overlay_evpn=ov is not None and not static)

    def _fw_port(self, port: Port) -> fw.FwPort:
        net = self.engine.defs.get(port.network)
        ipv4 = None
        if net is not None and port.mac_known:
            static = next((h for h in net.hosts if h.mac == port.mac), None)
            if static is not None:
                ipv4 = str(static.ip)
            else:
                lease = next((le for le in self.engine.dhcp.leases(net) if le.mac == port.mac
                              and ":" not in le.ip), None)
                ipv4 = lease.ip if lease else None
        return fw.FwPort(ifname=port.ifname, network=port.network,
                         mac=port.mac if port.mac_known else None, ipv4=ipv4)

    # --- whole-ruleset changes (network start/stop, start-up) ---------------------------
    async def sync_all(self) -> None:
        running = [self.engine.defs[n] for n in sorted(self.engine.running)
                   if n in self.engine.defs and self.engine.defs[n].mode != "bridged"]
        forwards: dict[tuple[str, Forward], fw.FwForward] = {}
        for net in running:
            for f in net.forwards:
                ff = self._fw_forward(net, f)
                if ff is not None:
                    forwards[(net.name, f)] = ff
        ours = {n.name for n in running}
        ports = {p.ifname: self._fw_port(p) for p in self.engine.ports.by_name.values()
                 if p.network in ours}
        await self._change("load the ruleset", fw.render_ruleset,
                           [self._fw_network(n) for n in running], list(forwards.values()),
                           list(ports.values()))
        self.applied_forwards, self.applied_ports = forwards, ports
        self._forwarding(any(n.mode == "nat" for n in running),
                         any(n.mode == "nat" and n.subnet6 for n in running))
        await asyncio.to_thread(self._docker_user, [n.bridge for n in running])

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
        ff = self._fw_forward(net, f)
        if ff is not None:
            await self._change("add the forward", fw.render_forward_add, ff)
            self.applied_forwards[(net.name, f)] = ff

    async def forward_removed(self, net: Network, f: Forward) -> None:
        ff = self.applied_forwards.get((net.name, f))
        if ff is not None:
            await self._change("remove the forward", fw.render_forward_remove, ff)
            del self.applied_forwards[(net.name, f)]

    async def port_attached(self, port: Port) -> None:
        """A new port, or one whose MAC was just learned."""
        new = self._fw_port(port)
        old = self.applied_ports.get(port.ifname)
        await self._change("protect the port", fw.render_port_update, new, old,
                           spoof_protection=self._protects(port.network))
        self.applied_ports[port.ifname] = new

    async def port_gone(self, port: Port) -> None:
        old = self.applied_ports.pop(port.ifname, None)
        if old is not None:
            try:
                await self._change("forget the port", fw.render_port_remove, old,
                                   spoof_protection=self._protects(port.network))
            except Failed as e:
                log.warning("%s", e.message)

    async def leases_changed(self, network: str) -> None:
        """A lease came, changed or went: re-resolve VM-name forwards and port addresses."""
        net = self.engine.defs.get(network)
        if net is None or network not in self.engine.running:
            return
        for f in net.forwards:
            old = self.applied_forwards.get((network, f))
            new = self._fw_forward(net, f)
            if old == new:
                continue
            cmds: list = []  # remove and add in one transaction: never half moved
            try:
                if old is not None:
                    cmds += fw.render_forward_remove(old)["nftables"]
                if new is not None:
                    cmds += fw.render_forward_add(new)["nftables"]
            except ValueError as e:
                raise Failed(f"The firewall cannot move the forward: {e}") from None
            await asyncio.to_thread(self._apply, {"nftables": cmds}, "move the forward")
            if new is None:
                del self.applied_forwards[(network, f)]
            else:
                self.applied_forwards[(network, f)] = new
                log.info("forward %s now goes to %s", f.describe(), new.target)
        for p in self.engine.ports.on_network(network):
            old_p = self.applied_ports.get(p.ifname)
            new_p = self._fw_port(p)
            if old_p is not None and old_p != new_p:
                await self._change("update the port's addresses", fw.render_port_update, new_p,
                                   old_p, spoof_protection=net.spoof_protection)
                self.applied_ports[p.ifname] = new_p
