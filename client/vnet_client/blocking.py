"""The synchronous client: vnetd's methods as plain calls, over jeepney's blocking I/O.

    from vnet_client.blocking import BlockingClient
    with BlockingClient() as c:
        for net in c.list_networks():
            print(net["name"], net["state"])

The short-lived commands use it (`vnet-client`, `vnet-bridge-helper`, `vnet-ifup`,
`vnet-ifdown`): it starts in a fraction of the time of the asyncio library (api.Client, on
dbus-fast), which long-lived VM managers use. Both have the same methods, errors
(VnetClientError) and rule for sending a call again (base.send_again).

Values: jeepney gives a received variant as a (signature, value) pair; replies are turned
into plain Python values by their signature, as api.plain does for dbus-fast. Received file
descriptors are plain ints, not inheritable, and the caller's to close. A call is put together
before it is sent: a value D-Bus cannot carry (a fraction, a date, a whole number past its
type's range, text that is not UTF-8) raises base.Unsendable, naming it, and nothing is sent.
Without connect() (or `with`), the first call connects, after that check.
"""

from __future__ import annotations

import functools
import os
import struct
import time
from collections.abc import Iterator
from typing import Any

from jeepney import DBusAddress, MessageFlag, MessageType, new_method_call
from jeepney.fds import FileDescriptor
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from jeepney.low_level import HeaderFields, Message
from vnet_common import frames
from vnet_common.wire import BUS_NAME, MANAGER, MANAGER_PATH, signature

from . import base
from .base import Attachment, VnetClientError

BUS = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                  interface="org.freedesktop.DBus")
AUTH_TIMEOUT = 5.0  # seconds for the connection's handshake


@functools.lru_cache(maxsize=256)
def _complete_types(sig: str) -> tuple[str, ...]:
    """The complete types of a signature ('sa{sv}' -> ('s', 'a{sv}')); remembered, as a
    reply of hundreds of dicts asks for the same few."""
    out, i = [], 0
    while i < len(sig):
        j = i
        while sig[j] == "a":
            j += 1
        if sig[j] in "({":
            depth, j = 1, j + 1
            while depth:
                depth += {"(": 1, "{": 1, ")": -1, "}": -1}.get(sig[j], 0)
                j += 1
        else:
            j += 1
        out.append(sig[i:j])
        i = j
    return tuple(out)


_BASIC = frozenset("ybnqiuxtdsog")


def plain(sig: str, v: Any) -> Any:
    """A received value of complete type `sig` with its variants unwrapped."""
    if sig in _BASIC:
        return v
    c = sig[0]
    if c == "v":
        return plain(*v)
    if sig == "a{sv}":  # (most of what vnetd sends: a list of hundreds of them, at times)
        return {k: x[1] if x[0] in _BASIC else plain(*x) for k, x in v.items()}
    if sig.startswith("a{"):
        kt, vt = _complete_types(sig[2:-1])
        return {plain(kt, k): plain(vt, x) for k, x in v.items()}
    if c == "a":
        return v if sig == "ay" else [plain(sig[1:], x) for x in v]
    if c == "(":
        return tuple(plain(t, x) for t, x in zip(_complete_types(sig[1:-1]), v, strict=True))
    return v


INT64 = range(-(2**63), 2**63)  # what D-Bus's widest whole number (x) carries


def variant(v: Any, key: str = "") -> tuple[str, Any]:
    """A Python value as the variant vnetd expects (vnet_common.wire.signature's type).
    TypeError for a value of no such type, OverflowError for a whole number past 64 bits."""
    sig = signature(v)
    if sig == "a{sv}":
        return (sig, asv(v, f"{key}."))
    if sig == "aa{sv}":
        return (sig, [asv(x, f"{key}[{i}].") for i, x in enumerate(v)])
    if sig in ("x", "ax") and not all(x in INT64 for x in (v if sig == "ax" else [v])):
        raise OverflowError("D-Bus carries whole numbers of at most 64 bits")
    return (sig, list(v) if sig[0] == "a" else v)


