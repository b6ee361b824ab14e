"""The firewall backend against the real kernel, in network namespaces made here (never the
host's own ruleset): NAT, isolation, host-only, port forwards (outside, host, hairpin),
element-only forward changes, atomicity, foreign tables left alone, anti-spoofing on real tap
fds, and the cost of one forward change with 10 / 1,000 / 10,000 forwards present.

libnftables runs in a small agent (Debian's python3 with python3-nftables) started with
``ip netns exec`` in the namespace under test; rendering happens here. Uses no fixture of the
repository's conftest.
"""

from __future__ import annotations

import gzip
import importlib.util
import ipaddress as ia
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.harness.nftlist import normalized
from tests.harness.users import read_line

REPO = Path(__file__).parents[2]
FW_PATH = REPO / "helper" / "vnetd" / "render" / "nft.py"


def _load_fw():
    spec = importlib.util.spec_from_file_location("qemu_vnet_firewall_under_test", FW_PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


fw = _load_fw()
FwNetwork, FwForward, FwPort = fw.FwNetwork, fw.FwForward, fw.FwPort


def _nft_python() -> str | None:
    for py in ("/usr/bin/python3", "/opt/qemu-vnet/bin/python", sys.executable):
        if Path(py).exists() and subprocess.run([py, "-c", "import nftables"],
                                                capture_output=True).returncode == 0:
            return py
    return None


NFT_PY = _nft_python()

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(NFT_PY is None, reason="no python with the nftables binding"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
]

# --- helper programs run inside the namespaces ------------------------------------------------

AGENT = textwrap.dedent(r'''
    import importlib.util, json, pathlib, statistics, sys, time
    # the renderer imports the shared vocabulary (vnet_common, standard library only)
    sys.path.insert(0, str(pathlib.Path(sys.argv[1]).resolve().parents[3] / "common"))
    spec = importlib.util.spec_from_file_location("fw_agent_firewall", sys.argv[1])
    fw = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fw
    spec.loader.exec_module(fw)
    import nftables
    nft = nftables.Nftables()
    nft.set_json_output(True)

    def say(o):
        sys.stdout.write(json.dumps(o) + "\n")
        sys.stdout.flush()

    def bench(req):
        net = fw.FwNetwork(**{**req["net"], "subnet": __import__("ipaddress").ip_network(
            req["net"]["subnet"]), "gateway": __import__("ipaddress").ip_address(
            req["net"]["gateway"])})
        fwds = [fw.FwForward(net.name, "tcp", 4, None, p, p, "172.16.12.50", 80)
                for p in range(10000, 10000 + req["n"])]
        t0 = time.perf_counter()
        fw.prepare_bridge(nft)
        fw.apply(fw.render_ruleset([net], fwds), nft)
        full = time.perf_counter() - t0
        adds, rems = [], []
        for i in range(req["rounds"]):
            f = fw.FwForward(net.name, "udp", 4, "10.77.0.1", 5000 + i, 5000 + i,
                             "172.16.12.51", 53)
            t0 = time.perf_counter()
            fw.apply(fw.render_forward_add(f), nft)
            t1 = time.perf_counter()
            fw.apply(fw.render_forward_remove(f), nft)
            t2 = time.perf_counter()
            adds.append(t1 - t0)
            rems.append(t2 - t1)
        return {"full": full, "add": statistics.median(adds), "remove": statistics.median(rems),
                "add_min": min(adds), "remove_min": min(rems)}

    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "apply":
                if {"add": {"table": {"family": "bridge", "name": fw.TABLE}}} in req["cmd"][
                        "nftables"]:  # a ruleset: its text-made sets first, as vnetd does
                    fw.prepare_bridge(nft)
                fw.apply(req["cmd"], nft)
                say({"ok": True})
            elif op == "query":
                say({"ok": True, "out": fw.query(req["cmd"], nft)})
            elif op == "raw":  # the test's own foreign tables; product code never does this
                rc, out, err = nft.json_cmd(req["cmd"])
                say({"ok": rc == 0, "error": err})
            elif op == "flowtables":
                ok, err = fw.flowtable_probe(nft)
                say({"ok": True, "supported": fw.kernel_supports_flowtables(nft),
                     "probe": ok, "err": err})
            elif op == "bench":
                say({"ok": True, **bench(req)})
            else:
                say({"ok": False, "error": "unknown op " + op})
        except Exception as e:
            say({"ok": False, "error": f"{type(e).__name__}: {e}"})
''')

TOOL = textwrap.dedent(r'''
    import fcntl, json, os, re, select, socket, struct, subprocess, sys, time
    cmd = sys.argv[1]

    def peer(a):
        h = a[0]
        return h[7:] if h.startswith("::ffff:") else h

    def listeners(kind, ports):
        socks = []
        for p in ports:
            s = socket.socket(socket.AF_INET6, kind)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::", p))
            if kind == socket.SOCK_STREAM:
                s.listen(64)
            socks.append(s)
        print("ready", flush=True)
        return socks

    if cmd == "serve-tcp":
        socks = listeners(socket.SOCK_STREAM, [int(p) for p in sys.argv[2:]])
        while True:
            for s in select.select(socks, [], [])[0]:
                c, a = s.accept()
                c.sendall(f"{peer(a)} {s.getsockname()[1]}\n".encode())
                c.close()
    elif cmd == "serve-udp":
        socks = listeners(socket.SOCK_DGRAM, [int(p) for p in sys.argv[2:]])
        while True:
            for s in select.select(socks, [], [])[0]:
                data, a = s.recvfrom(2048)
                try:
                    s.sendto(f"{peer(a)} {s.getsockname()[1]}\n".encode(), a)
                except OSError:
                    pass
    elif cmd in ("tcp", "udp"):
        host, port, timeout = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM if cmd == "tcp" else socket.SOCK_DGRAM)
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            if cmd == "udp":
                s.send(b"hello")
                print(s.recv(2048).decode().strip())
            else:
                print(s.makefile().readline().strip())
        except OSError as e:
            print(f"FAILED {e}")
            sys.exit(1)
    elif cmd == "hold-tcp":  # HOST PORT N TIMEOUT: open N connections, hold them, count
        host, port, n, timeout = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
            float(sys.argv[5])
        held = []
        for _ in range(n):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.settimeout(timeout)
            try:
                s.connect((host, port))
                held.append(s)
            except OSError:
                s.close()
        print(len(held), flush=True)
        if sys.argv[6:] == ["keep"]:  # and hold them until stdin ends
            sys.stdin.read()
    elif cmd == "sniff":  # IFACE: report the FWT:<tag>; markers of frames seen until stdin EOF
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        s.bind((sys.argv[2], 0))
        seen = []
        print("ready", flush=True)
        while True:
            r = select.select([s, sys.stdin], [], [])[0]
            if s in r:
                data, addr = s.recvfrom(65535)
                if addr[2] != socket.PACKET_OUTGOING:
                    seen += [m.decode() for m in re.findall(rb"FWT:([A-Za-z0-9_-]+);", data)]
            if sys.stdin in r and not sys.stdin.readline():
                break
        print(json.dumps(seen), flush=True)
    elif cmd == "taps":  # NAME:BRIDGE...: hold taps on bridges; stdin lines "NAME HEX" -> write
        fds = {}
        for spec in sys.argv[2:]:
            name, bridge = spec.split(":")
            fd = os.open("/dev/net/tun", os.O_RDWR)
            fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", name.encode(), 0x0002 | 0x1000))
            subprocess.run(["ip", "link", "set", name, "master", bridge, "up"], check=True)
            fds[name] = fd
        print("ready", flush=True)
        for line in sys.stdin:
            name, hexframe = line.split()
            os.write(fds[name], bytes.fromhex(hexframe))
            print("ok", flush=True)
''')


# --- namespaces and processes -----------------------------------------------------------------


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check)


