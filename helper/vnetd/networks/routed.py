"""Routed networks: `nat` and `host-only`. vnetd's bridge holds the gateway addresses (not on
an overlay's member hosts, whose gateway is on the gateway host), the pre-created taps sit on
it, and an overlay's VXLAN device joins it."""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Any

from .. import model
from ..errors import Failed
from ..kernel.links import bridge_fdb_learned
from ..model import Network
from . import vxlan
from .base import Context, Rollback, Running, gateway_ifaces

if TYPE_CHECKING:
    from ..kernel.links import Link

log = logging.getLogger("vnetd.routed")


# The most source MACs a network's bridge learns (kernel 6.7 on). Without a bound, a guest
# that may send from any MAC (behind a VDE switch's tap, on a network without spoof
# protection) makes the kernel keep an entry for each one it invents, about 128 bytes each
# for five minutes, and tell every forwarding-database listener (vnetd among them) of each.
# Past the bound, frames from a MAC the bridge does not know still pass; it learns nothing
# more until entries age out. 4,096 entries are 512 KiB of kernel memory at most.
FDB_MAX_LEARNED = 4096


def _gateways(net: Network) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    if net.overlay is not None and net.overlay.is_member:
        return []  # the gateway host holds the gateway address
    return gateway_ifaces(net)


class RoutedDriver:
    modes: tuple[str, ...] = ("nat", "host-only")

    async def verify(self, ctx: Context, net: Network) -> None:
        """Nothing of the host to check beyond what the engine checks for every network
        (its subnets against the others and against this host's addresses)."""

    async def start(self, ctx: Context, net: Network, rb: Rollback) -> Running:
        dev: Link | None = None
        if net.overlay is not None:
            dev, net = await vxlan.underlay(ctx, net)
        with ctx.store.intent(net.bridge):
            br = await ctx.links.create_bridge(net.bridge, net.mac, net.mtu,
                                               model.alias_for(net.name),
                                               fdb_max_learned=FDB_MAX_LEARNED)
        rb.add(f"delete bridge {net.bridge}", lambda: ctx.links.delete(br.index))
        if net.subnet6 is not None:
            # the gateway owns its prefix: no SLAAC from its own router advertisements
            ctx.links.sysctl_ipv6(net.bridge, accept_ra=0, autoconf=0)
        else:
            # an IPv4 network: the host has no IPv6 on it (no link-local address for guests
            # to reach, no routes announced to every rtnetlink listener when it comes up);
            # the guests' own IPv6 is bridged all the same
            ctx.links.sysctl_ipv6(net.bridge, disable_ipv6=1)
        await ctx.make_taps(net, br.index, rb)
        if dev is not None:  # the overlay's underlay
            await vxlan.start(ctx, net, br.index, dev, rb)
        await ctx.links.up(br.index)
        # the addresses last, on the bridge that is up: the kernel then announces each
        # address with its routes in one go, and every rtnetlink listener on the host
        # (each network's DHCP server listens for address and route changes) wakes once
        # per network started, not once for the address and again for its routes
        for iface in _gateways(net):
            await ctx.links.add_address(br.index, iface)
        return Running(net, br.index, dev.ifname if dev is not None else None)

    async def adopt(self, ctx: Context, net: Network, bridge: Link) -> Running:
        under = None
        if net.overlay is not None:
            net, under = await vxlan.ensure(ctx, net, bridge)
        if bridge.mtu != net.mtu:
            await ctx.links.set(bridge.index, mtu=net.mtu)
        try:  # (an older vnetd's bridge learned without a bound)
            ctx.links.fast.bridge_fdb_max_learned(bridge.index, FDB_MAX_LEARNED)
        except Failed as e:  # a bound it cannot have is no reason to tear the network down
            log.warning("%s: %s", net.name, e.message)
        if net.subnet6 is None:  # as start leaves it (a bridge an older vnetd made, too)
            ctx.links.sysctl_ipv6(net.bridge, disable_ipv6=1)
        for want in _gateways(net):  # one that is there already is no error: no dump of
            await ctx.links.add_address(bridge.index, want)  # every address first
        await ctx.ensure_taps(net, bridge.index)
        if not bridge.up:
            await ctx.links.up(bridge.index)
        return Running(net, bridge.index, under)

    async def stop(self, ctx: Context, run: Running) -> None:
        net = run.net
        await ctx.remove_links(net, (net.overlay.ifname,) if net.overlay is not None else ())

    async def status(self, ctx: Context, run: Running) -> dict[str, Any]:
        d: dict[str, Any] = {}
        try:
            learned = bridge_fdb_learned(run.bridge)
            d["learned-macs"] = (None if learned is None else
                                 {"count": learned[0], "most": learned[1]})
        except Failed:
            pass  # the bridge is gone: show says what is left without this
        if run.net.overlay is not None:
            d["overlay-state"] = await vxlan.state(ctx, run.net)
        return d
