"""Links and addresses through netlink (pyroute2's asyncio socket).

Every lookup is a kernel-side filtered request (RTM_GETLINK by name or index); the only full
dump is the one reconcile makes once at start-up to find what carries our alias.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import Failed
from ..model import ALIAS_PREFIX

log = logging.getLogger("vnetd.links")

SIOCGIFINDEX = 0x8933
_ioctl_sock: socket.socket | None = None


def ifindex(name: str) -> int:
    """socket.if_nametoindex in one system call: the ioctl on a socket kept for it (the
    attach path asks for its bridge's index each time). OSError if there is no such
    link."""
    global _ioctl_sock
    raw = name.encode()
    if not raw or len(raw) > 15 or b"\0" in raw:  # (never a prefix of a longer name)
        raise OSError(errno.ENODEV, f"no link named {name!r}")
    if _ioctl_sock is None:
        _ioctl_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    req = struct.pack("16si", raw, 0)
    return struct.unpack_from("16si", fcntl.ioctl(_ioctl_sock.fileno(), SIOCGIFINDEX, req))[1]


@dataclass(frozen=True)
class Link:
    index: int
    ifname: str
    kind: str | None
    alias: str | None
    master: int | None
    up: bool
    mtu: int
    address: str | None
    tun_owner: int | None = None
    tun_persist: bool = False
    # fds attached as queues, enabled or not (read by parse_link; None: the kernel did not say)
    tun_queues: int | None = None


def _to_link(msg) -> Link:
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    owner, persist = None, False
    if kind == "tun":
        data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        attrs = dict(data["attrs"]) if data else {}
        owner = attrs.get("IFLA_TUN_OWNER")
        owner = None if owner in (None, 0xFFFFFFFF) else owner
        persist = bool(attrs.get("IFLA_TUN_PERSIST"))
    return Link(
        index=msg["index"],
        ifname=msg.get("ifname"),
        kind=kind,
        alias=msg.get("ifalias"),
        master=msg.get("master"),
        up=bool(msg["flags"] & 1),
        mtu=msg.get("mtu"),
        address=msg.get("address"),
        tun_owner=owner,
        tun_persist=persist,
    )


def _failed(what: str, e: NetlinkError) -> Failed:
    return Failed(f"The kernel refused to {what}: {errno.errorcode.get(e.code, e.code)} "
                  f"({e.args[1] if len(e.args) > 1 else e}).")


RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
AF_BRIDGE = 7
NLA_F_NESTED = 0x8000
IFLA_PROTINFO, IFLA_BRPORT_GROUP_FWD_MASK = 12, 31
PORT_GROUP_FWD_MASK = 0xFFFD  # every reserved group but PAUSE (0x01), which may not be set
RTM_NEWADDR, RTM_GETADDR = 20, 22
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 1, 4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_IFALIAS = 1, 3, 4, 10, 20
IFLA_LINKINFO, IFLA_INFO_KIND, IFLA_INFO_DATA = 18, 1, 2
IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS = 29, 1 << 3
IFLA_TUN_OWNER, IFLA_TUN_PERSIST = 1, 6
IFLA_TUN_NUM_QUEUES, IFLA_TUN_NUM_DISABLED_QUEUES = 8, 9
# a bridge's count of learned forwarding entries and the most it may learn (kernel 6.7 on; an
# older kernel ignores the attribute when set and does not report it)
IFLA_BR_FDB_N_LEARNED, IFLA_BR_FDB_MAX_LEARNED = 48, 49
IFF_UP = 1
NLA_TYPE_MASK = 0x3FFF  # an attribute's type without its nested / byte-order flags


_RTA = struct.Struct("=HH")  # an attribute's header: length, type


def _attrs(data: bytes, a: int, end: int) -> dict[int, bytes]:
    """The netlink attributes between a and end, by type (the last of a type wins)."""
    out = {}
    unpack = _RTA.unpack_from
    while a + 4 <= end:
        alen, akind = unpack(data, a)
        if alen < 4:
            break
        out[akind & NLA_TYPE_MASK] = data[a + 4:a + alen]
        a += (alen + 3) & ~3
    return out


def _cstr(raw: bytes | None) -> str | None:
    return None if raw is None else raw.split(b"\0", 1)[0].decode(errors="replace")


def _u32(raw: bytes | None) -> int | None:
    return None if raw is None or len(raw) < 4 else struct.unpack_from("=I", raw)[0]


def parse_link(data: bytes, off: int, length: int, want_alias: bytes = b"") -> Link | None:
    """One RTM_NEWLINK message (at `off`, `length` bytes) as a Link; None if `want_alias`
    is given and its alias does not start with it. One pass over the attributes, keeping only
    those a Link holds (a link has some fifty; a dump of thousands reads them all)."""
    _fam, _type, index, flags, _change = struct.unpack_from("=BxHiII", data, off + 16)
    unpack = _RTA.unpack_from
    ifname = alias = mac = b""
    mtu = master = None
    info = None
    a, end = off + 32, off + length
    while a + 4 <= end:
        alen, akind = unpack(data, a)
        if alen < 4:
            break
        akind &= NLA_TYPE_MASK
        if akind == IFLA_IFNAME:
            ifname = data[a + 4:a + alen]
        elif akind == IFLA_IFALIAS:
            alias = data[a + 4:a + alen]
        elif akind == IFLA_ADDRESS:
            mac = data[a + 4:a + alen]
        elif akind == IFLA_MTU:
            mtu = data[a + 4:a + alen]
        elif akind == IFLA_MASTER:
            master = data[a + 4:a + alen]
        elif akind == IFLA_LINKINFO:
            info = data[a + 4:a + alen]
        a += (alen + 3) & ~3
    if want_alias and not alias.startswith(want_alias):
        return None
    kind = None
    owner, persist, queues = None, False, None
    if info is not None:
        li = _attrs(info, 0, len(info))
        kind = _cstr(li.get(IFLA_INFO_KIND))
        if kind == "tun" and IFLA_INFO_DATA in li:
            td = _attrs(li[IFLA_INFO_DATA], 0, len(li[IFLA_INFO_DATA]))
            owner = _u32(td.get(IFLA_TUN_OWNER))
            owner = None if owner in (None, 0xFFFFFFFF) else owner
            persist = bool(td.get(IFLA_TUN_PERSIST, b"\0")[:1] != b"\0")
            queues = _u32(td.get(IFLA_TUN_NUM_QUEUES))
            if queues is not None:
                queues += _u32(td.get(IFLA_TUN_NUM_DISABLED_QUEUES)) or 0
    return Link(index=index, ifname=_cstr(ifname) or "", kind=kind,
                alias=_cstr(alias) or None, master=_u32(master),
                up=bool(flags & IFF_UP), mtu=_u32(mtu) or 0,
                address=mac.hex(":") if mac else None,
                tun_owner=owner, tun_persist=persist, tun_queues=queues)


NLM_F_DUMP_INTR = 0x10  # the dump saw its objects change: it may miss some
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12


def _dump(request: int, body: bytes, what: str, answer: int, strict: bool = False):
    """The messages of type `answer` of one rtnetlink dump, read by hand: (data, offset,
    length) each, and last a bool: whether the kernel marked the dump interrupted.
    `strict`: the kernel filters by the request's header (NETLINK_GET_STRICT_CHK)."""
    unpack_hdr = struct.Struct("=IHHII").unpack_from
    whole = True
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        if strict:  # a kernel without it (before 4.20) dumps everything: callers filter too
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        sock.bind((0, 0))
        sock.send(struct.pack("=IHHII", 16 + len(body), request,
                              NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        while True:
            data = sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, kind, flags, _seq, _pid = unpack_hdr(data, off)
                if flags & NLM_F_DUMP_INTR:
                    whole = False
                if kind == NLMSG_DONE:
                    yield not whole
                    return
                if length < 16:
                    raise Failed(f"The kernel's list of {what} was malformed.")
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    raise Failed(f"The kernel refused to list {what}: {os.strerror(-err)}.")
                if kind == answer:
                    yield data, off, length
                off += (length + 3) & ~3


def dump_links(alias_prefix: str) -> list[Link]:
    """Every link whose alias starts with `alias_prefix`: one RTM_GETLINK dump read by hand
    (a host with thousands of links: pyroute2 decodes each message whole, about 0.6 ms a
    link; this looks at the alias first and reads the rest only of the links it keeps). A
    dump the kernel marks interrupted (links changed meanwhile) is taken again."""
    want = alias_prefix.encode()
    # IFLA_EXT_MASK: without the IPv6 and VF statistics (the link's own counters still come;
    # a kernel that does not know the flag sends them all)
    body = (struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
            + _rtattr(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS)))
    out: list[Link] = []
    for _ in range(9):
        out = []
        for item in _dump(RTM_GETLINK, body, "interfaces", RTM_NEWLINK):
            if isinstance(item, bool):
                if not item:  # not interrupted
                    return out
                break
            data, off, length = item
            link = parse_link(data, off, length, want_alias=want)
            if link is not None:
                out.append(link)
    return out


def dump_addresses(family: int = socket.AF_UNSPEC, index: int = 0
                   ) -> list[tuple[int, int, bytes, int]]:
    """(ifindex, family, address bytes, prefix length) of every address of the host (of one
    family, if given; of one interface, if given, which the kernel picks out itself): one
    RTM_GETADDR dump read by hand, IFA_LOCAL (the interface's own address, also on
    point-to-point links) else IFA_ADDRESS."""
    out: list[tuple[int, int, bytes, int]] = []
    unpack_ifa = struct.Struct("=BBBBI").unpack_from
    unpack = _RTA.unpack_from
    for item in _dump(RTM_GETADDR, struct.pack("=BBBBI", family, 0, 0, 0, index), "addresses",
                      RTM_NEWADDR, strict=bool(index)):
        if isinstance(item, bool):
            break
        data, off, length = item
        fam, plen, _f, _scope, index = unpack_ifa(data, off + 16)
        if fam != socket.AF_INET and fam != socket.AF_INET6:
            continue
        raw = None
        a, end = off + 24, off + length
        while a + 4 <= end:  # (the kernel puts these two first: stop at IFA_LOCAL)
            alen, akind = unpack(data, a)
            if alen < 4:
                break
            if akind == IFA_LOCAL:
                raw = data[a + 4:a + alen]
                break
            if akind == IFA_ADDRESS:
                raw = data[a + 4:a + alen]
            a += (alen + 3) & ~3
        if raw is not None:
            out.append((index, fam, raw, plen))
    return out


def overlapping_addresses(
        subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
) -> list[tuple[int, ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
    """The host's addresses whose own subnet overlaps `subnet` (link-local ones aside), with
    their interface's index: compared as integers, so a host with hundreds of networks pays
    for the dump, not for an object per address."""
    fam = socket.AF_INET if subnet.version == 4 else socket.AF_INET6
    bits = subnet.max_prefixlen
    lo, hi = int(subnet.network_address), int(subnet.broadcast_address)
    out: list[tuple[int, ipaddress.IPv4Interface | ipaddress.IPv6Interface]] = []
    for index, _fam, raw, plen in dump_addresses(fam):
        n = int.from_bytes(raw, "big")
        size = 1 << (bits - plen)
        start = n & ~(size - 1)
        if start <= hi and lo <= start + size - 1:
            iface = ipaddress.ip_interface((ipaddress.ip_address(raw), plen))
            if not iface.ip.is_link_local:
                out.append((index, iface))
    return out


def bridge_fdb_learned(index: int) -> tuple[int, int] | None:
    """(forwarding entries learned, the most it may learn: 0 for no bound) of bridge #index,
    or None where the kernel does not count them (before 6.7: no bound is possible)."""
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.send(struct.pack("=IHHII", 16 + len(body), RTM_GETLINK, NLM_F_REQUEST, 1, 0)
                  + body)
        data = sock.recv(1 << 16)
    if len(data) < 32:
        return None
    length, kind = struct.unpack_from("=IH", data, 0)
    if kind == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", data, 16)
        raise Failed(f"The kernel cannot show interface #{index}: {os.strerror(-err)}.")
    info = _attrs(data, 32, min(length, len(data))).get(IFLA_LINKINFO)
    if info is None:
        return None
    li = _attrs(info, 0, len(info))
    if _cstr(li.get(IFLA_INFO_KIND)) != "bridge" or IFLA_INFO_DATA not in li:
        return None
    bd = _attrs(li[IFLA_INFO_DATA], 0, len(li[IFLA_INFO_DATA]))
    learned, most = _u32(bd.get(IFLA_BR_FDB_N_LEARNED)), _u32(bd.get(IFLA_BR_FDB_MAX_LEARNED))
    return None if learned is None or most is None else (learned, most)


def ipv6_conf(ifname: str, key: str, value: int) -> None:
    """/proc/sys/net/ipv6/conf/IF/KEY of this namespace; nothing where the host runs without
    IPv6 (ipv6.disable=1: no such directory)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/{key}", "w") as f:
            f.write(f"{value}\n")
    except FileNotFoundError:
        if os.path.isdir("/proc/sys/net/ipv6"):
            raise


def _rtattr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


class FastLinkSetter:
    """One RTM_NEWLINK built by hand on a plain rtnetlink socket: the attach path's only
    netlink request (enslave, MTU, alias, up). pyroute2 is kept for everything else; this
    saves its per-request overhead where every tenth of a millisecond shows."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def set(self, index: int, *, master: int | None = None, mtu: int | None = None,
            alias: str | None = None, up: bool = True, port: str | None = None,
            guarded: bool = True) -> None:
        """`port`: the interface's name, when it is a port (a tap) for guests' frames: it
        gets no IPv6 of the host's own before it comes up (no link-local address, no routes
        to announce to every rtnetlink listener, nothing sent into the guest: DAD, MLD). The
        bridge forwards the guests' IPv6 all the same. Put on a bridge of a network whose
        ports are `guarded`, it forwards the reserved link-local groups it receives to the
        guard (see forward_link_local), from before it comes up."""
        if port is not None:
            try:
                ipv6_conf(port, "disable_ipv6", 1)
            except OSError as e:
                raise Failed(f"Cannot turn the host's IPv6 off on port {port}: "
                             f"{e.strerror or e}.") from None
        attrs = b""
        if mtu is not None:
            attrs += _rtattr(IFLA_MTU, struct.pack("=I", mtu))
        if master is not None:
            attrs += _rtattr(IFLA_MASTER, struct.pack("=I", master))
        if alias is not None:
            attrs += _rtattr(IFLA_IFALIAS, alias.encode() + b"\0")
        mask = port is not None and bool(master) and guarded
        self._request(RTM_NEWLINK, socket.AF_UNSPEC, index, IFF_UP if up and not mask else 0,
                      IFF_UP, attrs)
        if mask:
            self.forward_link_local(index)
            if up:
                self._request(RTM_NEWLINK, socket.AF_UNSPEC, index, IFF_UP, IFF_UP, b"")

    def bridge_fdb_max_learned(self, index: int, limit: int) -> None:
        """The most forwarding entries bridge #index learns (0: no bound): past it, frames
        from a source MAC it does not know are forwarded without teaching it anything. A
        kernel before 6.7 ignores this (see `bridge_fdb_learned`)."""
        data = _rtattr(IFLA_BR_FDB_MAX_LEARNED, struct.pack("=I", limit))
        info = _rtattr(IFLA_INFO_KIND, b"bridge\0") + _rtattr(IFLA_INFO_DATA | NLA_F_NESTED, data)
        self._request(RTM_NEWLINK, socket.AF_UNSPEC, index, 0, 0,
                      _rtattr(IFLA_LINKINFO | NLA_F_NESTED, info))

    def tun_queues(self, index: int) -> int | None:
        """How many fds are attached to tap #index, as queues (enabled or not); None where the
        kernel does not say (before 4.15)."""
        self.seq += 1
        typ, data, off, length = _ifinfo_request(
            self.sock, self.seq, RTM_GETLINK, NLM_F_REQUEST, socket.AF_UNSPEC, index, 0, 0, b"",
            want=(NLMSG_ERROR, RTM_NEWLINK))
        if typ == NLMSG_ERROR:
            err = -struct.unpack_from("=i", data, off + 16)[0]
            raise Failed(f"The kernel cannot say how many queues tap #{index} has: "
                         f"{errno.errorcode.get(err, err)} ({os.strerror(err)}).")
        link = parse_link(data, off, length)
        return link.tun_queues if link is not None else None

    def forward_link_local(self, index: int) -> None:
        """The reserved link-local groups (01:80:c2:00:00:0X: LLDP, 802.1X, ...) that this
        bridge port receives are forwarded, through the bridge's prerouting hook and so the
        port's guard, not handed to the host on the port itself, where no rule of the
        bridge's sees them (all but PAUSE, which the kernel drops itself). Only where the
        guard drops them: on a network without one, they would go on to the other ports and
        out of a bridged network's NIC (802.1X, LACP to the LAN's switch)."""
        self._request(RTM_SETLINK, AF_BRIDGE, index, 0, 0, _rtattr(
            IFLA_PROTINFO | NLA_F_NESTED,
            _rtattr(IFLA_BRPORT_GROUP_FWD_MASK, struct.pack("=H", PORT_GROUP_FWD_MASK))))

    def _request(self, kind: int, family: int, index: int, flags: int, change: int,
                 attrs: bytes) -> None:
        self.seq += 1
        err = _link_request(self.sock, self.seq, kind, family, index, flags, change, attrs)
        if err:
            raise Failed(f"The kernel refused to set up interface #{index}: "
                         f"{errno.errorcode.get(err, err)} ({os.strerror(err)}).")


def _ifinfo_request(sock: socket.socket, seq: int, kind: int, nl_flags: int, family: int,
                    index: int, flags: int, change: int, attrs: bytes,
                    want: tuple[int, ...] = (NLMSG_ERROR,)) -> tuple[int, bytes, int, int]:
    """Send one ifinfomsg request and read until the first answer to it of a type in `want`:
    (its type, the buffer it is in, its offset there, its length)."""
    msg = struct.pack("=BxHiII", family, 0, index, flags, change) + attrs
    sock.send(struct.pack("=IHHII", 16 + len(msg), kind, nl_flags, seq, 0) + msg)
    while True:
        data = sock.recv(65536)
        off = 0
        while off + 16 <= len(data):
            length, typ, _flags, got, _pid = struct.unpack_from("=IHHII", data, off)
            if typ in want and got == seq:
                return typ, data, off, length
            if length < 16:
                break
            off += (length + 3) & ~3


def _link_request(sock: socket.socket, seq: int, kind: int, family: int, index: int,
                  flags: int, change: int, attrs: bytes) -> int:
    """Send one ifinfomsg request and read until its acknowledgement: its errno (0: done)."""
    _typ, data, off, _length = _ifinfo_request(sock, seq, kind, NLM_F_REQUEST | NLM_F_ACK,
                                               family, index, flags, change, attrs)
    return -struct.unpack_from("=i", data, off + 16)[0]


def delete_link(index: int) -> bool:
    """RTM_DELLINK of interface #index on a netlink socket of its own, for a worker thread;
    False if it was gone already. Removing an interface makes the kernel wait for its users
    to let go (some 15 ms for a tap here, 48 ms seen under load), inside the request: on the
    event loop, one user detaching in a loop stalled every other caller that long, each
    time."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        err = _link_request(sock, 1, RTM_DELLINK, socket.AF_UNSPEC, index, 0, 0, b"")
    if err == errno.ENODEV:
        return False
    if err:
        raise Failed(f"The kernel refused to delete interface #{index}: "
                     f"{errno.errorcode.get(err, err)} ({os.strerror(err)}).")
    return True


class Links:
    def __init__(self) -> None:
        self.ipr: AsyncIPRoute | None = None
        self.fast = FastLinkSetter()

    async def open(self) -> None:
        self.ipr = AsyncIPRoute()
        await self.ipr.setup_endpoint()

    async def close(self) -> None:
        if self.ipr is not None:
            self.ipr.close()
            self.ipr = None

    @property
    def nl(self) -> AsyncIPRoute:
        """The netlink socket, once open()."""
        if self.ipr is None:
            raise RuntimeError("the netlink socket is used before Links.open()")
        return self.ipr

    async def _made(self, name: str) -> Link:
        """A link just created (gone again only if something removed it at once)."""
        link = await self.get(name)
        if link is None:
            raise Failed(f"The interface {name} was gone right after it was created.")
        return link

    async def get(self, ifname: str | None = None, index: int | None = None) -> Link | None:
        try:
            if index is not None:
                msgs = await self.nl.link("get", index=index)
            else:
                msgs = await self.nl.link("get", ifname=ifname)
        except NetlinkError as e:
            if e.code in (errno.ENODEV, errno.EINVAL):
                return None
            raise _failed(f"look up {ifname or index}", e) from None
        return _to_link(msgs[0]) if msgs else None

    async def dump_ours(self) -> list[Link]:
        """Every link whose alias says vnetd made it (start-up reconcile only)."""
        return dump_links(ALIAS_PREFIX)

    async def create_bridge(self, name: str, mac: str, mtu: int, alias: str,
                            fdb_max_learned: int = 0) -> Link:
        """`fdb_max_learned`: the most source MACs the bridge learns (0: no bound)."""
        try:
            await self.nl.link(
                "add", ifname=name, kind="bridge", br_forward_delay=0, br_stp_state=0,
                address=mac, mtu=mtu,
            )
        except NetlinkError as e:
            raise _failed(f"create bridge {name}", e) from None
        link = await self._made(name)
        try:
            await self.set(link.index, ifalias=alias)
            if fdb_max_learned:
                self.fast.bridge_fdb_max_learned(link.index, fdb_max_learned)
        except BaseException:  # nothing half-made: the caller's rollback starts after this
            try:
                await self.delete(link.index)
            except Failed as e:  # (the first trouble is the one to tell)
                log.error("%s", e.message)
            raise
        return link

    # --- VXLAN overlay ------------------------------------------------------------------
    async def create_vxlan(self, name: str, vni: int, local: str, port: int, dev: int | None,
                           learning: bool, mtu: int, alias: str) -> Link:
        kw: dict[str, str | int] = {"vxlan_local6" if ":" in local else "vxlan_local": local}
        if dev is not None:
            kw["vxlan_link"] = dev
        try:
            await self.nl.link("add", ifname=name, kind="vxlan", vxlan_id=vni,
                                vxlan_port=port, vxlan_learning=int(learning), mtu=mtu, **kw)
        except NetlinkError as e:
            raise _failed(f"create VXLAN device {name} (VNI {vni})", e) from None
        link = await self._made(name)
        try:
            await self.set(link.index, ifalias=alias)
        except BaseException:  # without its alias no reconcile would ever recognise it
            await self.delete(link.index)
            raise
        return link

    async def vxlan_port_flags(self, index: int, evpn: bool) -> None:
        """EVPN: the bridge learns nothing on the VXLAN port (bgpd installs remote MACs) and
        answers ARP/ND for remote hosts itself (neigh_suppress)."""
        try:
            await self.nl.brport("set", index=index, learning=0 if evpn else 1,
                                  neigh_suppress=1 if evpn else 0)
        except NetlinkError as e:
            raise _failed(f"set bridge port flags of interface #{index}", e) from None

    async def flood_to(self, index: int, peer: str, add: bool = True) -> None:
        """Head-end replication: BUM frames on the VXLAN device go to `peer` too (`bridge fdb
        append 00:00:00:00:00:00 dev VX dst PEER`). Idempotent both ways."""
        try:
            await self.nl.fdb("append" if add else "del", ifindex=index,
                               lladdr="00:00:00:00:00:00", dst=peer)
        except NetlinkError as e:
            if not add and e.code in (errno.ENOENT, errno.ENODEV):
                return
            raise _failed(f"{'add' if add else 'remove'} the flood entry for {peer}", e) from None

    async def forget_remote(self, index: int, peer: str) -> None:
        """Drop the MACs the VXLAN device learned behind `peer` (a removed peer)."""
        for e in await self.fdb(index):
            if e["dst"] == peer and e["mac"] != "00:00:00:00:00:00":
                try:
                    await self.nl.fdb("del", ifindex=index, lladdr=e["mac"], dst=peer)
                except NetlinkError as err:
                    if err.code not in (errno.ENOENT, errno.ENODEV):
                        raise _failed(f"forget {e['mac']} behind {peer}", err) from None

    async def fdb(self, index: int) -> list[dict]:
        """The VXLAN device's forwarding entries: MAC, remote address, and how it was
        learned ('static' by vnetd, 'extern' from BGP EVPN, 'learned' from traffic)."""
        out = []
        async for m in await self.nl.fdb("dump", ifindex=index):
            if m["ifindex"] != index or not m.get("dst"):
                continue
            flags = m["flags"]
            how = "extern" if flags & 0x10 else ("static" if m["state"] & 0x80 else "learned")
            out.append({"mac": m.get("lladdr"), "dst": m.get("dst"), "how": how})
        return out

    async def link_of_address(self, ip: str) -> Link | None:
        """The interface that holds `ip` on this host."""
        for index, iface in await self.all_addresses():
            if str(iface.ip) == ip:
                return await self.get(index=index)
        return None

    async def set(self, index: int, **kw) -> None:
        try:
            await self.nl.link("set", index=index, **kw)
        except NetlinkError as e:
            raise _failed(f"change interface #{index} ({', '.join(kw)})", e) from None

    async def up(self, index: int) -> None:
        await self.set(index, state="up")

    async def delete(self, index: int) -> bool:
        """Delete interface #index (False: it was gone), in a worker thread (delete_link)."""
        return await asyncio.to_thread(delete_link, index)

    async def addresses(
            self, index: int) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        return [ipaddress.ip_interface((ipaddress.ip_address(raw), plen))
                for i, _fam, raw, plen in dump_addresses(index=index) if i == index]

    async def all_addresses(
            self) -> list[tuple[int, ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
        """Every address of the host, with its interface's index: one RTM_GETADDR dump read
        by hand (a define or start checks its subnets against them; pyroute2 took about
        25 us an address, which made every start cost more the more networks ran)."""
        return [(index, ipaddress.ip_interface((ipaddress.ip_address(raw), plen)))
                for index, _fam, raw, plen in dump_addresses()]

    async def overlapping(
            self, subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
    ) -> list[tuple[int, ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
        return overlapping_addresses(subnet)

    async def add_address(self, index: int, iface) -> None:
        kw = {}
        if iface.version == 6:
            kw["flags"] = 0x80  # IFA_F_NODAD: the gateway owns its address, no DAD wait
        try:
            await self.nl.addr("add", index=index, address=str(iface.ip),
                                prefixlen=iface.network.prefixlen, **kw)
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                return
            raise _failed(f"add address {iface}", e) from None


    @staticmethod
    def sysctl_ipv6(ifname: str, **values: int) -> None:
        """Per-interface IPv6 settings of this namespace (a failure is logged)."""
        for key, value in values.items():
            try:
                ipv6_conf(ifname, key, value)
            except OSError as e:
                log.warning("could not set IPv6 %s of %s: %s", key, ifname, e)

    # --- bridged mode: moving a NIC's addresses and routes to its bridge and back ---------
    async def address_records(self, index: int) -> list[dict]:
        """The link's addresses as re-addable records (link-local ones excepted)."""
        out = []
        async for msg in await self.nl.addr("dump", index=index):
            if msg["index"] != index:
                continue
            addr = msg.get("address")
            if msg["family"] == socket.AF_INET6 and addr.startswith("fe80:"):
                continue  # regenerated by the kernel wherever the MAC goes
            flags = (msg.get("flags") or msg["flags"]) & ~0x80  # not IFA_F_PERMANENT
            out.append({"address": addr, "prefixlen": msg["prefixlen"],
                        "family": msg["family"], "flags": flags})
        return out

    async def route_records(self, index: int) -> list[dict]:
        """Routes of the main table that leave through the link and that the kernel does
        not make by itself from an address (so they must be moved by hand)."""
        out = []
        async for r in await self.nl.route("dump", oif=index):
            if r.get("oif") != index or r.get("table") != 254 or r["proto"] == 2:
                continue
            out.append({"family": r["family"], "dst": r.get("dst"), "dst_len": r["dst_len"],
                        "gateway": r.get("gateway"), "priority": r.get("priority"),
                        "proto": r["proto"], "scope": r["scope"], "type": r["type"]})
        return out

    async def move_addresses(self, records: list[dict], src: int | None, dst: int) -> None:
        for a in records:
            if src is not None:
                try:
                    await self.nl.addr("del", index=src, address=a["address"],
                                        prefixlen=a["prefixlen"])
                except NetlinkError as e:
                    if e.code not in (errno.EADDRNOTAVAIL, errno.ENODEV):
                        raise _failed(f"remove address {a['address']}", e) from None
            try:
                await self.nl.addr("add", index=dst, address=a["address"],
                                    prefixlen=a["prefixlen"], flags=a["flags"])
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise _failed(f"add address {a['address']}", e) from None

    async def add_routes(self, records: list[dict], oif: int) -> None:
        for r in records:
            kw = {k: v for k, v in r.items() if v is not None}
            kw.setdefault("dst_len", 0)
            try:
                await self.nl.route("add", oif=oif, table=254, **kw)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise _failed(f"add route {r.get('dst') or 'default'}", e) from None
