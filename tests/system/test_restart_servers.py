"""After a crash vnetd adopts a running network with its DHCP/DNS server still serving, and
replaces that server with one of its own afterwards; and the start-up's hand-read link dump
sees the kernel's links as pyroute2 does."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.harness.daemon import run_client

NET = "rsv7"
GATEWAY = "10.87.0.1"

PROBE = r"""
import socket, struct, sys, time
# one DNS query a millisecond for the given seconds; prints how many went unanswered in a row
# at most (a server that stops answering for a while shows as a long run)
end = time.monotonic() + float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.05)
worst = run = asked = 0
qid = 0
while time.monotonic() < end:
    qid = (qid + 1) & 0xFFFF
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"\x05probe\x04rsv7\x00" \
        + struct.pack(">HH", 1, 1)
    asked += 1
    try:
        s.sendto(q, (sys.argv[1], 53))
        s.recv(512)
        run = 0
    except OSError:
        run += 1
        worst = max(worst, run)
print(asked, worst, flush=True)
"""


def server(client) -> dict:
    (s,) = [x for x in json.loads(client("show", NET, "--json", check=True).stdout)["servers"]]
    return s


def dnsmasq_pids(vnetd) -> list[int]:
    out = []
    for p in subprocess.run(["pgrep", "-x", "dnsmasq"], capture_output=True,
                            text=True).stdout.split():
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if str(vnetd.runtime_dir / NET).encode() in f.read():
                    out.append(int(p))
        except OSError:
            pass
    return out


def test_a_crash_leaves_the_server_serving_until_vnetd_replaces_it(vnetd, client):
    client("define", NET, "--subnet=10.87.0.0/24", "--dhcp=dnsmasq", "--start", check=True)
    try:
        old = server(client)
        assert old["state"] == "running" and dnsmasq_pids(vnetd) == [old["pid"]]
        probe = subprocess.Popen(["ip", "netns", "exec", vnetd.netns, sys.executable, "-c",
                                  PROBE, GATEWAY, "4"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        vnetd.kill()  # SIGKILL: the server is left running, its output pipe broken
        assert dnsmasq_pids(vnetd) == [old["pid"]]
        vnetd.start()  # answers, adopts, then replaces the server
        asked, worst = map(int, probe.communicate(timeout=30)[0].split())
        new = server(client)
        assert new["state"] == "running" and new["pid"] != old["pid"]
        assert dnsmasq_pids(vnetd) == [new["pid"]]  # one server, never two
        # DNS answered throughout but for the moment of the swap (a query every ms or so;
        # 50 ms each unanswered one)
        assert asked > 100 and worst <= 10, (asked, worst)
        assert "left behind by a previous vnetd" in vnetd.log()
    finally:
        client("stop", NET, "--force")
        client("undefine", NET)
    assert dnsmasq_pids(vnetd) == []


def test_a_stop_before_the_replacement_takes_the_inherited_server_with_it(vnetd, client):
    """vnetd killed again while it adopts: the next one stops the network at once, and the
    server the first one started goes with it (it is never left running unowned)."""
    client("define", NET, "--subnet=10.87.0.0/24", "--dhcp=dnsmasq", "--start", check=True)
    try:
        pid = server(client)["pid"]
        vnetd.kill()
        vnetd.start(settled=False)
        r = run_client("stop", NET, "--force", timeout=60)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 5
        while dnsmasq_pids(vnetd) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dnsmasq_pids(vnetd) == [], f"pid {pid} outlived the stop"
    finally:
        client("stop", NET, "--force")
        client("undefine", NET)


LINKS = """
import asyncio, json
from vnetd.kernel.links import Links, dump_links, _to_link
async def main():
    links = Links()
    await links.open()
    mine = {}
    async for msg in await links.nl.link("dump"):
        lk = _to_link(msg)
        if lk.alias and lk.alias.startswith("qemu-vnet-test:"):
            mine[lk.index] = repr(lk)
    await links.close()
    hand = {lk.index: repr(lk) for lk in dump_links("qemu-vnet-test:")}
    print(json.dumps({"pyroute2": mine, "hand": hand}))
asyncio.run(main())
"""


def test_the_hand_read_link_dump_agrees_with_pyroute2(vnetd):
    ns = f"vnt-links-{vnetd.netns[-6:]}"
    sh = ["ip", "netns", "exec", ns]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["ip", "link", "add", "br7", "type", "bridge"],
                    ["ip", "tuntap", "add", "dev", "tp7", "mode", "tap", "user", "1234"],
                    ["ip", "tuntap", "add", "dev", "tq7", "mode", "tap"],
                    ["ip", "link", "add", "va7", "type", "veth", "peer", "name", "vb7"],
                    ["ip", "link", "set", "tp7", "master", "br7", "mtu", "1400"],
                    ["ip", "link", "set", "br7", "up", "address", "52:54:00:07:07:07"]):
            subprocess.run(sh + cmd, check=True)
        for dev in ("br7", "tp7", "va7"):
            subprocess.run(sh + ["ip", "link", "set", dev, "alias", f"qemu-vnet-test:{dev}"],
                           check=True)
        subprocess.run(sh + ["ip", "link", "set", "tq7", "alias", "someone-else"], check=True)
        r = subprocess.run(sh + [sys.executable, "-c", LINKS], capture_output=True,
                           text=True, check=True)
        got = json.loads(r.stdout)
        assert got["hand"] == got["pyroute2"]
        assert len(got["hand"]) == 3
        tap = next(v for v in got["hand"].values() if "'tp7'" in v)
        assert "tun_owner=1234" in tap and "tun_persist=True" in tap and "mtu=1400" in tap
        assert "master=" in tap and "master=None" not in tap
        br = next(v for v in got["hand"].values() if "'br7'" in v)
        assert "kind='bridge'" in br and "up=True" in br and "52:54:00:07:07:07" in br
    finally:
        subprocess.run(["ip", "netns", "del", ns])
