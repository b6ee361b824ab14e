"""Who is calling, and may they? Caller credentials from the bus, answers from polkit.

Rules:
- the caller's uid comes from org.freedesktop.DBus.GetConnectionCredentials(sender), never from
  an argument;
- polkit is asked with the *system-bus-name* subject of the sender (never a PID);
- AllowUserInteraction is set only when the call carried ALLOW_INTERACTIVE_AUTHORIZATION;
- when polkit says a challenge could help and the call did not allow interaction, the caller
  gets org.freedesktop.DBus.Error.InteractiveAuthorizationRequired;
- uid 0 skips polkit; if polkit cannot be asked, non-root callers are denied.

Positive answers are cached per (sender unique name, action, details), for a short time only
(--authz-cache-seconds, 60 s by default): polkit's answer can change under an open connection
(a user taken out of group 'vnet', a rule file edited), and an expired entry is asked again.
The cache is bounded by entries and by bytes, least recently used first out; the bus surface
validates every argument before it asks, so details are short names, never a caller's
kilobytes. Entries go when the sender disconnects and when polkit emits Changed, and an
answer to a check that was at polkit when it emitted Changed is used for that call only (it
may have been given under the rules from before); answers that came from a password (a
temporary authorization) are never cached. A refusal of a check that
could not prompt is remembered for DENIED_SECONDS (a user asking in a loop costs polkit one
check per few seconds, not one per call).

Checks in flight are bounded: POLKIT_IN_FLIGHT in all (below the replies dbus-daemon lets one
connection wait for), POLKIT_PER_UID per user (further ones wait for that user's own), and
each times out, so one user calling from many connections, or an agent that never answers,
cannot make everyone else's checks fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from vnet_common.wire import ACTION_PREFIX, ACTIONS, ATTACH

from .errors import AccessDenied, InteractiveAuthorizationRequired, LimitsExceeded, VnetError

log = logging.getLogger("vnetd.authz")

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
CHECK_ALLOW_USER_INTERACTION = 0x1

CACHE_SECONDS = 60.0  # how long a positive answer is trusted without asking polkit again
CACHE_ENTRIES = 4096
CACHE_BYTES = 1 << 20  # characters of keys held, all entries together
CREDS_ENTRIES = 4096  # connections whose credentials are remembered
# polkit checks in flight: vnetd's connection may wait for at most 128 replies (dbus-daemon's
# max_replies_per_connection), and one user calling from many connections must not use them
# all, or everyone else's checks fail. Per uid, further checks wait for that uid's own.
POLKIT_IN_FLIGHT = 96
POLKIT_PER_UID = 8
# a uid's calls waiting for polkit, in flight or queued behind its 8: each holds its message
# (up to the argument budget), and one user may call from many connections
POLKIT_WAITING_PER_UID = 32
POLKIT_TIMEOUT = 30.0  # seconds for a check without a password prompt
POLKIT_PROMPT_TIMEOUT = 300.0  # with one (an agent that never answers holds a slot no longer)
DENIED_SECONDS = 5.0  # a refusal without a prompt is remembered this long (per connection)

CacheKey = tuple[str, str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Caller:
    sender: str
    uid: int
    pid: int | None
    interactive: bool

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def _key_size(key: CacheKey) -> int:
    return len(key[0]) + len(key[1]) + sum(len(k) + len(v) for k, v in key[2])


class Authorizer:
    def __init__(self, bus: MessageBus, cache_seconds: float = CACHE_SECONDS,
                 max_entries: int = CACHE_ENTRIES, max_bytes: int = CACHE_BYTES,
                 clock=time.monotonic):
        self.bus = bus
        self.cache_seconds = cache_seconds
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self._creds: OrderedDict[str, tuple[int, int | None]] = OrderedDict()
        self._cache: OrderedDict[CacheKey, float] = OrderedDict()  # key -> expiry, LRU order
        # sender -> its keys in the cache: a disconnect (any name on the bus) costs its own
        # entries, not a walk over all of them
        self._by_sender: dict[str, set[CacheKey]] = {}
        self._bytes = 0
        self.polkit_calls = 0
        self.cache_hits = 0
        self._in_flight = asyncio.Semaphore(POLKIT_IN_FLIGHT)
        # uid -> [its semaphore, how many of its checks hold or wait for it]
        self._per_uid: dict[int, list] = {}
        # key -> (expiry, the refusal's class and text): polkit's refusals of checks that
        # could not prompt (a fresh exception each time: one raised again keeps growing)
        self._denied: OrderedDict[CacheKey, tuple[float, type[VnetError], str]] = OrderedDict()
        self._serial = 0  # for the cancellation ids of checks
        # polkit's configuration changes seen: an answer to a check asked before a change
        # (polkit may have answered under the old rules) is used once, never kept
        self._generation = 0

    # --- cache maintenance (wired to bus signals by bus.py) -----------------------------
    def forget_sender(self, name: str) -> None:
        self._creds.pop(name, None)  # (its refusals expire on their own: a few seconds)
        gone = list(self._by_sender.get(name, ()))
        for k in gone:
            self._drop(k)
        if gone:
            log.debug("forgot %d cached answer(s) for %s: it disconnected", len(gone), name)

    def polkit_changed(self) -> None:
        self._generation += 1
        if self._cache:
            log.info("polkit configuration changed: dropped %d cached answers", len(self._cache))
        self._cache.clear()
        self._by_sender.clear()
        self._denied.clear()
        self._bytes = 0

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    @property
    def cache_bytes(self) -> int:
        return self._bytes

    def _drop(self, key: CacheKey) -> None:
        if self._cache.pop(key, None) is not None:
            self._bytes -= _key_size(key)
            keys = self._by_sender.get(key[0])
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_sender[key[0]]

    def _cached(self, key: CacheKey) -> bool:
        expiry = self._cache.get(key)
        if expiry is None:
            return False
        if self.clock() >= expiry:
            self._drop(key)
            return False
        self._cache.move_to_end(key)
        return True

    def _remember(self, key: CacheKey) -> None:
        if self.cache_seconds <= 0:
            return
        size = _key_size(key)
        if size > self.max_bytes:
            return
        self._drop(key)
        self._cache[key] = self.clock() + self.cache_seconds
        self._by_sender.setdefault(key[0], set()).add(key)
        self._bytes += size
        while len(self._cache) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._cache)))  # the least recently used

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
            while len(self._creds) > CREDS_ENTRIES:  # a unique name is never reused
                self._creds.popitem(last=False)
        else:
            self._creds.move_to_end(sender)
        return Caller(sender=sender, uid=cached[0], pid=cached[1], interactive=interactive)

    # --- polkit -------------------------------------------------------------------------
    async def check(self, caller: Caller, action: str, details: dict[str, str] | None = None,
                    method: str = "") -> None:
        """Return if `caller` may do `action` (for `method`, which the refusal names); raise
        AccessDenied or InteractiveAuthorizationRequired otherwise."""
        if action not in ACTIONS:  # fail closed on anything unknown
            raise AccessDenied(f"No authorization is defined for '{action}'; refused.")
        if caller.is_root:
            return
        details = details or {}
        key = (caller.sender, action, tuple(sorted(details.items())))
        if self._cached(key):
            self.cache_hits += 1
            return
        if not caller.interactive:
            denied = self._denied.get(key)
            if denied is not None and self.clock() < denied[0]:
                self.cache_hits += 1
                raise denied[1](denied[2])
        generation = self._generation
        is_authorized, is_challenge, result_details = await self._ask(caller, action, details)
        current = generation == self._generation  # (no Changed from polkit meanwhile)
        log.debug("polkit: %s for uid %d: authorized=%s challenge=%s %s", action, caller.uid,
                  is_authorized, is_challenge, result_details)
        if is_authorized:
            if current and not any(k.startswith(("polkit.temporary_authorization",
                                                 "polkit.retains_authorization"))
                                   for k in result_details):
                self._remember(key)
            return
        refusal = self._refusal(caller, action, method, is_challenge, result_details)
        # polkit's own answer (never a failure to ask it), under the rules in force now
        if not caller.interactive and current:
            self._denied[key] = (self.clock() + DENIED_SECONDS, type(refusal), refusal.message)
            self._denied.move_to_end(key)
            while len(self._denied) > self.max_entries:
                self._denied.popitem(last=False)
        raise refusal

    async def _ask(self, caller: Caller, action: str, details: dict[str, str]
                   ) -> tuple[bool, bool, dict]:
        """polkit's answer (authorized, challenge, details); AccessDenied if it cannot be had.
        A check that times out is cancelled at polkit, which then answers the pending call:
        dbus-daemon lets vnetd's connection wait for 128 replies, and never times one out."""
        flags = CHECK_ALLOW_USER_INTERACTION if caller.interactive else 0
        subject = ("system-bus-name", {"name": Variant("s", caller.sender)})
        mine = self._per_uid.get(caller.uid)
        if mine is None:
            mine = self._per_uid[caller.uid] = [asyncio.Semaphore(POLKIT_PER_UID), 0]
        if mine[1] >= POLKIT_WAITING_PER_UID:
            raise LimitsExceeded(f"{POLKIT_WAITING_PER_UID} of your calls are waiting for "
                                 "the authorization service (polkit) already; try again once "
                                 "they are answered.")
        mine[1] += 1
        self._serial += 1
        cancel_id = f"vnetd-{self._serial}"
        try:
            async with mine[0], self._in_flight:
                self.polkit_calls += 1
                call = asyncio.ensure_future(self.bus.call(Message(
                    destination=POLKIT_NAME, path=POLKIT_PATH, interface=POLKIT_IFACE,
                    member="CheckAuthorization", signature="(sa{sv})sa{ss}us",
                    body=[subject, action, details, flags, cancel_id],
                )))
                try:
                    reply = await asyncio.wait_for(
                        asyncio.shield(call),
                        POLKIT_PROMPT_TIMEOUT if caller.interactive else POLKIT_TIMEOUT)
                except (TimeoutError, asyncio.CancelledError):
                    await self._cancel(cancel_id, call)
                    raise
        except TimeoutError:
            log.warning("polkit did not answer in time: denying %s to uid %d", action,
                        caller.uid)
            raise AccessDenied("The authorization service (polkit) did not answer in time; "
                               "refused.") from None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the bus itself failed: deny
            log.error("polkit could not be asked (%s): denying %s to uid %d", e, action, caller.uid)
            raise AccessDenied("The authorization service (polkit) is not available; "
                               "refused.") from None
        finally:
            mine[1] -= 1
            if not mine[1]:  # no uid keeps a semaphore it is not using
                del self._per_uid[caller.uid]
        if reply.message_type != MessageType.METHOD_RETURN:
            log.error("polkit error for %s: %s %s", action, reply.error_name, reply.body)
            raise AccessDenied(
                "The authorization service (polkit) is not available or failed; refused."
            )
        return reply.body[0]

    async def _cancel(self, cancel_id: str, call: asyncio.Future) -> None:
        """Ask polkit to drop a check, and wait (a little) for the pending call to end, so
        that its slot here and at dbus-daemon are freed together."""
        try:
            await asyncio.wait_for(self.bus.call(Message(
                destination=POLKIT_NAME, path=POLKIT_PATH, interface=POLKIT_IFACE,
                member="CancelCheckAuthorization", signature="s", body=[cancel_id],
            )), 5)
            await asyncio.wait_for(asyncio.shield(call), 5)
        except Exception as e:  # polkit gone as well: nothing more to free
            log.debug("cancelling polkit check %s: %s", cancel_id, e)

    def _refusal(self, caller: Caller, action: str, method: str, is_challenge: bool,
                 result_details: dict) -> VnetError:
        verb = action[len(ACTION_PREFIX):]
        what = _METHODS.get(method) or _VERBS.get(verb, verb)
        # group vnet grants the attach action only (its polkit rule); the others take a rule
        # of their own
        fix = ("ask an administrator to add you to group 'vnet' or grant it in a polkit rule"
               if action == ATTACH else
               f"ask an administrator to grant you {action} in a polkit rule")
        if is_challenge and not caller.interactive:
            return InteractiveAuthorizationRequired(
                f"Authentication is required to {what}: run the command on a terminal (a "
                f"password prompt will appear) or {fix}.")
        if result_details.get("polkit.dismissed"):
            return AccessDenied(f"Authentication to {what} was dismissed.")
        if is_challenge:
            return AccessDenied(
                f"Authentication is required to {what}, but no polkit authentication agent "
                f"answered: run the command on a terminal, or {fix}.")
        return AccessDenied(f"You are not allowed to {what}: {fix}.")


_VERBS = {
    "info": "query virtual networks",
    "attach": "attach a virtual machine to a network",
    "manage": "manage virtual networks",
    "forward": "change port forwarding",
}
# what a refusal names where the action alone would say something else
_METHODS = {
    "Detach": "detach a port", "Enslave": "put a tap on a network",
    "Release": "take a tap off a network", "GetMac": "get a virtual machine's MAC",
    "VdeSocket": "plug into a VDE switch", "Define": "define a network",
    "Undefine": "undefine a network", "Start": "start a network", "Stop": "stop a network",
    "Reload": "reload the network definitions", "SetAutostart": "change a network's autostart",
    "ImportMacs": "import MACs", "CheckDefinition": "check a network definition",
    "ForgetMac": "forget a virtual machine's MACs",
    "TransferVm": "give a virtual machine to another user", "AddHost": "add a static host",
    "RemoveHost": "remove a static host", "AddPeer": "add an overlay peer",
    "RemovePeer": "remove an overlay peer", "AddForward": "add a port forward",
    "RemoveForward": "remove a port forward",
}
