"""What both clients share (the asyncio library in api.py and the synchronous one in
blocking.py): the errors, the rule for sending a call again, and what Attach hands back.

Standard library only, so that the commands importing it pay for no D-Bus library they do
not use.
"""

from __future__ import annotations

import os
from typing import Any

from vnet_common.errors import ERROR_PREFIX
from vnet_common.wire import BUS_NAME, MANAGER, MANAGER_PATH  # noqa: F401  (the clients' names)

AUTH_ERRORS = (
    "org.freedesktop.DBus.Error.AccessDenied",
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
    "org.freedesktop.PolicyKit1.Error.NotAuthorized",
)
INTERACTION_REQUIRED = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
NO_REPLY = "org.freedesktop.DBus.Error.NoReply"
DISCONNECTED = "org.freedesktop.DBus.Error.Disconnected"
NO_BUS = ERROR_PREFIX + "NoBus"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"  # a value the client cannot send
# the call never reached vnetd: safe to send again, whatever it is
NOT_DELIVERED = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Spawn.ChildExited",
)
UNAVAILABLE = (*NOT_DELIVERED, NO_REPLY)
# Calls whose repetition changes nothing (the "info" methods, and GetMac, which gives the same
# MAC again): only these are sent again after vnetd went away without answering. A change
# (Define, Attach, ...) may have been made before the reply was lost.
RESENDABLE = frozenset({
    "ListNetworks", "GetNetwork", "ExportDefinition", "ListPorts", "GetMac",
    "ExportEtherConf", "ExportMacs", "ListHosts", "Leases", "ListForwards", "GetInfo",
    "CheckDefinition", "OpenSession",
})
CALL_TIMEOUT = 300.0  # a person may be typing a password
RETRY_AFTER = 1.0  # seconds before the one retry when vnetd is not there


def lost_reply(member: str) -> str:
    return (f"vnetd went away without answering {member}: it may or may not have been done, "
            "so it was not sent again. Check with 'vnet-client list', 'show NET' or 'ports' "
            "before trying again.")


def send_again(error_name: str, member: str) -> bool:
    """Whether a call that failed with `error_name` is sent once more: when it never reached
    vnetd, or when vnetd went away without answering and repeating it changes nothing."""
    return error_name in NOT_DELIVERED or (error_name == NO_REPLY and member in RESENDABLE)


def error_for(error_name: str, text: str, member: str) -> VnetClientError:
    """The error a failed call raises, after the one resend (if any) failed too."""
    if error_name == NO_REPLY and member not in RESENDABLE:
        return VnetClientError(NO_REPLY, lost_reply(member))
    if error_name in UNAVAILABLE:
        text = (f"The qemu-vnet service (vnetd) is not running or not reachable ({text}). "
                "Start it with 'sudo make install' or 'systemctl start vnetd'.")
    return VnetClientError(error_name, text)


def timed_out(member: str) -> VnetClientError:
    return VnetClientError(NO_REPLY, "vnetd did not answer in time." if member in RESENDABLE
                           else lost_reply(member))


class VnetClientError(Exception):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name
        self.message = message

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def is_auth(self) -> bool:
        return self.name in AUTH_ERRORS

    @property
    def needs_interaction(self) -> bool:
        return self.name == INTERACTION_REQUIRED


class NotSent(Exception):
    """A call could not be written on a session (vnetd had ended it): it never reached vnetd,
    so it goes on the bus instead, whatever it is."""


class Unsendable(VnetClientError):
    """A value D-Bus cannot carry (a fraction, a date, a list of mixed kinds, a whole number
    past 64 bits or past its type's range, text that is not UTF-8). Found while the call is
    put together, before anything is sent: the caller's mistake, never vnetd's answer."""

    def __init__(self, message: str):
        super().__init__(INVALID_ARGS, message)


class BusUnreachable(VnetClientError):
    """NoBus: the connection to the bus could not be made. `address` is the one given (an
    argument or $VNET_BUS_ADDRESS; None: the system bus), `reason` what failed."""

    def __init__(self, address: str | None, reason: str):
        super().__init__(NO_BUS, f"Cannot connect to the system bus ({reason}): is dbus-daemon "
                         "running?")
        self.address, self.reason = address, reason

    def sentence(self) -> str:
        """What the commands print: a given address is named, and the system bus is not
        blamed for it."""
        if self.address is None:
            return self.message
        return (f"Cannot connect to the bus at '{self.address}' ({self.reason}): it is not a "
                "valid D-Bus address or cannot be reached.")


def shown_text(text: str) -> str:
    """Text as given, for a message: bytes that are not UTF-8 (which Python keeps as lone
    surrogates) as \\xNN escapes."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return raw.decode("utf-8", "backslashreplace")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def not_utf8(text: str) -> str:
    """The sentence for an argument D-Bus cannot carry because it is not UTF-8."""
    return (f"The argument '{shown_text(text)}' is not valid UTF-8, and D-Bus carries only "
            "UTF-8 text.")


class Attachment:
    """A port vnetd opened for you: the tap fd(s) are yours (inheritable=False until you say).
    (A plain class, not a dataclass: importing dataclasses costs the commands milliseconds.)"""

    def __init__(self, ifname: str, mac: str, network: str, vm: str, nic: int, fds: list[int],
                 vhostfds: list[int], info: dict[str, Any] | None = None):
        self.ifname, self.mac, self.network, self.vm, self.nic = ifname, mac, network, vm, nic
        self.fds, self.vhostfds, self.info = fds, vhostfds, info if info is not None else {}

    def __repr__(self) -> str:
        return (f"Attachment(ifname={self.ifname!r}, mac={self.mac!r}, network={self.network!r}, "
                f"vm={self.vm!r}, nic={self.nic!r}, fds={self.fds!r}, vhostfds={self.vhostfds!r})")

    def close(self) -> None:
        for fd in self.fds + self.vhostfds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds, self.vhostfds = [], []


def attach_options(nic: int = 0, queues: int = 1, vhost: bool = False, mac: str | None = None,
                   learn_mac: bool = False, holder_pid: int | None = None) -> dict[str, Any]:
    """Attach's options as both clients send them."""
    opts: dict[str, Any] = {"nic": nic, "queues": queues, "vhost": vhost}
    if mac:
        opts["mac"] = mac
    if learn_mac:
        opts["learn-mac"] = True
    if holder_pid:
        opts["holder-pid"] = holder_pid
    return opts


def option_keys(options: dict[str, Any]) -> dict[str, Any]:
    """define(name, dhcp_start=...) keyword arguments as Define's option keys (dhcp-start)."""
    return {k.replace("_", "-"): v for k, v in options.items() if v is not None}


# vnetd's signals that events() reports, with the names of their arguments
EVENT_FIELDS = {"NetworkChanged": ("network", "state"),
                "PortChanged": ("ifname", "network", "state"),
                "LeaseChanged": ("network", "event")}
EVENT_MATCH = f"type='signal',sender='{BUS_NAME}',interface='{MANAGER}'"
