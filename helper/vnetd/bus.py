"""The D-Bus surface, thin: decode, authorize, call the engine, encode, map errors, send fds.

Messages are taken with a low-level handler so that each call's sender, flags and file
descriptors are seen exactly (dbus-fast's high-level service hides the flags). Received fds
that no method expects are closed at once. A reply that carries fds is awaited until written,
and only then are the service's copies closed.
"""

from __future__ import annotations

import asyncio
import logging
import pwd
import reprlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from vnet_common.names import key, validate_ifname, validate_network_name, validate_vm_name
from vnet_common.toml import render_definition
from vnet_common.wire import signature

from . import api, model
from .authz import POLKIT_NAME, Authorizer, Caller
from .engine import Engine
from .errors import Failed, InvalidArgument, NotFound, NotOwner, VnetError
from .fairlock import caller_key
from .handover import send_handing_over
from .kernel import closing
from .linebudget import LineBudget
from .model import Network
from .session import Sessions

BUS_DAEMON = "org.freedesktop.DBus"

log = logging.getLogger("vnetd.bus")

STD_IFACES = """  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect"><arg name="xml" type="s" direction="out"/></method>
  </interface>
  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping"/>
    <method name="GetMachineId"><arg name="machine_uuid" type="s" direction="out"/></method>
  </interface>"""

MAX_DEPTH = 16  # containers and variants nested in one argument
MAX_IN_FLIGHT = 32  # calls one sender may have waiting for an answer at once
MAX_STRING = 4096  # characters in any one string argument
# what all the arguments of one call hold together: a call of up to 1 MiB (what vnetd reads,
# on the bus or on a session: busreader, frames.MAX_MESSAGE) is decoded before vnetd sees it,
# and anyone may send one (before polkit is asked): past these, it is refused at once, rather
# than turned into Python values and held while polkit answers
MAX_ITEMS = 65536  # members of containers, in all
MAX_CHARS = 1 << 20  # characters of strings, in all
IGNORED_SIGNAL_LOG_EVERY = 10.0  # seconds between warnings about signals from the wrong sender

# Arguments checked before polkit is asked (by name, as the contract table names them): a call
# with a bad one is refused with InvalidArgument at once, so polkit's answer, and the cache of
# answers, only ever hold names that could be real.
ARG_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "name": validate_network_name,
    "network": validate_network_name,
    "vm": validate_vm_name,
    "ifname": lambda v: validate_ifname(v, "interface name"),
}


# --- value conversion -------------------------------------------------------------------
def to_variant(v: Any) -> Variant:
    """A plain value as the variant the contract's signature() names (see vnet_common)."""
    t = type(v)
    # most of what goes out (a `ports` of thousands: some 65,000 values) is of these types,
    # whose signature is known: neither signature() nor the variant's own check is needed
    if t is str:
        return Variant("s", v, False)
    if t is int:  # past 32 bits, x, checked (past 64, refused)
        return Variant("i", v, False) if -0x80000000 <= v <= 0x7FFFFFFF else Variant("x", v)
    if t is bool:
        return Variant("b", v, False)
    if isinstance(v, Variant):
        return v
    sig = signature(v)
    if sig == "a{sv}":
        return Variant(sig, to_asv(v))
    if sig == "aa{sv}":
        return Variant(sig, [to_asv(x) for x in v])
    return Variant(sig, list(v) if sig in ("as", "ax") else v)


def to_asv(d: dict[str, Any]) -> dict[str, Variant]:
    """A dictionary as a{sv}, without its None values (to_variant, inlined for the common
    types: `ports` makes some 65,000 of these at 5,000 ports)."""
    out = {}
    for k, v in d.items():
        t = type(v)
        if t is str:
            out[k] = Variant("s", v, False)
        elif t is int:
            out[k] = (Variant("i", v, False) if -0x80000000 <= v <= 0x7FFFFFFF
                      else Variant("x", v))
        elif t is bool:
            out[k] = Variant("b", v, False)
        elif v is not None:
            out[k] = to_variant(v)
    return out


class Budget:
    """What is left of one call's MAX_ITEMS and MAX_CHARS while its arguments are unwrapped."""

    __slots__ = ("items", "chars")

    def __init__(self) -> None:
        self.items, self.chars = MAX_ITEMS, MAX_CHARS


