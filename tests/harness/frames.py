"""Raw frames for attack-as-test: build Ethernet, ARP, IPv4, UDP, DHCP, IPv6 and ICMPv6
(neighbour solicitation/advertisement, router advertisement, redirect) with their checksums,
read them back, and write/read them on a tap fd that was handed out with IFF_VNET_HDR (every
frame sits behind a 10-byte virtio-net header; a zeroed one means "no offloads").

Standard library only: the test users' processes load this file by its path.

Every attack frame can carry a marker, ``ADV:<tag>;``: inside the UDP or ICMP echo payload,
or after the layer-3 packet (Ethernet padding, forwarded untouched for ARP; for IPv4 and IPv6
br_netfilter trims it, so :func:`tags` also recognizes a sent frame by its bytes up to the end
of its layer-3 packet), so a victim can report exactly which attack frames reached it
whatever their headers say.
"""

from __future__ import annotations

import ipaddress
import os
import re
import select
import socket
import struct
import time

VNET_HDR_LEN = 10
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6, ETH_P_8021Q = 0x0800, 0x0806, 0x86DD, 0x8100
BROADCAST = "ff:ff:ff:ff:ff:ff"
SIOCSIFHWADDR = 0x8924
ARPHRD_ETHER = 1
TUNSETIFF, TUNGETIFF = 0x400454CA, 0x800454D2
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000

# ICMPv6 types
RS, RA, NS, NA, REDIRECT = 133, 134, 135, 136, 137
ECHO6_REQUEST, ECHO6_REPLY = 128, 129
# NA flags
NA_ROUTER, NA_SOLICITED, NA_OVERRIDE = 0x80000000, 0x40000000, 0x20000000
# DHCP message types
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
DHCP_MAGIC = b"\x63\x82\x53\x63"

MARK_RE = re.compile(rb"ADV:([A-Za-z0-9_.-]+);")


# --- addresses --------------------------------------------------------------------------------


def mac_bytes(mac: str | bytes) -> bytes:
    if isinstance(mac, bytes):
        assert len(mac) == 6
        return mac
    b = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    assert len(b) == 6, mac
    return b


def mac_str(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def ip4(a: str) -> bytes:
    return socket.inet_aton(a)


def ip6(a: str) -> bytes:
    return ipaddress.IPv6Address(a).packed


def eui64_ll(mac: str) -> str:
    """The EUI-64 link-local address a guest derives from its MAC."""
    b = mac_bytes(mac)
    iid = bytes([b[0] ^ 2, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]])
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + iid))


def solicited_node(addr: str) -> str:
    low = ipaddress.IPv6Address(addr).packed[-3:]
    return str(ipaddress.IPv6Address(bytes.fromhex("ff0200000000000000000001ff") + low))


def mcast6_mac(addr: str) -> str:
    return mac_str(b"\x33\x33" + ipaddress.IPv6Address(addr).packed[-4:])


def random_mac(seed: int | None = None) -> str:
    """A locally administered unicast MAC."""
    raw = os.urandom(5) if seed is None else seed.to_bytes(5, "big")
    return mac_str(b"\x02" + raw)


def marker(tag: str | None) -> bytes:
    return f"ADV:{tag};".encode() if tag else b""


# --- checksums --------------------------------------------------------------------------------


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _l4_checksum(pseudo: bytes, segment: bytes) -> int:
    c = inet_checksum(pseudo + segment)
    return c or 0xFFFF


# --- layer 2 ----------------------------------------------------------------------------------


def ether(dst: str, src: str, ethertype: int, payload: bytes, *, vlan: int | None = None,
          tag: str | None = None) -> bytes:
    """An Ethernet frame (802.1Q-tagged with `vlan`), padded to 60 bytes; the marker goes
    after the payload."""
    head = mac_bytes(dst) + mac_bytes(src)
    if vlan is not None:
        head += struct.pack("!HH", ETH_P_8021Q, vlan & 0x0FFF)
    frame = head + struct.pack("!H", ethertype) + payload + marker(tag)
    return frame + bytes(max(0, 60 - len(frame)))


