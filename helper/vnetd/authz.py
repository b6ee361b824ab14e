"""Who is calling, and may they? Caller credentials from the bus, answers from polkit.

Rules (DESIGN.md rule 1 and 2):
- the caller's uid comes from org.freedesktop.DBus.GetConnectionCredentials(sender), never from
  an argument;
- polkit is asked with the *system-bus-name* subject of the sender (never a PID);
- AllowUserInteraction is set only when the call carried ALLOW_INTERACTIVE_AUTHORIZATION;
- when polkit says a challenge could help and the call did not allow interaction, the caller
  gets org.freedesktop.DBus.Error.InteractiveAuthorizationRequired;
- uid 0 skips polkit; if polkit cannot be asked, non-root callers are denied.

Positive answers are cached per (sender unique name, action, details): a connection's uid and
groups cannot change under it, so the cache answers as polkit would. Entries go when the sender
disconnects and when polkit emits Changed; answers that came from a password (a temporary
authorization) are never cached.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from .errors import AccessDenied, InteractiveAuthorizationRequired

log = logging.getLogger("vnetd.authz")

ACTION_PREFIX = "org.qemuvnet.Vnet1."
INFO = ACTION_PREFIX + "info"
ATTACH = ACTION_PREFIX + "attach"
MANAGE = ACTION_PREFIX + "manage"
FORWARD = ACTION_PREFIX + "forward"
ACTIONS = (INFO, ATTACH, MANAGE, FORWARD)

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
CHECK_ALLOW_USER_INTERACTION = 0x1


@dataclass(frozen=True)
class Caller:
    sender: str
    uid: int
    pid: int | None
    interactive: bool

    @property
    def is_root(self) -> bool:
        return self.uid == 0


class Authorizer:
    def __init__(self, bus: MessageBus):
        self.bus = bus
        self._creds: dict[str, tuple[int, int | None]] = {}
        self._cache: set[tuple[str, str, tuple[tuple[str, str], ...]]] = set()
        self.polkit_calls = 0
        self.cache_hits = 0

    # --- cache maintenance (wired to bus signals by bus.py) -----------------------------
    def forget_sender(self, name: str) -> None:
        self._creds.pop(name, None)
        if self._cache:
            before = len(self._cache)
            self._cache = {k for k in self._cache if k[0] != name}
            if len(self._cache) != before:
                log.debug("forgot %d cached answer(s) for %s: it disconnected",
                          before - len(self._cache), name)

    def polkit_changed(self) -> None:
        if self._cache:
            log.info("polkit configuration changed: dropped %d cached answers", len(self._cache))
        self._cache.clear()

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    # --- credentials --------------------------------------------------------------------
    async def caller(self, sender: str, interactive: bool) -> Caller:
        cached = self._creds.get(sender)
        if cached is None:
            reply = await self.bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="GetConnectionCredentials",
                signature="s", body=[sender],
            ))
            if reply.message_type != MessageType.METHOD_RETURN:
                raise AccessDenied("The bus could not tell who is calling; refused.")
            creds = reply.body[0]
            uid = creds["UnixUserID"].value
            pid = creds["ProcessID"].value if "ProcessID" in creds else None
            cached = (uid, pid)
            self._creds[sender] = cached
        return Caller(sender=sender, uid=cached[0], pid=cached[1], interactive=interactive)

    # --- polkit -------------------------------------------------------------------------
    async def check(self, caller: Caller, action: str, details: dict[str, str] | None = None) -> None:
        """Return if `caller` may do `action`; raise AccessDenied or
        InteractiveAuthorizationRequired otherwise."""
        if action not in ACTIONS:  # fail closed on anything unknown
            raise AccessDenied(f"No authorization is defined for '{action}'; refused.")
        if caller.is_root:
            return
        details = details or {}
        key = (caller.sender, action, tuple(sorted(details.items())))
        if key in self._cache:
            self.cache_hits += 1
            return
        flags = CHECK_ALLOW_USER_INTERACTION if caller.interactive else 0
        subject = ("system-bus-name", {"name": Variant("s", caller.sender)})
        self.polkit_calls += 1
        try:
            reply = await self.bus.call(Message(
                destination=POLKIT_NAME, path=POLKIT_PATH, interface=POLKIT_IFACE,
                member="CheckAuthorization", signature="(sa{sv})sa{ss}us",
                body=[subject, action, details, flags, ""],
            ))
        except Exception as e:  # the bus itself failed: deny
            log.error("polkit could not be asked (%s): denying %s to uid %d", e, action, caller.uid)
            raise AccessDenied("The authorization service (polkit) is not available; refused.") from None
        if reply.message_type != MessageType.METHOD_RETURN:
            log.error("polkit error for %s: %s %s", action, reply.error_name, reply.body)
            raise AccessDenied(
                "The authorization service (polkit) is not available or failed; refused."
            )
        is_authorized, is_challenge, result_details = reply.body[0]
        log.debug("polkit: %s for uid %d: authorized=%s challenge=%s %s", action, caller.uid,
                  is_authorized, is_challenge, result_details)
        if is_authorized:
            if not any(k.startswith(("polkit.temporary_authorization",
                                     "polkit.retains_authorization")) for k in result_details):
                self._cache.add(key)
            return
        verb = action[len(ACTION_PREFIX):]
        if is_challenge and not caller.interactive:
            raise InteractiveAuthorizationRequired(
                f"Authentication is required to {_VERBS.get(verb, verb)}: run the command on a "
                "terminal (a password prompt will appear) or ask an administrator to add you "
                "to group 'vnet' or grant it in a polkit rule."
            )
        if result_details.get("polkit.dismissed"):
            raise AccessDenied(f"Authentication to {_VERBS.get(verb, verb)} was dismissed.")
        if is_challenge:
            raise AccessDenied(
                f"Authentication is required to {_VERBS.get(verb, verb)}, but no polkit "
                "authentication agent answered: run the command on a terminal, or ask an "
                "administrator to add you to group 'vnet' or grant it in a polkit rule."
            )
        raise AccessDenied(f"You are not allowed to {_VERBS.get(verb, verb)}.")


_VERBS = {
    "info": "query virtual networks",
    "attach": "attach a virtual machine to a network",
    "manage": "manage virtual networks",
    "forward": "change port forwarding",
}
