"""The one D-Bus call vnet-bridge-helper makes: Attach, trying NIC 0, 1, ... in turn (QEMU
runs the helper once per `-netdev bridge`, in order, so an earlier NIC is already held)."""

from __future__ import annotations

import asyncio

from .api import Client, VnetClientError

MAX_NICS = 8


def attach_for_helper(bridge: str, vm: str, macs: list[str | None], holder: int) -> int:
    async def go() -> int:
        async with Client(interactive=True) as c:
            for nic in range(max(len(macs), 1) + MAX_NICS):
                mac = macs[nic] if nic < len(macs) else None
                try:
                    a = await c.attach(bridge, vm, nic=nic, mac=mac, learn_mac=mac is None,
                                       holder_pid=holder)
                except VnetClientError as e:
                    if e.short_name == "Busy":
                        continue
                    raise
                for extra in a.fds[1:] + a.vhostfds:
                    import os

                    os.close(extra)
                return a.fds[0]
        raise VnetClientError("org.qemuvnet.Vnet1.Error.Busy",
                              f"VM '{vm}' already holds {MAX_NICS} NICs on {bridge}.")

    return asyncio.run(go())
