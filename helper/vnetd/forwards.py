"""Port forwards: adding, removing and listing a network's forwards, and the index that
finds a forward and its clashes across every network.

The engine's lock, definitions and quotas are the engine's: a forward is added or removed
under its lock, counted against its owner's limit (`Engine.check_forward_quota`), written one
file each (`Store.save_forward`) and, while its network runs, put in the firewall's maps.
"""

from __future__ import annotations

import builtins
import dataclasses
from typing import TYPE_CHECKING, Any

from . import model
from .errors import Exists, InvalidArgument, NotFound
from .operations import Operations

if TYPE_CHECKING:
    from .engine import Engine


class Forwards(Operations):
    """Every network's port forwards (`engine.forwards`)."""

    def __init__(self, engine: Engine):
        super().__init__(engine)
        # (network, forward) of every definition: lookups and clashes across networks
        self.index = model.ForwardIndex()

    def reindex(self) -> None:
        """The index again, from every definition (after the definitions changed)."""
        self.index = model.ForwardIndex()
        for net in self.engine.defs.values():
            for f in net.forwards:
                self.index.add(net.name, f)

    async def add(self, network: str, spec: dict[str, Any], uid: int = 0) -> model.Forward:
        """Add a forward owned by `uid`, within uid's limit."""
        await self.engine._adopted()  # their firewall elements: once the ruleset is whole
        async with self.engine.lock:
            net = self.engine.get(network)
            if net.overlay is not None and net.overlay.is_member:
                raise InvalidArgument(f"'{network}' is a member of an overlay here: port "
                                      "forwards live on the overlay's gateway host.")
            fwd = dataclasses.replace(
                model.parse_forward(net, model.expand_forward_words(spec)), owner=uid)
            self.engine.check_forward_quota(uid)
            if not self.resolver.knows_vm(net, fwd.target):
                raise InvalidArgument(
                    f"'{fwd.target}' is neither an address nor a known VM on {network} (an "
                    "unknown VM name): give it a static host or attach it once first.")
            clash = self.index.clash(fwd)
            if clash is not None:
                owner, other = clash
                raise Exists(f"{fwd.proto} {fwd.external} is already forwarded to "
                             f"'{other.target}' ({other.describe()}) on network '{owner}'.")
            new = net.with_changes(forwards=(*net.forwards, fwd))
            if net.name in self.engine.running:
                await self.firewall.forward_added(new, fwd)
            try:
                self.store.save_forward(network, fwd)
            except OSError:
                if net.name in self.engine.running:
                    await self.firewall.forward_removed(new, fwd)
                raise
            self.engine._put(new)
            self.index.add(network, fwd)
        return fwd

    async def remove(self, network: str, spec: dict[str, Any]) -> model.Forward:
        """Remove the forward of PROTO [EXT_ADDR:]PORT[-PORT] (family from spec)."""
        await self.engine._adopted()  # their firewall elements: once the ruleset is whole
        async with self.engine.lock:
            net = self.engine.get(network)
            spec = model.expand_forward_words(spec)
            probe = model.parse_forward(net, {**spec, "target": spec.get("target") or "x",
                                              "target-port": spec.get("target-port", 1)})
            match = self.index.find(network, probe.proto, probe.family, probe.port_lo,
                                    probe.port_hi, probe.ext_addr)
            if match is None:
                raise NotFound(f"There is no forward of {probe.proto} {probe.external} on "
                               f"{network}. 'vnet-client forward list {network}' shows them.")
            if net.name in self.engine.running:
                await self.firewall.forward_removed(net, match)
            self.store.delete_forward(network, match)
            self.engine._put(net.with_changes(
                forwards=tuple(f for f in net.forwards if f is not match)))
            self.index.remove(network, match)
        return match

    def list(self, network: str) -> builtins.list[dict[str, Any]]:
        net = self.engine.get(network)
        out = []
        for f in net.forwards:
            d = self.info(f)
            d["resolved"] = self.firewall.resolve(net, f) or ""
            out.append(d)
        return out

    @staticmethod
    def info(f: model.Forward) -> dict[str, Any]:
        """A forward as callers see it: its table, with its owner even when that is root."""
        return {**f.to_dict(), "owner": f.owner}
