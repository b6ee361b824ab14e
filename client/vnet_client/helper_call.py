"""The one D-Bus call vnet-bridge-helper makes: Attach, trying NIC 0, 1, ... in turn (QEMU
runs the helper once per `-netdev bridge`, in order, so an earlier NIC is already held).
It uses the small synchronous client (minibus) so the helper starts in milliseconds."""

from __future__ import annotations

import os

from .minibus import ALLOW_INTERACTIVE_AUTHORIZATION, DBusError, MiniBus

MAX_NICS = 8
BUS_NAME = "org.qemuvnet.Vnet1"
PATH = "/org/qemuvnet/Vnet1"
IFACE = "org.qemuvnet.Vnet1.Manager"


class HelperError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def attach_for_helper(bridge: str, vm: str, macs: list[str | None], holder: int) -> int:
    """Return the tap fd for the next free NIC of `vm` on `bridge`."""
    try:
        bus = MiniBus(os.environ.get("VNET_BUS_ADDRESS") or None)
    except DBusError as e:
        raise HelperError(f"cannot reach the system bus: {e.message}") from None
    with bus:
        for nic in range(max(len(macs), 1) + MAX_NICS):
            mac = macs[nic] if nic < len(macs) else None
            opts: dict = {"nic": ("i", nic), "holder-pid": ("i", holder)}
            opts.update({"mac": ("s", mac)} if mac else {"learn-mac": ("b", True)})
            try:
                values, fds = bus.call(BUS_NAME, PATH, IFACE, "Attach", "ssa{sv}",
                                       [bridge, vm, opts], flags=ALLOW_INTERACTIVE_AUTHORIZATION)
            except DBusError as e:
                if e.name.endswith(".Busy"):
                    continue
                if e.name.endswith((".ServiceUnknown", ".NameHasNoOwner")):
                    raise HelperError("the qemu-vnet service (vnetd) is not running") from None
                raise HelperError(e.message) from None
            tap = values[1][0]
            for fd in fds:
                if fd != tap:
                    os.close(fd)
            return tap
    raise HelperError(f"VM '{vm}' already holds {MAX_NICS} NICs on {bridge}.")