def arp(op: int, sha: str, spa: str, tha: str, tpa: str, *, src: str | None = None,
        dst: str = BROADCAST, tag: str | None = None, vlan: int | None = None) -> bytes:
    """ARP over Ethernet: op 1 request, 2 reply. The frame's source is `src` or `sha`."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, mac_bytes(sha), ip4(spa),
                       mac_bytes(tha), ip4(tpa))
    return ether(dst, src or sha, ETH_P_ARP, body, tag=tag, vlan=vlan)


def gratuitous_arp(mac: str, ip: str, *, reply: bool = False, tag: str | None = None) -> bytes:
    return arp(2 if reply else 1, mac, ip, BROADCAST if reply else "00:00:00:00:00:00", ip,
               tag=tag)


def arp_probe(mac: str, target: str, *, tag: str | None = None) -> bytes:
    """What a client sends before using an address (RFC 5227): sender IP 0.0.0.0."""
    return arp(1, mac, "0.0.0.0", "00:00:00:00:00:00", target, tag=tag)


# --- IPv4 -------------------------------------------------------------------------------------


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, ttl: int = 64,
         ident: int = 0) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, ttl, proto, 0,
                      ip4(src), ip4(dst))
    c = inet_checksum(hdr)
    return hdr[:10] + struct.pack("!H", c) + hdr[12:] + payload


def udp4(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    length = 8 + len(data)
    seg = struct.pack("!HHHH", sport, dport, length, 0) + data
    pseudo = ip4(src) + ip4(dst) + struct.pack("!BBH", 0, 17, length)
    c = _l4_checksum(pseudo, seg)
    return ipv4(src, dst, 17, seg[:6] + struct.pack("!H", c) + seg[8:])


def udp4_frame(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int,
               data: bytes = b"", *, tag: str | None = None, vlan: int | None = None) -> bytes:
    return ether(dst_mac, src_mac, ETH_P_IP, udp4(src, dst, sport, dport, data + marker(tag)),
                 vlan=vlan)


def icmp4_echo(src_mac: str, dst_mac: str, src: str, dst: str, *, ident: int = 0x7A7A,
               seq: int = 1, reply: bool = False, tag: str | None = None) -> bytes:
    data = marker(tag) or b"vnet-echo"
    body = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + data
    c = inet_checksum(body)
    body = body[:2] + struct.pack("!H", c) + body[4:]
    return ether(dst_mac, src_mac, ETH_P_IP, ipv4(src, dst, 1, body))


def icmp4_redirect(src_mac: str, dst_mac: str, src: str, dst: str, gateway: str,
                   *, tag: str | None = None) -> bytes:
    inner = ipv4(dst, "198.51.100.1", 17, bytes(8))
    body = struct.pack("!BBH4s", 5, 1, 0, ip4(gateway)) + inner[:28]
    c = inet_checksum(body)
    body = body[:2] + struct.pack("!H", c) + body[4:]
    return ether(dst_mac, src_mac, ETH_P_IP, ipv4(src, dst, 1, body), tag=tag)


# --- DHCP -------------------------------------------------------------------------------------


def dhcp_payload(msgtype: int, chaddr: str, *, xid: int = 0x1234ABCD, op: int | None = None,
                 ciaddr: str = "0.0.0.0", yiaddr: str = "0.0.0.0", siaddr: str = "0.0.0.0",
                 broadcast: bool = False, options: list[tuple[int, bytes]] = ()) -> bytes:
    """A BOOTP/DHCP message; op defaults to 1 (client) for client message types."""
    if op is None:
        op = 2 if msgtype in (OFFER, ACK, NAK) else 1
    fixed = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, 1, 6, 0, xid, 0,
                        0x8000 if broadcast else 0, ip4(ciaddr), ip4(yiaddr), ip4(siaddr),
                        bytes(4), mac_bytes(chaddr) + bytes(10), bytes(64), bytes(128))
    opts = bytes([53, 1, msgtype])
    for code, value in options:
        opts += bytes([code, len(value)]) + value
    return fixed + DHCP_MAGIC + opts + b"\xff"


def dhcp_client(msgtype: int, mac: str, *, chaddr: str | None = None, xid: int = 0x1234ABCD,
                src: str = "0.0.0.0", dst: str = "255.255.255.255", dst_mac: str = BROADCAST,
                ciaddr: str = "0.0.0.0", requested: str | None = None,
                server: str | None = None, tag: str | None = None) -> bytes:
    """A DHCP client message from `mac` (udp 68 -> 67); chaddr defaults to the frame's
    source MAC."""
    opts: list[tuple[int, bytes]] = []
    if requested:
        opts.append((50, ip4(requested)))
    if server:
        opts.append((54, ip4(server)))
    payload = dhcp_payload(msgtype, chaddr or mac, xid=xid, ciaddr=ciaddr, options=opts)
    return udp4_frame(mac, dst_mac, src, dst, 68, 67, payload, tag=tag)


def dhcp_server(msgtype: int, server_mac: str, server_ip: str, client_mac: str, yiaddr: str,
                *, router: str | None = None, xid: int = 0x1234ABCD, dst_mac: str = BROADCAST,
                tag: str | None = None) -> bytes:
    """A DHCP server's OFFER/ACK (udp 67 -> 68), as a rogue server would send it."""
    opts = [(54, ip4(server_ip)), (51, struct.pack("!I", 3600)), (1, ip4("255.255.255.0"))]
    if router:
        opts += [(3, ip4(router)), (6, ip4(router))]
    payload = dhcp_payload(msgtype, client_mac, xid=xid, yiaddr=yiaddr, siaddr=server_ip,
                           options=opts)
    return udp4_frame(server_mac, dst_mac, server_ip, "255.255.255.255", 67, 68, payload,
                      tag=tag)


