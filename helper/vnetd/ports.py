"""Ports: taps handed to users (DESIGN.md rule 4).

A port is a tap vnetd opened for a user, enslaved to a running network's bridge, whose fd(s)
went to the caller. The tap is not persistent, so it lives exactly as long as the holder's
fds; vnetd watches netlink link events and forgets a port when the kernel deletes its tap. If
the holder made it persistent, vnetd deletes it on Detach or when the holder process exits
(watched through a pidfd). Ports are tracked by ifindex, and written to the runtime directory
so a restarted vnetd adopts the ones still alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import struct
import time
from dataclasses import asdict, dataclass
from typing import Any

from . import model
from .backends import tap as tapdev
from .backends.links import Links
from .errors import Busy, Failed, InvalidArgument, NotFound, QuotaExceeded
from .macs import MacRegistry, validate_nic

log = logging.getLogger("vnetd.ports")

RTMGRP_LINK, RTMGRP_NEIGH = 1, 4
RTM_DELLINK, RTM_NEWNEIGH = 17, 28
AF_BRIDGE, NDA_LLADDR, NUD_PERMANENT = 7, 2, 0x80
MAX_QUEUES = 8
VHOST_PATH = "/dev/vhost-net"
ATTACH_OPTIONS = ("nic", "queues", "vhost", "mac", "learn-mac", "holder-pid")


@dataclass
class Port:
    ifname: str
    ifindex: int
    network: str
    vm: str
    nic: int
    uid: int
    mac: str
    mac_known: bool
    holder_pid: int | None
    queues: int
    created: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created"] = int(self.created)
        if d["holder_pid"] is None:
            del d["holder_pid"]
        return {k.replace("_", "-"): v for k, v in d.items()}


def port_name(network: str, vm: str, nic: int, attempt: int = 0) -> str:
    """Deterministic, fits IFNAMSIZ, recognizably the network's: '<net[:8]>-<6 hex>'."""
    h = hashlib.sha256(f"{network}/{vm}/{nic}/{attempt}".encode()).hexdigest()[:6]
    return f"{network[:8]}-{h}"


def parse_attach_options(options: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise InvalidArgument("The attach options must be a dictionary.")
    unknown = sorted(model._printable(k) for k in options if k not in ATTACH_OPTIONS)
    if unknown:
        raise InvalidArgument(f"Unknown attach option(s): {', '.join(unknown)}. "
                              f"Known: {', '.join(ATTACH_OPTIONS)}.")
    nic = validate_nic(options.get("nic", 0))
    queues = options.get("queues", 1)
    if isinstance(queues, bool) or not isinstance(queues, int) or not 1 <= queues <= MAX_QUEUES:
        raise InvalidArgument(f"The queue count must be a whole number from 1 to {MAX_QUEUES}.")
    vhost = options.get("vhost", False)
    if not isinstance(vhost, bool):
        raise InvalidArgument("'vhost' must be true or false.")
    mac = options.get("mac")
    if mac is not None:
        mac = model.validate_mac(mac)
    learn = options.get("learn-mac", False)
    if not isinstance(learn, bool):
        raise InvalidArgument("'learn-mac' must be true or false.")
    if learn and mac is not None:
        raise InvalidArgument("Give either 'mac' or 'learn-mac', not both.")
    holder = options.get("holder-pid")
    if holder is not None and (isinstance(holder, bool) or not isinstance(holder, int)
                               or not 1 < holder < 2**22):
        raise InvalidArgument("'holder-pid' must be a process id.")
    return {"nic": nic, "queues": queues, "vhost": vhost, "mac": mac, "learn": learn,
            "holder": holder}


def ancestors(pid: int, depth: int = 2) -> list[int]:
    """The parent and grandparent of pid (QEMU may run a helper through 'sh -c')."""
    out = []
    for _ in range(depth):
        ppid = parent_pid(pid)
        if not ppid:
            break
        out.append(ppid)
        pid = ppid
    return out


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[1])