class Lab:
    """Namespaces, background processes and the nft agents of one module."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.agent_path = tmp / "fw_agent.py"
        self.tool_path = tmp / "fw_tool.py"
        self.agent_path.write_text(AGENT)
        self.tool_path.write_text(TOOL)
        self.suffix = f"{os.getpid() % 100000}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.agents: dict[str, subprocess.Popen] = {}

    def ns(self, role: str) -> str:
        name = f"fwtest-{role}-{self.suffix}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0",
           "net.ipv6.conf.default.accept_dad=0")
        return name

    def spawn(self, ns: str, *args: str, python: str | None = None,
              wait_ready: bool = True) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, python or sys.executable, *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, bufsize=1)
        self.procs.append(p)
        if wait_ready:
            line = readline(p, 10)
            assert line == "ready", f"{args} did not start: {line!r} {p.stderr.read()}"
        return p

    def tool(self, ns: str, *args: str, **kw) -> subprocess.Popen:
        return self.spawn(ns, str(self.tool_path), *args, **kw)

    def run_tool(self, ns: str, *args: str, timeout: float = 10) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(self.tool_path),
                               *args], capture_output=True, text=True, timeout=timeout)

    def agent(self, ns: str) -> subprocess.Popen:
        if ns not in self.agents:
            self.agents[ns] = self.spawn(ns, str(self.agent_path), str(FW_PATH),
                                         python=NFT_PY, wait_ready=False)
        return self.agents[ns]

    def call(self, ns: str, req: dict, timeout: float = 120) -> dict:
        p = self.agent(ns)
        p.stdin.write(json.dumps(req) + "\n")
        p.stdin.flush()
        line = readline(p, timeout)
        if not line:
            raise RuntimeError(f"the nft agent died: {p.stderr.read()}")
        return json.loads(line)

    def apply(self, ns: str, cmd: dict) -> None:
        r = self.call(ns, {"op": "apply", "cmd": cmd})
        if not r["ok"]:
            raise RuntimeError(r["error"])

    def query(self, ns: str, cmd: dict) -> dict:
        r = self.call(ns, {"op": "query", "cmd": cmd})
        assert r["ok"], r
        return r["out"]

    def raw(self, ns: str, cmd: dict) -> None:
        r = self.call(ns, {"op": "raw", "cmd": cmd})
        assert r["ok"], r

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.stdin.close()
                except OSError:
                    pass
                try:
                    p.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    p.kill()  # our own child, by its pid
                    p.wait()
        for name in reversed(self.namespaces):
            sh("ip", "netns", "del", name, check=False)


def readline(p: subprocess.Popen, timeout: float) -> str:
    line = read_line(p, timeout)
    if line is None:
        raise TimeoutError("no answer from a helper process")
    return line.strip()


def table_query(family: str, name: str) -> dict:
    return {"nftables": [{"list": {"table": {"family": family, "name": name}}}]}


RULESET = {"nftables": [{"list": {"ruleset": None}}]}


# --- the networks under test ------------------------------------------------------------------


def network(name, mode, n, v6=None, **kw):
    s6 = ia.ip_network(v6) if v6 else None
    return FwNetwork(name, mode, ia.ip_network(f"172.16.{n}.0/24"), ia.ip_address(f"172.16.{n}.1"),
                     s6, (s6.network_address + 1) if s6 else None, **kw)


GW_MAC = "52:54:00:12:00:01"  # vnet2's gateway MAC as vnetd names it (taken: no port may use it)
NETS = [
    network("vnet2", "nat", 12, "fd00:12::/64", routed_with=("vnet4",), mac=GW_MAC),
    network("vnet3", "host-only", 13),
    network("vnet4", "nat", 14, spoof_protection=False),
]
F_TCP = FwForward("vnet2", "tcp", 4, None, 8080, 8080, "172.16.12.50", 80)
F_UDP = FwForward("vnet2", "udp", 4, None, 6000, 6002, "172.16.12.50", 7000)
F_IF = FwForward("vnet2", "tcp", 4, "10.77.0.1", 9090, 9090, "172.16.12.50", 80, iface="ho0")
F_V6 = FwForward("vnet2", "tcp", 6, None, 8080, 8080, "fd00:12::50", 80)
FWDS = [F_TCP, F_UDP, F_IF, F_V6]
MAC0, MAC1, MAC4 = "52:54:00:00:00:aa", "52:54:00:00:00:cc", "52:54:00:00:00:ee"
P0 = FwPort("fwtap0", "vnet2", MAC0, "172.16.12.60")
P1 = FwPort("fwtap1", "vnet2", None)
P4 = FwPort("fwtap4", "vnet4", MAC4, "172.16.14.60")
PORTS = [P0, P1, P4]

GUESTS = {  # role: (bridge, host-side port, address, IPv6 or None)
    "g2a": ("vnet2", "172.16.12.50", "fd00:12::50"),
    "g2b": ("vnet2", "172.16.12.51", "fd00:12::51"),
    "g3": ("vnet3", "172.16.13.50", None),
    "g4": ("vnet4", "172.16.14.50", None),
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("fwlab"))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def world(lab):
    """host / outside / guest namespaces, bridges vnet2-4, servers, and our ruleset."""
    h, o = lab.ns("h"), lab.ns("o")
    ns = {"h": h, "o": o}
    sh("ip", "netns", "exec", h, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
       "net.ipv6.conf.all.forwarding=1")
    for i, n in enumerate(NETS):
        # a MAC of its own, as vnetd gives every bridge: a bridge left to pick one takes its
        # lowest port's, so the gateway's MAC would change under the guests as the tests'
        # taps come and go (and a guest's neighbour entry would point at a tap that is gone)
        sh("ip", "-n", h, "link", "add", n.name, "address", n.mac or f"52:54:00:7f:00:{i:02x}",
           "type", "bridge", "forward_delay", "0", "stp_state", "0")
        sh("ip", "-n", h, "addr", "add", f"{n.gateway}/{n.subnet.prefixlen}", "dev", n.name)
        if n.subnet6:
            sh("ip", "-n", h, "addr", "add", f"{n.gateway6}/{n.subnet6.prefixlen}", "dev", n.name,
               "nodad")
        sh("ip", "-n", h, "link", "set", n.name, "up")
    sh("ip", "-n", h, "link", "add", "ho0", "type", "veth", "peer", "name", "eth0", "netns", o)
    sh("ip", "-n", h, "addr", "add", "10.77.0.1/24", "dev", "ho0")
    sh("ip", "-n", h, "addr", "add", "fd77::1/64", "dev", "ho0", "nodad")
    sh("ip", "-n", h, "link", "set", "ho0", "up")
    sh("ip", "-n", o, "addr", "add", "10.77.0.2/24", "dev", "eth0")
    sh("ip", "-n", o, "addr", "add", "fd77::2/64", "dev", "eth0", "nodad")
    sh("ip", "-n", o, "link", "set", "eth0", "up")
    # the outside knows a route to the guests: only the firewall keeps it out
    sh("ip", "-n", o, "route", "add", "172.16.0.0/16", "via", "10.77.0.1")
    sh("ip", "-n", o, "route", "add", "fd00::/16", "via", "fd77::1")
    for role, (bridge, addr, addr6) in GUESTS.items():
        g = ns[role] = lab.ns(role)
        gw = next(n for n in NETS if n.name == bridge)
        sh("ip", "-n", h, "link", "add", role, "type", "veth", "peer", "name", "eth0", "netns", g)
        sh("ip", "-n", h, "link", "set", role, "master", bridge, "up")
        sh("ip", "-n", g, "addr", "add", f"{addr}/24", "dev", "eth0")
        sh("ip", "-n", g, "link", "set", "eth0", "up")
        sh("ip", "-n", g, "route", "add", "default", "via", str(gw.gateway))
        if addr6:
            sh("ip", "-n", g, "addr", "add", f"{addr6}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", g, "-6", "route", "add", "default", "via", str(gw.gateway6))
    lab.tool(ns["g2a"], "serve-tcp", "80")
    lab.tool(ns["g2a"], "serve-udp", "7000", "7001", "7002")
    lab.tool(ns["g3"], "serve-tcp", "80")
    lab.tool(ns["g4"], "serve-tcp", "80")
    lab.tool(o, "serve-tcp", "9000")
    lab.tool(h, "serve-tcp", "53", "2222")
    lab.tool(h, "serve-udp", "53", "67")
    lab.apply(h, fw.render_ruleset(NETS, FWDS, PORTS))
    return ns


def talk(lab, ns, proto, host, port, timeout=1.5) -> str | None:
    r = lab.run_tool(ns, proto, host, str(port), str(timeout))
    return r.stdout.strip() if r.returncode == 0 else None


def ping(ns, host) -> bool:
    return sh("ip", "netns", "exec", ns, "busybox", "ping", "-c", "1", "-W", "1", host,
              check=False).returncode == 0


# --- traffic ----------------------------------------------------------------------------------


def test_kernel_facts(world, capsys):
    h = world["h"]
    bnf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    value = sh("ip", "netns", "exec", h, "cat", str(bnf), check=False).stdout.strip()
    with capsys.disabled():
        print(f"\n[firewall] br_netfilter in the test namespace: bridge-nf-call-iptables="
              f"{value or 'absent (module not loaded)'}")


def test_nat_guest_reaches_outside_as_the_host(lab, world):
    assert talk(lab, world["g2a"], "tcp", "10.77.0.2", 9000) == "10.77.0.1 9000"
    # IPv6 from a ULA prefix is masqueraded too
    assert talk(lab, world["g2a"], "tcp", "fd77::2", 9000) == "fd77::1 9000"
    assert talk(lab, world["g4"], "tcp", "10.77.0.2", 9000) == "10.77.0.1 9000"


def test_host_only_guest_reaches_the_gateway_services_only(lab, world):
    g3 = world["g3"]
    assert talk(lab, g3, "tcp", "10.77.0.2", 9000) is None  # nothing forwarded beyond
    assert talk(lab, g3, "udp", "172.16.13.1", 53) == "172.16.13.50 53"  # DNS
    assert talk(lab, g3, "tcp", "172.16.13.1", 53) == "172.16.13.50 53"
    assert talk(lab, g3, "udp", "172.16.13.1", 67) == "172.16.13.50 67"  # DHCP
    assert ping(g3, "172.16.13.1")
    assert talk(lab, g3, "tcp", "172.16.13.1", 2222) is None  # other host services: no
    assert talk(lab, g3, "tcp", "10.77.0.1", 2222) is None
    assert not ping(g3, "10.77.0.1")
    # a nat network's guests reach the host (as with libvirt)
    assert talk(lab, world["g2a"], "tcp", "172.16.12.1", 2222) == "172.16.12.50 2222"


def test_networks_are_isolated_unless_routed(lab, world):
    assert talk(lab, world["g2a"], "tcp", "172.16.13.50", 80) is None
    assert talk(lab, world["g3"], "tcp", "172.16.12.50", 80) is None
    assert talk(lab, world["g4"], "tcp", "172.16.13.50", 80) is None
    assert talk(lab, world["g3"], "tcp", "172.16.14.50", 80) is None
    # vnet2 lists vnet4 in routed_with: both directions work
    assert talk(lab, world["g2a"], "tcp", "172.16.14.50", 80) is not None
    assert talk(lab, world["g4"], "tcp", "172.16.12.50", 80) is not None
    # guests of one network talk directly (bridged, even through br_netfilter's hooks)
    assert talk(lab, world["g2b"], "tcp", "172.16.12.50", 80) == "172.16.12.51 80"


def test_outside_cannot_open_connections_into_networks(lab, world):
    assert talk(lab, world["o"], "tcp", "172.16.12.50", 80) is None
    assert talk(lab, world["o"], "tcp", "172.16.13.50", 80) is None
    assert talk(lab, world["o"], "tcp", "fd00:12::50", 80) is None


def test_forwards_from_outside_host_and_hairpin(lab, world):
    o, h, g2b = world["o"], world["h"], world["g2b"]
    # TCP, any address of the host
    assert talk(lab, o, "tcp", "10.77.0.1", 8080) == "10.77.0.2 80"
    assert talk(lab, h, "tcp", "10.77.0.1", 8080) == "10.77.0.1 80"
    assert talk(lab, h, "tcp", "172.16.12.1", 8080) == "172.16.12.1 80"
    assert talk(lab, g2b, "tcp", "10.77.0.1", 8080) == "172.16.12.1 80"  # hairpin, masqueraded
    # UDP range 6000-6002 -> 7000-7002
    assert talk(lab, o, "udp", "10.77.0.1", 6001) == "10.77.0.2 7001"
    assert talk(lab, o, "udp", "10.77.0.1", 6002) == "10.77.0.2 7002"
    assert talk(lab, h, "udp", "10.77.0.1", 6000) == "10.77.0.1 7000"
    assert talk(lab, g2b, "udp", "10.77.0.1", 6001) == "172.16.12.1 7001"
    # IPv6 forward
    assert talk(lab, o, "tcp", "fd77::1", 8080) == "fd77::2 80"
    assert talk(lab, h, "tcp", "fd77::1", 8080) == "fd77::1 80"
    # address + interface specific: only packets arriving on ho0 for 10.77.0.1
    assert talk(lab, o, "tcp", "10.77.0.1", 9090) == "10.77.0.2 80"
    assert talk(lab, h, "tcp", "10.77.0.1", 9090) is None
    assert talk(lab, g2b, "tcp", "10.77.0.1", 9090) is None
    # loopback is never forwarded
    assert talk(lab, h, "tcp", "127.0.0.1", 8080) is None


def test_forward_added_and_removed_live(lab, world):
    h, o = world["h"], world["o"]
    f = FwForward("vnet2", "tcp", 4, None, 8181, 8181, "172.16.12.50", 80)
    assert talk(lab, o, "tcp", "10.77.0.1", 8181) is None
    lab.apply(h, fw.render_forward_add(f))
    assert talk(lab, o, "tcp", "10.77.0.1", 8181) == "10.77.0.2 80"
    lab.apply(h, fw.render_forward_remove(f))
    assert talk(lab, o, "tcp", "10.77.0.1", 8181) is None


# --- anti-spoofing with real tap fds ----------------------------------------------------------


def _mac(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


def _csum(b: bytes) -> int:
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _udp4(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + udp


def _eth(src: str, etype: int, payload: bytes, dst: str = "ff:ff:ff:ff:ff:ff") -> bytes:
    frame = _mac(dst) + _mac(src) + struct.pack("!H", etype) + payload
    return frame + b"\0" * max(0, 60 - len(frame))


def _arp_reply(eth_src: str, sha: str, spa: str, tag: str) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, _mac(sha), socket.inet_aton(spa),
                      b"\xff" * 6, socket.inet_aton("172.16.12.255"))
    return _eth(eth_src, 0x0806, arp + f"FWT:{tag};".encode())


def _ip_frame(src_mac: str, src_ip: str, tag: str, dst_ip: str = "172.16.12.255",
              sport: int = 9999, dport: int = 9999, body: bytes = b"") -> bytes:
    return _eth(src_mac, 0x0800, _udp4(src_ip, dst_ip, sport, dport,
                                       body + f"FWT:{tag};".encode()))


def _dhcp(op: int, src_mac: str) -> bytes:
    """A BOOTP message: op 2 with option 53 = 2 is a DHCPOFFER, op 1 / 1 a DISCOVER."""
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, 1, 6, 0, 0x1234, 0, 0, bytes(4),
                        socket.inet_aton("172.16.12.77") if op == 2 else bytes(4),
                        bytes(4), bytes(4), _mac(src_mac) + bytes(10), bytes(64), bytes(128))
    return bootp + bytes.fromhex("63825363") + bytes([53, 1, 2 if op == 2 else 1, 255])


def _vlan(src_mac: str, src_ip: str, tag: str) -> bytes:
    inner = _udp4(src_ip, "172.16.12.255", 9999, 9999, f"FWT:{tag};".encode())
    return _eth(src_mac, 0x8100, struct.pack("!HH", 0, 0x0800) + inner)


def spoof_counters(lab, h) -> dict[str, int]:
    return {k: v["packets"] for k, v in
            fw.parse_spoof_counters(lab.query(h, fw.render_counters_query())).items()}


def test_anti_spoofing_on_real_taps(lab, world):
    h = world["h"]
    taps = lab.tool(h, "taps", "fwtap0:vnet2", "fwtap1:vnet2", "fwtap4:vnet4")
    sniff2 = lab.tool(world["g2b"], "sniff", "eth0")
    sniff4 = lab.tool(world["g4"], "sniff", "eth0")
    assert spoof_counters(lab, h) == {"fwtap0": 0, "fwtap1": 0}  # vnet4: no protection
    bad_mac, other = "52:54:00:00:00:bb", "52:54:00:00:00:dd"
    frames = [  # (port, tag, frame, dropped)
        ("fwtap0", "genuine", _ip_frame(MAC0, "172.16.12.60", "genuine"), False),
        ("fwtap0", "genuine-arp", _arp_reply(MAC0, MAC0, "172.16.12.60", "genuine-arp"), False),
        ("fwtap0", "dhcp-discover", _ip_frame(MAC0, "0.0.0.0", "dhcp-discover", "255.255.255.255",
                                              68, 67, _dhcp(1, MAC0)), False),
        ("fwtap0", "forged-mac", _ip_frame(bad_mac, "172.16.12.60", "forged-mac"), True),
        ("fwtap0", "forged-ip", _ip_frame(MAC0, "172.16.12.61", "forged-ip"), True),
        ("fwtap0", "forged-arp-ip", _arp_reply(MAC0, MAC0, "172.16.12.1", "forged-arp-ip"), True),
        ("fwtap0", "forged-arp-mac", _arp_reply(MAC0, bad_mac, "172.16.12.60", "forged-arp-mac"),
         True),
        ("fwtap0", "rogue-dhcp", _ip_frame(MAC0, "172.16.12.60", "rogue-dhcp", "255.255.255.255",
                                           67, 68, _dhcp(2, MAC0)), True),
        ("fwtap0", "vlan", _vlan(MAC0, "172.16.12.61", "vlan"), True),
        # MAC not known yet: a DHCP client's first frame teaches the bridge its MAC but
        # reaches nobody (its client hardware address is checked once the MAC is locked), and
        # is not counted as spoofing ("quiet"); nothing else goes before an address is bound,
        # nor a DHCP server's reply
        ("fwtap1", "unknown-discover", _ip_frame(other, "0.0.0.0", "unknown-discover",
                                                 "255.255.255.255", 68, 67, _dhcp(1, other)),
         "quiet"),
        ("fwtap1", "unknown-any", _ip_frame(other, "172.16.12.99", "unknown-any"), True),
        ("fwtap1", "unknown-dhcp", _ip_frame(other, "172.16.12.99", "unknown-dhcp",
                                             "255.255.255.255", 67, 68, _dhcp(2, other)), True),
        ("fwtap1", "unknown-as-gateway", _ip_frame(GW_MAC, "0.0.0.0", "unknown-as-gateway",
                                                   "255.255.255.255", 68, 67, _dhcp(1, GW_MAC)),
         True),
        ("learn", "", b"", False),
        ("fwtap1", "learned-forged", _ip_frame(other, "172.16.12.99", "learned-forged"), True),
        ("fwtap1", "learned-genuine", _ip_frame(MAC1, "172.16.12.99", "learned-genuine"), False),
        ("fwtap1", "learned-other-chaddr", _ip_frame(MAC1, "172.16.12.99", "learned-other-chaddr",
                                                     "172.16.12.1", 68, 67, _dhcp(1, other)),
         True),
        # a network without spoof protection
        ("fwtap4", "unprotected", _ip_frame(other, "172.16.14.99", "unprotected",
                                            "172.16.14.255"), False),
        ("fwtap4", "unprotected-dhcp", _ip_frame(other, "172.16.14.99", "unprotected-dhcp",
                                                 "255.255.255.255", 67, 68, _dhcp(2, other)),
         False),
    ]
    expected = {"fwtap0": 0, "fwtap1": 0}
    for port, tag, frame, dropped in frames:
        if port == "learn":  # the engine learnt fwtap1's MAC (and its lease): only its chains
            before = normalized(lab.query(h, table_query("bridge", "qemu_vnet")))
            lab.apply(h, fw.render_port_update(FwPort("fwtap1", "vnet2", MAC1, "172.16.12.99"),
                                               P1))
            after = normalized(lab.query(h, table_query("bridge", "qemu_vnet")))

            def others(listing):
                return [o for o in listing if ("rule" in o or "chain" in o) and not (
                    o.get("rule") or o.get("chain"))["chain" if "rule" in o else "name"
                                                       ].endswith("_fwtap1")]
            assert others(before) == others(after)
            continue
        taps.stdin.write(f"{port} {frame.hex()}\n")
        taps.stdin.flush()
        assert readline(taps, 5) == "ok"
        if dropped is True:
            expected[port] += 1
        deadline = time.monotonic() + 2
        while spoof_counters(lab, h) != expected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert spoof_counters(lab, h) == expected, tag
    time.sleep(0.3)
    seen = set()
    for s in (sniff2, sniff4):
        s.stdin.close()
        seen |= set(json.loads(readline(s, 5)))
    passed = {tag for port, tag, _f, dropped in frames if port != "learn" and not dropped}
    blocked = {tag for port, tag, _f, dropped in frames if port != "learn" and dropped}
    assert passed <= seen, passed - seen
    assert not (blocked & seen), blocked & seen
    assert spoof_counters(lab, h) == {"fwtap0": 6, "fwtap1": 5}
    # a port that goes away takes its elements and counter with it
    lab.apply(h, fw.render_port_remove(P0))
    assert spoof_counters(lab, h) == {"fwtap1": 5}
    taps.stdin.close()
    taps.wait(timeout=5)


def test_a_guest_holds_a_bounded_number_of_connections(lab, world, monkeypatch):
    """The host's connection tracking table is one for all: a guest opening flows as fast as
    it can would fill it, and every other guest's new connections would be dropped. Each
    guest address holds at most CT_PER_GUEST (made small here) through the host; past that
    its new connections are dropped and counted, and another guest's are not."""
    h = world["h"]
    monkeypatch.setattr(fw, "CT_PER_GUEST", 12)
    monkeypatch.setattr(fw, "DNS_TCP_PER_GUEST", 100)  # (the next test's limit)
    lab.apply(h, fw.render_ruleset(NETS, FWDS, PORTS))
    try:
        r = lab.run_tool(world["g2a"], "hold-tcp", "10.77.0.2", "9000", "20", "0.5", timeout=60)
        assert r.stdout.strip() == "12", (r.stdout, r.stderr)  # forwarded (nat)
        r = lab.run_tool(world["g3"], "hold-tcp", "172.16.13.1", "53", "20", "0.5", timeout=60)
        assert r.stdout.strip() == "12", (r.stdout, r.stderr)  # to the host (DNS)
        # g2a's connections are gone with its process: it connects again, and so do others
        assert talk(lab, world["g2a"], "tcp", "10.77.0.2", 9000) == "10.77.0.1 9000"
        assert talk(lab, world["g2b"], "tcp", "10.77.0.2", 9000) == "10.77.0.1 9000"
    finally:
        monkeypatch.undo()
        lab.apply(h, fw.render_ruleset(NETS, FWDS, PORTS))