# --- IPv6 and ICMPv6 --------------------------------------------------------------------------


def ipv6(src: str, dst: str, nh: int, payload: bytes, *, hlim: int = 255) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), nh, hlim, ip6(src),
                       ip6(dst)) + payload


def _pseudo6(src: str, dst: str, length: int, nh: int) -> bytes:
    return ip6(src) + ip6(dst) + struct.pack("!I3xB", length, nh)


def icmp6(src: str, dst: str, type_: int, code: int, body: bytes) -> bytes:
    msg = struct.pack("!BBH", type_, code, 0) + body
    c = _l4_checksum(_pseudo6(src, dst, len(msg), 58), msg)
    return ipv6(src, dst, 58, msg[:2] + struct.pack("!H", c) + msg[4:])


def lla_option(kind: int, mac: str) -> bytes:
    """Source (1) or target (2) link-layer address option."""
    return bytes([kind, 1]) + mac_bytes(mac)


def icmp6_frame(src_mac: str, dst_mac: str, src: str, dst: str, type_: int, code: int,
                body: bytes, *, tag: str | None = None, vlan: int | None = None) -> bytes:
    return ether(dst_mac, src_mac, ETH_P_IPV6, icmp6(src, dst, type_, code, body), tag=tag,
                 vlan=vlan)


def neighbor_solicit(src_mac: str, src: str, target: str, *, sll: str | None = "same",
                     dst: str | None = None, dst_mac: str | None = None,
                     tag: str | None = None) -> bytes:
    """NS for `target` (to its solicited-node group unless `dst`), with a source link-layer
    option carrying `sll` ("same": the frame's source MAC; None: no option)."""
    dst = dst or solicited_node(target)
    body = bytes(4) + ip6(target)
    if sll is not None and src != "::":
        body += lla_option(1, src_mac if sll == "same" else sll)
    return icmp6_frame(src_mac, dst_mac or mcast6_mac(dst), src, dst, NS, 0, body, tag=tag)


def neighbor_advert(src_mac: str, src: str, target: str, *, tll: str | None = "same",
                    flags: int = NA_OVERRIDE, dst: str = "ff02::1", dst_mac: str | None = None,
                    tag: str | None = None, vlan: int | None = None) -> bytes:
    """NA for `target` (unsolicited to all nodes unless `dst`), with a target link-layer
    option carrying `tll` ("same": the frame's source MAC; None: no option)."""
    body = struct.pack("!I", flags) + ip6(target)
    if tll is not None:
        body += lla_option(2, src_mac if tll == "same" else tll)
    return icmp6_frame(src_mac, dst_mac or mcast6_mac(dst), src, dst, NA, 0, body, tag=tag,
                       vlan=vlan)


