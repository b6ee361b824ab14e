"""An overlay's peers, changed live (vnet-client peer add/remove): the flood entry (static
control) or the BGP neighbour (evpn), the VXLAN filter in the firewall and the stored
definition change together, or nothing does.

The overlay's definition is overlay.py's (pure); its kernel side is the routed driver's
(networks/vxlan.py) and FRR's (subsystems/evpn.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import overlay as overlay_mod
from .errors import InvalidArgument, VnetError
from .model import Network
from .networks import vxlan
from .operations import Operations

if TYPE_CHECKING:
    pass

log = logging.getLogger("vnetd")


class Peers(Operations):
    """Every overlay network's peers (`engine.peers`)."""

    async def set(self, network: str, address: str, add: bool) -> Network:
        """Add or remove an overlay peer, live: the flood entry (static) or the BGP
        neighbour (evpn), the VXLAN filter and the stored definition change together, or
        nothing does."""
        await self.engine._adopted()
        async with self.engine.lock:
            net = self.engine.get(network)
            if net.overlay is None:
                raise InvalidArgument(f"The network '{network}' has no overlay: define it with "
                                      "--vni, --local and --peer.")
            peer = overlay_mod.parse_address(address, "peer address")
            ov = net.overlay.with_peer(peer) if add else net.overlay.without_peer(peer)
            new = net.with_changes(overlay=ov)
            running = network in self.engine.running

            async def kernel(n: Network, adding: bool) -> None:
                if not running:
                    return
                if ov.control == "static":
                    await vxlan.flood(self.ctx, n, str(peer), adding)
                else:
                    await self.evpn.apply(self.engine.running[network])

            self.engine._put(new)
            try:
                await kernel(new, add)
            except BaseException:
                self.engine._put(net)
                raise
            try:
                if running:
                    await self.firewall.sync()  # the VNI takes only the peers
                self.store.save(new)
            except BaseException:
                self.engine._put(net)
                await kernel(net, not add)
                if running:
                    await self.firewall.sync()
                raise
            if running and ov.control == "static" and not add:
                try:  # tidying: the MACs learned behind the removed host
                    await vxlan.forget(self.ctx, new, str(peer))
                except VnetError as e:
                    log.warning("overlay %s: %s", network, e.message)
        self.engine._changed(network, "peers")
        return new
