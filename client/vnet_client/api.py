"""The Python client library: talk to vnetd over the system bus.

    from vnet_client import Client
    async with Client() as c:
        for net in await c.list_networks():
            print(net["name"], net["state"])

Errors from the service are raised as VnetClientError with the D-Bus error name and the
service's sentence. This module imports only dbus-fast (the client never needs the daemon's
dependencies).
"""

from __future__ import annotations

import io
import os
from typing import Any

from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from vnet_common import frames
from vnet_common.errors import ERROR_PREFIX
from vnet_common.wire import BUS_NAME, MANAGER, MANAGER_PATH, signature  # noqa: F401  (public)

from . import base
from .base import (  # noqa: F401  (part of this module's interface)
    AUTH_ERRORS,
    CALL_TIMEOUT,
    NO_REPLY,
    NOT_DELIVERED,
    RESENDABLE,
    UNAVAILABLE,
    Attachment,
    VnetClientError,
    lost_reply,
)

ERR = ERROR_PREFIX


def plain(v: Any) -> Any:
    """Variants and nested containers as plain Python values."""
    if isinstance(v, Variant):
        return plain(v.value)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def variant(v: Any) -> Variant:
    """A plain value as the variant of the type vnet_common.wire.signature names."""
    sig = signature(v)
    if sig == "a{sv}":
        return Variant(sig, asv(v))
    if sig == "aa{sv}":
        return Variant(sig, [asv(x) for x in v])
    return Variant(sig, list(v) if sig[0] == "a" else v)


def asv(d: dict[str, Any]) -> dict[str, Variant]:
    return {k: variant(v) for k, v in d.items() if v is not None}


def _wake(fut: Any) -> None:
    if not fut.done():
        fut.set_result(None)