def router_advert(src_mac: str, src: str, prefix: str, *, lifetime: int = 1800,
                  dst: str = "ff02::1", tag: str | None = None) -> bytes:
    net = ipaddress.IPv6Network(prefix)
    body = struct.pack("!BBHII", 64, 0, lifetime, 0, 0)
    body += lla_option(1, src_mac)
    body += struct.pack("!BBBBIII16s", 3, 4, net.prefixlen, 0xC0, 86400, 14400, 0,
                        net.network_address.packed)
    return icmp6_frame(src_mac, mcast6_mac(dst), src, dst, RA, 0, body, tag=tag)


def redirect6(src_mac: str, src: str, dst: str, dst_mac: str, target: str, destination: str,
              *, tag: str | None = None) -> bytes:
    """'Reach `destination` through `target`' (target link-layer option: our MAC)."""
    body = bytes(4) + ip6(target) + ip6(destination) + lla_option(2, src_mac)
    return icmp6_frame(src_mac, dst_mac, src, dst, REDIRECT, 0, body, tag=tag)


def udp6_frame(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int,
               data: bytes = b"", *, tag: str | None = None) -> bytes:
    data = data + marker(tag)
    length = 8 + len(data)
    seg = struct.pack("!HHHH", sport, dport, length, 0) + data
    c = _l4_checksum(_pseudo6(src, dst, length, 17), seg)
    return ether(dst_mac, src_mac, ETH_P_IPV6,
                 ipv6(src, dst, 17, seg[:6] + struct.pack("!H", c) + seg[8:], hlim=64))


def echo6(src_mac: str, dst_mac: str, src: str, dst: str, *, ident: int = 0x7A7A, seq: int = 1,
          tag: str | None = None) -> bytes:
    body = struct.pack("!HH", ident, seq) + (marker(tag) or b"vnet-echo")
    return icmp6_frame(src_mac, dst_mac, src, dst, ECHO6_REQUEST, 0, body)


# --- reading frames ---------------------------------------------------------------------------


def parse(frame: bytes) -> dict:
    """The fields the tests look at; unknown layers are left out."""
    d: dict = {"dst": mac_str(frame[0:6]), "src": mac_str(frame[6:12]),
               "tags": [m.decode() for m in MARK_RE.findall(frame)]}
    off, etype = 14, struct.unpack_from("!H", frame, 12)[0]
    if etype == ETH_P_8021Q and len(frame) >= 18:
        d["vlan"] = struct.unpack_from("!H", frame, 14)[0] & 0x0FFF
        etype = struct.unpack_from("!H", frame, 16)[0]
        off = 18
    d["type"] = etype
    p = frame[off:]
    if etype == ETH_P_ARP and len(p) >= 28:
        op, sha, spa, tha, tpa = struct.unpack_from("!6xH6s4s6s4s", p)
        d["arp"] = {"op": op, "sha": mac_str(sha), "spa": socket.inet_ntoa(spa),
                    "tha": mac_str(tha), "tpa": socket.inet_ntoa(tpa)}
    elif etype == ETH_P_IP and len(p) >= 20:
        ihl = (p[0] & 15) * 4
        proto = p[9]
        d["ip"] = {"src": socket.inet_ntoa(p[12:16]), "dst": socket.inet_ntoa(p[16:20]),
                   "proto": proto}
        l4 = p[ihl:]
        if proto == 17 and len(l4) >= 8:
            sport, dport = struct.unpack_from("!HH", l4)
            d["udp"] = {"sport": sport, "dport": dport}
            if {sport, dport} <= {67, 68} and len(l4) >= 8 + 240:
                bootp = l4[8:]
                d["dhcp"] = {"op": bootp[0], "xid": struct.unpack_from("!I", bootp, 4)[0],
                             "yiaddr": socket.inet_ntoa(bootp[16:20]),
                             "chaddr": mac_str(bootp[28:34]),
                             "type": _dhcp_type(bootp[240:])}
        elif proto == 1 and len(l4) >= 8:
            d["icmp"] = {"type": l4[0], "code": l4[1]}
    elif etype == ETH_P_IPV6 and len(p) >= 40:
        d["ip6"] = {"src": str(ipaddress.IPv6Address(p[8:24])),
                    "dst": str(ipaddress.IPv6Address(p[24:40])), "nh": p[6]}
        if p[6] == 58 and len(p) >= 44:
            d["icmp6"] = {"type": p[40], "code": p[41]}
            if p[40] in (NS, NA) and len(p) >= 64:
                d["icmp6"]["target"] = str(ipaddress.IPv6Address(p[48:64]))
    return d