def test_a_guest_holds_a_bounded_number_of_dns_connections_over_tcp(lab, world):
    """dnsmasq serves at most 20 DNS connections over TCP at once and keeps an idle one for
    up to 150 s: one guest holding 20 stalled TCP DNS for every other guest of its network.
    A guest address holds at most DNS_TCP_PER_GUEST (per family); its next one is reset at
    once (not left to time out), and another guest of the same network still connects."""
    gw = next(n for n in NETS if n.name == "vnet2")
    for host in (str(gw.gateway), str(gw.gateway6)):
        holder = lab.tool(world["g2a"], "hold-tcp", host, "53", "10", "0.5", "keep",
                          wait_ready=False)
        try:
            assert readline(holder, 30) == str(fw.DNS_TCP_PER_GUEST), host
            r = lab.run_tool(world["g2a"], "tcp", host, "53", "1.5")
            assert r.returncode != 0 and "refused" in r.stdout, (host, r.stdout)
            assert talk(lab, world["g2b"], "tcp", host, 53) is not None, host
        finally:
            holder.stdin.close()
            holder.wait(timeout=10)
        # once it lets them go, the guest connects again
        assert talk(lab, world["g2a"], "tcp", host, 53) is not None, host


def test_a_guest_cannot_make_the_host_look_for_addresses_nobody_holds(lab, world):
    """Sent to the gateway for unused addresses of its own subnet (a /64 has plenty), every
    packet made the host solicit a neighbour and keep an entry for it, in the table all its
    interfaces share (1,024 entries by default): before the fix each address below was in the
    host's table afterwards. Guest to guest on the bridge still passes (the control)."""
    h, g = world["h"], world["g2a"]
    unused = [f"172.16.12.{200 + i}" for i in range(5)]
    for a in unused:  # the guest routes them through its gateway, as an attacker would
        sh("ip", "-n", g, "route", "replace", f"{a}/32", "via", "172.16.12.1")
    try:
        for a in unused:
            assert talk(lab, g, "tcp", a, 80, timeout=0.3) is None
        time.sleep(0.2)
        table = sh("ip", "-n", h, "-j", "neigh", "show", "dev", "vnet2").stdout
        assert not [a for a in unused if f'"{a}"' in table], table
        assert talk(lab, world["g2b"], "tcp", "172.16.12.50", 80) == "172.16.12.51 80"
    finally:
        for a in unused:
            sh("ip", "-n", g, "route", "del", f"{a}/32", check=False)