def unwrap(v: Any, depth: int = 0, budget: Budget | None = None) -> Any:
    """Plain Python values from what dbus-fast decoded (nested at most MAX_DEPTH deep; all of
    one call's arguments, given one `budget`, within MAX_ITEMS and MAX_CHARS, bytes counted
    as characters: a call past them is refused before vnetd builds anything of its own from
    them, or holds them while polkit is asked)."""
    if budget is None:
        budget = Budget()
    if depth > MAX_DEPTH:
        raise InvalidArgument("The arguments are nested too deeply.")
    if isinstance(v, str):
        if len(v) > MAX_STRING:
            raise InvalidArgument(f"A string argument is longer than {MAX_STRING} characters.")
        budget.chars -= len(v)
        if budget.chars < 0:
            raise InvalidArgument(f"The arguments hold more than {MAX_CHARS} characters of "
                                  "text in all.")
        return v
    if isinstance(v, bytes | bytearray):  # (no method takes bytes; an option may hold them)
        budget.chars -= len(v)
        if budget.chars < 0:
            raise InvalidArgument(f"The arguments hold more than {MAX_CHARS} characters of "
                                  "text and bytes in all.")
        return v
    if isinstance(v, dict | list):
        budget.items -= len(v)
        if budget.items < 0:
            raise InvalidArgument(f"The arguments hold more than {MAX_ITEMS} items in all.")
    if isinstance(v, Variant):
        if "h" in v.signature:
            raise InvalidArgument("File descriptors are not accepted in options.")
        return unwrap(v.value, depth + 1, budget)
    if isinstance(v, dict):
        return {unwrap(k, depth + 1, budget): unwrap(x, depth + 1, budget)
                for k, x in v.items()}
    if isinstance(v, list):
        return [unwrap(x, depth + 1, budget) for x in v]
    return v


def label_escape(name: str) -> str:
    """A network name as one object-path element ([A-Za-z0-9_] only), systemd style."""
    return "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in name) or "_"


# the longest object-path element a network's name makes: 15 characters, each escaped
LABEL_MAX = 3 * 15


def network_of(path: str) -> str | None:
    """The network a path under NETWORK_PATH names, or None. A path may be as long as a
    message (1 MiB, what vnetd reads): one too long to name a network is not read further."""
    label = path[len(api.NETWORK_PATH) + 1:]
    return label_unescape(label) if len(label) <= LABEL_MAX else None


def _clip(text: str | None, n: int = 80) -> str:
    """A caller's name of something, as an error repeats it: at most n characters."""
    text = text or ""
    return text if len(text) <= n else text[:n] + "..."


def label_unescape(label: str) -> str:
    out, i = [], 0
    while i < len(label):
        if label[i] == "_" and i + 3 <= len(label):
            try:
                out.append(chr(int(label[i + 1:i + 3], 16)))
                i += 3
                continue
            except ValueError:
                pass
        out.append(label[i])
        i += 1
    return "".join(out)


def network_path(name: str) -> str:
    return f"{api.NETWORK_PATH}/{label_escape(name)}"


async def finish(after: After) -> None:
    """Run what a call left to do after its answer. It is shielded: the guard of a port
    handed out is put in even when the task that answered is cancelled meanwhile (a session
    that ends), and its failure is logged here, never raised into the transport."""
    if after is None:
        return
    task = asyncio.ensure_future(after())
    task.add_done_callback(_after_failed)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        raise
    except Exception:
        pass  # said by _after_failed


