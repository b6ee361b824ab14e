"""The one D-Bus call vnet-bridge-helper makes: Attach, trying NIC 0, 1, ... in turn (QEMU
runs the helper once per `-netdev bridge`, in order, so an earlier NIC is already held).
It uses the synchronous client (blocking, on jeepney) so the helper starts in milliseconds."""

from __future__ import annotations

import os

from .base import NO_BUS, BusUnreachable, VnetClientError
from .blocking import BlockingClient

MAX_NICS = 8


class HelperError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def attach_for_helper(bridge: str, vm: str, macs: list[str | None], holder: int) -> int:
    """Return the tap fd for the next free NIC of `vm` on `bridge`."""
    client = BlockingClient(interactive=True)
    try:
        client.connect()
    except BusUnreachable as e:
        raise HelperError(e.sentence() if e.address else f"cannot reach the system bus: "
                          f"{e.message}") from None
    with client:
        for nic in range(max(len(macs), 1) + MAX_NICS):
            mac = macs[nic] if nic < len(macs) else None
            try:
                a = client.attach(bridge, vm, nic=nic, mac=mac, learn_mac=not mac,
                                  holder_pid=holder)
            except VnetClientError as e:
                if e.short_name == "Busy":
                    continue
                if e.name == NO_BUS:
                    raise HelperError(f"cannot reach the system bus: {e.message}") from None
                raise HelperError(e.message) from None
            tap = a.fds[0]
            for fd in a.fds[1:] + a.vhostfds:
                os.close(fd)
            return tap
    raise HelperError(f"VM '{vm}' already holds {MAX_NICS} NICs on {bridge}.")
