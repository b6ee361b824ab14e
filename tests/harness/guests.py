"""Stand-in VMs: network namespaces wired to a vnetd bridge by a veth pair, running real
DHCP clients (busybox udhcpc) and DNS lookups (busybox nslookup)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid

from .daemon import Daemon, sh

BUSYBOX = "/bin/busybox"
UDHCPC_SCRIPT = """#!/bin/sh
# prints what the server gave; configures eth0 when VNET_CONFIGURE=1
case "$1" in
  bound|renew)
    echo "LEASE ip=$ip mask=$mask router=$router dns=$dns domain=$domain \
serverid=$serverid lease=$lease"
    if [ "$VNET_CONFIGURE" = 1 ]; then
      /bin/busybox ip addr flush dev "$interface"
      /bin/busybox ip addr add "$ip/$mask" dev "$interface"
      [ -n "$router" ] && /bin/busybox ip route replace default via "${router%% *}"
    fi
    ;;
esac
"""
_script_dir = tempfile.mkdtemp(prefix="vnet-udhcpc-")
SCRIPT = os.path.join(_script_dir, "udhcpc.sh")
with open(SCRIPT, "w") as f:
    f.write(UDHCPC_SCRIPT)
os.chmod(SCRIPT, 0o755)


def parse_lease(out: str) -> dict[str, str] | None:
    for line in out.splitlines():
        if line.startswith("LEASE "):
            return dict(kv.split("=", 1) for kv in line[6:].split() if "=" in kv)
    return None


class Guest:
    """A netns with eth0 plugged into `bridge` of the daemon's namespace."""

    def __init__(self, daemon: Daemon, bridge: str, mac: str | None = None):
        self.daemon = daemon
        tag = uuid.uuid4().hex[:6]
        self.netns = f"vng-{tag}"
        self.host_if = f"vg{tag}"
        sh("ip", "netns", "add", self.netns)
        daemon.ip("link", "add", self.host_if, "type", "veth", "peer", "name", "eth0",
                  "netns", self.netns)
        if mac:
            self.ip("link", "set", "eth0", "address", mac)
        daemon.ip("link", "set", self.host_if, "master", bridge, "up")
        self.ip("link", "set", "lo", "up")
        self.ip("link", "set", "eth0", "up")
        self.mac = self.ipj("link", "show", "eth0")[0]["address"]

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        return sh("ip", "-n", self.netns, *args)

    def ipj(self, *args: str):
        import json

        return json.loads(self.ip("-j", *args).stdout)

    def run(self, *argv: str, timeout: float = 30, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True,
                              text=True, timeout=timeout, env=env, check=check)

    def dhcp(self, configure: bool = False, hostname: str | None = None,
             request: str | None = None, tries: int = 5) -> dict[str, str] | None:
        argv = [BUSYBOX, "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", str(tries), "-T", "1",
                "-s", SCRIPT]
        if hostname:
            argv += ["-x", f"hostname:{hostname}"]
        if request:
            argv += ["-r", request]
        env = dict(os.environ, VNET_CONFIGURE="1" if configure else "0")
        r = self.run(*argv, env=env, timeout=tries * 3 + 10)
        return parse_lease(r.stdout)

    def resolve(self, name: str, server: str, tries: int = 3) -> str | None:
        for _ in range(tries):
            r = self.run(BUSYBOX, "nslookup", "-type=a", name, server, timeout=10)
            answer = r.stdout.split("Name:", 1)[1] if "Name:" in r.stdout else ""
            addrs = [ln.split()[-1] for ln in answer.splitlines() if ln.startswith("Address")]
            if addrs:
                return addrs[0]
            self.last_resolve_output = r.stdout + r.stderr
        return None

    def static(self, cidr: str, gateway: str) -> None:
        """Configure an address and default route by hand (IPv4 or IPv6)."""
        extra = ["nodad"] if ":" in cidr else []
        self.ip("addr", "add", cidr, "dev", "eth0", *extra)
        self.ip("route", "replace", "default", "via", gateway)

    def close(self) -> None:
        self.daemon.ip("link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.netns, check=False)