def asv(d: dict[str, Any], prefix: str = "") -> dict[str, tuple[str, Any]]:
    """Options as an a{sv}; a value D-Bus cannot carry is base.Unsendable, naming its key
    (`prefix` is the path of a nested table: 'overlay.')."""
    out = {}
    for k, v in d.items():
        if v is None:
            continue
        try:
            out[k] = variant(v, f"{prefix}{k}")
        except OverflowError as e:
            raise base.Unsendable(f"{prefix}{k} = {_shown(v)} cannot be sent: {e}.") from None
        except TypeError:
            raise base.Unsendable(
                f"{prefix}{k} = {_shown(v)} cannot be sent: D-Bus carries text, whole numbers, "
                f"true/false, tables and lists of one of these, not {_kind(v)}.") from None
    return out


def _shown(v: Any) -> str:
    text = str(v) if hasattr(v, "isoformat") else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(v: Any) -> str:
    if isinstance(v, float):
        return "a fraction"
    if hasattr(v, "isoformat"):
        return "a date or time"
    if isinstance(v, list | tuple):
        odd = [x for x in v if not isinstance(x, str | int | dict)]
        return f"a list holding {_kind(odd[0])}" if odd else "a list mixing kinds of values"
    return f"a {type(v).__name__}"


def _check_sendable(msg: Message, member: str) -> None:
    """Put the message together as sending it would, so that a value D-Bus cannot carry
    is found before anything is sent (base.Unsendable), not taken for a broken connection."""
    try:
        msg.serialise(serial=1)
    except UnicodeEncodeError as e:
        raise base.Unsendable(base.not_utf8(e.object)) from None
    except (struct.error, TypeError, OverflowError, ValueError) as e:
        raise base.Unsendable(f"The arguments of {member} cannot be sent: {e}.") from None


def _fd_ints(body: Any) -> Any:
    """The message body with every received FileDescriptor as a plain int that we own."""
    if isinstance(body, tuple | list):
        return type(body)(_fd_ints(x) for x in body)
    if isinstance(body, dict):
        return {k: _fd_ints(x) for k, x in body.items()}
    if isinstance(body, FileDescriptor):
        fd = body.to_raw_fd()
        os.set_inheritable(fd, False)
        return fd
    return body


def _close_body_fds(body: Any) -> None:
    """Close the FileDescriptors a message we do not keep brought."""
    if isinstance(body, tuple | list):
        for x in body:
            _close_body_fds(x)
    elif isinstance(body, dict):
        for x in body.values():
            _close_body_fds(x)
    elif isinstance(body, FileDescriptor):
        body.close()