class Ports:
    def __init__(self, links: Links, macs: MacRegistry, store, max_per_user: int = 64):
        self.links = links
        self.macs = macs
        self.store = store
        self.max_per_user = max_per_user
        self.by_name: dict[str, Port] = {}
        self._pidfds: dict[int, int] = {}  # holder pid -> pidfd
        self._monitor: asyncio.Task | None = None
        self._records: dict[str, Port] = {}
        # ports whose guest MAC is still to be learned, by ifindex: the FDB events of every
        # bridge on the host are checked against this, so it must cost O(1)
        self.learning: dict[int, Port] = {}
        self.listeners: list = []

    DIR = "ports"

    # --- persistence and adoption -------------------------------------------------------
    # One small file per port under the runtime directory (tmpfs): O(1) per attach however
    # many ports exist, and no fsync (a daemon crash keeps the page cache; a reboot loses the
    # ports anyway).
    def _record(self, ifname: str):
        return self.store.runtime_dir / self.DIR / f"{ifname}.json"

    def _write(self, port: Port) -> None:
        self.store.write_runtime_file(self._record(port.ifname),
                                      json.dumps(port.to_dict()).encode())

    def _forget(self, ifname: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._record(ifname).unlink()

    def load_records(self) -> dict[str, Port]:
        out = {}
        folder = self.store.runtime_dir / self.DIR
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.glob("*.json"):
            try:
                d = json.loads(path.read_text())
            except (OSError, ValueError):
                log.error("ignoring an unreadable port record %s", path)
                continue
            try:
                p = Port(**{k.replace("-", "_"): v for k, v in d.items()
                            if k.replace("-", "_") in Port.__dataclass_fields__},
                         **({} if "holder-pid" in d else {"holder_pid": None}))
                out[p.ifname] = p
            except TypeError:
                log.error("ignoring an unreadable port record: %r", d)
        return out

    async def adopt(self, link) -> bool:
        """At start-up: keep an attached tap if our records know it (same ifindex)."""
        rec = self._records.get(link.ifname)
        if rec is None or rec.ifindex != link.index:
            return False
        self.by_name[rec.ifname] = rec
        if not rec.mac_known:
            self.learning[rec.ifindex] = rec
        if rec.holder_pid and not self._watch(rec.holder_pid):
            # the holder died while vnetd was down
            if link.tun_persist:
                await self.links.delete(link.index)
            self.by_name.pop(rec.ifname, None)
            return True
        log.info("reconcile: adopted port %s (%s/%s nic %d, uid %d)", rec.ifname, rec.network,
                 rec.vm, rec.nic, rec.uid)
        return True

    def begin_reconcile(self) -> None:
        self._records = self.load_records()

    def end_reconcile(self) -> None:
        for name in self._records:
            if name not in self.by_name:
                self._forget(name)
        self._records = {}

    # --- netlink events -----------------------------------------------------------------
    async def start_monitor(self) -> None:
        """Listen to RTM_DELLINK on a raw rtnetlink socket. Every tap creation makes several
        RTM_NEWLINK events too; reading only the fixed headers (no attribute parsing) keeps
        them nearly free, which matters on the attach path."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                             socket.NETLINK_ROUTE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((0, RTMGRP_LINK | RTMGRP_NEIGH))
        self._monitor_sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_netlink)

    def _on_netlink(self) -> None:
        while True:
            try:
                data = self._monitor_sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:  # ENOBUFS: events were lost; re-check every port
                log.warning("netlink monitor: %s; re-checking ports", e)
                for p in list(self.by_name.values()):
                    try:
                        socket.if_indextoname(p.ifindex)
                    except OSError:
                        self._gone(p.ifindex)
                continue
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if length < 16:
                    break
                if kind == RTM_DELLINK and off + 24 <= len(data):
                    (index,) = struct.unpack_from("=i", data, off + 20)  # ifinfomsg.ifi_index
                    self._gone(index)
                elif kind == RTM_NEWNEIGH and self.learning:
                    self._fdb_entry(data[off + 16:off + length])
                off += (length + 3) & ~3

    def _fdb_entry(self, msg: bytes) -> None:
        """A bridge FDB entry: the first source MAC seen on a port whose guest MAC vnetd could
        not know becomes that port's MAC, sticky until the port goes (switch port security)."""
        if len(msg) < 12:
            return
        family, index, state = struct.unpack_from("=B3xiH", msg)
        if family != AF_BRIDGE or state & NUD_PERMANENT:
            return  # the tap's own address (a local entry), or not a bridge entry
        port = self.learning.get(index)
        if port is None or self.by_name.get(port.ifname) is not port:
            self.learning.pop(index, None)  # gone meanwhile
            return
        off = 12
        while off + 4 <= len(msg):
            alen, atype = struct.unpack_from("=HH", msg, off)
            if alen < 4:
                return
            if atype == NDA_LLADDR and alen >= 10:
                mac = ":".join(f"{b:02x}" for b in msg[off + 4:off + 10])
                if int(mac[:2], 16) & 1:
                    return  # multicast source: not a guest's address
                port.mac, port.mac_known = mac, True
                del self.learning[index]
                self._write(port)
                log.info("port %s learned its guest MAC %s (locked until the port goes)",
                         port.ifname, mac)
                for fn in self.listeners:
                    fn(port, "learned")
                return
            off += (alen + 3) & ~3

    def _gone(self, index: int) -> None:
        port = next((p for p in self.by_name.values() if p.ifindex == index), None) \
            if self.by_name else None
        if port is None:
            return
        del self.by_name[port.ifname]
        self.learning.pop(port.ifindex, None)
        log.info("port %s gone (%s/%s nic %d, uid %d): its holder closed it", port.ifname,
                 port.network, port.vm, port.nic, port.uid)
        self._forget(port.ifname)
        for fn in self.listeners:
            fn(port, "detached")

    # --- holder processes ---------------------------------------------------------------
    def _watch(self, pid: int) -> bool:
        if pid in self._pidfds:
            return True
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return False
        self._pidfds[pid] = pidfd
        asyncio.get_running_loop().add_reader(pidfd, self._holder_exited, pid)
        return True

    def _holder_exited(self, pid: int) -> None:
        pidfd = self._pidfds.pop(pid, None)
        if pidfd is not None:
            asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)
        left = [p for p in self.by_name.values() if p.holder_pid == pid]
        if left:
            asyncio.get_running_loop().create_task(self._reap(left))

    async def _reap(self, ports: list[Port]) -> None:
        """The holder exited: a tap still there was made persistent by it; remove it."""
        for p in ports:
            if self.by_name.get(p.ifname) is not p:
                continue
            lk = await self.links.get(index=p.ifindex)
            if lk is not None and lk.ifname == p.ifname:
                log.info("port %s outlived its holder (pid %s, persistent): removing it",
                         p.ifname, p.holder_pid)
                await self.links.delete(p.ifindex)
            self.by_name.pop(p.ifname, None)
            self._forget(p.ifname)

    # --- queries ------------------------------------------------------------------------
    def of_uid(self, uid: int) -> list[Port]:
        return [p for p in self.by_name.values() if p.uid == uid]

    def on_network(self, network: str) -> list[Port]:
        return [p for p in self.by_name.values() if p.network == network]

    def get(self, ifname: str) -> Port:
        model.validate_ifname(ifname, "port name")
        p = self.by_name.get(ifname)
        if p is None:
            raise NotFound(f"There is no port named '{ifname}'.")
        return p

    # --- attach / detach ----------------------------------------------------------------
    async def attach(self, net: model.Network, bridge_index: int, vm: str, uid: int,
                     caller_pid: int | None, opts: dict[str, Any]) -> tuple[Port, list[int],
                                                                          list[int], dict]:
        nic, queues = opts["nic"], opts["queues"]
        for p in self.by_name.values():
            if p.network == net.name and p.vm == vm and p.nic == nic:
                raise Busy(f"VM '{vm}' NIC {nic} is already attached to {net.name} as {p.ifname} "
                           f"(uid {p.uid}); detach it or use another --nic.")
        if len(self.of_uid(uid)) >= self.max_per_user and uid != 0:
            raise QuotaExceeded(f"You already hold {self.max_per_user} ports, the most one user "
                                "may; detach some first.")
        holder = caller_pid
        if opts["holder"] is not None:
            if caller_pid is None or opts["holder"] not in ancestors(caller_pid):
                raise InvalidArgument("'holder-pid' must be the calling process's parent "
                                      "(or its grandparent).")
            holder = opts["holder"]
        mac_known = not opts["learn"]
        mac = opts["mac"]
        host = net.host(vm) if nic == 0 else None
        if mac is None and host is not None:
            mac = host.mac  # the static host says which MAC this VM has on this network
        if mac is None:
            # the stable MAC; with learn-mac the guest's own MAC is unknown (the firewall
            # locks the port to the first source MAC it sees), but the VM still has one given
            mac = self.macs.get(net.name, vm, nic, uid)
        flags = tapdev.HANDOFF_FLAGS | (tapdev.IFF_MULTI_QUEUE if queues > 1 else 0)
        fds: list[int] = []
        vhostfds: list[int] = []
        try:
            ifname, first = self._open_free(net.name, vm, nic, flags)
            fds.append(first)
            try:
                fcntl.ioctl(first, tapdev.TUNSETOWNER, uid)
                for _ in range(queues - 1):
                    fds.append(tapdev.open_tap(ifname, flags & ~tapdev.IFF_TUN_EXCL))
                index = socket.if_nametoindex(ifname)
            except OSError as e:
                raise Failed(f"Could not set up tap '{ifname}': {e.strerror}.") from None
            self.links.fast.set(index, alias=model.alias_for(net.name), master=bridge_index,
                                mtu=net.mtu)
            info: dict[str, Any] = {"vhost": False}
            if opts["vhost"]:
                if os.path.exists(VHOST_PATH):
                    for _ in range(queues):
                        vhostfds.append(os.open(VHOST_PATH, os.O_RDWR | os.O_CLOEXEC))
                    info["vhost"] = True
                else:
                    info["vhost-reason"] = f"{VHOST_PATH} is not available on this host"
        except BaseException:
            for fd in fds + vhostfds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        port = Port(ifname=ifname, ifindex=index, network=net.name, vm=vm, nic=nic, uid=uid,
                    mac=mac, mac_known=mac_known, holder_pid=holder, queues=queues,
                    created=time.time())
        self.by_name[ifname] = port
        if not mac_known:
            self.learning[port.ifindex] = port
        if holder:
            self._watch(holder)
        self._write(port)
        info.update(port.to_dict())
        info["mtu"] = net.mtu
        return port, fds, vhostfds, info

    def _open_free(self, network: str, vm: str, nic: int, flags: int) -> tuple[str, int]:
        """Create the tap under the first free deterministic name. IFF_TUN_EXCL makes the
        kernel refuse a name that exists (EBUSY), so no lookup is needed first."""
        for attempt in range(16):
            name = port_name(network, vm, nic, attempt)
            if name in self.by_name:
                continue
            try:
                return name, tapdev.open_tap(name, flags)
            except OSError as e:
                if e.errno in (errno.EBUSY, errno.EEXIST, errno.EINVAL):
                    continue  # taken by another interface (EINVAL: not a tap)
                raise Failed(f"Could not create tap '{name}': {e.strerror}.") from None
        raise Busy("No free interface name for this port (16 collisions); try again.")

    async def detach(self, port: Port) -> None:
        await self.links.delete(port.ifindex)
        self.by_name.pop(port.ifname, None)
        self.learning.pop(port.ifindex, None)
        self._forget(port.ifname)

    async def remove_network_ports(self, network: str) -> None:
        for p in self.on_network(network):
            await self.detach(p)
