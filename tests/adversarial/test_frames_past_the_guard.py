"""Frames built to pass beside the port guard rather than through it:

- to a reserved link-local group (01:80:c2:00:00:0e, LLDP's): the bridge hands such a frame
  to the host on the port itself, where neither the bridge's hooks nor inet's rules for the
  bridge see it, so a host-only guest reached the host's UDP services with any source;
- DHCP whose first fragment ends before the client hardware address, which the guard checks,
  and DHCP that names another guest's client-id: both released the other guest's lease;
- VXLAN from a guest of a nat network to its gateway, which its network may reach: the
  overlay on the same host took the inner frame as one from its peers.

Each attack passes on the code before its fix; each is dropped now."""

from __future__ import annotations

import struct
import subprocess
import sys
import time

import pytest

from tests.harness import frames as F
from tests.harness.daemon import ALICE, BOB, run_client

from .lab import bridge_mac, dhcp_bind, exchange, leases, ping, respond, settle

HOSTONLY, NAT, OVERLAY = "llc1", "natv1", "ovl1"
LLDP_GROUP = "01:80:c2:00:00:0e"
LISTEN = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
s.settimeout(float(sys.argv[2]))
try:
    data, peer = s.recvfrom(2048)
    print(peer[0], data.hex(), flush=True)
except socket.timeout:
    print("nothing", flush=True)
