"""Peers for firewall tests: an 'outside' host reachable from the daemon's namespace, and
small servers that tell each client which source address they saw."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

from .daemon import Daemon, sh
from .tools import require

PY = "/usr/bin/python3"

SERVER = r"""
import socket, sys, threading
proto, family, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
af = socket.AF_INET6 if family == 6 else socket.AF_INET
if proto == "tcp":
    s = socket.socket(af, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if family == 6 else "0.0.0.0", port)); s.listen(16)
    print("ready", flush=True)
    while True:
        c, addr = s.accept()
        c.sendall(("seen " + addr[0] + "\n").encode()); c.close()
else:
    s = socket.socket(af, socket.SOCK_DGRAM)
    s.bind(("::" if family == 6 else "0.0.0.0", port))
    print("ready", flush=True)
    while True:
        data, addr = s.recvfrom(512)
        s.sendto(("seen " + addr[0] + "\n").encode(), addr)
"""

CLIENT = r"""
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
af = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if proto == "tcp":
        s = socket.create_connection((host, port), timeout=2)
        print(s.recv(512).decode().strip())
    else:
        s = socket.socket(af, socket.SOCK_DGRAM); s.settimeout(2)
        s.sendto(b"hi", (host, port)); print(s.recv(512).decode().strip())
except OSError as e:
    print("fail", type(e).__name__)
"""


def in_ns(netns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


class Server:
    def __init__(self, netns: str | None, proto: str, port: int, family: int = 4):
        self.proc = subprocess.Popen(in_ns(netns, [PY, "-c", SERVER, proto, str(family),
                                                   str(port)]),
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def connect(netns: str | None, proto: str, host: str, port: int) -> str:
    """'seen <source address>' or 'fail <error>'."""
    r = subprocess.run(in_ns(netns, [PY, "-c", CLIENT, proto, host, str(port)]),
                       capture_output=True, text=True, timeout=20)
    return r.stdout.strip() or ("fail " + r.stderr.strip()[-200:])


class Outside:
    """A netns standing for the world beyond the host: 10.77.0.2 (fd77::2), reachable from the
    daemon's namespace through a veth whose host end is 10.77.0.1 (fd77::1)."""

    HOST, PEER = "10.77.0.1", "10.77.0.2"
    HOST6, PEER6 = "fd77::1", "fd77::2"

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.netns = f"vno-{uuid.uuid4().hex[:6]}"
        sh("ip", "netns", "add", self.netns)
        daemon.ip("link", "add", "uplink0", "type", "veth", "peer", "name", "eth0", "netns",
                  self.netns)
        daemon.ip("addr", "add", f"{self.HOST}/24", "dev", "uplink0")
        daemon.ip("addr", "add", f"{self.HOST6}/64", "dev", "uplink0", "nodad")
        daemon.ip("link", "set", "uplink0", "up")
        for args in (["addr", "add", f"{self.PEER}/24", "dev", "eth0"],
                     ["addr", "add", f"{self.PEER6}/64", "dev", "eth0", "nodad"],
                     ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
            sh("ip", "-n", self.netns, *args)
        time.sleep(0.1)

    def close(self) -> None:
        self.daemon.ip("link", "del", "uplink0", check=False)
        sh("ip", "netns", "del", self.netns, check=False)


if __name__ == "__main__":
    sys.exit("a library for tests")


@contextmanager
def physical_lan(vnetd: Daemon, nic: str, prefix: str, *, prefix6: str | None = None,
                 host_routes: tuple[tuple[str, ...], ...] = ()):
    """A physical LAN for a bridged network: a veth `nic` in vnetd's namespace holding
    PREFIX.5/24 (and PREFIX6::5/64), its far end 'up0' in a namespace of its own holding
    PREFIX.1 (the LAN's router) with a DHCP server for PREFIX.100-150. Yields that
    namespace's name."""
    ns = f"vnl-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    vnetd.ip("link", "add", nic, "type", "veth", "peer", "name", "up0", "netns", ns)
    far = [["addr", "add", f"{prefix}.1/24", "dev", "up0"]]
    near = [["addr", "add", f"{prefix}.5/24", "dev", nic]]
    if prefix6:
        far.append(["addr", "add", f"{prefix6}::1/64", "dev", "up0", "nodad"])
        near.append(["addr", "add", f"{prefix6}::5/64", "dev", nic, "nodad"])
    for args in (*far, ["link", "set", "up0", "up"], ["link", "set", "lo", "up"]):
        sh("ip", "-n", ns, *args)
    for args in (*near, ["link", "set", nic, "up"], *(["route", "add", *r] for r in host_routes)):
        vnetd.ip(*args)
    dhcp = subprocess.Popen(["ip", "netns", "exec", ns, require("dnsmasq"),
                             "--keep-in-foreground", "--no-resolv", "--no-hosts",
                             "--interface=up0", "--bind-interfaces",
                             f"--dhcp-range={prefix}.100,{prefix}.150,1h", "--port=0",
                             "--log-facility=-", "--pid-file=", "--dhcp-leasefile=/dev/null"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        yield ns
    finally:
        dhcp.kill()
        dhcp.wait()
        vnetd.ip("link", "del", nic, check=False)
        sh("ip", "netns", "del", ns, check=False)