def test_same_without_br_netfilter_calls(lab, world):
    """With bridge-nf-call-ip(6)tables=0 (what qemu-vlan used to set) nothing changes: the
    bridge table does not need br_netfilter, and routed traffic never depended on it."""
    h = world["h"]
    keys = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")
    if not Path("/proc/sys/net/bridge").exists():
        pytest.skip("br_netfilter is not loaded")
    old = [sh("ip", "netns", "exec", h, "sysctl", "-n", k).stdout.strip() for k in keys]
    sh("ip", "netns", "exec", h, "sysctl", "-q", "-w", *(f"{k}=0" for k in keys))
    try:
        assert talk(lab, world["g2b"], "tcp", "172.16.12.50", 80) == "172.16.12.51 80"
        assert talk(lab, world["g2a"], "tcp", "10.77.0.2", 9000) == "10.77.0.1 9000"
        assert talk(lab, world["g2b"], "tcp", "10.77.0.1", 8080) == "172.16.12.1 80"
        assert talk(lab, world["o"], "tcp", "10.77.0.1", 8080) == "10.77.0.2 80"
        assert talk(lab, world["g3"], "tcp", "10.77.0.2", 9000) is None
        assert talk(lab, world["g2a"], "tcp", "172.16.13.50", 80) is None
    finally:
        sh("ip", "netns", "exec", h, "sysctl", "-q", "-w",
           *(f"{k}={v}" for k, v in zip(keys, old, strict=True)))


