"""A VM's MACs on a network: asking for one, exporting and importing them, forgetting them
and giving the VM name to another user.

The MAC registry (macs.py) keeps them; this is what the bus asks of it, under the engine's
lock where attach gives out MACs or checks owners too, and never while a NIC of the VM is
attached (its port belongs to its holder).
"""

from __future__ import annotations

import asyncio
import pwd
from typing import TYPE_CHECKING, Any

from . import model
from .errors import Busy, Failed, InvalidArgument
from .macs import Change
from .operations import Operations

if TYPE_CHECKING:
    from .engine import Engine


class Vms(Operations):
    """The VMs' MACs on every network (`engine.vms`).

    Every write of the registry is made off the event loop (a durable write of a network's
    file: in the loop, one caller's change would hold up every other call meanwhile).
    A forget, a transfer or an import is written first and made after (macs.Change), under
    the engine's lock, where attach gives out MACs; GetMac, which does not take that lock,
    waits for such a change of its network to be over before it looks."""

    def __init__(self, engine: Engine):
        super().__init__(engine)
        self._changing: dict[str, asyncio.Future] = {}  # network -> its change being written

    async def _make(self, change: Change) -> Any:
        """Write the change's network file off the event loop; only then is it made (a
        write that fails changes nothing, and says so). A caller cancelled meanwhile (vnetd
        stopping) does not cut it in two: what is on disk is made."""
        return await asyncio.shield(self._write_then_make(change))

    async def _write_then_make(self, change: Change) -> Any:
        loop = asyncio.get_running_loop()
        done = self._changing[change.network] = loop.create_future()
        try:
            try:
                await asyncio.to_thread(change.write)
            except OSError as e:
                raise Failed(f"Could not write the MAC registry of {change.network} "
                             f"({e.strerror or e}); nothing was changed.") from None
            return change.commit()
        finally:
            del self._changing[change.network]
            done.set_result(None)

    async def _settled(self, network: str) -> None:
        while (busy := self._changing.get(network)) is not None:
            await asyncio.shield(busy)

    async def get_mac(self, network: str, vm: str, nic: int, uid: int = 0) -> str:
        """The VM's stable MAC. A new one is on disk before the answer."""
        await self._settled(network)
        if vm in self.engine.get(network).tap_names:
            # a pre-created tap's MAC (what its guard holds it to): anyone may know it, which
            # registers nobody but the network (root) as the name's owner
            uid = 0
        self.macs.defer += 1
        try:
            mac = self.macs.get(network, vm, nic, uid)
        finally:
            self.macs.defer -= 1
        if self.macs.dirty:
            await self.engine.macs_written()
        return mac

    def export_macs(self, network: str, uid: int | None = None) -> dict[str, str]:
        self.engine.get(network)
        return self.macs.export(network, uid)

    async def import_macs(self, network: str, entries: dict[str, str]) -> int:
        self.engine.get(network)
        async with self.engine.lock:  # attach gives out MACs under it
            return await self._make(self.macs.plan_import(network, entries))

    async def forget_mac(self, network: str, vm: str) -> int:
        """Drop a VM's MACs on a network (defined or not: an undefined network's MACs stay
        remembered until forgotten), unless one of its NICs is attached there now."""
        model.validate_network_name(network)
        model.validate_vm_name(vm)
        async with self.engine.lock:  # attach gives out MACs under it
            self._refuse_attached(network, vm)
            net = self.engine.defs.get(network)
            host = net.host(vm) if net is not None else None
            if host is not None:
                raise Busy(f"VM '{vm}' has a static host on {network} with the MAC {host.mac}: "
                           f"remove it first (vnet-client host remove {network} --vm {vm}).")
            return await self._make(self.macs.plan_forget(network, vm))

    def _refuse_attached(self, network: str, vm: str) -> None:
        held = sorted(p.ifname for p in self.ports.on_network(network) if p.vm == vm)
        if held:
            raise Busy(f"VM '{vm}' is attached to {network} now (port "
                       f"{', '.join(held)}): detach it (or stop the VM) first.")

    async def transfer(self, network: str, vm: str, uid: int) -> int | None:
        """Give a VM name on a network (and its MACs) to another uid; the uid that had it.
        Refused while a NIC of the VM is attached there (the port belongs to its holder)."""
        model.validate_network_name(network)
        model.validate_vm_name(vm)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            raise InvalidArgument(f"There is no user with uid {uid} on this host.") from None
        async with self.engine.lock:  # attach checks owners under it
            self._refuse_attached(network, vm)
            return await self._make(self.macs.plan_transfer(network, vm, uid))
