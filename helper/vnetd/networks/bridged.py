"""Bridged networks: a physical NIC joins vnetd's bridge, and its addresses and routes move to
the bridge (which takes the NIC's MAC, so upstream DHCP and ARP keep working) and move back
exactly on stop. What the NIC had is written down first, so a restarted vnetd can still put
it back."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import model
from ..errors import Busy, Failed, InvalidArgument, NotFound
from ..model import Network
from .base import Context, Rollback, Running

if TYPE_CHECKING:
    from ..kernel.links import Link

log = logging.getLogger("vnetd")


def record_path(ctx: Context, net: Network) -> Path:
    return ctx.store.runtime_dir / f"bridged-{net.name}.json"


def _carries_default(routes: list[dict]) -> bool:
    return any(r["dst_len"] == 0 for r in routes)


def _refuse_default(net: Network) -> None:
    raise InvalidArgument(
        f"'{net.uplink}' carries this host's default route: bridging moves its addresses "
        "and routes to the bridge, and a mistake would cut the host off. Define the network "
        "with --force if you mean it.")


class BridgedDriver:
    modes: tuple[str, ...] = ("bridged",)

    async def _nic(self, ctx: Context, net: Network) -> Link:
        """The NIC to bridge, if it can be: present, free, physical, wired."""
        nic = await ctx.links.get(net.uplink)
        if nic is None:
            raise NotFound(f"There is no interface named '{net.uplink}' to bridge.")
        if nic.master is not None:
            master = await ctx.links.get(index=nic.master)
            raise Busy(f"'{net.uplink}' is already in bridge "
                       f"'{master.ifname if master else nic.master}'; take it out first.")
        self._bridgeable(net, nic)
        return nic

    @staticmethod
    def _bridgeable(net: Network, nic: Link) -> None:
        if nic.kind in ("bridge", "tun") or model.network_of_alias(nic.alias):
            raise InvalidArgument(f"'{net.uplink}' is not a physical NIC (it is a "
                                  f"{nic.kind or 'virtual'} interface).")
        sysfs = f"/sys/class/net/{net.uplink}"
        if os.path.exists(f"{sysfs}/wireless") or os.path.exists(f"{sysfs}/phy80211"):
            raise InvalidArgument(f"'{net.uplink}' is a wireless NIC: Wi-Fi cannot be put in "
                                  "a bridge (the access point drops other MACs); use a nat "
                                  "network instead.")

    async def verify(self, ctx: Context, net: Network) -> None:
        """At define time, what can already be known: a NIC that is there must be one that
        can be bridged, and one that carries the default route needs --force. (A NIC that is
        not there yet, a USB one say, or one still in another bridge, is checked at start.)"""
        nic = await ctx.links.get(net.uplink)
        if nic is None:
            return
        self._bridgeable(net, nic)
        if not net.force and _carries_default(await ctx.links.route_records(nic.index)):
            _refuse_default(net)

    async def start(self, ctx: Context, net: Network, rb: Rollback) -> Running:
        nic = await self._nic(ctx, net)
        if nic.address is None:  # the bridge takes the NIC's MAC
            raise InvalidArgument(f"'{net.uplink}' has no MAC address: it cannot be bridged.")
        addrs = await ctx.links.address_records(nic.index)
        routes = await ctx.links.route_records(nic.index)
        if _carries_default(routes) and not net.force:
            _refuse_default(net)
        record = {"nic": net.uplink, "up": nic.up, "mtu": nic.mtu, "addresses": addrs,
                  "routes": routes}
        path = record_path(ctx, net)
        ctx.store.write_runtime_file(path, json.dumps(record).encode())

        async def forget() -> None:
            path.unlink(missing_ok=True)

        rb.add("forget the uplink record", forget)
        with ctx.store.intent(net.bridge):
            br = await ctx.links.create_bridge(net.bridge, nic.address, nic.mtu,
                                               model.alias_for(net.name))
        rb.add(f"give {net.uplink} back its addresses", lambda: _restore(ctx, record))
        rb.add(f"delete bridge {net.bridge}", lambda: ctx.links.delete(br.index))
        await ctx.links.set(nic.index, master=br.index)
        await ctx.links.up(br.index)
        await ctx.links.move_addresses(addrs, nic.index, br.index)
        await ctx.links.add_routes(routes, br.index)
        await ctx.make_taps(net, br.index, rb)
        log.info("bridged %s: %s with %d address(es) and %d route(s) moved to the bridge",
                 net.name, net.uplink, len(addrs), len(routes))
        return Running(net, br.index)

    async def adopt(self, ctx: Context, net: Network, bridge: Link) -> Running:
        """Finish a move a crash may have cut short."""
        try:
            record = json.loads(record_path(ctx, net).read_text())
        except (OSError, ValueError):
            raise Failed(f"There is no record of what {net.uplink} had.") from None
        nic = await ctx.links.get(record["nic"])
        if nic is None:
            raise NotFound(f"The bridged interface {record['nic']} is gone.")
        if nic.master != bridge.index:
            await ctx.links.set(nic.index, master=bridge.index)
        await ctx.links.move_addresses(record["addresses"], nic.index, bridge.index)
        await ctx.links.add_routes(record["routes"], bridge.index)
        await ctx.ensure_taps(net, bridge.index)
        if not bridge.up:
            await ctx.links.up(bridge.index)
        return Running(net, bridge.index)

    async def stop(self, ctx: Context, run: Running) -> None:
        net = run.net
        await ctx.remove_links(net)
        path = record_path(ctx, net)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            log.error("bridged %s: no record of %s's addresses; nothing to give back",
                      net.name, net.uplink)
            return
        await _restore(ctx, record)
        path.unlink(missing_ok=True)
        log.info("bridged %s: %s has its addresses and routes back", net.name, net.uplink)

    async def status(self, ctx: Context, run: Running) -> dict[str, Any]:
        return {}


async def _restore(ctx: Context, record: dict) -> None:
    nic = await ctx.links.get(record["nic"])
    if nic is None:
        log.error("bridged: %s is gone; cannot give its addresses back", record["nic"])
        return
    if nic.master is not None:
        await ctx.links.set(nic.index, master=0)
    await ctx.links.move_addresses(record["addresses"], None, nic.index)
    await ctx.links.add_routes(record["routes"], nic.index)
    if record["up"] and not nic.up:
        await ctx.links.up(nic.index)