class Session:
    """A private session with vnetd (OpenSession): calls written on a socket of our own, one
    at a time, answered as the same calls on the bus would be, without dbus-daemon between."""

    def __init__(self, fd: int):
        import asyncio
        import socket

        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.serial = 0
        self.lock = asyncio.Lock()

    def close(self) -> None:
        self.sock.close()

    async def call(self, msg: Message) -> Message:
        from dbus_fast._private.unmarshaller import Unmarshaller

        async with self.lock:
            self.serial += 1
            msg.serial = self.serial
            await self._send_all(msg._marshall(True))
            data, fds = await self._read()
            try:
                reply = Unmarshaller(stream=io.BytesIO(data)).unmarshall()  # type: ignore[arg-type]
                if reply is None or reply.reply_serial != msg.serial:
                    raise EOFError("the session's answer does not answer the call")
            except BaseException:
                frames.close_fds(fds)
                raise
            reply.unix_fds = fds
            return reply

    async def _ready(self, write: bool) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.sock.fileno()
        (loop.add_writer if write else loop.add_reader)(fd, _wake, ready)
        try:
            await ready
        finally:
            (loop.remove_writer if write else loop.remove_reader)(fd)

    async def _send_all(self, data: bytes | bytearray) -> None:
        """The whole call; base.NotSent if not a byte of it went (vnetd had ended the
        session: it never saw the call)."""

        view, first = memoryview(data), True
        while view:
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                await self._ready(write=True)
                continue
            except OSError as e:
                if first:
                    raise base.NotSent(str(e)) from None
                raise
            first = False
            view = view[sent:]

    async def _read(self) -> tuple[bytes, list[int]]:
        """The answer (one call at a time: whatever comes is this call's answer, so reads
        take what is there rather than exactly what is missing)."""
        buf, fds, need = bytearray(), list[int](), frames.HEADER
        try:
            while len(buf) < need:
                chunk = await self._recv(1 << 16, fds)
                if not chunk:
                    raise EOFError("vnetd ended the session")
                buf += chunk
                if need == frames.HEADER and len(buf) >= frames.HEADER:
                    need = frames.message_length(buf[:frames.HEADER])
            if len(buf) > need:
                raise EOFError("vnetd sent more than the answer")
        except BaseException:
            frames.close_fds(fds)
            raise
        return bytes(buf), fds

    async def _recv(self, n: int, fds: list[int]) -> bytes:
        import array
        import socket

        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(
                    n, socket.CMSG_SPACE(frames.MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                await self._ready(write=False)
                continue
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", raw[:len(raw) - len(raw) % 4]))
            return data


class Client:
    """One connection to vnetd. `interactive` sets ALLOW_INTERACTIVE_AUTHORIZATION on calls,
    so that polkit may ask for a password through a registered agent. A client that makes
    many calls may open_session() once: its calls then go to vnetd on a socket of its own,
    without dbus-daemon's two hops (an Attach in about half the time)."""

    def __init__(self, bus_address: str | None = None, interactive: bool = False):
        self.bus_address = bus_address or os.environ.get("VNET_BUS_ADDRESS") or None
        self.interactive = interactive
        self.bus: MessageBus | None = None
        self.session: Session | None = None

    async def connect(self) -> Client:
        if self.bus_address:
            self.bus = MessageBus(bus_address=self.bus_address, negotiate_unix_fd=True)
        else:
            self.bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        try:
            await self.bus.connect()
        except (OSError, Exception) as e:
            raise VnetClientError(
                base.NO_BUS,
                f"Cannot connect to the system bus ({e}): is dbus-daemon running?",
            ) from None
        return self

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.close_session()
        if self.bus is not None:
            self.bus.disconnect()
            self.bus = None

    async def open_session(self) -> None:
        """From now on, calls go to vnetd on a private session (vnetd's OpenSession), until
        close_session(), close(), or the session ends (vnetd restarted: a call that had been
        sent raises NoReply unless repeating it changes nothing, and the calls after it go
        on the bus again)."""
        reply = await self.call("OpenSession")
        fds = list(reply.unix_fds)
        keep = fds[reply.body[0]]
        for fd in fds:
            if fd != keep:
                os.close(fd)
        self.close_session()
        self.session = Session(keep)

    def close_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    @property
    def _bus(self) -> MessageBus:
        if self.bus is None:
            raise RuntimeError("the client is not connected: connect() first, or use "
                               "'async with Client()'")
        return self.bus

    async def call(self, member: str, signature: str = "", body: list[Any] | None = None,
                   path: str = MANAGER_PATH, interface: str = MANAGER,
                   interactive: bool | None = None) -> Message:
        """Call a method; return the reply Message (its unix_fds are the caller's to close)."""
        interactive = self.interactive if interactive is None else interactive
        flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else MessageFlag.NONE
        def message() -> Message:
            return Message(destination=BUS_NAME, path=path, interface=interface, member=member,
                           signature=signature, body=body or [], flags=flags)

        reply = await self._send(message(), member)
        if (reply.message_type == MessageType.ERROR
                and base.send_again(reply.error_name or "", member)):
            # vnetd may be restarting (systemd's Restart=, or D-Bus activation): once more
            import asyncio

            for fd in reply.unix_fds:
                os.close(fd)
            await asyncio.sleep(base.RETRY_AFTER)
            reply = await self._send(message(), member)
        if reply.message_type == MessageType.ERROR:
            for fd in reply.unix_fds:
                os.close(fd)
            error_name = reply.error_name or ""  # an error always has a name
            text = reply.body[0] if reply.body else error_name
            raise base.error_for(error_name, text, member)
        return reply

    async def _send(self, msg: Message, member: str = "") -> Message:
        import asyncio

        if self.session is not None and member != "OpenSession":
            try:
                async with asyncio.timeout(CALL_TIMEOUT):  # (inline: no task per call)
                    return await self.session.call(msg)
            except TimeoutError:
                self.close_session()
                raise base.timed_out(member) from None
            except base.NotSent:  # vnetd ended the session before: the bus, for any call
                self.close_session()
                msg.serial = 0
            except Exception:  # vnetd went away or ended the session, or a broken answer
                self.close_session()  # vnetd went away, or ended the session
                if member not in RESENDABLE:
                    raise VnetClientError(NO_REPLY, lost_reply(member)) from None
                msg.serial = 0  # once more, on the bus
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                return await self._bus.call(msg)
        except TimeoutError:
            raise base.timed_out(member) from None
        except (OSError, EOFError) as e:
            raise VnetClientError("org.freedesktop.DBus.Error.Disconnected",
                                  f"The connection to the system bus broke ({e}).") from None

    async def value(self, member: str, signature: str = "", body: list[Any] | None = None,
                    **kw: Any) -> Any:
        reply = await self.call(member, signature, body, **kw)
        if not reply.body:
            return None
        return plain(reply.body[0]) if len(reply.body) == 1 else [plain(b) for b in reply.body]

    # --- networks -----------------------------------------------------------------------
    async def list_networks(self) -> list[dict[str, Any]]:
        return await self.value("ListNetworks")

    async def get_network(self, name: str) -> dict[str, Any]:
        return await self.value("GetNetwork", "s", [name])

    async def define(self, name: str, **options: Any) -> str:
        opts = {k.replace("_", "-"): v for k, v in options.items() if v is not None}
        return await self.value("Define", "sa{sv}", [name, asv(opts)])

    async def export_definition(self, name: str) -> str:
        return await self.value("ExportDefinition", "s", [name])

    async def check_definition(self, name: str, **options: Any) -> dict[str, Any]:
        """What define(name, **options) would make, checked as define checks it; nothing is
        defined."""
        opts = {k.replace("_", "-"): v for k, v in options.items() if v is not None}
        return await self.value("CheckDefinition", "sa{sv}", [name, asv(opts)])

    async def define_from(self, name: str, options: dict[str, Any]) -> str:
        return await self.value("Define", "sa{sv}", [name, asv(options)])

    async def redefine(self, name: str, options: dict[str, Any], dry_run: bool = False
                       ) -> tuple[dict[str, Any], list[str]]:
        """Replace the definition (TOML keys; what is left out takes its default): the
        network as it now is, and what that means for it, a sentence each."""
        network, notes = await self.value("Redefine", "sa{sv}b", [name, asv(options), dry_run])
        return network, notes

    async def undefine(self, name: str) -> None:
        await self.call("Undefine", "s", [name])

    async def start(self, name: str) -> None:
        await self.call("Start", "s", [name])

    async def stop(self, name: str) -> None:
        await self.call("Stop", "s", [name])

    async def set_autostart(self, name: str, enabled: bool) -> None:
        await self.call("SetAutostart", "sb", [name, enabled])

    async def reload(self) -> list[str]:
        return await self.value("Reload")

    # --- ports --------------------------------------------------------------------------
    async def attach(self, network: str, vm: str, *, nic: int = 0, queues: int = 1,
                     vhost: bool = False, mac: str | None = None, learn_mac: bool = False,
                     holder_pid: int | None = None) -> Attachment:
        opts = base.attach_options(nic, queues, vhost, mac, learn_mac, holder_pid)
        reply = await self.call("Attach", "ssa{sv}", [network, vm, asv(opts)])
        info = plain(reply.body[0])
        all_fds = list(reply.unix_fds)
        fds = [all_fds[i] for i in reply.body[1]]
        vhostfds = [all_fds[i] for i in reply.body[2]]
        return Attachment(ifname=info["ifname"], mac=info["mac"], network=info["network"],
                          vm=info["vm"], nic=info["nic"], fds=fds, vhostfds=vhostfds, info=info)

    async def detach(self, ifname: str) -> None:
        await self.call("Detach", "s", [ifname])

    async def list_ports(self) -> list[dict[str, Any]]:
        return await self.value("ListPorts")

    async def get_mac(self, network: str, vm: str, nic: int = 0) -> str:
        return await self.value("GetMac", "ssu", [network, vm, nic])

    async def vde_socket(self, network: str, vm: str, nic: int = 0) -> tuple[str, str]:
        """(socket path for -netdev vde,sock=, the VM's stable MAC)."""
        return tuple(await self.value("VdeSocket", "ssu", [network, vm, nic]))

    async def export_ether_conf(self, network: str) -> str:
        return await self.value("ExportEtherConf", "s", [network])

    async def import_macs(self, network: str, macs: dict[str, str]) -> int:
        """Keys 'vm' (NIC 0) or 'vm/nic'; all or nothing."""
        return await self.value("ImportMacs", "sa{ss}", [network, macs])

    async def export_macs(self, network: str) -> dict[str, str]:
        """The network's MAC registry, 'vm/nic' -> mac (what import_macs takes)."""
        return await self.value("ExportMacs", "s", [network])

    async def forget_mac(self, network: str, vm: str) -> int:
        """Drop every NIC's MAC of `vm` on `network`; how many there were."""
        return await self.value("ForgetMac", "ss", [network, vm])

    async def transfer_vm(self, network: str, vm: str, uid: int) -> int:
        """Give VM `vm` on `network` (its name and MACs) to user `uid`."""
        return await self.value("TransferVm", "ssu", [network, vm, uid])

    async def events(self, network: str | None = None):
        """vnetd's signals as they come: (member, {field: value}) for NetworkChanged,
        PortChanged and LeaseChanged (of `network` only, if given)."""
        import asyncio

        fields = {"NetworkChanged": ("network", "state"),
                  "PortChanged": ("ifname", "network", "state"),
                  "LeaseChanged": ("network", "event")}
        queue: asyncio.Queue = asyncio.Queue()

        def on(msg: Message) -> None:
            if (msg.message_type == MessageType.SIGNAL and msg.interface == MANAGER
                    and msg.member in fields):
                ev = dict(zip(fields[msg.member], (plain(b) for b in msg.body), strict=False))
                if network is None or ev.get("network") == network:
                    queue.put_nowait((msg.member, ev))

        self._bus.add_message_handler(on)
        await self._send(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                 interface="org.freedesktop.DBus", member="AddMatch",
                                 signature="s", body=[f"type='signal',sender='{BUS_NAME}',"
                                                      f"interface='{MANAGER}'"]))
        try:
            while True:
                yield await queue.get()
        finally:
            self._bus.remove_message_handler(on)

    async def enslave(self, ifname: str) -> str:
        return await self.value("Enslave", "s", [ifname])

    async def release(self, ifname: str) -> str:
        return await self.value("Release", "s", [ifname])

    # --- static hosts and leases --------------------------------------------------------
    async def add_host(self, network: str, vm: str, *, ip: str | None = None,
                       mac: str | None = None) -> dict[str, Any]:
        opts = {k: v for k, v in (("ip", ip), ("mac", mac)) if v is not None}
        return await self.value("AddHost", "ssa{sv}", [network, vm, asv(opts)])

    async def remove_host(self, network: str, vm: str) -> None:
        await self.call("RemoveHost", "ss", [network, vm])

    async def list_hosts(self, network: str) -> list[dict[str, Any]]:
        return await self.value("ListHosts", "s", [network])

    async def leases(self, network: str) -> list[dict[str, Any]]:
        return await self.value("Leases", "s", [network])

    # --- port forwarding ----------------------------------------------------------------
    async def add_forward(self, network: str, spec: dict[str, Any]) -> dict[str, Any]:
        return await self.value("AddForward", "sa{sv}", [network, asv(spec)])

    async def remove_forward(self, network: str, spec: dict[str, Any]) -> None:
        await self.call("RemoveForward", "sa{sv}", [network, asv(spec)])

    async def set_peer(self, network: str, address: str, add: bool = True) -> None:
        await self.call("AddPeer" if add else "RemovePeer", "ss", [network, address])

    async def list_forwards(self, network: str) -> list[dict[str, Any]]:
        return await self.value("ListForwards", "s", [network])