def _dhcp_type(opts: bytes) -> int | None:
    i = 0
    while i + 1 < len(opts):
        code = opts[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        n = opts[i + 1]
        if code == 53 and n >= 1:
            return opts[i + 2]
        i += 2 + n
    return None


def core(frame: bytes) -> bytes:
    """The frame up to the end of its layer-3 packet: what a bridge forwards whatever it does
    with the padding (br_netfilter trims IPv4 and IPv6 packets to their length, and with them
    a marker behind the payload)."""
    off, etype = 14, struct.unpack_from("!H", frame, 12)[0]
    if etype == ETH_P_8021Q and len(frame) >= 18:
        off, etype = 18, struct.unpack_from("!H", frame, 16)[0]
    if etype == ETH_P_ARP:
        return frame[:off + 28]
    if etype == ETH_P_IP and len(frame) >= off + 4:
        return frame[:off + struct.unpack_from("!H", frame, off + 2)[0]]
    if etype == ETH_P_IPV6 and len(frame) >= off + 6:
        return frame[:off + 40 + struct.unpack_from("!H", frame, off + 4)[0]]
    return frame


def tags(frames: list[bytes], sent: list[bytes] = ()) -> set[str]:
    """The markers in `frames`; with `sent`, also the tag of every sent frame that arrived
    with its marker trimmed off (same bytes up to the end of its layer-3 packet)."""
    out = {t for f in frames for t in parse(f)["tags"]}
    cores = {core(f) for f in frames}
    for f in sent:
        if core(f) in cores:
            out.update(parse(f)["tags"])
    return out


def distinct(frames: list[bytes]) -> list[bytes]:
    """The frames, checked to differ before their padding (so that tags() tells them apart)."""
    seen: dict[bytes, list[str]] = {}
    for f in frames:
        seen.setdefault(core(f), []).extend(parse(f)["tags"])
    clash = [t for t in seen.values() if len(t) > 1]
    assert not clash, f"frames identical but for their marker: {clash}"
    return list(frames)


# --- a tap fd behind the virtio-net header ------------------------------------------------------


def write_frame(fd: int, frame: bytes) -> None:
    """One frame to a tap opened with IFF_VNET_HDR: a zeroed header (no offloads) first."""
    os.write(fd, bytes(VNET_HDR_LEN) + frame)


def read_frames(fd: int, seconds: float, *, until=None, vnet_hdr: bool = True) -> list[bytes]:
    """Frames the tap hands to its holder for `seconds` (or until until(frame) is true),
    without the virtio-net header."""
    out: list[bytes] = []
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return out
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            return out
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue
        frame = data[VNET_HDR_LEN:] if vnet_hdr else data
        out.append(frame)
        if until is not None and until(frame):
            return out


def set_hwaddr_via_fd(fd: int, ifname: str, mac: str) -> None:
    """SIOCSIFHWADDR issued on the tun fd itself: the kernel lets the fd's holder do it."""
    import fcntl

    req = struct.pack("16sH6s8x", ifname.encode(), ARPHRD_ETHER, mac_bytes(mac))
    fcntl.ioctl(fd, SIOCSIFHWADDR, req)


def set_hwaddr_via_socket(ifname: str, mac: str) -> None:
    """SIOCSIFHWADDR on an AF_INET socket (needs CAP_NET_ADMIN in the device's namespace)."""
    import fcntl

    req = struct.pack("16sH6s8x", ifname.encode(), ARPHRD_ETHER, mac_bytes(mac))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCSIFHWADDR, req)