def test_control_without_our_tables_the_blocked_traffic_flows(lab, world):
    """The refusals above are ours: with both tables deleted they all go through."""
    h = world["h"]
    lab.apply(h, fw.render_delete_all())
    try:
        assert talk(lab, world["g3"], "tcp", "10.77.0.2", 9000) == "172.16.13.50 9000"
        assert talk(lab, world["g2a"], "tcp", "172.16.13.50", 80) == "172.16.12.50 80"
        assert talk(lab, world["o"], "tcp", "172.16.12.50", 80) == "10.77.0.2 80"
        assert talk(lab, world["g3"], "tcp", "172.16.13.1", 2222) == "172.16.13.50 2222"
        assert talk(lab, world["o"], "tcp", "10.77.0.1", 8080) is None  # no forward either
        taps = lab.tool(h, "taps", "fwtap0:vnet2")
        sniff = lab.tool(world["g2b"], "sniff", "eth0")
        frame = _ip_frame("52:54:00:00:00:bb", "172.16.12.1", "control-forged")
        taps.stdin.write(f"fwtap0 {frame.hex()}\n")
        taps.stdin.flush()
        assert readline(taps, 5) == "ok"
        time.sleep(0.3)
        sniff.stdin.close()
        assert "control-forged" in json.loads(readline(sniff, 5))
        taps.stdin.close()
        taps.wait(timeout=5)
    finally:
        lab.apply(h, fw.render_ruleset(NETS, FWDS, PORTS))
    assert talk(lab, world["g3"], "tcp", "10.77.0.2", 9000) is None


