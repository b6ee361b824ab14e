"""The VXLAN overlay: a part the routed driver composes. It finds the underlay (the
interface that holds the overlay's local address), makes the VXLAN device on the bridge, and
keeps its flood list (static peers) exactly the definition's. EVPN's BGP side is the EVPN
subsystem's (evpn.py)."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from .. import model
from ..errors import Exists, InvalidArgument, NotFound, VnetError
from ..model import Network
from ..overlay import Overlay
from .base import Context, Rollback

if TYPE_CHECKING:
    from ..kernel.links import Link

log = logging.getLogger("vnetd")


def moved(old: Network, new: Network) -> bool:
    """Overlay settings that need the VXLAN device made again (all but the peers)."""
    a, b = old.overlay, new.overlay
    if a is None or b is None:
        return a is not b
    return dataclasses.replace(a, peers=()) != dataclasses.replace(b, peers=())


def _overlay(net: Network) -> Overlay:
    """The overlay of a network that has one: the functions below are called for those only."""
    ov = net.overlay
    assert ov is not None, f"network {net.name} has no overlay"
    return ov


async def underlay(ctx: Context, net: Network) -> tuple[Link, Network]:
    """The interface the overlay leaves through (it must hold `local`), and the network with
    its MTU in force: the underlay's minus VXLAN's overhead unless the definition says."""
    ov = _overlay(net)
    holder = await ctx.links.link_of_address(str(ov.local))
    if holder is None:
        raise InvalidArgument(
            f"The overlay's local address {ov.local} is not an address of this host: "
            "give this host's own underlay address.")
    dev = holder
    if ov.dev is not None:
        named = await ctx.links.get(ov.dev)
        if named is None:
            raise NotFound(f"The underlay interface '{ov.dev}' (overlay dev) does not "
                           "exist on this host.")
        dev = named
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


async def start(ctx: Context, net: Network, bridge: int, dev: Link, rb: Rollback) -> None:
    vx = await _create(ctx, net, dev)
    rb.add(f"delete {_overlay(net).ifname}", lambda: ctx.links.delete(vx.index))
    await plumb(ctx, net, bridge, vx)


async def _create(ctx: Context, net: Network, dev: Link) -> Link:
    ov = _overlay(net)
    taken = await ctx.links.get(ov.ifname)
    if taken is not None:
        owner = model.network_of_alias(taken.alias)
        raise Exists(f"An interface named '{ov.ifname}' already exists on this host, so "
                     f"VNI {ov.vni} is taken" + (f" (by network '{owner}')." if owner else
                                                  " (not by qemu-vnet)."))
    with ctx.store.intent(ov.ifname):
        return await ctx.links.create_vxlan(
            ov.ifname, ov.vni, str(ov.local), ov.port,
            dev.index if ov.dev is not None else None, learning=ov.control == "static",
            mtu=net.mtu, alias=model.alias_for(net.name))


async def ensure(ctx: Context, net: Network, bridge: Link) -> tuple[Network, str | None]:
    """An adopted overlay network (vnetd restart, reload): kept running through passing
    trouble (underlay not up yet, FRR restarting), which is reported, not punished by tearing
    the guests' LAN down. A missing VXLAN device is made again. The network in force (its
    MTU) and the underlay's name come back."""
    dev: Link | None
    try:
        dev, net = await underlay(ctx, net)
    except VnetError as e:
        dev = None
        ctx.problems.append(f"{net.name}: {e.message} (the network keeps running)")
        log.error("overlay %s: %s", net.name, e.message)
        if net.mtu_auto:
            net = net.with_changes(mtu=bridge.mtu)
    vx = await ctx.links.get(_overlay(net).ifname)
    if vx is None:
        if dev is None:
            raise NotFound(f"The VXLAN device {_overlay(net).ifname} is gone and cannot be "
                           "made again without its underlay.")
        vx = await _create(ctx, net, dev)
    await plumb(ctx, net, bridge.index, vx)
    return net, dev.ifname if dev is not None else None


async def plumb(ctx: Context, net: Network, bridge: int, vx: Link) -> None:
    """Idempotent: the VXLAN port on the bridge, its flags, and (static) the flood list,
    exactly the peers: entries for hosts no longer listed are removed."""
    ov = _overlay(net)
    await ctx.links.set(vx.index, master=bridge, mtu=net.mtu, state="up")
    await ctx.links.vxlan_port_flags(vx.index, evpn=ov.control == "evpn")
    if ov.control == "static":
        want = {str(p) for p in ov.peers}
        for e in await ctx.links.fdb(vx.index):
            if e["mac"] == "00:00:00:00:00:00" and e["dst"] not in want:
                await ctx.links.flood_to(vx.index, e["dst"], add=False)
                await ctx.links.forget_remote(vx.index, e["dst"])
        for peer in sorted(want):
            await ctx.links.flood_to(vx.index, peer)


async def flood(ctx: Context, net: Network, peer: str, add: bool) -> None:
    """A static overlay's flood entry for one peer, live (no-op while not running)."""
    vx = await ctx.links.get(_overlay(net).ifname)
    if vx is not None:
        await ctx.links.flood_to(vx.index, peer, add=add)


async def forget(ctx: Context, net: Network, peer: str) -> None:
    """Tidying after a static peer went: the MACs learned behind it."""
    vx = await ctx.links.get(_overlay(net).ifname)
    if vx is not None:
        await ctx.links.forget_remote(vx.index, peer)


async def state(ctx: Context, net: Network) -> dict[str, Any]:
    ov = _overlay(net)
    d: dict[str, Any] = {"device": ov.ifname, "mtu": net.mtu,
                         "mtu-source": "underlay minus VXLAN overhead" if net.mtu_auto
                         else "definition"}
    vx = await ctx.links.get(ov.ifname)
    if vx is not None:
        d["fdb"] = await ctx.links.fdb(vx.index)
        d["underlay-mtu"] = net.mtu + ov.overhead if net.mtu_auto else None
    return {k: v for k, v in d.items() if v is not None}
