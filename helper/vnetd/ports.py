"""Ports: taps handed to users (made IFF_TAP|IFF_NO_PI|IFF_VNET_HDR|IFF_TUN_EXCL, never
persistent, tracked by ifindex).

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
import hmac
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from vnet_common.limits import MAX_QUEUES
from vnet_common.names import validate_nic

from . import model
from .errors import Busy, Failed, InvalidArgument, NotFound, NotOwner, QuotaExceeded, VnetError
from .kernel import tap as tapdev
from .kernel.links import FastLinkSetter, Links
from .macs import MacRegistry

if TYPE_CHECKING:
    from .subsystems.firewall import Firewall
    from .subsystems.spares import Spares

log = logging.getLogger("vnetd.ports")

RTMGRP_LINK, RTMGRP_NEIGH = 1, 4
# A port's holder decides how many link events its tap makes (every TUNSETOFFLOAD on its fd is
# one): the monitor reads at most this many batches of events at a time, then lets the loop
# serve everyone else before it reads on; and after lost events (ENOBUFS) it re-checks every
# port at most once a RESCAN_EVERY seconds.
MONITOR_BATCHES = 32
RESCAN_EVERY = 1.0
RTM_NEWLINK, RTM_DELLINK, RTM_NEWNEIGH = 16, 17, 28
IFLA_ADDRESS = 1
SIOCGIFHWADDR = 0x8927
# What a port is: a tap handed out by Attach (the bridge helper too), a pre-created `-n` tap,
# the tap of a VDE switch (a shared segment), or a user's own tap enslaved by vnet-ifup.
KINDS = ("attach", "tap", "vde", "ifup")
AF_BRIDGE, NDA_LLADDR, NUD_PERMANENT = 7, 2, 0x80
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
    kind: str = "attach"
    tap_mac: str | None = None  # the tap's own address when vnetd took it: a change is cut off
    # its MAC came from the registry (not --mac or a static host): in its runtime record
    # only, so that adopting it puts back an entry a crash kept from being written
    registry_mac: bool = False
    # its network's stop parked it (record only too): after a crash in that stop, the
    # restart puts it back on the bridge if the network still runs
    parked: bool = False

    def to_dict(self) -> dict[str, Any]:
        """What callers see of it (every field is a plain value: no deep copy needed, and
        `ports` lists thousands)."""
        d = {key: getattr(self, name) for name, key in _PUBLIC}
        d["created"] = int(self.created)
        if self.holder_pid is None:
            del d["holder-pid"]
        if self.tap_mac is None:
            del d["tap-mac"]
        return d


# (field, key) of what Port.to_dict shows: all but the runtime record's own
_PUBLIC = tuple((f.name, f.name.replace("_", "-")) for f in fields(Port)
                if f.name not in ("registry_mac", "parked"))


def reserve_tap_names(net: model.Network, vm: str, uid: int) -> None:
    """The VM names of a network's pre-created taps (`<network>_<n>`: the MAC its `-n` tap is
    guarded with) are the network's: a user who registered one first would own the tap's MAC,
    attach as it and read the leases of whoever uses the tap."""
    if uid != 0 and vm in net.tap_names:
        raise NotOwner(f"VM '{vm}' on {net.name} is the name of one of the network's "
                       "pre-created taps, which belongs to the network: choose another name.")


def port_name(network: str, vm: str, nic: int, attempt: int = 0, key: bytes = b"") -> str:
    """Fits IFNAMSIZ, recognizably the network's: '<net[:8]>-<6 hex>', the hex keyed with a
    secret of this vnetd (Ports' name key): names another user could compute ahead could be
    taken by that user's own ports first, and a VM's attach would run out of names."""
    h = hmac.new(key, f"{network}/{vm}/{nic}/{attempt}".encode(), hashlib.sha256)
    return f"{network[:8]}-{h.hexdigest()[:6]}"


@dataclass(frozen=True)
class AttachOptions:
    """Attach's options (the D-Bus dictionary), checked."""

    nic: int = 0
    queues: int = 1
    vhost: bool = False
    mac: str | None = None
    learn: bool = False  # 'learn-mac': the port takes the first source MAC its guest sends
    holder: int | None = None  # 'holder-pid': the caller's parent (or grandparent) holds it


def parse_attach_options(options: dict[str, Any]) -> AttachOptions:
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
    return AttachOptions(nic=nic, queues=queues, vhost=vhost, mac=mac, learn=learn,
                         holder=holder)


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


def read_tap_mac(fd: int | None = None, ifname: str | None = None) -> str | None:
    """A tap's own hardware address, through its fd (the tun driver answers SIOCGIFHWADDR)
    or by name."""
    req = struct.pack("16s16x", (ifname or "").encode())
    try:
        if fd is not None:
            out = fcntl.ioctl(fd, SIOCGIFHWADDR, req)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sk:
                out = fcntl.ioctl(sk.fileno(), SIOCGIFHWADDR, req)
    except OSError:
        return None
    return ":".join(f"{b:02x}" for b in out[18:24])


def _mac_attr(attrs: bytes, want: int) -> str | None:
    """The MAC in netlink attribute `want` of `attrs` (a run of rtattrs), or None."""
    off = 0
    while off + 4 <= len(attrs):
        alen, atype = struct.unpack_from("=HH", attrs, off)
        if alen < 4:
            return None
        if atype == want and alen >= 10:
            return ":".join(f"{b:02x}" for b in attrs[off + 4:off + 10])
        off += (alen + 3) & ~3
    return None


def _forward_link_local(due: list[tuple[str, int]], still_ours: Callable[[int], bool]) -> None:
    """`Links.forward_link_local` for each (ifname, index) still ours (on a thread). What
    fails is logged, never raised: the adoption of every network waits for this."""
    try:
        setter = FastLinkSetter()
    except OSError as e:
        log.error("the link-local set-up of %d adopted port(s) was not made: no netlink socket "
                  "(%s)", len(due), e)
        return
    try:
        for ifname, index in due:
            if not still_ours(index):
                continue  # gone meanwhile
            try:
                setter.forward_link_local(index)
            except Failed as e:
                log.warning("port %s: %s", ifname, e)
            except OSError as e:
                log.warning("port %s: its link-local set-up was not made (%s)", ifname, e)
    finally:
        setter.sock.close()


class Ports:
    def __init__(self, links: Links, macs: MacRegistry, store, max_per_user: int = 64):
        self.links = links
        self.macs = macs
        self.store = store
        self.max_per_user = max_per_user
        self.name_key = os.urandom(16)  # port_name's secret (adopted ports keep their names)
        self.by_name: dict[str, Port] = {}
        self.by_index: dict[int, Port] = {}
        # keyed views of by_name, so that no attach, quota check or holder exit scans every
        # port on the host: {network: {ifname: port}}, {uid: ...}, {holder pid: ...}, and
        # (network, vm, nic) -> port
        self._on_network: dict[str, dict[str, Port]] = {}
        self._of_uid: dict[int, dict[str, Port]] = {}
        self._of_holder: dict[int, dict[str, Port]] = {}
        self._by_nic: dict[tuple[str, str, int], Port] = {}
        self._pidfds: dict[int, int] = {}  # holder pid -> pidfd (one per holder process)
        self._monitor: asyncio.Task | None = None
        self._monitor_sock: socket.socket | None = None
        self._rescanned = 0.0  # when the ports were last re-checked after lost events
        self._rescan: asyncio.TimerHandle | None = None  # one waiting, if any
        self.spares: Spares | None = None  # taps made ahead of attaches (set by the engine)
        self.firewall: Firewall | None = None  # (set by the engine) holds a tap made here
        self._records: dict[str, Port] = {}
        # adopted ports whose link-local forwarding is set once vnetd answers: (ifname, index)
        self._link_local_due: list[tuple[str, int]] = []
        # ports whose guest MAC is still to be learned, by ifindex: the FDB events of every
        # bridge on the host are checked against this, so it must cost O(1)
        self.learning: dict[int, Port] = {}
        self.listeners: list = []
        # who else holds an identity: a learned MAC must not be one (set by the engine)
        self.identity_owner: Callable[[str, str], str | None] = lambda network, mac: None

    DIR = "ports"

    # --- the one place ports come and go ------------------------------------------------
    def _add(self, port: Port) -> None:
        self.by_name[port.ifname] = port
        self.by_index[port.ifindex] = port
        self._on_network.setdefault(port.network, {})[port.ifname] = port
        self._of_uid.setdefault(port.uid, {})[port.ifname] = port
        if port.holder_pid:
            self._of_holder.setdefault(port.holder_pid, {})[port.ifname] = port
        self._by_nic[(port.network, port.vm, port.nic)] = port
        if not port.mac_known:
            self.learning[port.ifindex] = port

    def _drop(self, port: Port) -> bool:
        """Forget a port (its record, its index entries and, with the last port of its holder,
        the holder's pidfd); False if it was not known."""
        if self.by_name.get(port.ifname) is not port:
            return False
        del self.by_name[port.ifname]
        if self.by_index.get(port.ifindex) is port:
            del self.by_index[port.ifindex]
        indexes: tuple[tuple[dict[Any, dict[str, Port]], Any], ...] = (
            (self._on_network, port.network), (self._of_uid, port.uid),
            (self._of_holder, port.holder_pid))
        for index, key in indexes:
            group = index.get(key)
            if group is not None:
                group.pop(port.ifname, None)
                if not group:
                    del index[key]
        if self._by_nic.get((port.network, port.vm, port.nic)) is port:
            del self._by_nic[(port.network, port.vm, port.nic)]
        self.learning.pop(port.ifindex, None)
        self._forget(port.ifname)
        pid = port.holder_pid
        if pid and pid in self._pidfds and pid not in self._of_holder:
            self._unwatch(pid)
        return True

    # --- persistence and adoption -------------------------------------------------------
    # One small file per port under the runtime directory (tmpfs): O(1) per attach however
    # many ports exist, and no fsync (a daemon crash keeps the page cache; a reboot loses the
    # ports anyway).
    def _record(self, ifname: str):
        return self.store.runtime_dir / self.DIR / f"{ifname}.json"

    def _write(self, port: Port, new: bool = False) -> None:
        d = port.to_dict()
        if port.registry_mac:
            d["registry-mac"] = True
        if port.parked:
            d["parked"] = True
        self.store.write_runtime_file(self._record(port.ifname), json.dumps(d).encode(), new)

    def _forget(self, ifname: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._record(ifname).unlink()

    def load_records(self) -> dict[str, Port]:
        out = {}
        folder = self.store.runtime_dir / self.DIR
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.glob("*.json"):
            try:
                raw = path.read_bytes()
                if not raw:  # made in place by an attach that was killed before writing
                    path.unlink(missing_ok=True)  # it: its tap never left vnetd, and died
                    continue
                d = json.loads(raw)
            except (OSError, ValueError):
                log.error("ignoring an unreadable port record %s", path)
                continue
            try:
                fields = {k.replace("-", "_"): v for k, v in d.items()
                          if k.replace("-", "_") in Port.__dataclass_fields__}
                if "holder-pid" not in d:
                    fields["holder_pid"] = None
                p = Port(**fields)
                if p.kind not in KINDS:
                    raise TypeError(p.kind)
                out[p.ifname] = p
            except TypeError:
                log.error("ignoring an unreadable port record: %r", d)
        return out

    async def adopt(self, link) -> bool:
        """At start-up: keep an attached tap if our records know it (same ifindex), and cut
        off one whose own address changed while vnetd was away."""
        rec = self._records.get(link.ifname)
        if rec is None or rec.ifindex != link.index:
            return False
        self._add(rec)
        if rec.holder_pid and not self._watch(rec.holder_pid):
            # the holder died while vnetd was down
            if link.tun_persist and rec.kind == "attach":
                await self.links.delete(link.index)
            self._drop(rec)
            return True
        # its address as the kernel listed it: a change since comes as an event, read once
        # vnetd answers (the monitor listens from before the list; see open_monitor)
        now = link.address
        if rec.tap_mac and now and now != rec.tap_mac:
            self._cut(rec, now)
            return True
        log.debug("reconcile: adopted port %s (%s/%s nic %d, uid %d)", rec.ifname, rec.network,
                  rec.vm, rec.nic, rec.uid)
        if link.master is not None and (self.firewall is None
                                        or self.firewall.protects(rec.network)):
            # as a port is set up now (one made by an older vnetd), once vnetd answers
            self._link_local_due.append((rec.ifname, link.index))
        if rec.kind == "attach":
            self.macs.remember(rec.network, rec.vm, rec.uid, rec.nic,
                               rec.mac if rec.registry_mac else None)
        return True

    def begin_reconcile(self) -> None:
        self._records = self.load_records()

    def end_reconcile(self) -> None:
        log.info("reconcile: adopted %d port(s)", len(self.by_name))
        for name in self._records:
            if name not in self.by_name:
                self._forget(name)
        self._records = {}

    async def forward_adopted_link_local(self) -> None:
        """Give the adopted ports the link-local set-up a new port gets (see
        `Links.forward_link_local`): one request per port (which held the first answer after
        a restart 0.1 s at 5,000 ports), on a thread with a netlink socket of its own, while
        vnetd answers."""
        due, self._link_local_due = self._link_local_due, []
        if due:
            await asyncio.to_thread(_forward_link_local, due, self.by_index.__contains__)

    # --- netlink events -----------------------------------------------------------------
    def open_monitor(self) -> None:
        """Listen to link and neighbour events on a raw rtnetlink socket, from now on: what
        comes before `start_monitor` waits in the socket (start-up opens it before it lists
        the links, so that a port's change after the list is not missed)."""
        if self._monitor_sock is not None:
            return
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                             socket.NETLINK_ROUTE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((0, RTMGRP_LINK | RTMGRP_NEIGH))
        self._monitor_sock = sock

    async def start_monitor(self) -> None:
        """Read the events of the monitor (`open_monitor`). Every tap creation makes several
        RTM_NEWLINK events; only those of our ports are parsed further (a dictionary lookup
        by ifindex), which keeps the rest nearly free on the attach path."""
        self.open_monitor()
        assert self._monitor_sock is not None
        asyncio.get_running_loop().add_reader(self._monitor_sock.fileno(), self._on_netlink)

    def _on_netlink(self) -> None:
        for _ in range(MONITOR_BATCHES):  # (what is left is read at the loop's next turn)
            try:
                data = self._monitor_sock.recv(1 << 16)  # type: ignore[union-attr]
            except BlockingIOError:
                return
            except OSError as e:  # ENOBUFS: events were lost; re-check every port
                self._rescan_soon(e)
                continue
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if length < 16:
                    break
                if kind == RTM_DELLINK and off + 24 <= len(data):
                    # ifinfomsg: family, index; AF_BRIDGE: the tap left its bridge, which
                    # ends a port too, but for one its network's stop parked (or one back
                    # on a bridge by the time the event is read)
                    family, index = struct.unpack_from("=B3xi", data, off + 16)
                    if family != AF_BRIDGE or not self._still_bridged(index):
                        self._gone(index)
                elif kind == RTM_NEWLINK and off + 32 <= len(data):
                    (index,) = struct.unpack_from("=i", data, off + 20)
                    port = self.by_index.get(index)
                    if port is not None and port.tap_mac:
                        self._link_changed(port, data[off + 32:off + length])
                elif kind == RTM_NEWNEIGH and self.learning:
                    self._fdb_entry(data[off + 16:off + length])
                off += (length + 3) & ~3

    def _rescan_soon(self, e: OSError) -> None:
        """Events were lost: every port is checked again (gone? re-MACed?), at once, or, if
        that was done less than RESCAN_EVERY ago, once that much time has passed."""
        if self._rescan is not None:
            return
        loop = asyncio.get_running_loop()
        wait = self._rescanned + RESCAN_EVERY - loop.time()
        log.warning("netlink monitor: %s; re-checking ports%s", e,
                    f" in {wait:.1f} s" if wait > 0 else "")
        if wait > 0:
            self._rescan = loop.call_later(wait, self._recheck)
        else:
            self._recheck()

    def _recheck(self) -> None:
        self._rescan = None
        self._rescanned = asyncio.get_running_loop().time()
        for p in list(self.by_name.values()):
            try:
                socket.if_indextoname(p.ifindex)
            except OSError:
                self._gone(p.ifindex)
                continue
            now = read_tap_mac(ifname=p.ifname)
            if p.tap_mac and now and now != p.tap_mac:
                self._cut(p, now)

    def _still_bridged(self, index: int) -> bool:
        port = self.by_index.get(index)
        return port is not None and (
            port.parked or os.path.exists(f"/sys/class/net/{port.ifname}/master"))

    def _link_changed(self, port: Port, attrs: bytes) -> None:
        """A link event of one of our ports: its own address must stay what it was (a holder
        can re-MAC its tap through the fd; the bridge would then deliver another guest's
        frames to it)."""
        mac = _mac_attr(attrs, IFLA_ADDRESS)
        if mac is not None and mac != port.tap_mac:
            self._cut(port, mac)

    def _cut(self, port: Port, new_mac: str) -> None:
        """Cut a port off: its holder changed the tap's own address."""
        log.warning("audit: cut off port %s (%s/%s nic %d, uid %d, %s): its tap's address "
                    "changed from %s to %s", port.ifname, port.network, port.vm, port.nic,
                    port.uid, port.kind, port.tap_mac, new_mac)
        if not self._drop(port):
            return
        for fn in self.listeners:
            fn(port, "cut")

    def _fdb_entry(self, msg: bytes) -> None:
        """A bridge FDB entry: the first source MAC seen on a port whose guest MAC vnetd could
        not know becomes that port's MAC, sticky until the port goes (switch port security).
        The firewall never lets a MAC that is taken (another port's, the gateway's) pass, so
        it is never learned; one that belongs to another VM (the MAC registry, a static host)
        cuts the port off."""
        if len(msg) < 12:
            return
        family, index, state = struct.unpack_from("=B3xiH", msg)
        if family != AF_BRIDGE or state & NUD_PERMANENT:
            return  # the tap's own address (a local entry), or not a bridge entry
        port = self.learning.get(index)
        if port is None or self.by_name.get(port.ifname) is not port:
            self.learning.pop(index, None)  # gone meanwhile
            return
        mac = _mac_attr(msg[12:], NDA_LLADDR)
        if mac is None or int(mac[:2], 16) & 1:
            return  # no address, or a multicast source: not a guest's address
        owner = self.identity_owner(port.network, mac)
        if owner is not None and owner != port.vm:
            log.warning("audit: port %s (uid %d) sent as %s, which belongs to %s on %s",
                        port.ifname, port.uid, mac, owner, port.network)
            self._cut(port, port.tap_mac or "?")
            return
        port.mac, port.mac_known = mac, True
        del self.learning[index]
        self._write(port)
        log.info("port %s learned its guest MAC %s (locked until the port goes)",
                 port.ifname, mac)
        for fn in self.listeners:
            fn(port, "learned")

    def _gone(self, index: int) -> None:
        port = self.by_index.get(index)
        if port is None or not self._drop(port):
            return
        log.info("port %s gone (%s/%s nic %d, uid %d): its holder closed it", port.ifname,
                 port.network, port.vm, port.nic, port.uid)
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

    def _unwatch(self, pid: int) -> None:
        pidfd = self._pidfds.pop(pid, None)
        if pidfd is not None:
            asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)

    def _holder_exited(self, pid: int) -> None:
        self._unwatch(pid)
        left = list(self._of_holder.get(pid, {}).values())
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
            if self._drop(p):
                for fn in self.listeners:
                    fn(p, "detached")

    # --- queries ------------------------------------------------------------------------
    def of_uid(self, uid: int) -> list[Port]:
        return list(self._of_uid.get(uid, {}).values())

    def held_by(self, uid: int) -> int:
        """How many ports `uid` holds (counted, not listed: root may hold thousands)."""
        return len(self._of_uid.get(uid, ()))

    def check_quota(self, uid: int) -> None:
        """QuotaExceeded if `uid` (not root) holds as many ports as one user may."""
        if uid != 0 and self.held_by(uid) >= self.max_per_user:
            raise QuotaExceeded(f"You already hold {self.max_per_user} ports, the most one user "
                                "may; detach some first.")

    def on_network(self, network: str) -> list[Port]:
        return list(self._on_network.get(network, {}).values())

    def get(self, ifname: str) -> Port:
        model.validate_ifname(ifname, "port name")
        p = self.by_name.get(ifname)
        if p is None:
            raise NotFound(f"There is no port named '{ifname}'.")
        return p

    # --- identity -----------------------------------------------------------------------
    def check_mac(self, net: model.Network, vm: str, mac: str, uid: int) -> None:
        """A MAC a VM may use on a network: not the gateway's, not another VM's (the
        registry, a static host, an attached port). The refusal names the VM that has it
        only to that VM's owner (or root, or for an administrator's static host): another
        user's VM names are theirs, as their ports are."""
        if mac == net.mac:
            raise NotOwner(f"{mac} is the MAC of the gateway of {net.name}; a VM cannot use "
                           "it.")
        owner = self.identity_owner(net.name, mac)
        if owner is not None and owner != vm:
            whose = self.macs.owner_uid(net.name, owner)
            named = f"VM '{owner}'" if uid == 0 or whose in (None, uid) else \
                "another user's VM"
            raise NotOwner(f"The MAC {mac} belongs to {named} on {net.name}; use the "
                           f"VM's own MAC (vnet-client mac {net.name} {vm}).")

    # --- attach / detach ----------------------------------------------------------------
    async def attach(self, net: model.Network, bridge_index: int, vm: str, uid: int,
                     caller_pid: int | None, opts: AttachOptions) -> tuple[Port, list[int],
                                                                          list[int], dict]:
        nic, queues = opts.nic, opts.queues
        reserve_tap_names(net, vm, uid)
        self.macs.check_owner(net.name, vm, uid)  # before anything says who holds it
        p = self._by_nic.get((net.name, vm, nic))
        if p is not None and self._monitor_sock is not None:
            # its holder may have closed it a moment ago (the same VM restarting): the
            # kernel's events already say so, if only they were read first
            self._on_netlink()
            p = self._by_nic.get((net.name, vm, nic))
        if p is not None:
            raise Busy(f"VM '{vm}' NIC {nic} is already attached to {net.name} as {p.ifname} "
                       f"(uid {p.uid}); detach it or use another --nic.")
        self.check_quota(uid)
        holder = caller_pid
        if opts.holder is not None:
            if caller_pid is None or opts.holder not in ancestors(caller_pid):
                raise InvalidArgument("'holder-pid' must be the calling process's parent "
                                      "(or its grandparent).")
            holder = opts.holder
        mac_known = not opts.learn
        mac = opts.mac
        host = net.host(vm) if nic == 0 else None
        if mac is None and host is not None:
            mac = host.mac  # the static host says which MAC this VM has on this network
        if mac is not None:
            self.check_mac(net, vm, mac, uid)
        self.macs.claim(net.name, vm, uid)
        registry_mac = mac is None
        if mac is None:
            # the stable MAC; with learn-mac the guest's own MAC is unknown (the firewall
            # locks the port to the first source MAC it sees), but the VM still has one given
            mac = self.macs.get(net.name, vm, nic, uid)
        flags = tapdev.HANDOFF_FLAGS | (tapdev.IFF_MULTI_QUEUE if queues > 1 else 0)
        fds: list[int] = []
        vhostfds: list[int] = []
        spare = self.spares.take(net.name) if self.spares is not None and queues == 1 else None
        held: Firewall | None = None  # holds the tap made here as pending
        try:
            if spare is not None:  # made ahead, already on the bridge: only its owner is left
                ifname, first, index, tap_mac = spare.ifname, spare.fd, spare.index, \
                    spare.tap_mac
            else:
                ifname, first = self._open_free(net.name, vm, nic, flags)
            fds.append(first)
            try:
                fcntl.ioctl(first, tapdev.TUNSETOWNER, uid)
                if spare is None:
                    for _ in range(queues - 1):
                        fds.append(tapdev.open_tap(ifname, flags & ~tapdev.IFF_TUN_EXCL))
                    index = socket.if_nametoindex(ifname)
            except OSError as e:
                raise Failed(f"Could not set up tap '{ifname}': {e.strerror}.") from None
            if spare is None and queues > 1:
                await self._check_queues(ifname, index, queues, uid)
            if spare is None:
                tap_mac = read_tap_mac(fd=first, ifname=ifname)
                if self.firewall is not None and net.spoof_protection:
                    # nothing to or from it until its guard is in (as for a spare): frames
                    # flooded meanwhile would wait in its queue for the holder
                    await self.firewall.spares_added([ifname])
                    held = self.firewall
                self.links.fast.set(index, alias=model.alias_for(net.name),
                                    master=bridge_index, mtu=net.mtu, port=ifname,
                                    guarded=net.spoof_protection)
            info: dict[str, Any] = {"vhost": False}
            if opts.vhost:
                if os.path.exists(VHOST_PATH):
                    for _ in range(queues):
                        vhostfds.append(os.open(VHOST_PATH, os.O_RDWR | os.O_CLOEXEC))
                    info["vhost"] = True
                else:
                    info["vhost-reason"] = f"{VHOST_PATH} is not available on this host"
        except BaseException:
            if spare is not None and self.spares is not None:
                self.spares.discard(spare)  # its fd and its firewall element
                fds = [fd for fd in fds if fd != spare.fd]
            for fd in fds + vhostfds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if held is not None:
                await held.spares_gone([ifname])
            raise
        port = Port(ifname=ifname, ifindex=index, network=net.name, vm=vm, nic=nic, uid=uid,
                    mac=mac, mac_known=mac_known, holder_pid=holder, queues=queues,
                    created=time.time(), tap_mac=tap_mac, registry_mac=registry_mac)
        self._add(port)
        if holder:
            self._watch(holder)
        self._write(port, new=True)  # (a record a crash left under its name is replaced)
        info.update(port.to_dict())
        info["mtu"] = net.mtu
        return port, fds, vhostfds, info

    async def _check_queues(self, ifname: str, index: int, queues: int, uid: int) -> None:
        """A multi-queue tap has no owner between its creation and TUNSETOWNER, and the kernel
        lets anyone attach a queue to a tap that has none: another local user who watches for
        new links could join the port that way, before it is the caller's. After TUNSETOWNER
        no one else can; so the tap must hold exactly the queues vnetd attached, or it is
        deleted (the other process's queue dies with it) and the attach fails."""
        have = self.links.fast.tun_queues(index)
        if have is None or have == queues:
            return
        log.warning("audit: tap %s for uid %d had %d queues, not the %d vnetd attached: "
                    "another process joined it before it had an owner; deleted", ifname, uid,
                    have, queues)
        with contextlib.suppress(VnetError):
            await self.links.delete(index)
        raise Failed(f"Another process joined the new tap '{ifname}' before it was yours; it "
                     "was deleted. Try again.")

    def guard_tap(self, net: model.Network, ifname: str, kind: str, uid: int,
                  mac: str | None) -> Port | None:
        """Record a tap vnetd did not hand out as a port, so that it is guarded like one: a
        `-n` tap (locked to its registry MAC), a VDE switch's tap (a shared segment) or a
        user's tap enslaved by vnet-ifup (locked to its first source MAC)."""
        old = self.by_name.get(ifname)
        if old is not None:
            return old
        try:
            index = socket.if_nametoindex(ifname)
        except OSError:
            return None
        port = Port(ifname=ifname, ifindex=index, network=net.name, vm=ifname, nic=0, uid=uid,
                    mac=mac or "", mac_known=mac is not None or kind == "vde", holder_pid=None,
                    queues=1, created=time.time(), kind=kind,
                    tap_mac=read_tap_mac(ifname=ifname))
        self._add(port)
        self._write(port)
        return port

    def _open_free(self, network: str, vm: str, nic: int, flags: int) -> tuple[str, int]:
        """Create the tap under the first free one of the port's names (port_name).
        IFF_TUN_EXCL makes the kernel refuse a name that exists (EBUSY), so no lookup is
        needed first."""
        for attempt in range(16):
            name = port_name(network, vm, nic, attempt, self.name_key)
            if name in self.by_name:
                continue
            try:
                return name, tapdev.open_tap(name, flags)
            except OSError as e:
                if e.errno in (errno.EBUSY, errno.EEXIST, errno.EINVAL):
                    continue  # taken by another interface (EINVAL: not a tap)
                raise Failed(f"Could not create tap '{name}': {e.strerror}.") from None
        raise Busy("No free interface name for this port (16 collisions); try again.")

    def forget(self, port: Port) -> bool:
        """Stop tracking a port (its tap stays as it is)."""
        return self._drop(port)

    async def detach(self, port: Port) -> None:
        """Remove a port: a tap vnetd handed out is deleted, another tap leaves the bridge."""
        if port.kind == "attach":
            await self.links.delete(port.ifindex)
        else:
            with contextlib.suppress(Exception):
                await self.links.set(port.ifindex, master=0)
        self._drop(port)

    async def remove_network_ports(self, network: str, *, park: bool = False) -> None:
        """The network's ports go; with `park`, the taps vnetd handed out (their fds are
        still held) stay, down and off any bridge, until the network starts again
        (`unpark`) or their holders close them. Down, a tap neither forwards nor reaches
        the host: no address, no ARP answer, nothing queued for its guest."""
        for p in self.on_network(network):
            if park and p.kind == "attach":
                try:
                    p.parked = True
                    self._write(p)  # first: a crash from here on finds it parked
                    await self.links.set(p.ifindex, master=0, state="down")
                    log.info("port %s (%s/%s, uid %d) waits for %s to start again",
                             p.ifname, p.network, p.vm, p.uid, network)
                    continue
                except VnetError as e:  # gone meanwhile, or stuck: it goes
                    p.parked = False
                    log.warning("could not park port %s: %s", p.ifname, e.message)
            await self.detach(p)

    def parked(self, network: str) -> list[Port]:
        """The ports that wait for a stopped network (see remove_network_ports)."""
        return [p for p in self.on_network(network) if p.kind == "attach"]

    def unpark(self, net: model.Network, bridge_index: int, *,
               marked_only: bool = False) -> list[Port]:
        """Put the ports that waited for `net` back on its (new) bridge, up: their guards
        must be in place already. `marked_only`: only those a stop marked parked (after a
        restart, of a network that still runs: a crash cut its stop short). A port whose tap
        is gone is dropped; returns those back."""
        back = []
        for p in self.parked(net.name):
            if marked_only and not p.parked:
                continue
            try:
                self.links.fast.set(p.ifindex, alias=model.alias_for(net.name),
                                    master=bridge_index, mtu=net.mtu, port=p.ifname,
                                    guarded=net.spoof_protection)
            except VnetError as e:
                log.warning("port %s could not come back on %s: %s", p.ifname, net.name,
                            e.message)
                self._drop(p)
                continue
            back.append(p)
            p.parked = False
            self._write(p)
            log.info("port %s (%s/%s, uid %d) is back on %s", p.ifname, p.network, p.vm,
                     p.uid, net.name)
        return back