def _after_failed(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("after answering a call: %r", task.exception(), exc_info=task.exception())


class Reply:
    """What a handler returns: body values, and fds to send and close after the write."""

    def __init__(self, *body: Any, fds: list[int] | None = None, audit: str = "",
                 changed: bool = True, after: Callable[[], Awaitable[None]] | None = None):
        self.body = list(body)
        self.fds = fds or []
        self.audit = audit  # what the log line should add about the result
        self.changed = changed  # False: a call of a changing method that changed nothing
        # what is left to do once the answer is written (an attached port's guard): the
        # transport awaits it, whatever became of the answer
        self.after = after


Handler = Callable[..., Awaitable[Any]]
After = Callable[[], Awaitable[None]] | None


class CallLog(LineBudget):
    """How many lines of refused calls a uid may have: BURST at once, then RATE a second
    (root is not limited). A local user calling in a loop would otherwise fill the log, and
    push everyone's lines past journald's rate limit (10,000 a service in 30 s by default),
    the audit lines of other users' calls with them. A change that was made is always logged
    (what it costs bounds how fast one can loop). Lines held back are counted and said in
    that uid's next line."""

    BURST = 200
    RATE = 20.0
    MAX_UIDS = LineBudget.MAX_KEYS

    def __init__(self, burst: float = BURST, rate: float = RATE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(burst, rate, clock)

    def take(self, uid: int) -> int | None:  # type: ignore[override]
        return 0 if uid == 0 else super().take(uid)


class Service:
    def __init__(self, bus: MessageBus, engine: Engine, authz: Authorizer):
        self.bus = bus
        self.engine = engine
        self.authz = authz
        self.methods = {(m.iface, m.name): m for m in api.METHODS}
        self.call_log = CallLog()
        self.handlers: dict[tuple[str, str], Handler] = {
            (api.MANAGER, "ListNetworks"): self.list_networks,
            (api.MANAGER, "GetNetwork"): self.get_network,
            (api.MANAGER, "Define"): self.define,
            (api.MANAGER, "ExportDefinition"): self.export_definition,
            (api.MANAGER, "Undefine"): self.undefine,
            (api.MANAGER, "Start"): self.start,
            (api.MANAGER, "Stop"): self.stop,
            (api.MANAGER, "SetAutostart"): self.set_autostart,
            (api.MANAGER, "Reload"): self.reload,
            (api.MANAGER, "Attach"): self.attach,
            (api.MANAGER, "OpenSession"): self.open_session,
            (api.MANAGER, "Detach"): self.detach,
            (api.MANAGER, "ListPorts"): self.list_ports,
            (api.MANAGER, "GetMac"): self.get_mac,
            (api.MANAGER, "ExportEtherConf"): self.export_ether_conf,
            (api.MANAGER, "VdeSocket"): self.vde_socket,
            (api.MANAGER, "ImportMacs"): self.import_macs,
            (api.MANAGER, "ExportMacs"): self.export_macs,
            (api.MANAGER, "ForgetMac"): self.forget_mac,
            (api.MANAGER, "CheckDefinition"): self.check_definition,
            (api.MANAGER, "Redefine"): self.redefine,
            (api.MANAGER, "TransferVm"): self.transfer_vm,
            (api.MANAGER, "Enslave"): self.enslave,
            (api.MANAGER, "Release"): self.release,
            (api.MANAGER, "AddHost"): self.add_host,
            (api.MANAGER, "RemoveHost"): self.remove_host,
            (api.MANAGER, "ListHosts"): self.list_hosts,
            (api.MANAGER, "Leases"): self.leases,
            (api.MANAGER, "AddForward"): self.add_forward,
            (api.MANAGER, "RemoveForward"): self.remove_forward,
            (api.MANAGER, "AddPeer"): self.add_peer,
            (api.MANAGER, "RemovePeer"): self.remove_peer,
            (api.MANAGER, "ListForwards"): self.list_forwards,
            (api.NETWORK, "GetInfo"): self.get_network,
            (api.NETWORK, "Start"): self.start,
            (api.NETWORK, "Stop"): self.stop,
        }
        missing = set(self.methods) ^ set(self.handlers)
        if missing:
            raise RuntimeError(f"contract and handlers disagree: {sorted(missing)}")
        self.tasks: set[asyncio.Task] = set()
        self.in_flight: dict[str, int] = {}
        self.polkit_owner: str | None = None  # polkitd's unique name on the bus, when it runs
        self._ignored_logged = 0.0
        self.sessions = Sessions(self.serve_session, finish)
        engine.listeners.append(self.emit_event)

    # --- wiring -------------------------------------------------------------------------
    def install(self) -> None:
        self.bus.add_message_handler(self.on_message)

    def on_message(self, msg: Message) -> Message | bool | None:
        if msg.unix_fds:
            # nothing vnetd is sent takes fds (no call, no signal, no reply to its own calls):
            # never kept, never closed on the loop (a sender chooses what their last close
            # costs: kernel/closing.py)
            closing.discard(msg.unix_fds)
        if msg.message_type == MessageType.SIGNAL:
            self._on_signal(msg)
            return True
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        path = msg.path or ""
        ours = path == api.MANAGER_PATH or path.startswith(api.MANAGER_PATH + "/")
        if msg.interface == "org.freedesktop.DBus.Introspectable" and msg.member == "Introspect":
            return self._introspect(msg)
        if msg.interface == "org.freedesktop.DBus.Peer" and msg.member in ("Ping",
                                                                           "GetMachineId"):
            return None  # dbus-fast answers these
        if not ours:
            if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
                return True  # nobody waits for an answer: drop it
            return self._unknown(msg)
        sender = msg.sender or ""
        if self.in_flight.get(sender, 0) >= MAX_IN_FLIGHT:
            self.bus.send(Message.new_error(
                msg, "org.freedesktop.DBus.Error.LimitsExceeded",
                f"Too many calls at once from {sender} (at most {MAX_IN_FLIGHT} waiting for an "
                "answer); wait for the answers first."))
            return True
        self.in_flight[sender] = self.in_flight.get(sender, 0) + 1
        task = asyncio.get_running_loop().create_task(self._dispatch(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(lambda _t: self._done(sender))
        return True

    def _done(self, sender: str) -> None:
        n = self.in_flight.get(sender, 1) - 1
        if n:
            self.in_flight[sender] = n
        else:
            self.in_flight.pop(sender, None)

    def _on_signal(self, msg: Message) -> None:
        """Only the bus daemon says who disconnected, and only polkitd's current connection
        says that polkit changed: the same signals from anyone else (a local user can send
        any signal to vnetd's connection) are ignored."""
        if msg.interface == BUS_DAEMON and msg.member == "NameOwnerChanged":
            if msg.sender != BUS_DAEMON or msg.signature != "sss":
                return self._ignored(msg)
            name, _old, new = msg.body
            if name == POLKIT_NAME:
                self.polkit_owner = new or None
                # a polkitd that (re)starts sends no Changed, and may read other rules
                self.authz.polkit_changed()
            if name.startswith(":") and not new:
                self.authz.forget_sender(name)
                self.sessions.forget(name)
        elif msg.interface == "org.freedesktop.PolicyKit1.Authority" and msg.member == "Changed":
            if self.polkit_owner is None or msg.sender != self.polkit_owner:
                return self._ignored(msg)
            self.authz.polkit_changed()

    def _ignored(self, msg: Message) -> None:
        now = time.monotonic()
        level = logging.DEBUG
        if now - self._ignored_logged >= IGNORED_SIGNAL_LOG_EVERY:
            self._ignored_logged = now
            level = logging.WARNING
        log.log(level, "ignored a %s.%s signal from %s: only %s sends it", msg.interface,
                msg.member, msg.sender,
                BUS_DAEMON if msg.member == "NameOwnerChanged" else "polkitd")

    async def subscribe(self) -> None:
        for rule in (
            "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
            "member='NameOwnerChanged'",
            "type='signal',sender='org.freedesktop.PolicyKit1',"
            "interface='org.freedesktop.PolicyKit1.Authority',member='Changed'",
        ):
            await self.bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule],
            ))
        # after the match: a polkitd that starts from now on is seen by NameOwnerChanged
        reply = await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="GetNameOwner", signature="s",
            body=[POLKIT_NAME],
        ))
        if reply.message_type == MessageType.METHOD_RETURN and self.polkit_owner is None:
            self.polkit_owner = reply.body[0]

    # --- introspection ------------------------------------------------------------------
    def _children(self, path: str) -> list[str]:
        if path == "/":
            return ["org"]
        if path == "/org":
            return ["qemuvnet"]
        if path == "/org/qemuvnet":
            return ["Vnet1"]
        if path == api.MANAGER_PATH:
            return ["network", "port"]
        if path == api.NETWORK_PATH:
            return [label_escape(n) for n in sorted(self.engine.defs)]
        return []

    def _introspect(self, msg: Message) -> Message:
        path = msg.path or ""  # a method call always has one
        ifaces = []
        if path == api.MANAGER_PATH:
            ifaces.append(api.interface_xml(api.MANAGER))
        elif path.startswith(api.NETWORK_PATH + "/"):
            if network_of(path) in self.engine.defs:
                ifaces.append(api.interface_xml(api.NETWORK))
        nodes = "".join(f'\n  <node name="{c}"/>' for c in self._children(path))
        xml = (f"{api.DOCTYPE}\n<node>\n{STD_IFACES}\n" + "\n".join(ifaces)
               + f"{nodes}\n</node>\n")
        return Message.new_method_return(msg, "s", [xml])

    # --- dispatch -----------------------------------------------------------------------
    def _error(self, msg: Message, name: str, text: str) -> Message:
        return Message.new_error(msg, name, text)

    async def _dispatch(self, msg: Message) -> None:
        t0 = time.perf_counter()
        reply, fds, after = await self.answer(msg, msg.sender or "")
        try:
            # on the bus, what follows an answer comes before it: when Attach returns, the
            # port has its guard (a session answers first; see vnetd.session)
            await finish(after)
            if reply is None:
                return
            # its fds (vnetd's copies) are closed between its first byte and the rest: the
            # caller, never vnetd, closes a port's tap last (vnetd.handover)
            await (send_handing_over(self.bus, reply, fds) if fds else self.bus.send(reply))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s from %s answered in %.2f ms", msg.member, msg.sender,
                          (time.perf_counter() - t0) * 1000)
        finally:
            # none are left once handed over; if the reply was not sent, they are vnetd's
            # alone (the last copies: see close_later)
            closing.close_later(fds)

    async def answer(self, msg: Message, sender: str
                     ) -> tuple[Message | None, list[int], After]:
        """The answer to a method call from `sender` (None when none is expected), the fds
        it carries, and what is left to do once it is written: the caller closes the fds once
        the answer is written, then awaits finish(after), whatever became of the answer. The
        bus and sessions (vnetd.session) both answer through here."""
        reply: Message
        fds: list[int] = []
        after: After = None
        try:
            reply, fds, after = await self._call(msg, sender)
        except VnetError as e:
            reply = self._error(msg, e.dbus_name, e.message)
        except Exception:
            log.exception("internal error in %s.%s", msg.interface, msg.member)
            reply = self._error(msg, Failed.dbus_name,
                                "vnetd hit an internal error; the details are in its log.")
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            closing.close_later(fds)  # (the last copies: see close_later)
            return None, [], after
        return reply, fds, after

    async def serve_session(self, msg: Message, sender: str
                            ) -> tuple[Message | None, list[int], After]:
        """A call on one of `sender`'s sessions: as on the bus, but for OpenSession."""
        if msg.member == "OpenSession":
            if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
                return None, [], None
            return self._error(msg, "org.freedesktop.DBus.Error.NotSupported",
                               "OpenSession is a call on the system bus, not on a session."
                               ), [], None
        return await self.answer(msg, sender)

    async def _call(self, msg: Message, sender: str) -> tuple[Message, list[int], After]:
        path = msg.path or ""  # a method call always has a path and a member
        member = msg.member or ""
        iface = msg.interface
        target: str | None = None
        if path == api.MANAGER_PATH:
            iface = iface or api.MANAGER
            if iface != api.MANAGER:
                return self._unknown(msg), [], None
        elif path.startswith(api.NETWORK_PATH + "/"):
            iface = iface or api.NETWORK
            target = network_of(path)
            if iface != api.NETWORK or target not in self.engine.defs:
                return self._unknown(msg), [], None
        else:
            return self._unknown(msg), [], None
        spec = self.methods.get((iface, member))
        if spec is None:
            return self._unknown(msg), [], None
        if msg.signature != spec.in_sig:
            return self._error(
                msg, "org.freedesktop.DBus.Error.InvalidArgs",
                f"{spec.name} takes arguments of type '{spec.in_sig}', not '{msg.signature}'.",
            ), [], None
        interactive = bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        caller = await self.authz.caller(sender, interactive)
        # the engine's lock serves callers in turn: this task (and what it starts) is theirs
        caller_key.set(caller.uid)
        budget = Budget()
        args = [unwrap(a, 0, budget) for a in msg.body]
        if target is not None:
            args.insert(0, target)
        for arg, value in zip(spec.args, args[1:] if target is not None else args,
                              strict=False):
            check = ARG_VALIDATORS.get(arg.name)
            if check is not None:
                check(value)
        details = self._details(spec, args, target)
        handler = self.handlers[(iface, member)]
        try:
            await self.authz.check(caller, spec.action, details, spec.name)
            result = await handler(caller, *args)
        except VnetError as e:
            # a read of something that is not there says nothing about anyone: debug only
            level = (logging.DEBUG if spec.action == api.INFO
                     and isinstance(e, NotFound | InvalidArgument) else logging.INFO)
            if log.isEnabledFor(level) and (held := self.call_log.take(caller.uid)) is not None:
                log.log(level, "uid=%d sender=%s pid=%s %s%s: refused: %s: %s%s", caller.uid,
                        caller.sender, caller.pid, spec.name, _fmt_args(args),
                        e.dbus_name.rsplit(".", 1)[-1], _one_line(e.message), _held(held),
                        extra={"VNET_METHOD": spec.name, "VNET_UID": caller.uid,
                               "VNET_PID": caller.pid, "VNET_SENDER": caller.sender,
                               "VNET_NETWORK": details.get("network"),
                               "VNET_RESULT": "refused", "VNET_ERROR": e.dbus_name})
            raise
        if not isinstance(result, Reply):
            result = Reply() if result is None else Reply(result)
        done = result

        async def after() -> None:
            if done.after is not None:  # first: an attached port's guard
                await done.after()
            # every change has its line (refusals are budgeted; a call that changed nothing,
            # such as GetMac of a known VM, a debug line)
            level = logging.INFO if done.changed else logging.DEBUG
            if spec.action != api.INFO and log.isEnabledFor(level):
                log.log(level, "uid=%d sender=%s pid=%s %s%s: ok%s%s", caller.uid,
                        caller.sender, caller.pid, spec.name, _fmt_args(args),
                        f": {done.audit}" if done.audit else "",
                        _held(self.call_log.held(caller.uid)),
                        extra={"VNET_METHOD": spec.name, "VNET_UID": caller.uid,
                               "VNET_PID": caller.pid, "VNET_SENDER": caller.sender,
                               "VNET_NETWORK": details.get("network"), "VNET_RESULT": "ok"})

        try:
            reply = Message(
                message_type=MessageType.METHOD_RETURN, reply_serial=msg.serial,
                destination=msg.sender or None, signature=spec.out_sig, body=result.body,
                unix_fds=result.fds,
            )
        except BaseException:  # the change was made: its fds go, its guard and line follow
            closing.close_later(result.fds)
            await finish(after)
            raise
        return reply, result.fds, (None if spec.action == api.INFO and result.after is None
                                   else after)

    def _details(self, spec: api.Method, args: list[Any], target: str | None) -> dict[str, str]:
        """polkit details from the named arguments (what a rules file may test). Every method
        that touches a network names it, also those given only an interface: the network its
        name says (vnet-ifup's <network>_<n> taps), or the network of the port."""
        if target is not None:
            return {"network": target}
        names = [a.name for a in spec.args]
        out = {}
        for want in spec.details:
            if want in names and isinstance(args[names.index(want)], str):
                out["network" if want == "name" else want] = args[names.index(want)]
        ifname = out.get("ifname")
        if ifname is not None and "network" not in out:
            network = self._network_of_interface(spec.name, ifname)
            if network is not None:
                out = {"network": network, **out}
        return out

    def _network_of_interface(self, method: str, ifname: str) -> str | None:
        if method == "Detach":
            port = self.engine.ports.by_name.get(ifname)
            return port.network if port is not None else None
        network = ifname.rsplit("_", 1)[0] if "_" in ifname else ""
        try:
            return validate_network_name(network)
        except VnetError:  # the engine says what is wrong with the name
            return None

    def _unknown(self, msg: Message) -> Message:
        # (what the caller named is repeated clipped: a reply larger than the bus takes would
        # cost vnetd its connection)
        return self._error(msg, "org.freedesktop.DBus.Error.UnknownMethod",
                           f"No method {_clip(msg.interface)}.{_clip(msg.member)} at "
                           f"{_clip(msg.path)}.")

    def emit_event(self, kind: str, *args: Any) -> None:
        """The engine's one event stream, as signals."""
        emit: dict[str, Callable[..., None]] = {
            "network": self.emit_network_changed, "port": self.emit_port_changed,
            "lease": self.emit_lease_changed}
        emit[kind](*args)

    def emit_port_changed(self, port, state: str) -> None:
        self.bus.send(Message.new_signal(api.MANAGER_PATH, api.MANAGER, "PortChanged", "sss",
                                         [port.ifname, port.network, state]))

    def emit_lease_changed(self, network: str, lease, event: str) -> None:
        # broadcast: no MAC, address or host name of anyone's VM (Leases filters those)
        self.bus.send(Message.new_signal(api.MANAGER_PATH, api.MANAGER, "LeaseChanged", "ss",
                                         [network, event]))

    def emit_network_changed(self, name: str, state: str) -> None:
        self.bus.send(Message.new_signal(api.MANAGER_PATH, api.MANAGER, "NetworkChanged",
                                         "ss", [name, state]))

    # --- handlers -----------------------------------------------------------------------
    async def list_networks(self, caller: Caller) -> Any:
        return self.engine.queries.rows(to_asv)

    async def get_network(self, caller: Caller, name: str) -> Any:
        """Everyone may look at a network; its ports (VM, MAC, uid) are shown whole only to
        their holders and to administrators (manage), the rest as a count (other-ports)."""
        d = await self.engine.queries.show(name)
        ports = d.get("ports")
        if ports and not caller.is_root and any(p["uid"] != caller.uid for p in ports):
            if not await self.is_admin(caller, name):
                d["ports"] = [p for p in ports if p["uid"] == caller.uid]
                d["other-ports"] = len(ports) - len(d["ports"])
        return to_asv(d)

    async def define(self, caller: Caller, name: str, options: dict[str, Any]) -> Any:
        return await self._define(caller, name, options, dry_run=False)

    async def check_definition(self, caller: Caller, name: str, options: dict[str, Any]) -> Any:
        return await self._define(caller, name, options, dry_run=True)

    async def _define(self, caller: Caller, name: str, options: dict[str, Any],
                      dry_run: bool) -> Any:
        await self.engine.definitions.check_new_name(validate_network_name(name))
        opts = dict(options)
        if opts.get("taps") and "tap-user" not in opts:
            opts["tap-user"] = caller.uid  # the original's default: the caller owns the taps
        net = Network.from_options(name, opts)
        net = await self.engine.definitions.define(net, caller.uid, dry_run=dry_run)
        if dry_run:
            return to_asv(self.engine.queries.summary(net) | {"state": "not defined"})
        return network_path(net.name)

    async def redefine(self, caller: Caller, name: str, options: dict[str, Any],
                       dry_run: bool) -> Any:
        """Its owner (or root) gives a network a new definition; a forward the new one
        leaves out must be the caller's to remove, as 'forward remove' would require."""
        old = self.owns_network(caller, name)
        opts = dict(options)
        if opts.get("taps") and "tap-user" not in opts:
            opts["tap-user"] = old.tap_user if old.tap_user is not None else caller.uid
        new = Network.from_options(name, opts)

        def may_drop(f: model.Forward) -> None:  # checked under the engine's lock
            self._owns(caller, f.owner, f"The forward of {f.proto} {f.external}")

        net, notes = await self.engine.definitions.redefine(new, caller.uid, dry_run=dry_run,
                                                            may_drop=may_drop)
        d = self.engine.queries.summary(self.engine.get(name) if not dry_run else net)
        return Reply(to_asv(d), notes)

    async def export_definition(self, caller: Caller, name: str) -> Any:
        d = self.engine.get(name).to_dict(owner=False)  # portable: the definer owns it
        d.pop("name", None)
        return render_definition(d, f"qemu-vnet network {name}: 'vnet-client define {name} --from "
                           "FILE' takes this back.")

    async def undefine(self, caller: Caller, name: str) -> None:
        self.owns_network(caller, name)
        await self.engine.definitions.undefine(name)

    async def start(self, caller: Caller, name: str) -> None:
        self.owns_network(caller, name)
        await self.engine.start(name)

    async def stop(self, caller: Caller, name: str) -> None:
        self.owns_network(caller, name)
        await self.engine.stop(name)

    async def set_autostart(self, caller: Caller, name: str, enabled: bool) -> None:
        self.owns_network(caller, name)
        await self.engine.definitions.set_autostart(name, enabled)

    # --- owners -------------------------------------------------------------------------
    # polkit says who may manage networks or change forwards at all; a network and a forward
    # also carry the uid that made them. With the action delegated to users other than root
    # (a polkit rule), each of them may change what they own and what root owns, never what
    # another such user owns. Root may change anything.
    @staticmethod
    def _owns(caller: Caller, owner: int, what: str) -> None:
        if caller.is_root or owner in (0, caller.uid):
            return
        raise NotOwner(f"{what} belongs to {_who(owner)}: only its owner or root may change "
                       "it.")

    def owns_network(self, caller: Caller, name: str) -> Network:
        net = self.engine.get(name)
        self._owns(caller, net.owner, f"The network '{name}'")
        return net

    async def reload(self, caller: Caller) -> Any:
        return await self.engine.definitions.reload()


    # --- ports ------------------------------------------------------------------------
    async def attach(self, caller: Caller, network: str, vm: str,
                     options: dict[str, Any]) -> Reply:
        port, fds, vhostfds, info, guard = await self.engine.attach(
            network, vm, caller.uid, caller.pid, options)
        # the signal follows the reply (which _dispatch sends before the loop turns)
        asyncio.get_running_loop().call_soon(self.emit_port_changed, port, "attached")
        n = len(fds)
        # the port's guard follows the answer: only the answer is the caller's wait
        return Reply(to_asv(info), list(range(n)), list(range(n, n + len(vhostfds))),
                     fds=fds + vhostfds, after=guard,
                     audit=f"opened tap {port.ifname} (mac {port.mac}) for uid {port.uid}")

    async def open_session(self, caller: Caller) -> Reply:
        fd = self.sessions.open(caller.sender, caller.uid)
        return Reply(0, fds=[fd], changed=False)

    async def is_admin(self, caller: Caller, network: str | None = None) -> bool:
        if caller.is_root:
            return True
        quiet = Caller(caller.sender, caller.uid, caller.pid, interactive=False)
        try:
            await self.authz.check(quiet, api.MANAGE, {"network": network} if network else {})
        except VnetError:
            return False
        return True

    async def detach(self, caller: Caller, ifname: str) -> None:
        port = self.engine.ports.get(ifname)
        if port.uid != caller.uid and not caller.is_root:
            # not the owner: an administrator may (and may be asked for a password)
            await self.authz.check(caller, api.MANAGE, {"network": port.network}, "Detach")
        await self.engine.detach(port)
        self.emit_port_changed(port, "detached")

    async def list_ports(self, caller: Caller) -> Any:
        ports = list(self.engine.ports.by_name.values())
        if not await self.is_admin(caller):
            ports = [p for p in ports if p.uid == caller.uid]
        return [to_asv(p.to_dict()) for p in sorted(ports, key=lambda p: p.ifname)]

    async def get_mac(self, caller: Caller, network: str, vm: str, nic: int) -> Any:
        known = key(vm, nic) in self.engine.macs.data.get(network, {})
        return Reply(await self.engine.vms.get_mac(network, vm, nic, caller.uid),
                     changed=not known)

    async def vde_socket(self, caller: Caller, network: str, vm: str, nic: int) -> Any:
        sock, mac = await self.engine.vde_socket(network, vm, nic, caller.uid)
        return Reply(sock, mac)

    async def export_ether_conf(self, caller: Caller, network: str) -> Any:
        self.engine.get(network)
        return self.engine.macs.export_ether_conf(network, await self._whose(caller, network))

    async def import_macs(self, caller: Caller, network: str, macs: dict[str, str]) -> Any:
        self.owns_network(caller, network)
        return Reply(await self.engine.vms.import_macs(network, macs),
                     audit=f"{len(macs)} entr{'y' if len(macs) == 1 else 'ies'}")

    async def export_macs(self, caller: Caller, network: str) -> Any:
        return self.engine.vms.export_macs(network, await self._whose(caller, network))

    async def _whose(self, caller: Caller, network: str) -> int | None:
        """Whose registry entries a caller may read: every one for an administrator
        (manage), else its own VMs' (which VM has which MAC is, as for leases, what an
        attack on another guest starts from)."""
        return None if await self.is_admin(caller, network) else caller.uid

    async def forget_mac(self, caller: Caller, network: str, vm: str) -> Any:
        if network in self.engine.defs:  # the network need not be defined any more
            self.owns_network(caller, network)
        n = await self.engine.vms.forget_mac(network, vm)
        return Reply(n, audit=f"forgot {n} MAC(s)")

    async def transfer_vm(self, caller: Caller, network: str, vm: str, uid: int) -> Any:
        if network in self.engine.defs:  # the network need not be defined any more
            self.owns_network(caller, network)
        before = await self.engine.vms.transfer(network, vm, uid)
        return Reply(uid, audit=f"VM {vm} from uid {'none' if before is None else before} "
                                f"to uid {uid}")

    async def enslave(self, caller: Caller, ifname: str) -> Any:
        return await self.engine.enslave(ifname, caller.uid)

    async def release(self, caller: Caller, ifname: str) -> Any:
        return await self.engine.enslave(ifname, caller.uid, release=True)

    # --- static hosts and leases --------------------------------------------------------
    async def add_host(self, caller: Caller, network: str, vm: str,
                       options: dict[str, Any]) -> Any:
        self.owns_network(caller, network)
        host = await self.engine.hosts.add(network, vm, options)
        d = host.to_dict()
        kept = self.engine.resolver.kept_lease(self.engine.get(network), vm)
        if kept is not None:  # the guest keeps its lease until it renews (the port allows both)
            d["keeps"] = kept
        net = self.engine.get(network)
        start, end = net.dhcp_range
        if net.dhcp != "none" and start <= host.ip <= end:
            d["in-dhcp-range"] = f"{start}-{end}"
        return to_asv(d)

    async def remove_host(self, caller: Caller, network: str, vm: str) -> None:
        self.owns_network(caller, network)
        await self.engine.hosts.remove(network, vm)

    async def list_hosts(self, caller: Caller, network: str) -> Any:
        return [to_asv(h.to_dict()) for h in self.engine.get(network).hosts]

    async def leases(self, caller: Caller, network: str) -> Any:
        """Administrators (manage) see every lease; others the leases of their own VMs (who
        has which address and MAC is what an attack on another guest starts from)."""
        admin = await self.is_admin(caller, network)
        leases = self.engine.hosts.leases(network, None if admin else caller.uid)
        return [to_asv(d) for d in leases]

    # --- port forwarding ----------------------------------------------------------------
    async def add_forward(self, caller: Caller, network: str, spec: dict[str, Any]) -> Any:
        self.owns_network(caller, network)  # a forward into a network changes it
        fwd = await self.engine.forwards.add(network, spec, caller.uid)
        return to_asv(self.engine.forwards.info(fwd))

    async def remove_forward(self, caller: Caller, network: str, spec: dict[str, Any]) -> None:
        net = self.owns_network(caller, network)
        if not caller.is_root:
            words = model.expand_forward_words(spec)  # the engine's own lookup, to see whose
            probe = model.parse_forward(net, {**words, "target": words.get("target") or "x",
                                              "target-port": words.get("target-port", 1)})
            match = self.engine.forwards.index.find(
                network, probe.proto, probe.family, probe.port_lo, probe.port_hi,
                probe.ext_addr)
            if match is not None:
                self._owns(caller, match.owner,
                           f"The forward of {match.proto} {match.external} on {network}")
        await self.engine.forwards.remove(network, spec)

    # --- VXLAN overlay ------------------------------------------------------------------
    async def add_peer(self, caller: Caller, network: str, address: str) -> None:
        self.owns_network(caller, network)
        await self.engine.peers.set(network, address, add=True)

    async def remove_peer(self, caller: Caller, network: str, address: str) -> None:
        self.owns_network(caller, network)
        await self.engine.peers.set(network, address, add=False)

    async def list_forwards(self, caller: Caller, network: str) -> Any:
        return [to_asv(d) for d in self.engine.forwards.list(network)]


def _who(uid: int) -> str:
    """A user as a sentence names them: 'alice (uid 1000)', or 'uid 1000'."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _held(n: int) -> str:
    return f" ({n} earlier line(s) of this uid held back: too many calls)" if n else ""


def _one_line(text: str) -> str:
    """Caller-influenced text as one log line: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_SHORT = reprlib.Repr()  # (Python 3.11 takes no limits in the constructor)
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist = 3, 8, 8
_SHORT.maxstring = _SHORT.maxother = 60


def _fmt_args(args: list[Any]) -> str:
    """A call's arguments for a log line: each cut short as it is written (never the repr
    of a whole megabyte cut afterwards)."""
    parts = []
    for a in args:
        r = _SHORT.repr(a)
        parts.append(r if len(r) <= 80 else r[:77] + "...")
    return "(" + ", ".join(parts) + ")"
