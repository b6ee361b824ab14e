"""VDE switches (qemu-vlan's --vde) with real vde_switch and vde_plug2tap clients."""

from __future__ import annotations

import grp
import json
import os
import signal
import stat
import subprocess
import time
import uuid

import pytest

from tests.harness.daemon import ALICE, BOB, run_client, sh
from tests.harness.users import run_as

CONNECT = """
import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1] + "/ctl"); print("connected")
except OSError as e:
    print(type(e).__name__)
"""


@pytest.fixture(scope="module", autouse=True)
def network(vnetd):
    r = run_client("define", "vnet3", "--vde", "-n", "2", "--vde-ports", "8")
    assert r.returncode == 0, r.stderr
    run_client("start", "vnet3", check=True)
    yield


def vde(vnetd) -> list[dict]:
    return json.loads(run_client("show", "vnet3", "--json", check=True).stdout)["vde"]


class VdeGuest:
    """A netns whose tap0 is plugged into a VDE switch by vde_plug2tap."""

    def __init__(self, sock: str):
        self.netns = f"vnv-{uuid.uuid4().hex[:6]}"
        sh("ip", "netns", "add", self.netns)
        self.plug = subprocess.Popen(["ip", "netns", "exec", self.netns, "vde_plug2tap", "-s",
                                      sock, "tap0"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        while subprocess.run(["ip", "-n", self.netns, "link", "show", "tap0"],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, self.plug.stderr.read()
            time.sleep(0.05)
        sh("ip", "-n", self.netns, "link", "set", "tap0", "up")
        sh("ip", "-n", self.netns, "link", "set", "lo", "up")

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True,
                              text=True, timeout=30)

    def close(self) -> None:
        self.plug.kill()
        self.plug.wait()
        sh("ip", "netns", "del", self.netns, check=False)


def test_one_switch_per_tap_with_group_vnet_sockets(vnetd):
    switches = vde(vnetd)
    assert [s["tap"] for s in switches] == ["vnet3_0", "vnet3_1"]  # qemu-vlan's names
    for s in switches:
        ctl = os.stat(os.path.join(s["sock"], "ctl"))
        assert stat.S_ISSOCK(ctl.st_mode) and stat.S_IMODE(ctl.st_mode) == 0o660
        assert grp.getgrgid(ctl.st_gid).gr_name == "vnet"
        assert s["state"] == "running" and s["ports"] == 8 and s["free"] == 7  # tap uses one
        assert s["sock"] == str(vnetd.runtime_dir / "vde" / s["tap"])


def test_two_vde_clients_get_leases_and_reach_each_other_and_the_gateway(vnetd):
    socks = [s["sock"] for s in vde(vnetd)]
    a, b = VdeGuest(socks[0]), VdeGuest(socks[1])
    try:
        ips = []
        for g in (a, b):
            r = g.run("busybox", "udhcpc", "-i", "tap0", "-n", "-q", "-f", "-t", "5", "-T", "1",
                      "-s", "/bin/true")
            ip = next(line.split()[3] for line in r.stderr.splitlines() if "lease of" in line)
            assert ip.startswith("172.16.13."), r.stderr
            g.run("ip", "addr", "add", f"{ip}/24", "dev", "tap0")
            ips.append(ip)
        assert a.run("busybox", "ping", "-c1", "-W2", "172.16.13.1").returncode == 0
        assert a.run("busybox", "ping", "-c1", "-W2", ips[1]).returncode == 0
        assert next(s for s in vde(vnetd) if s["tap"] == "vnet3_0")["free"] == 6
    finally:
        a.close()
        b.close()


def test_vnet_members_may_connect_others_may_not(vnetd):
    sock = vde(vnetd)[0]["sock"]
    assert run_as(ALICE, CONNECT, sock).stdout.strip() == "connected"
    assert run_as(BOB, CONNECT, sock).stdout.strip() == "PermissionError"


def test_attach_vde_picks_a_switch_and_substitutes(vnetd):
    r = run_client("attach", "--br=vnet3", "--vm=vdevm", "--vde", "--", "echo", "{vde_sock}",
                   "{mac}", user=ALICE)
    assert r.returncode == 0, r.stderr
    sock, mac = r.stdout.split()
    assert sock in [s["sock"] for s in vde(vnetd)]
    assert mac == run_client("mac", "--br=vnet3", "--vm=vdevm", user=ALICE).stdout.strip()
    r = run_client("attach", "--br=vnet3", "--vm=vdevm", "--vde", "--", "echo", "{fd}",
                   user=ALICE)
    assert r.returncode == 2 and "does not fit" in r.stderr


def test_a_killed_switch_is_back_within_1s(vnetd):
    s = vde(vnetd)[0]
    os.kill(s["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0:
        now = vde(vnetd)[0]
        if now.get("pid") not in (None, s["pid"]) and os.path.exists(s["sock"] + "/ctl"):
            break
        time.sleep(0.02)
    now = vde(vnetd)[0]
    assert now.get("pid") not in (None, s["pid"]), "vde_switch was not restarted within 1 s"


def test_bad_switch_arguments_are_refused(vnetd):
    for extra in (["--daemon"], ["--pidfile", "/tmp/x"], ["--sock", "/tmp/y"], ["-f", "rc"]):
        path = vnetd.config_dir / "networks" / "vnet9.toml"
        path.write_text('mode = "host-only"\ntaps = 1\nvde = true\nvde-switch-args = '
                        + json.dumps(extra) + "\n")
        r = run_client("reload")
        assert r.returncode == 1 and "not allowed" in r.stderr, (extra, r.stderr)
        path.unlink()
    run_client("reload", check=True)
    r = run_client("define", "vnet8", "--vde")
    assert r.returncode == 1 and "needs" not in r.stdout and "taps" in r.stderr


def test_stop_removes_every_socket_and_process(vnetd):
    pids = [s["pid"] for s in vde(vnetd)]
    run_client("stop", "vnet3", check=True)
    assert not any((vnetd.runtime_dir / "vde" / t).exists() for t in ("vnet3_0", "vnet3_1"))
    time.sleep(0.2)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")
    run_client("start", "vnet3", check=True)
    assert len(vde(vnetd)) == 2
