"""What every network driver shares: the `Running` record, the driver protocol, the context a
driver works in, and `Rollback`.

A definition (`model.Network`) says what an administrator declared; a `Running` record says
what exists at run time for a started network (the definition in force, with what only run
time knows, such as an overlay's MTU taken from its underlay, and the bridge's ifindex).
Drivers make and remove the network's own kernel objects (bridge, addresses, pre-created
taps, a VXLAN device, a bridged NIC); the subsystems (DHCP/DNS, VDE, EVPN, firewall) are
applied by the engine around them.
"""

from __future__ import annotations

import asyncio
import functools
import grp
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .. import model
from ..errors import Exists, Failed, InvalidArgument
from ..kernel import tap as tapdev
from ..model import Network

if TYPE_CHECKING:
    from ..kernel.links import Link, Links
    from ..ports import Ports
    from ..store import Store

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


@dataclass
class Running:
    """A started network: the definition in force (declared settings plus what only run time
    knows) and its bridge."""

    net: Network
    bridge: int
    underlay: str | None = None  # an overlay's underlay interface

    @property
    def name(self) -> str:
        return self.net.name


@dataclass
class Context:
    """What a driver may use: the kernel's links, the store (intents, runtime files) and the
    ports (a network's ports go with it)."""

    links: Links
    store: Store
    ports: Ports
    problems: list[str]  # trouble reported while a network keeps running (show, reload)

    def tap_gid(self, net: Network) -> int:
        try:
            return grp.getgrnam(net.tap_group).gr_gid
        except KeyError:
            raise InvalidArgument(
                f"The group '{net.tap_group}' for the taps of '{net.name}' does not exist on "
                "this host (make install creates group 'vnet')."
            ) from None

    async def make_tap(self, net: Network, tname: str, master: int, gid: int | None,
                       rb: Rollback) -> None:
        """A pre-created tap (`-n`), persistent, owned by the network's tap user/group."""
        with self.store.intent(tname):
            try:
                await asyncio.to_thread(tapdev.make_persistent_tap, tname, net.tap_user, gid)
            except OSError as e:
                raise Failed(f"Could not create tap '{tname}': {e.strerror}.") from None
            index = socket.if_nametoindex(tname)
            rb.add(f"delete tap {tname}", functools.partial(self.links.delete, index))
            self.links.fast.set(index, alias=model.alias_for(net.name), master=master,
                                mtu=net.mtu, port=tname, guarded=net.spoof_protection)

    async def make_taps(self, net: Network, master: int, rb: Rollback) -> None:
        gid = self.tap_gid(net) if net.taps else None
        for tname in net.tap_names:
            if await self.links.get(tname) is not None:
                raise Exists(f"An interface named '{tname}' already exists on this host.")
            await self.make_tap(net, tname, master, gid, rb)

    async def ensure_taps(self, net: Network, bridge: int) -> None:
        """Adopted network: each pre-created tap there, on the bridge and up."""
        gid = self.tap_gid(net) if net.taps else None
        for tname in net.tap_names:
            lk = await self.links.get(tname)
            if lk is None:
                await self.make_tap(net, tname, bridge, gid, Rollback())
            elif lk.master != bridge or not lk.up:  # set up as a new one is (mask and all)
                self.links.fast.set(lk.index, master=bridge, mtu=net.mtu, port=tname,
                                    guarded=net.spoof_protection)

    async def remove_links(self, net: Network, extra: tuple[str, ...] = ()) -> None:
        """The network's ports, pre-created taps, `extra` devices and bridge: only those
        carrying its alias. The ports of attached VMs wait, off the network, for it to start
        again (Ports.remove_network_ports)."""
        await self.ports.remove_network_ports(net.name, park=True)
        for name in [*net.tap_names, *extra, net.bridge]:
            lk = await self.links.get(name)
            if lk is not None and model.network_of_alias(lk.alias) == net.name:
                await self.links.delete(lk.index)


def gateway_ifaces(net: Network) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """The addresses the bridge of a routed network holds: its gateways."""
    out: list[Any] = [ipaddress.ip_interface(f"{net.gateway}/{net.subnet.prefixlen}")]
    if net.subnet6 is not None:
        out.append(ipaddress.ip_interface(f"{net.gateway6}/{net.subnet6.prefixlen}"))
    return out


class NetworkDriver(Protocol):
    """One kind of network. `verify` checks a definition against the host before it is
    stored; `start` makes the network's kernel objects (undo steps into `rb`); `adopt` makes
    an existing bridge match its definition again (after a restart or a reload; idempotent);
    `stop` removes what `start` made and gives back what it took; `status` adds what only
    this kind has to `show`."""

    modes: tuple[str, ...]

    async def verify(self, ctx: Context, net: Network) -> None: ...

    async def start(self, ctx: Context, net: Network, rb: Rollback) -> Running: ...

    async def adopt(self, ctx: Context, net: Network, bridge: Link) -> Running: ...

    async def stop(self, ctx: Context, run: Running) -> None: ...

    async def status(self, ctx: Context, run: Running) -> dict[str, Any]: ...