class Session:
    """A private session with vnetd (OpenSession): calls written on a socket of our own,
    answered as the same calls on the bus would be, without dbus-daemon between."""

    def __init__(self, fd: int):
        import socket

        from jeepney.low_level import Parser

        self.sock = socket.socket(fileno=fd)
        self.parser = Parser()
        self.serial = 0

    def close(self) -> None:
        self.sock.close()
        frames.close_fds(self.parser.fds)  # come, but not yet part of an answer
        self.parser.fds.clear()

    def call(self, msg: Message, timeout: float) -> Message:
        import array
        import socket

        self.serial += 1
        self.sock.settimeout(timeout)
        data = msg.serialise(serial=self.serial)
        try:
            sent = self.sock.send(data)  # the first part: if none of it went, nothing did
        except TimeoutError:
            raise
        except OSError as e:
            raise base.NotSent(str(e)) from None
        self.sock.sendall(data[sent:])
        while True:
            reply = self.parser.get_next_message()
            if reply is not None:
                if reply.header.fields.get(HeaderFields.reply_serial) != self.serial:
                    _close_body_fds(reply.body)
                    raise EOFError("the session's answer does not answer the call")
                return reply
            data, anc, _flags, _addr = self.sock.recvmsg(
                65536, socket.CMSG_SPACE(frames.MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
            fds = [fd for level, kind, raw in anc
                   if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                   for fd in array.array("i", raw[:len(raw) - len(raw) % 4])]
            if not data:
                frames.close_fds(fds)
                raise EOFError("vnetd ended the session")
            self.parser.add_data(data, fds)


class BlockingClient:
    """One connection to vnetd. `interactive` sets ALLOW_INTERACTIVE_AUTHORIZATION on calls,
    so that polkit may ask for a password through a registered agent."""

    def __init__(self, bus_address: str | None = None, interactive: bool = False):
        self.bus_address = bus_address or os.environ.get("VNET_BUS_ADDRESS") or None
        self.interactive = interactive
        self.conn: DBusConnection | None = None
        self.opened = False  # a connection was made (after close(), calls fail: Disconnected)
        self.session: Session | None = None

    def connect(self) -> BlockingClient:
        """Connect now. Without it the first call connects, after its values were checked
        (so a value D-Bus cannot carry is base.Unsendable even where no bus is)."""
        try:
            self.conn = open_dbus_connection(self.bus_address or "SYSTEM", enable_fds=True,
                                             auth_timeout=AUTH_TIMEOUT)
        except (OSError, ValueError, RuntimeError, StopIteration) as e:
            raise base.BusUnreachable(self.bus_address, str(e) or type(e).__name__) from None
        self.opened = True
        return self

    def _connection(self) -> DBusConnection:
        if self.conn is None and not self.opened:
            self.connect()
        if self.conn is None:
            raise VnetClientError(base.DISCONNECTED, "Not connected to the system bus.")
        return self.conn

    def __enter__(self) -> BlockingClient:
        return self.connect()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.close_session()
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def open_session(self) -> None:
        """From now on, calls go to vnetd on a private session (vnetd's OpenSession), until
        close_session(), close(), or the session ends (as api.Client.open_session)."""
        (fd,) = self.call("OpenSession")
        self.close_session()
        self.session = Session(fd)

    def close_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def call(self, member: str, signature: str = "", body: list[Any] | tuple = (),
             path: str = MANAGER_PATH, interface: str = MANAGER,
             interactive: bool | None = None) -> tuple:
        """Call a method; return the reply's body (received fds as ints, the caller's)."""
        return _fd_ints(self.reply(member, signature, body, path, interface, interactive).body)

    def reply(self, member: str, signature: str = "", body: list[Any] | tuple = (),
              path: str = MANAGER_PATH, interface: str = MANAGER,
              interactive: bool | None = None) -> Message:
        """Call a method; return the reply message (its FileDescriptors are the caller's)."""
        interactive = self.interactive if interactive is None else interactive
        msg = new_method_call(DBusAddress(path, bus_name=BUS_NAME, interface=interface),
                              member, signature or None, tuple(body))
        if interactive:
            msg.header.flags |= MessageFlag.allow_interactive_authorization
        _check_sendable(msg, member)
        reply = self._send(msg, member)
        if (reply.header.message_type == MessageType.error
                and base.send_again(_error_name(reply), member)):
            # vnetd may be restarting (systemd's Restart=, or D-Bus activation): once more
            _close_body_fds(reply.body)
            time.sleep(base.RETRY_AFTER)
            reply = self._send(msg, member)
        if reply.header.message_type == MessageType.error:
            _close_body_fds(reply.body)
            name = _error_name(reply)
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else name
            raise base.error_for(name, text, member)
        return reply

    def _send(self, msg: Message, member: str) -> Message:
        if self.session is not None and member != "OpenSession":
            try:
                return self.session.call(msg, base.CALL_TIMEOUT)
            except TimeoutError:
                self.close_session()
                raise base.timed_out(member) from None
            except base.NotSent:  # vnetd ended the session before: the bus, for any call
                self.close_session()
            except Exception:  # vnetd went away or ended the session, or a broken answer
                self.close_session()  # vnetd went away, or ended the session
                if member not in base.RESENDABLE:
                    raise VnetClientError(base.NO_REPLY, base.lost_reply(member)) from None
        conn = self._connection()
        try:
            return conn.send_and_get_reply(msg, timeout=base.CALL_TIMEOUT)
        except TimeoutError:
            raise base.timed_out(member) from None
        except (OSError, RuntimeError, ValueError) as e:
            self.close()
            raise VnetClientError(base.DISCONNECTED,
                                  f"The connection to the system bus broke ({e}).") from None

    def value(self, member: str, signature: str = "", body: list[Any] | tuple = (),
              **kw: Any) -> Any:
        """The reply's values as plain Python values: None, the one value, or a list."""
        reply = self.reply(member, signature, body, **kw)
        types = _complete_types(reply.header.fields.get(HeaderFields.signature, ""))
        body = _fd_ints(reply.body) if any("h" in t for t in types) else reply.body
        values = [plain(t, v) for t, v in zip(types, body, strict=True)]
        return None if not values else values[0] if len(values) == 1 else values

    # --- networks -----------------------------------------------------------------------
    def list_networks(self) -> list[dict[str, Any]]:
        return self.value("ListNetworks")

    def get_network(self, name: str) -> dict[str, Any]:
        return self.value("GetNetwork", "s", [name])

    def define(self, name: str, **options: Any) -> str:
        return self.value("Define", "sa{sv}", [name, asv(base.option_keys(options))])

    def export_definition(self, name: str) -> str:
        return self.value("ExportDefinition", "s", [name])

    def check_definition(self, name: str, **options: Any) -> dict[str, Any]:
        """What define(name, **options) would make, checked as define checks it; nothing is
        defined."""
        return self.value("CheckDefinition", "sa{sv}", [name, asv(base.option_keys(options))])

    def define_from(self, name: str, options: dict[str, Any]) -> str:
        return self.value("Define", "sa{sv}", [name, asv(options)])

    def redefine(self, name: str, options: dict[str, Any], dry_run: bool = False
                 ) -> tuple[dict[str, Any], list[str]]:
        """Replace the definition (TOML keys; what is left out takes its default): the
        network as it now is, and what that means for it, a sentence each."""
        network, notes = self.value("Redefine", "sa{sv}b", [name, asv(options), dry_run])
        return network, notes

    def undefine(self, name: str) -> None:
        self.value("Undefine", "s", [name])

    def start(self, name: str) -> None:
        self.value("Start", "s", [name])

    def stop(self, name: str) -> None:
        self.value("Stop", "s", [name])

    def set_autostart(self, name: str, enabled: bool) -> None:
        self.value("SetAutostart", "sb", [name, enabled])

    def reload(self) -> list[str]:
        return self.value("Reload")

    # --- ports --------------------------------------------------------------------------
    def attach(self, network: str, vm: str, *, nic: int = 0, queues: int = 1,
               vhost: bool = False, mac: str | None = None, learn_mac: bool = False,
               holder_pid: int | None = None) -> Attachment:
        opts = base.attach_options(nic, queues, vhost, mac, learn_mac, holder_pid)
        info, fds, vhostfds = self.call("Attach", "ssa{sv}", [network, vm, asv(opts)])
        info = plain("a{sv}", info)
        return Attachment(ifname=info["ifname"], mac=info["mac"], network=info["network"],
                          vm=info["vm"], nic=info["nic"], fds=list(fds),
                          vhostfds=list(vhostfds), info=info)

    def detach(self, ifname: str) -> None:
        self.value("Detach", "s", [ifname])

    def list_ports(self) -> list[dict[str, Any]]:
        return self.value("ListPorts")

    def get_mac(self, network: str, vm: str, nic: int = 0) -> str:
        return self.value("GetMac", "ssu", [network, vm, nic])

    def vde_socket(self, network: str, vm: str, nic: int = 0) -> tuple[str, str]:
        """(socket path for -netdev vde,sock=, the VM's stable MAC)."""
        return tuple(self.value("VdeSocket", "ssu", [network, vm, nic]))

    def export_ether_conf(self, network: str) -> str:
        return self.value("ExportEtherConf", "s", [network])

    def import_macs(self, network: str, macs: dict[str, str]) -> int:
        """Keys 'vm' (NIC 0) or 'vm/nic'; all or nothing."""
        return self.value("ImportMacs", "sa{ss}", [network, macs])

    def export_macs(self, network: str) -> dict[str, str]:
        """The network's MAC registry, 'vm/nic' -> mac (what import_macs takes)."""
        return self.value("ExportMacs", "s", [network])

    def forget_mac(self, network: str, vm: str) -> int:
        """Drop every NIC's MAC of `vm` on `network`; how many there were."""
        return self.value("ForgetMac", "ss", [network, vm])

    def transfer_vm(self, network: str, vm: str, uid: int) -> int:
        """Give VM `vm` on `network` (its name and MACs) to user `uid`."""
        return self.value("TransferVm", "ssu", [network, vm, uid])

    def enslave(self, ifname: str) -> str:
        return self.value("Enslave", "s", [ifname])

    def release(self, ifname: str) -> str:
        return self.value("Release", "s", [ifname])

    def events(self, network: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """vnetd's signals as they come: (member, {field: value}) for NetworkChanged,
        PortChanged and LeaseChanged (of `network` only, if given)."""
        conn = self._connection()
        try:
            reply = conn.send_and_get_reply(
                new_method_call(BUS, "AddMatch", "s", (base.EVENT_MATCH,)),
                timeout=base.CALL_TIMEOUT)
        except (OSError, RuntimeError, ValueError) as e:
            raise VnetClientError(base.DISCONNECTED,
                                  f"The connection to the system bus broke ({e}).") from None
        if reply.header.message_type == MessageType.error:
            raise VnetClientError(_error_name(reply), str(reply.body[0] if reply.body else ""))
        while True:
            try:
                msg = conn.receive()
            except (OSError, RuntimeError, ValueError) as e:
                raise VnetClientError(base.DISCONNECTED,
                                      f"The connection to the system bus broke ({e}).") from None
            fields = msg.header.fields
            member = fields.get(HeaderFields.member)
            if (msg.header.message_type != MessageType.signal
                    or fields.get(HeaderFields.interface) != MANAGER
                    or member not in base.EVENT_FIELDS):
                _close_body_fds(msg.body)
                continue
            ev = dict(zip(base.EVENT_FIELDS[member], msg.body, strict=False))
            if network is None or ev.get("network") == network:
                yield member, ev

    # --- static hosts and leases --------------------------------------------------------
    def add_host(self, network: str, vm: str, *, ip: str | None = None,
                 mac: str | None = None) -> dict[str, Any]:
        opts = {k: v for k, v in (("ip", ip), ("mac", mac)) if v is not None}
        return self.value("AddHost", "ssa{sv}", [network, vm, asv(opts)])

    def remove_host(self, network: str, vm: str) -> None:
        self.value("RemoveHost", "ss", [network, vm])

    def list_hosts(self, network: str) -> list[dict[str, Any]]:
        return self.value("ListHosts", "s", [network])

    def leases(self, network: str) -> list[dict[str, Any]]:
        return self.value("Leases", "s", [network])

    # --- port forwarding ----------------------------------------------------------------
    def add_forward(self, network: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.value("AddForward", "sa{sv}", [network, asv(spec)])

    def remove_forward(self, network: str, spec: dict[str, Any]) -> None:
        self.value("RemoveForward", "sa{sv}", [network, asv(spec)])

    def set_peer(self, network: str, address: str, add: bool = True) -> None:
        self.value("AddPeer" if add else "RemovePeer", "ss", [network, address])

    def list_forwards(self, network: str) -> list[dict[str, Any]]:
        return self.value("ListForwards", "s", [network])


def _error_name(msg: Message) -> str:
    return msg.header.fields.get(HeaderFields.error_name, "org.freedesktop.DBus.Error.Failed")