def open_tap(name: str, vnet_hdr: bool = True) -> int:
    """Attach to an existing (persistent) tap the caller owns."""
    import fcntl

    fd = os.open("/dev/net/tun", os.O_RDWR)
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


def vde_stream(frame: bytes) -> bytes:
    """A frame as vde_plug's stdin/stdout stream carries it: a 2-byte big-endian length."""
    return struct.pack("!H", len(frame)) + frame


# --- the agent: a test user's process holding one port ------------------------------------------
# Run as `python frames.py attach NET VM OPTIONS_JSON` (a tap handed out by Attach),
# `python frames.py tap NAME` (a pre-created tap the user owns) or `python frames.py vde SOCK`
# (a VDE switch port through vde_plug). It prints one JSON line about its port, captures every
# frame that reaches it, and answers one JSON line per command line on stdin:
#   {"op": "send", "frames": [hex, ...]}        write the frames
#   {"op": "clear"}                              forget what was captured
#   {"op": "collect", "seconds": s, "until": {}} wait s (or until a frame matches), return
#                                                and forget the capture
#   {"op": "setmac", "mac": m}                   SIOCSIFHWADDR through the fd and a socket
#   {"op": "setmac_send", "mac": m, "frames": [hex, ...], "seconds": s}  SIOCSIFHWADDR
#                                                through the fd, then write the frames over
#                                                and over until a write fails or s is up
#   {"op": "respond", "mac": m, "ip4": [..], "ip6": [..]}  answer ARP and NS for these
#   {"op": "watch", "cores": [hex, ...]}         from now on count frames instead of keeping
#                                                them; count apart those with these cores
#   {"op": "summary"}                            {"frames": n, "hits": n, "tags": {tag: n}};
#                                                frames are kept again from then on
#   {"op": "exit"}


def _matches(frame: bytes, until: dict) -> bool:
    d = parse(frame)
    for key, want in until.items():
        if key == "tag":
            if want not in d["tags"]:
                return False
            continue
        layer, field = key.split(".", 1)
        if d.get(layer, {}).get(field) != want:
            return False
    return True