# --- transactions in a quiet namespace (no interfaces, no traffic) ----------------------------


@pytest.fixture(scope="module")
def quiet(lab):
    q = lab.ns("q")
    # foreign tables an administrator or Docker made; one even shares our table's name in
    # another family
    foreign = [
        {"add": {"table": {"family": "inet", "name": "admin"}}},
        {"add": {"set": {"family": "inet", "table": "admin", "name": "blocked",
                         "type": "ipv4_addr"}}},
        {"add": {"element": {"family": "inet", "table": "admin", "name": "blocked",
                             "elem": ["192.0.2.1"]}}},
        {"add": {"chain": {"family": "inet", "table": "admin", "name": "fwd", "type": "filter",
                           "hook": "forward", "prio": 0, "policy": "drop"}}},
        {"add": {"rule": {"family": "inet", "table": "admin", "chain": "fwd", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": "@blocked"}}, {"counter": None}, {"drop": None}]}}},
        {"add": {"table": {"family": "ip", "name": "filter"}}},
        {"add": {"chain": {"family": "ip", "table": "filter", "name": "FORWARD",
                           "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}},
        {"add": {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER"}}},
        {"add": {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD",
                          "expr": [{"jump": {"target": "DOCKER-USER"}}]}}},
        {"add": {"table": {"family": "ip", "name": "qemu_vnet"}}},
        {"add": {"chain": {"family": "ip", "table": "qemu_vnet", "name": "keep"}}},
    ]
    lab.raw(q, {"nftables": foreign})
    return q


FOREIGN = [("inet", "admin"), ("ip", "filter"), ("ip", "qemu_vnet")]


def foreign_snapshot(lab, q) -> str:
    return json.dumps([lab.query(q, table_query(f, t)) for f, t in FOREIGN])


def test_foreign_tables_are_never_touched(lab, quiet):
    q = quiet
    before = foreign_snapshot(lab, q)
    lab.apply(q, fw.render_ruleset(NETS, FWDS, PORTS))
    lab.apply(q, fw.render_ruleset(NETS, FWDS, PORTS))
    lab.apply(q, fw.render_ruleset(NETS, FWDS, PORTS, fresh=True))
    f = FwForward("vnet2", "udp", 4, None, 4000, 4010, "172.16.12.50", 4000)
    lab.apply(q, fw.render_forward_add(f))
    lab.apply(q, fw.render_forward_remove(f))
    lab.apply(q, fw.render_port_update(FwPort("fwtap1", "vnet2", MAC1), P1))
    lab.apply(q, fw.render_port_remove(P0))
    lab.apply(q, fw.render_delete_all())
    lab.apply(q, fw.render_delete_all())  # idempotent
    assert foreign_snapshot(lab, q) == before
    lab.apply(q, fw.render_ruleset([]))
    assert foreign_snapshot(lab, q) == before
    # the engine can name what will drop our traffic anyway
    assert fw.foreign_drop_chains(lab.query(q, fw.render_chains_query())) == [
        "inet admin fwd (hook forward, policy drop)",
        "ip filter FORWARD (hook forward, policy drop)",
    ]
    # and apply() refuses to touch them at all
    r = lab.call(q, {"op": "apply", "cmd": {"nftables": [
        {"flush": {"table": {"family": "inet", "name": "admin"}}}]}})
    assert not r["ok"] and "ValueError" in r["error"]
    assert foreign_snapshot(lab, q) == before


def test_ruleset_is_idempotent_and_rebuilds_completely(lab, quiet):
    q = quiet
    full = fw.render_ruleset(NETS, FWDS, PORTS)
    lab.apply(q, full)
    once = normalized(lab.query(q, RULESET))
    lab.apply(q, full)
    assert normalized(lab.query(q, RULESET)) == once
    # a smaller ruleset applied in place leaves exactly what a fresh build of it leaves
    small = [NETS[1]]
    lab.apply(q, fw.render_ruleset(small, (), [], fresh=False))
    in_place = normalized(lab.query(q, RULESET))
    lab.apply(q, fw.render_ruleset(small, (), [], fresh=True))
    fresh = normalized(lab.query(q, RULESET))
    # the only leftovers of an in-place rebuild are the named counters of vanished ports
    assert [o for o in in_place if "counter" not in o] == [o for o in fresh if "counter" not in o]
    lab.apply(q, fw.render_ruleset([], (), []))
    empty = lab.query(q, table_query("inet", "qemu_vnet"))
    assert any("chain" in o and o["chain"].get("hook") == "forward" for o in empty["nftables"])


def _without_forward_elems(listing: dict, maps: set[str]) -> list:
    out = []
    for o in listing["nftables"]:
        if "map" in o and o["map"]["name"] in maps:
            o = {"map": {k: v for k, v in o["map"].items() if k != "elem"}}
        out.append(o)
    return out


def test_forward_add_remove_changes_only_map_elements(lab, quiet):
    q = quiet
    lab.apply(q, fw.render_ruleset(NETS, FWDS, PORTS))
    f = FwForward("vnet2", "tcp", 4, "10.77.0.1", 3000, 3002, "172.16.12.50", 3100, iface="eth9")
    maps = set(fw.forward_maps(4, "_ia"))
    before = lab.query(q, RULESET)
    lab.apply(q, fw.render_forward_add(f))
    during = lab.query(q, RULESET)
    assert json.dumps(_without_forward_elems(before, maps)) == \
        json.dumps(_without_forward_elems(during, maps))
    changed = {o["map"]["name"] for o, p in zip(before["nftables"], during["nftables"],
                                                 strict=True) if o != p}
    assert changed == maps
    lab.apply(q, fw.render_forward_remove(f))
    assert json.dumps(lab.query(q, RULESET)) == json.dumps(before)


def test_transactions_are_all_or_nothing(lab, quiet):
    q = quiet
    lab.apply(q, fw.render_ruleset(NETS, FWDS, PORTS))
    snap = json.dumps(lab.query(q, table_query("inet", "qemu_vnet")))
    bridge_snap = json.dumps(lab.query(q, table_query("bridge", "qemu_vnet")))
    good1 = fw.render_forward_add(FwForward("vnet2", "tcp", 4, None, 7777, 7777,
                                            "172.16.12.50", 80))["nftables"]
    good2 = fw.render_forward_add(FwForward("vnet2", "udp", 4, None, 7778, 7778,
                                            "172.16.12.50", 80))["nftables"]
    clash = fw.render_forward_add(FwForward("vnet2", "tcp", 4, None, 8080, 8080,
                                            "172.16.12.99", 80))["nftables"]  # F_TCP's key
    clash2 = fw.render_forward_add(FwForward("vnet2", "tcp", 4, None, 8080, 8080,
                                             "172.16.12.98", 80))["nftables"]
    bad_addr = [{"add": {"element": {"family": "inet", "table": "qemu_vnet", "name": "fwd4_ip",
                                     "elem": [[{"concat": ["tcp", 7779]}, "999.1.1.1"]]}}}]
    bad_jump = [{"add": {"rule": {"family": "inet", "table": "qemu_vnet", "chain": "forward",
                                  "expr": [{"jump": {"target": "no_such_chain"}}]}}}]
    rebuild = fw.render_ruleset([NETS[1]], (), [])["nftables"]
    for bad in (good1 + clash + good2,  # the kernel refuses the clash (EEXIST)
                good1 + bad_addr + good2,  # libnftables refuses before sending
                good1 + bad_jump + good2,
                rebuild + clash + clash2):  # a whole rebuild, flush included, fails as one
        r = lab.call(q, {"op": "apply", "cmd": {"nftables": bad}})
        assert not r["ok"] and "RuntimeError" in r["error"], r
        assert json.dumps(lab.query(q, table_query("inet", "qemu_vnet"))) == snap
        assert json.dumps(lab.query(q, table_query("bridge", "qemu_vnet"))) == bridge_snap


def test_flowtables_probe(lab, quiet):
    q = quiet
    before = json.dumps(lab.query(q, RULESET))
    r = lab.call(q, {"op": "flowtables"})
    assert r["ok"]
    config = Path("/proc/config.gz")
    if config.exists():
        has = re.search(rb"^CONFIG_NF_FLOW_TABLE=[ym]$", gzip.decompress(config.read_bytes()),
                        re.M) is not None
        assert r["supported"] is has, r
    if not r["supported"]:
        assert "Could not process rule" in r["err"], r  # the kernel said no, not the parser
    assert json.dumps(lab.query(q, RULESET)) == before  # dry run: nothing left behind


def test_forward_change_cost_with_many_forwards(lab, quiet, capsys):
    q = quiet
    net = {"name": "vnet2", "mode": "nat", "subnet": "172.16.12.0/24", "gateway": "172.16.12.1"}
    lines = []
    for n in (10, 1000, 10000):
        r = lab.call(q, {"op": "bench", "n": n, "rounds": 15, "net": net}, timeout=300)
        assert r["ok"], r
        lines.append(f"  {n:>6} forwards: full ruleset {r['full'] * 1000:8.1f} ms | "
                     f"add {r['add'] * 1000:6.2f} ms (min {r['add_min'] * 1000:.2f}) | "
                     f"remove {r['remove'] * 1000:6.2f} ms (min {r['remove_min'] * 1000:.2f})")
    with capsys.disabled():
        print("\n[firewall] render_forward_add/remove + apply (median of 15):")
        print("\n".join(lines))
    lab.apply(q, fw.render_delete_all())
