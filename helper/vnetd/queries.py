"""What `list` and `show` say of the networks: each one's definition with its state, and of a
running one what the kernel, its servers, the firewall and its driver report.

Reads only: nothing here takes the engine's lock or changes state.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .model import Network
from .networks import driver_for
from .operations import Operations
from .ports import Port

if TYPE_CHECKING:
    from .engine import Engine


def _port_row(p: Port) -> dict[str, Any]:
    """A port as `show` lists it."""
    return {"ifname": p.ifname, "vm": p.vm, "nic": p.nic, "kind": p.kind,
            "mac": p.mac if p.mac_known else "(learning)", "uid": p.uid}


class Queries(Operations):
    """The networks as callers read them (`engine.queries`)."""

    def __init__(self, engine: Engine):
        super().__init__(engine)
        # network -> (its definition, its record while it runs, its state; its row as the
        # bus sends it): a row is made again only when one of those changed
        self._rows: dict[str, tuple[Network, Network | None, str, Any]] = {}

    def summary(self, net: Network) -> dict[str, Any]:
        d = net.to_dict()
        d["mtu"] = (self.engine.network(net.name) or net).mtu
        d["owner"] = net.owner
        d["state"] = self._state(net.name)
        if net.mode == "bridged":  # the LAN's addresses, not ours: no subnet, gateway, range
            d.pop("subnet", None)
        else:
            d["gateway"] = str(net.gateway)
        if net.gateway6:
            d["gateway6"] = str(net.gateway6)
        d["bridge"] = net.bridge
        d["tap-names"] = net.tap_names
        return d

    def list(self) -> builtins.list[dict[str, Any]]:
        return [self.summary(n) for _, n in sorted(self.engine.defs.items())]

    def rows(self, encode: Callable[[dict[str, Any]], Any]) -> builtins.list[Any]:
        """list(), each summary as `encode` makes it (the bus's variants). A network's row
        is kept, and made again only once its definition or state changed (both are
        replaced, never changed in place), so that a list of hundreds of networks costs
        little more than a list of their names."""
        kept, rows = self._rows, {}
        out = []
        for name, net in sorted(self.engine.defs.items()):
            run = self.engine.running.get(name)
            live = run.net if run is not None else None
            state = self._state(name)
            row = kept.get(name)
            if row is None or row[0] is not net or row[1] is not live or row[2] != state:
                row = (net, live, state, encode(self.summary(net)))
            rows[name] = row
            out.append(row[3])
        self._rows = rows  # (networks gone since are dropped)
        return out

    def _state(self, name: str) -> str:
        return ("adopting" if name in self.engine.adopting else
                "running" if name in self.engine.running else "stopped")

    async def show(self, name: str) -> dict[str, Any]:
        net = self.engine.get(name)
        d = self.summary(net)
        run = self.engine.running.get(name)
        if run is not None:
            lk = await self.links.get(net.bridge)
            if lk is not None:
                d["ifindex"] = lk.index
                d["mac"] = lk.address
                d["addresses"] = [str(a) for a in await self.links.addresses(lk.index)]
            d["servers"] = await self.dhcp.status(name)
            vde = await self.vde.status(name)
            if vde is not None:
                d["vde"] = vde
            counters = await self.firewall.status(name)
            d["ports"] = [_port_row(p) | {"spoof-drops": counters.get(p.ifname, {}).get(
                "packets", 0)} for p in sorted(self.ports.on_network(net.name),
                                               key=lambda p: p.ifname)]
            d.update(await driver_for(net).status(self.ctx, run))
            evpn = await self.evpn.status(name)
            if evpn is not None and "overlay-state" in d:
                d["overlay-state"]["evpn"] = evpn
            warnings = await self.firewall.current_warnings()
            if warnings:
                d["firewall-warnings"] = warnings
        elif self.ports.parked(name):  # stopped with VMs attached: they wait for its start
            d["ports"] = [_port_row(p) | {"waiting": True}
                          for p in sorted(self.ports.parked(name), key=lambda p: p.ifname)]
        # VMs attached (or waiting for a start): what `stop` names; a count anyone may see
        d["attached"] = sum(1 for p in self.ports.on_network(name) if p.kind == "attach")
        if net.mode != "bridged":
            d["dhcp-range"] = [str(a) for a in net.dhcp_range]
        d["domain"] = net.dns_domain
        return d