def _agent(argv: list[str]) -> None:  # pragma: no cover - runs as a test user
    import json
    import subprocess
    import sys
    import threading

    def say(o: dict) -> None:
        sys.stdout.write(json.dumps(o) + "\n")
        sys.stdout.flush()

    mode = argv[0]
    hello: dict = {"pid": os.getpid()}
    fd = None
    plug = None
    if mode == "attach":
        import asyncio

        from vnet_client import Client, VnetClientError

        network, vm, opts = argv[1], argv[2], json.loads(argv[3])

        async def attach():
            async with Client() as c:
                return await c.attach(network, vm, **opts)

        try:
            a = asyncio.run(attach())
        except VnetClientError as e:
            say({"error": e.name, "message": e.message})
            return
        fd = a.fds[0]
        hello.update(ifname=a.ifname, mac=a.mac, info=a.info)
    elif mode == "tap":
        try:
            fd = open_tap(argv[1])
        except OSError as e:
            say({"error": "OSError", "message": str(e)})
            return
        hello.update(ifname=argv[1])
    elif mode == "vde":
        plug = subprocess.Popen(["vde_plug", argv[1]], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        hello.update(sock=argv[1], plug_pid=plug.pid)
    else:
        raise SystemExit(f"unknown mode {mode}")

    lock = threading.Condition()
    captured: list[bytes] = []
    # counting mode (long runs): frames are not kept, only counted, and those whose bytes up
    # to the end of their layer-3 packet are among `watched` counted apart
    counting: dict = {"on": False, "watched": set(), "frames": 0, "hits": 0, "tags": {}}
    responder: dict = {"mac": None, "ip4": set(), "ip6": set()}

    def emit(frame: bytes) -> None:
        if fd is not None:
            write_frame(fd, frame)
        else:
            plug.stdin.write(vde_stream(frame))
            plug.stdin.flush()

    def answer(data: bytes) -> None:
        """Behave like a guest for the addresses it holds: answer ARP and NS for them."""
        mac = responder["mac"]
        if mac is None:
            return
        d = parse(data)
        a = d.get("arp")
        if a and a["op"] == 1 and a["tpa"] in responder["ip4"] and a["spa"] != "0.0.0.0":
            emit(arp(2, mac, a["tpa"], a["sha"], a["spa"], dst=a["sha"]))
        n = d.get("icmp6")
        if n and n["type"] == NS and n.get("target") in responder["ip6"]:
            src = d["ip6"]["src"]
            dst, dst_mac = (src, d["src"]) if src != "::" else ("ff02::1", None)
            emit(neighbor_advert(mac, n["target"], n["target"], dst=dst, dst_mac=dst_mac,
                                 flags=NA_SOLICITED | NA_OVERRIDE if src != "::"
                                 else NA_OVERRIDE))

    def capture() -> None:
        while True:
            try:
                if fd is not None:
                    data = os.read(fd, 65536)[VNET_HDR_LEN:]
                else:
                    head = plug.stdout.read(2)
                    if len(head) < 2:
                        return
                    data = plug.stdout.read(struct.unpack("!H", head)[0])
            except OSError:
                return
            with lock:
                if counting["on"]:
                    counting["frames"] += 1
                    if core(data) in counting["watched"]:
                        counting["hits"] += 1
                        for t in MARK_RE.findall(data):
                            t = t.decode()
                            counting["tags"][t] = counting["tags"].get(t, 0) + 1
                else:
                    captured.append(data)
                lock.notify_all()
            try:
                answer(data)
            except (OSError, ValueError, struct.error):
                pass

    threading.Thread(target=capture, daemon=True).start()
    say(hello)
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "send":
            n = 0
            errors = []
            for h in req["frames"]:
                frame = bytes.fromhex(h)
                try:
                    emit(frame)
                    n += 1
                except OSError as e:
                    errors.append(str(e))
            say({"sent": n, "errors": errors})
        elif op == "respond":
            responder.update(mac=req.get("mac") or hello.get("mac"), ip4=set(req.get("ip4", ())),
                             ip6=set(req.get("ip6", ())))
            say({"ok": True})
        elif op == "watch":
            with lock:
                counting.update(on=True, watched={bytes.fromhex(h) for h in req["cores"]},
                                frames=0, hits=0, tags={})
                captured.clear()
            say({"ok": True})
        elif op == "summary":
            with lock:
                out = {k: counting[k] for k in ("frames", "hits", "tags")}
                counting["on"] = False
            say(out)
        elif op == "clear":
            with lock:
                captured.clear()
            say({"ok": True})
        elif op == "collect":
            until = req.get("until")
            deadline = time.monotonic() + req["seconds"]
            with lock:
                while True:
                    if until and any(_matches(f, until) for f in captured):
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    lock.wait(left)
                got = [f.hex() for f in captured]
                captured.clear()
            say({"frames": got})
        elif op == "setmac":
            out = {}
            for how in ("fd", "socket"):
                try:
                    if how == "fd":
                        set_hwaddr_via_fd(fd, hello["ifname"], req["mac"])
                    else:
                        set_hwaddr_via_socket(hello["ifname"], req["mac"])
                    out[how] = "ok"
                except OSError as e:
                    out[how] = f"{type(e).__name__}: {e}"
            say(out)
        elif op == "setmac_send":
            # re-MAC through the fd, then write the frames again and again, as fast as one
            # process can, for `seconds` or until the port is cut off (the write fails)
            set_hwaddr_via_fd(fd, hello["ifname"], req["mac"])
            frames = [bytes.fromhex(h) for h in req["frames"]]
            n, stopped = 0, None
            deadline = time.monotonic() + req["seconds"]
            while stopped is None and time.monotonic() < deadline:
                for frame in frames:
                    try:
                        emit(frame)
                        n += 1
                    except OSError as e:
                        stopped = f"{type(e).__name__}: {e}"
                        break
            say({"sent": n, "stopped": stopped})
        elif op == "exit":
            break
    if plug is not None:
        plug.stdin.close()
        plug.kill()
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    import sys

    _agent(sys.argv[1:])
