"""What goes over the bus, by name: vnetd's bus name, object paths, interfaces and polkit
actions, and the D-Bus type a plain value is sent as.

Imports nothing, so that the short-lived commands (vnet-client, the bridge helper) take these
names at no cost; vnet_common.contract builds the method table from them.
"""

from __future__ import annotations

BUS_NAME = "org.qemuvnet.Vnet1"
ACTION_PREFIX = "org.qemuvnet.Vnet1."
INFO = ACTION_PREFIX + "info"
ATTACH = ACTION_PREFIX + "attach"
MANAGE = ACTION_PREFIX + "manage"
FORWARD = ACTION_PREFIX + "forward"
ACTIONS = (INFO, ATTACH, MANAGE, FORWARD)

MANAGER_PATH = "/org/qemuvnet/Vnet1"
NETWORK_PATH = MANAGER_PATH + "/network"
PORT_PATH = MANAGER_PATH + "/port"
MANAGER = "org.qemuvnet.Vnet1.Manager"
NETWORK = "org.qemuvnet.Vnet1.Network"


def signature(v: object) -> str:
    """The D-Bus signature a plain value goes out as, in a variant (both vnetd's replies and
    the client's options): bool b, int i (x past 32 bits), str s, dict a{sv}, a list of
    dicts aa{sv}, a list of strings as (the empty list too), a list of ints ax."""
    if isinstance(v, bool):
        return "b"
    if isinstance(v, int):
        return "i" if -(2**31) <= v < 2**31 else "x"
    if isinstance(v, str):
        return "s"
    if isinstance(v, dict):
        return "a{sv}"
    if isinstance(v, list | tuple):
        if v and all(isinstance(x, dict) for x in v):
            return "aa{sv}"
        if all(isinstance(x, str) for x in v):
            return "as"
        if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return "ax"
    raise TypeError(f"cannot send {type(v).__name__} over D-Bus")