"""


@pytest.fixture(scope="module", autouse=True)
def networks(vnetd, bob_may_attach):
    vnetd.ip("link", "add", "ul0", "type", "veth", "peer", "name", "ul1")  # the underlay
    vnetd.ip("addr", "add", "10.233.0.1/24", "dev", "ul0")
    vnetd.ip("link", "set", "ul0", "up")
    vnetd.ip("link", "set", "ul1", "up")
    run_client("define", HOSTONLY, "--mode=host-only", "--subnet=10.232.1.0/24", check=True)
    run_client("define", NAT, "--subnet=10.232.2.0/24", check=True)
    run_client("define", OVERLAY, "--subnet=10.232.3.0/24", "--dhcp=none", "--vni", "900",
               "--local", "10.233.0.1", "--peer", "10.233.0.2", check=True)
    for name in (HOSTONLY, NAT, OVERLAY):
        run_client("start", name, check=True)
    yield
    for name in (HOSTONLY, NAT, OVERLAY):
        run_client("stop", name, "--force")
        run_client("undefine", name)
    vnetd.ip("link", "del", "ul0", check=False)


def host_listener(vnetd, port: int, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen(["ip", "netns", "exec", vnetd.netns, sys.executable, "-c", LISTEN,
                          str(port), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_a_link_local_group_does_not_carry_a_guest_to_the_hosts_services(vnetd, agents):
    evil = agents(BOB, HOSTONLY, "llc-evil")
    assert evil.error is None, evil.hello
    for n, (dst_mac, src) in enumerate([(bridge_mac(vnetd, HOSTONLY), "10.232.1.77"),
                                        (LLDP_GROUP, "10.232.1.77"),
                                        (LLDP_GROUP, "203.0.113.9")]):
        listener = host_listener(vnetd, 5555 + n, 2.0)
        evil.send(F.udp4_frame(evil.mac, dst_mac, src, "10.232.1.1", 4000, 5555 + n,
                               b"to the host", tag=f"llc-{n}"))
        got = listener.communicate(timeout=30)[0].strip()
        assert got == "nothing", f"a UDP datagram to {dst_mac} from {src} reached the host"


def first_fragment_split(frame: bytes, first_payload: int) -> list[bytes]:
    """An IPv4 frame (no VLAN tag) as two fragments, the first with `first_payload` bytes of
    the IP payload (a multiple of 8)."""
    eth, ip = frame[:14], frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack("!H", ip[2:4])[0]
    hdr, payload = ip[:ihl], ip[ihl:total]
    out = []
    for off, part, more in ((0, payload[:first_payload], True),
                            (first_payload, payload[first_payload:], False)):
        h = bytearray(hdr)
        struct.pack_into("!H", h, 2, ihl + len(part))
        struct.pack_into("!H", h, 6, (0x2000 if more else 0) | (off // 8))
        struct.pack_into("!H", h, 10, 0)
        struct.pack_into("!H", h, 10, F.inet_checksum(bytes(h)))
        f = eth + bytes(h) + part
        out.append(f + bytes(max(0, 60 - len(f))))
    return out


def dhcp_with_clid(msgtype: int, mac: str, clid: bytes, *, xid: int, src: str = "0.0.0.0",
                   ciaddr: str = "0.0.0.0", requested: str | None = None,
                   server: str | None = None, chaddr: str | None = None) -> bytes:
    opts = [(61, clid)]
    if requested:
        opts.append((50, F.ip4(requested)))
    if server:
        opts.append((54, F.ip4(server)))
    payload = F.dhcp_payload(msgtype, chaddr or mac, xid=xid, ciaddr=ciaddr, options=opts)
    if src == "0.0.0.0":  # no address yet: broadcast
        return F.udp4_frame(mac, F.BROADCAST, src, "255.255.255.255", 68, 67, payload)
    return F.udp4_frame(mac, bridge_mac_cache[0], src, server, 68, 67, payload)


bridge_mac_cache: list[str] = []


def bind_with_clid(agent, clid: bytes, xid: int) -> str:
    """DISCOVER / REQUEST naming a client-id, as systemd-networkd and dhclient do."""
    for _ in range(3):
        got = exchange(agent, [dhcp_with_clid(F.DISCOVER, agent.mac, clid, xid=xid)],
                       {"dhcp.type": F.OFFER, "dhcp.xid": xid})
        offer = next((d for d in map(F.parse, got) if d.get("dhcp", {}).get("type")
                      == F.OFFER), None)
        if offer is None:
            continue
        ip, server = offer["dhcp"]["yiaddr"], offer["ip"]["src"]
        got = exchange(agent, [dhcp_with_clid(F.REQUEST, agent.mac, clid, xid=xid,
                                              requested=ip, server=server)],
                       {"dhcp.type": F.ACK, "dhcp.xid": xid})
        if any(d.get("dhcp", {}).get("type") == F.ACK for d in map(F.parse, got)):
            return ip
    raise AssertionError(f"{agent.ifname} got no DHCP lease")


def wait_leases(network: str, want, seconds: float = 3.0):
    deadline = time.monotonic() + seconds
    while True:
        now = leases(network)
        if want(now) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def test_dhcp_cannot_release_another_guests_lease(vnetd, agents):
    bridge_mac_cache[:] = [bridge_mac(vnetd, NAT)]
    gw = "10.232.2.1"
    victim = agents(ALICE, NAT, "dhcp-victim")
    evil = agents(BOB, NAT, "dhcp-evil")
    assert victim.error is None and evil.error is None, (victim.hello, evil.hello)
    clid = b"\x01" + F.mac_bytes(victim.mac)
    vip = bind_with_clid(victim, clid, 0x61000001)
    eip = dhcp_bind(evil, xid=0x61000002)
    respond(evil, ip4=[eip])
    assert ping(evil, eip, bridge_mac_cache[0], gw), "positive control: bound"
    assert (victim.mac, vip) in wait_leases(NAT, lambda now: (victim.mac, vip) in now)
    # 1. a RELEASE in the victim's name, its first fragment ending before the client
    # hardware address (UDP header + 24 bytes of BOOTP: op..ciaddr)
    release = F.udp4_frame(evil.mac, bridge_mac_cache[0], eip, gw, 68, 67, F.dhcp_payload(
        F.RELEASE, victim.mac, xid=0x61000003, ciaddr=vip, options=[(54, F.ip4(gw))]))
    evil.send(*first_fragment_split(release, 32))
    settle(1.0)
    # 2. a RELEASE with the evil guest's own MAC but the victim's client-id
    evil.send(dhcp_with_clid(F.RELEASE, evil.mac, clid, xid=0x61000004, src=eip,
                             ciaddr=vip, server=gw))
    now = wait_leases(NAT, lambda now: (victim.mac, vip) not in now, seconds=2.0)
    assert (victim.mac, vip) in now, f"the victim's lease was released: {now}"
    # and the victim's client-id does not get the evil guest the victim's address
    got = exchange(evil, [dhcp_with_clid(F.DISCOVER, evil.mac, clid, xid=0x61000005)],
                   {"dhcp.type": F.OFFER, "dhcp.xid": 0x61000005})
    offers = [d["dhcp"]["yiaddr"] for d in map(F.parse, got)
              if d.get("dhcp", {}).get("type") == F.OFFER]
    assert vip not in offers, f"the victim's address was offered to another MAC: {offers}"


def vxlan(vni: int, inner: bytes) -> bytes:
    return struct.pack("!II", 0x08000000, vni << 8) + inner


def test_vxlan_from_a_guest_never_reaches_an_overlay(vnetd, agents):
    bridge_mac_cache[:] = [bridge_mac(vnetd, NAT)]
    victim = agents(ALICE, OVERLAY, "ovl-victim")
    evil = agents(BOB, NAT, "ovl-evil")
    assert victim.error is None and evil.error is None, (victim.hello, evil.hello)
    eip = dhcp_bind(evil, xid=0x62000001)
    respond(evil, ip4=[eip])
    assert ping(evil, eip, bridge_mac_cache[0], "10.232.2.1"), "positive control: bound"
    # what a guest behind a peer may send: a broadcast from its own MAC and address
    inner = F.udp4_frame("52:54:00:66:66:66", F.BROADCAST, "10.232.3.77", "10.232.3.255",
                         5000, 5000, b"across the overlay", tag="vxlan-from-a-guest")
    victim.clear()
    for dst in ("10.232.2.1", "10.233.0.1"):  # its gateway; the overlay's local address
        evil.send(F.udp4_frame(evil.mac, bridge_mac_cache[0], eip, dst, 4789, 4789,
                               vxlan(900, inner)))
    got = victim.collect(1.5)
    assert not [f for f in got if F.marker("vxlan-from-a-guest") in f], \
        "a guest's VXLAN datagram put a frame on the overlay"


def group_fwd_mask(vnetd, ifname: str) -> int:
    info = vnetd.ipj("-d", "link", "show", ifname)[0]["linkinfo"]["info_slave_data"]
    return int(str(info["group_fwd_mask"]), 0)


def test_a_port_an_older_vnetd_made_forwards_link_local_groups_after_a_restart(vnetd, agents):
    held = agents(BOB, HOSTONLY, "llc-older")
    assert held.error is None, held.hello
    assert group_fwd_mask(vnetd, held.ifname) == 0xFFFD
    vnetd.ip("link", "set", "dev", held.ifname, "type", "bridge_slave", "group_fwd_mask", "0")
    assert group_fwd_mask(vnetd, held.ifname) == 0  # as an older vnetd left it
    vnetd.stop()
    vnetd.start()
    deadline = time.monotonic() + 10
    while group_fwd_mask(vnetd, held.ifname) != 0xFFFD and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_fwd_mask(vnetd, held.ifname) == 0xFFFD
