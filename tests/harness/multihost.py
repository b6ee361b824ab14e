"""Several hosts on one machine: each a network namespace with its own vnetd on its own
private D-Bus (`vnetd --bus-address`), joined by an underlay (a veth from each host to a
bridge in a "switch" namespace). Root calls on a private bus skip polkit, as on the system
bus, so these tests talk to each daemon as root."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from . import services
from .daemon import PY, Daemon, run_client, sh
from .tools import require

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>qemu-vnet-test-host</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="root"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


class Host(Daemon):
    """A vnetd in its own netns on its own bus, with an underlay address `ul0`."""

    def __init__(self, label: str):
        super().__init__(label)
        sock = self.dir / "bus"
        self.bus_address = f"unix:path={sock}"
        conf = self.dir / "bus.conf"
        conf.write_text(BUS_CONFIG.format(path=sock))
        self.bus = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork",
                                     "--nopidfile"], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
        services.wait_for(sock.exists, 10, f"the bus of {label}")
        self.underlay: str | None = None

    # --- process --------------------------------------------------------------------------
    def start(self, extra: list[str] | None = None) -> None:
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *services.sandboxed([
                str(PY), "-m", "vnetd", "--bus-address", self.bus_address,
                "--config-dir", str(self.config_dir), "--state-dir", str(self.state_dir),
                "--runtime-dir", str(self.runtime_dir), "--log-level", "debug",
                *(extra or [])])],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vnetd exited ({self.proc.returncode}):\n{self.log()}")
            if self.client("list", timeout=5).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"vnetd did not come up:\n{self.log()}")

    def client(self, *args: str, timeout: float = 60, check: bool = False
               ) -> subprocess.CompletedProcess:
        return run_client(*args, timeout=timeout, check=check,
                          env={"VNET_BUS_ADDRESS": self.bus_address})

    def close(self) -> None:
        super().close()
        if self.bus.poll() is None:
            self.bus.send_signal(signal.SIGTERM)
            self.bus.wait(5)


class Underlay:
    """A switch namespace with a bridge; `join(host)` gives the host `ul0` on it."""

    def __init__(self, subnet: str = "10.88.0.0/24"):
        self.netns = f"vnu-{uuid.uuid4().hex[:6]}"
        self.subnet = ipaddress.ip_network(subnet)
        self.next = 1
        self.ports: list[str] = []
        sh("ip", "netns", "add", self.netns)
        self.ip("link", "add", "sw", "type", "bridge")
        self.ip("link", "set", "sw", "up")

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "-n", self.netns, *args, check=check)

    def join(self, host: Host) -> str:
        addr = str(self.subnet[self.next])
        port = f"p{self.next}"
        self.next += 1
        host.ip("link", "add", "ul0", "type", "veth", "peer", "name", port, "netns",
                self.netns)
        self.ip("link", "set", port, "master", "sw", "up")
        host.ip("addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", "ul0")
        host.ip("link", "set", "ul0", "up")
        host.underlay = addr
        self.ports.append(port)
        return addr

    def cut(self, host: Host, down: bool = True) -> None:
        """Take a host's switch port down (or up again)."""
        idx = int(host.underlay.rsplit(".", 1)[1])
        self.ip("link", "set", f"p{idx}", "down" if down else "up")

    def close(self) -> None:
        sh("ip", "netns", "del", self.netns, check=False)


def wait_until(fn, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def ping(guest, addr: str, count: int = 1, wait: int = 1) -> bool:
    require("ping")  # a missing ping must not read as 'unreachable'
    r = guest.run("ping", "-c", str(count), "-W", str(wait), addr, timeout=count * wait + 10)
    return r.returncode == 0


class Frr:
    """FRR's zebra and bgpd in a host's namespace, as the system would run them there: one
    instance per host, told apart by pathspace (-N, sockets in /var/run/frr/<host netns>).
    bgpd starts with no BGP configuration: the host's vnetd (--frr-pathspace) supplies it."""

    DAEMONS = ("zebra", "bgpd")

    def __init__(self, host: Host):
        self.host = host
        self.ns = host.netns
        self.dir = host.dir / "frr"
        self.dir.mkdir()
        sh("chown", "frr:frr", str(self.dir))
        run = Path("/var/run/frr")
        if not run.exists():
            run.mkdir(parents=True)
            sh("chown", "frr:frr", str(run))
        for d in self.DAEMONS:
            conf = self.dir / f"{d}.conf"
            conf.write_text(f"hostname {self.ns}\nlog file {self.dir}/{d}.log informational\n")
            sh("chown", "frr:frr", str(conf))
        for d in self.DAEMONS:
            host.exec(f"/usr/lib/frr/{d}", "-d", "-N", self.ns, "-F", "traditional", "-P", "0",
                      "-f", str(self.dir / f"{d}.conf"), "-i", str(self.dir / f"{d}.pid"))
            wait_until(lambda d=d: (run / self.ns / f"{d}.vty").exists(), 10, f"{d} of {self.ns}")

    def vtysh(self, *commands: str, check: bool = True) -> str:
        argv = ["vtysh", "-N", self.ns]
        for c in commands:
            argv += ["-c", c]
        return sh(*argv, check=check).stdout

    def stop(self) -> None:
        for d in reversed(self.DAEMONS):
            pidfile = self.dir / f"{d}.pid"
            try:
                pid = int(pidfile.read_text())
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if self.ns.encode() in f.read():
                        os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5
        vty = Path("/var/run/frr") / self.ns / "bgpd.vty"
        while time.monotonic() < deadline and vty.exists():
            time.sleep(0.05)
        shutil.rmtree(Path("/var/run/frr") / self.ns, ignore_errors=True)


def frr_available() -> bool:
    return Path("/usr/lib/frr/bgpd").exists() and os.access("/usr/bin/vtysh", os.X_OK)
