"""The root side of the frame-level attack tests: test users' agent processes holding real
ports (tests/harness/frames.py run as that user), and what the host looks like (bridge FDB,
neighbour table, leases, ports) so that a test can say "nothing changed".

A port is always obtained by the unprivileged user through the real Attach method (or, for a
pre-created tap or a VDE switch, through what that user may open); root only watches.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import frames as F
from tests.harness.daemon import PY, as_user, run_client
from tests.harness.users import read_line

FRAMES_PATH = Path(F.__file__).resolve()

TOOLS = {"ip": "iproute2", "bridge": "iproute2", "vde_plug": "vde2 (vdeplug)",
         "vde_switch": "vde2", "setpriv": "util-linux"}


def require_tools(*names: str) -> None:
    """Fail (not skip: a missing tool must not look like a pass) naming the tool."""
    for name in names:
        if shutil.which(name) is None:
            pytest.fail(f"{name} is missing: install {TOOLS.get(name, name)}")


class AgentError(AssertionError):
    pass


class Agent:
    """A test user's process holding one port; it sends frames and reports what reached it."""

    def __init__(self, user: str, mode: str, *args: str, netns: str | None = None):
        """`netns`: run in that namespace (a pre-created tap is found by its name in the
        opener's namespace: the user works where the daemon's taps are)."""
        self.user = user
        argv = as_user(user, [str(PY), str(FRAMES_PATH), mode, *args])
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.proc = subprocess.Popen(argv,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.hello = self._read(30)
        self.ifname: str | None = self.hello.get("ifname")
        self.mac: str | None = self.hello.get("mac")

    @classmethod
    def attach(cls, user: str, network: str, vm: str, **opts) -> Agent:
        return cls(user, "attach", network, vm, json.dumps(opts))

    @property
    def error(self) -> str | None:
        return self.hello.get("error")

    def _read(self, timeout: float) -> dict:
        line = read_line(self.proc, timeout)
        if line is None:
            raise AgentError(f"agent of {self.user} did not answer in {timeout} s")
        if not line:
            raise AgentError(f"agent of {self.user} ended: {self.proc.stderr.read()}")
        return json.loads(line)

    def call(self, timeout: float = 30, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def send(self, *frames: bytes, check: bool = True) -> dict:
        """Write the frames; with check=False a refused write (a port that was cut off by
        deleting its tap answers EBADFD) is reported, not raised."""
        r = self.call(op="send", frames=[f.hex() for f in frames])
        if check:
            assert not r["errors"], r
        return r

    def clear(self) -> None:
        self.call(op="clear")

    def collect(self, seconds: float, until: dict | None = None) -> list[bytes]:
        r = self.call(timeout=seconds + 30, op="collect", seconds=seconds, until=until)
        return [bytes.fromhex(h) for h in r["frames"]]

    def setmac(self, mac: str) -> dict:
        return self.call(op="setmac", mac=mac)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()  # our own child, by its pid
                self.proc.wait()


def exchange(agent: Agent, frames: list[bytes], until: dict, seconds: float = 3) -> list[bytes]:
    """Send and wait for a frame matching `until`; returns what reached the agent."""
    agent.clear()
    agent.send(*frames)
    return agent.collect(seconds, until)


def matching(frames: list[bytes], **want) -> list[dict]:
    out = []
    for f in frames:
        if F._matches(f, {k.replace("__", "."): v for k, v in want.items()}):
            out.append(F.parse(f))
    return out


def dhcp_bind(agent: Agent, *, xid: int, tries: int = 3) -> str:
    """DISCOVER / OFFER / REQUEST / ACK with the agent's own MAC; returns the address."""
    for _ in range(tries):
        got = exchange(agent, [F.dhcp_client(F.DISCOVER, agent.mac, xid=xid)],
                       {"dhcp.type": F.OFFER, "dhcp.xid": xid})
        offer = next((d for d in map(F.parse, got) if d.get("dhcp", {}).get("type") == F.OFFER
                      and d["dhcp"]["xid"] == xid), None)
        if offer is None:
            continue
        ip, server = offer["dhcp"]["yiaddr"], offer["ip"]["src"]
        got = exchange(agent, [F.dhcp_client(F.REQUEST, agent.mac, xid=xid, requested=ip,
                                             server=server)],
                       {"dhcp.type": F.ACK, "dhcp.xid": xid})
        if any(d.get("dhcp", {}).get("type") == F.ACK for d in map(F.parse, got)):
            return ip
    raise AssertionError(f"{agent.ifname} got no DHCP lease")


# --- what the host looks like -----------------------------------------------------------------


def fdb(vnetd, bridge: str) -> list[tuple[str, str, str]]:
    """(mac, port, state) of the bridge's forwarding database, VLAN/self entries aside."""
    out = json.loads(vnetd.exec("bridge", "-j", "fdb", "show", "br", bridge).stdout or "[]")
    rows = set()
    for e in out:
        if "self" in e.get("flags", []) or e.get("ifname") == bridge:
            continue
        rows.add((e["mac"], e.get("ifname", ""), e.get("state", "")))
    return sorted(rows)


def fdb_ports_of(vnetd, bridge: str, mac: str) -> set[str]:
    return {port for m, port, _s in fdb(vnetd, bridge) if m == mac.lower()}


def neigh(vnetd, bridge: str) -> dict[str, tuple[str | None, str]]:
    """The host's neighbour table on the bridge: {ip: (lladdr, state)}."""
    out = vnetd.ipj("neigh", "show", "dev", bridge)
    return {e["dst"]: (e.get("lladdr"), ",".join(e.get("state", []))) for e in out}


def neigh_macs(vnetd, bridge: str) -> dict[str, str]:
    """{ip: lladdr} of the entries that name a link-layer address."""
    return {ip: ll for ip, (ll, _st) in neigh(vnetd, bridge).items() if ll}


def leases(network: str) -> list[tuple[str, str]]:
    r = run_client("leases", network, "--json", check=True)
    return sorted((le["mac"], le["ip"]) for le in json.loads(r.stdout or "[]"))


def ports() -> list[tuple[str, str, str, int]]:
    """(ifname, vm, mac, uid) of every port (as root: everyone's)."""
    r = run_client("ports", "--json", check=True)
    return sorted((p["ifname"], p["vm"], p["mac"], p["uid"]) for p in json.loads(r.stdout))


def bridge_mac(vnetd, bridge: str) -> str:
    return vnetd.ipj("link", "show", bridge)[0]["address"]


def wait_for(cond, timeout: float = 5, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


def settle(seconds: float = 0.3) -> None:
    """Frames are in flight through the bridge: let them land."""
    time.sleep(seconds)


def respond(agent: Agent, ip4: list[str] = (), ip6: list[str] = (),
            mac: str | None = None) -> None:
    """The agent answers ARP and neighbour solicitations for these addresses, as a guest."""
    agent.call(op="respond", mac=mac or agent.mac, ip4=list(ip4), ip6=list(ip6))


def ping(agent: Agent, src_ip: str, dst_mac: str, dst_ip: str, *, seq: int = 1,
         tries: int = 4) -> bool:
    """ICMP echo from the agent's MAC; True when the reply reaches it. A guest retries too:
    a fresh lease is bound by the firewall a moment after the ACK."""
    for attempt in range(tries):
        got = exchange(agent, [F.icmp4_echo(agent.mac, dst_mac, src_ip, dst_ip,
                                            seq=seq + attempt)],
                       {"icmp.type": 0}, seconds=1.0)
        if matching(got, icmp__type=0):
            return True
    return False
