"""The one shape every subsystem has: DHCP/DNS (dhcp.py), VDE switches (vde.py), EVPN
(evpn.py) and the firewall (firewall.py).

The engine starts a network by having its driver make the kernel objects and then applying
each subsystem to the `Running` record; it stops one by removing each subsystem and then
having the driver remove what it made. Reconcile at start-up `adopt`s each running network
into each subsystem and then `sync`s each subsystem once (one FRR push, one ruleset); reload
re-applies the networks whose definitions changed. A subsystem decides for itself whether a
network concerns it (a bridged network has no DHCP server, only an EVPN overlay concerns
EVPN), so the engine's loops have no branches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..networks import Running


class Subsystem(Protocol):
    name: str

    async def apply(self, run: Running) -> None:
        """Make the subsystem hold the network as `run` has it (start, or a changed
        definition)."""

    async def remove(self, name: str) -> None:
        """Nothing of the network left in the subsystem; a network it never had is no
        error."""

    async def adopt(self, run: Running) -> None:
        """A network found running at start-up: take it over (`sync` follows)."""

    async def sync(self) -> None:
        """After a batch of adoptions (start-up, reload): make everything true at once."""

    async def status(self, name: str) -> Any:
        """What `show` says of the network in this subsystem (None: nothing)."""
