"""Crash consistency (nothing is lost).

vnetd is SIGKILLed at random points *inside* operations (define, undefine, start, stop, attach,
forward add/remove, host add, MAC hand-out), restarted, and the whole state is checked against
what the client was told:

- a change whose reply reached the client happened and is still there after the restart;
- a change that got no reply may have happened or not, but whole: a network is fully up
  (bridge with its addresses, its taps, exactly one DHCP server with a pid file naming it) or
  fully absent; forwards in nft maps exactly as the definitions of running networks say;
- nothing is lost (definitions, forwards, static hosts, ports held by their holder, MACs handed
  out) and nothing duplicated (servers, ports, forwards), and the daemon always comes back.

Each kill comes a random delay after the call is on the bus, drawn over the duration of that
operation measured on this machine at the start (stratified: every slice of the window gets
its turn), so that kills land before, during and after the kernel and file changes. The seed
(VNET_CRASH_SEED, printed in every failure) fixes every choice the test makes; which kernel
step a given delay hits still varies a little from run to run. Profiles: VNET_CRASH_PROFILE=ci
(default, 110 kills, about a minute) or nightly (1000); VNET_CRASH_KILLS=N overrides;
VNET_CRASH_OPS=start,stop limits the kills to some operations (the kinds of WEIGHTS).

A second group damages definition files and a network's MAC registry file on disk before a
restart: the damage is reported and the last good copy used, never a crash loop.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness import services
from tests.harness.crash import CallLost, Driver, DriverError, Reaper, nft_sets, proc_cmdlines
from tests.harness.daemon import ALICE

PROFILES = {"ci": 110, "nightly": 1000}
PROFILE = os.environ.get("VNET_CRASH_PROFILE", "ci")
KILLS = int(os.environ.get("VNET_CRASH_KILLS") or PROFILES.get(PROFILE, PROFILES["ci"]))
SEED = int(os.environ.get("VNET_CRASH_SEED") or random.SystemRandom().randrange(1, 2**31))

NO_REPLY = ("org.freedesktop.DBus.Error.NoReply",)
NOT_DELIVERED = ("org.freedesktop.DBus.Error.ServiceUnknown",
                 "org.freedesktop.DBus.Error.NameHasNoOwner")

HAVE_DHCPD = Path("/usr/sbin/dhcpd").exists()
# The networks the test plays with: names, fixed subnets, and what differs between them.
SPECS: dict[str, dict[str, Any]] = {
    "ck1": {"subnet": "10.91.1.0/24"},
    "ck2": {"subnet": "10.91.2.0/24", "subnet6": "fd00:91:2::/64"},
    "ck3": {"subnet": "10.91.3.0/24", "mode": "host-only", "autostart": True},
    "ck4": {"subnet": "10.91.4.0/24", "dhcp": "none"},
}
if HAVE_DHCPD:
    SPECS["ck5"] = {"subnet": "10.91.5.0/24", "dhcp": "dhcpd"}

# How the kills are shared between the operations (scaled to KILLS).
WEIGHTS = {"start": 16, "stop": 12, "attach": 14, "forward-add": 14, "forward-remove": 11,
           "host-add": 12, "define": 8, "undefine": 6, "mac": 7, "restart": 6}
if os.environ.get("VNET_CRASH_OPS"):  # e.g. VNET_CRASH_OPS=attach,stop to look closer
    WEIGHTS = {k: WEIGHTS[k] for k in os.environ["VNET_CRASH_OPS"].split(",")}
NAMES = itertools.count(1)
STRATA = 8  # each operation's window is cut in this many slices, each hit in turn


@pytest.fixture(scope="module", autouse=True)
def reaper():
    with Reaper() as r:
        yield r


# --- the declared state, as the client knows it -----------------------------------------------
@dataclass
class Net:
    name: str
    taps: int
    running: bool = False
    forwards: dict[int, tuple[str, str, int]] = field(default_factory=dict)  # ext port -> ...
    hosts: dict[str, tuple[str, str]] = field(default_factory=dict)  # vm -> (mac, ip)

    @property
    def spec(self) -> dict[str, Any]:
        return SPECS[self.name]

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(self.spec["subnet"])

    @property
    def autostart(self) -> bool:
        return bool(self.spec.get("autostart"))

    @property
    def dhcp(self) -> str:
        return self.spec.get("dhcp", "dnsmasq")

    @property
    def tap_names(self) -> list[str]:
        return [f"{self.name}_{i}" for i in range(self.taps)]  # NAME_0.., as qemu-vlan


@dataclass
class Port:
    ifname: str
    network: str
    vm: str
    mac: str


@dataclass
class Op:
    kind: str
    desc: str
    driver: str  # "root" | "alice"
    member: str
    sig: str
    args: tuple
    done: Any  # (reply values) -> None: the client was told it happened
    unknown: Any  # () -> None: no reply; find out after the restart which way it went
    window: str = ""  # which measured duration the kill delay is drawn over

    def __post_init__(self) -> None:
        self.window = self.window or self.kind


class Failure(AssertionError):
    pass


class World:
    """The model of the declared state, the drivers, and the checks against the kernel."""

    def __init__(self, vnetd, rng: random.Random):
        self.vnetd = vnetd
        self.rng = rng
        self.nets: dict[str, Net] = {}
        self.ports: dict[str, Port] = {}
        self.macs: dict[tuple[str, str, int], str] = {}
        self.counter = 0
        self.fwd_port = 20000
        self.history: list[str] = []
        self.root = Driver(None)
        self.alice = Driver(ALICE)
        self.log_mark = 0
        self.foreign: list[str] = []  # other processes that took the bus name meanwhile

    def close(self) -> None:
        self.root.stop()
        self.alice.stop()

    def fresh(self, prefix: str) -> str:
        self.counter = next(NAMES)  # unique in the module: the MAC registry never forgets
        return f"{prefix}{self.counter}"

    # --- talking to vnetd -----------------------------------------------------------------
    def drv(self, which: str) -> Driver:
        return self.root if which == "root" else self.alice

    def lost(self, d: Driver, since: int, desc: str) -> bool:
        """A call of root's that got no answer at all: True when it never reached vnetd
        (vnetd answers a new caller, has no call pending and logged nothing from that
        driver since the call was sent). The driver is then replaced (its connection may
        still hold the call) and the loss listed as not vnetd's doing; anything else is
        vnetd's fault and raises."""
        if d is not self.root or not self.vnetd.alive():
            return False
        dump = self.vnetd.stacks()
        after = self.vnetd.log()[since:]
        if "_dispatch" in dump or "no answer" in dump or f"sender={d.name} " in after \
                or f"from {d.name} " in after:
            return False
        self.root.proc.kill()
        self.root.stop()
        self.root = Driver(None)
        self.foreign.append(f"{desc}: the call never reached vnetd (vnetd idle, answering "
                            "others); sent again from a new connection")
        return True

    def run(self, op: Op) -> None:
        """An operation that is not interrupted: it must succeed."""
        mark = len(self.vnetd.log())
        try:
            r = self.drv(op.driver).call(op.member, op.sig, *op.args)
        except CallLost:
            if not self.lost(self.drv(op.driver), mark, op.desc):
                raise
            r = self.drv(op.driver).call(op.member, op.sig, *op.args)
        self.history.append(f"{op.desc}: {'ok' if 'ok' in r else r}")
        if "ok" not in r:
            raise Failure(f"{op.desc} failed although nothing was interrupted: {r}")
        op.done(r["ok"])

    def run_killed(self, op: Op, delay: float) -> tuple[str, float]:
        """Send op, SIGKILL vnetd `delay` s after it is on the bus, restart vnetd. Returns
        ('replied' | 'no reply' | 'not delivered', seconds the restart took)."""
        d = self.drv(op.driver)
        before = self.fingerprint()
        d.begin(op.member, op.sig, *op.args)
        t0 = time.monotonic()
        while time.monotonic() - t0 < delay:
            pass  # sub-millisecond precision; time.sleep() may oversleep by ~0.1 ms
        self.vnetd.kill()
        try:
            r = d.finish()
        except CallLost:
            if d is not self.root:
                raise
            # neither a reply nor the bus's error for a killed recipient: the call never
            # left the driver's connection; a new connection, and the call may or may not
            # have happened (as with no reply)
            self.root.proc.kill()
            self.root.stop()
            self.root = Driver(None)
            self.foreign.append(f"{op.desc}: no answer and no error from the bus after the "
                                "kill; the driver's connection was replaced")
            r = {"error": "org.freedesktop.DBus.Error.NoReply", "message": "lost"}
        self.log_mark = len(self.vnetd.log())
        t1 = time.monotonic()
        self.restart()
        restart = time.monotonic() - t1
        if "ok" in r:
            op.done(r["ok"])
            outcome = "replied"
        elif r.get("error") in NO_REPLY:
            op.unknown()
            outcome = "no reply"
        elif r.get("error") in NOT_DELIVERED:
            op.unknown()
            outcome = "not delivered"
            if self.fingerprint() != before:
                raise Failure(f"{op.desc} never reached vnetd ({r['error']}) but happened")
        else:
            raise Failure(f"{op.desc}: unexpected answer {r}")
        self.restarted()
        self.history.append(f"{op.desc} killed at {delay * 1000:.2f} ms: {outcome}")
        return outcome, restart

    def kill_in_startup(self, delay: float) -> tuple[str, float]:
        """Restart vnetd and SIGKILL it `delay` s after it was started (inside its start-up
        reconcile, or after), then start it again: adopting must survive a crash too."""
        self.vnetd.kill()
        dead = threading.Event()

        def killer() -> None:
            while self.vnetd.proc is None:
                time.sleep(0.0002)
            proc = self.vnetd.proc
            time.sleep(delay)
            proc.kill()
            dead.set()

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        try:
            self.vnetd.start()
            outcome = "after start-up"
        except RuntimeError as e:
            if "vnetd exited (-9)" not in str(e):
                raise Failure(f"vnetd did not come up: {str(e)[-3000:]}") from None
            outcome = "in start-up"
        dead.wait(30)
        self.vnetd.kill()
        self.log_mark = len(self.vnetd.log())
        t1 = time.monotonic()
        self.restart()
        self.restarted()
        self.history.append(f"restart killed at {delay * 1000:.1f} ms: {outcome}")
        return outcome, time.monotonic() - t1

    def restarted(self) -> None:
        """What a restart itself declares: autostart networks run again."""
        for net in self.nets.values():
            if net.autostart:
                net.running = True

    def fingerprint(self) -> str:
        """The model as a restart leaves it (autostart networks running)."""
        nets = sorted((n, net.taps, net.running or net.autostart, net.forwards, net.hosts)
                      for n, net in self.nets.items())
        return repr((nets, sorted(self.ports.items())))

    def restart(self) -> None:
        """Start vnetd again after a kill. Two things that are not vnetd's doing are waited
        out (and listed in the summary): another process taking the bus name in the moment it
        was free (a test session run without the session lock), and /opt/qemu-vnet being
        reinstalled under us ('make venv' in another session: modules missing for a moment).
        Anything else is a daemon that does not come back."""
        for attempt in range(10):
            mark = len(self.vnetd.log())
            try:
                self.vnetd.start()
                return
            except RuntimeError as e:
                why = self.vnetd.log()[mark:] or str(e)
            if "cannot own org.qemuvnet.Vnet1 (3)" in why:
                owner = services.name_owner_pid("org.qemuvnet.Vnet1")
                try:
                    who = Path(f"/proc/{owner}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    who = b"?"
                self.foreign.append(f"bus name taken by pid {owner}: {who.decode()[:200]}")
                services.wait_for(lambda: not services.has_owner("org.qemuvnet.Vnet1"), 300,
                                  f"the other owner of org.qemuvnet.Vnet1 ({owner})")
            elif ("ModuleNotFoundError: No module named 'vnetd" in why
                  or "No such file or directory: '/opt/qemu-vnet" in why) and attempt < 9:
                self.foreign.append("vnetd's installation was being replaced: "
                                    + why.strip().splitlines()[-1][:200])
                time.sleep(2)
            else:
                raise Failure(f"vnetd did not come back after the kill: {why[-3000:]}")
        raise Failure("vnetd did not come back after the kill (10 attempts)")

    def q(self, member: str, sig: str = "", *args: Any) -> Any:
        return self.root.ok(member, sig, *args)

    def listed(self) -> dict[str, dict]:
        return {n["name"]: n for n in self.q("ListNetworks")}

    # --- operations -----------------------------------------------------------------------
    def op_define(self, name: str) -> Op:
        taps = self.rng.randrange(3)
        opts = dict(SPECS[name], **({"taps": taps} if taps else {}))

        def done(_):
            self.nets[name] = Net(name, taps)

        def unknown():
            got = self.listed().get(name)
            if got is not None:
                state = "running" if SPECS[name].get("autostart") else "stopped"
                if got["state"] != state or got.get("taps", 0) != taps:
                    raise Failure(f"define {name} came back changed (or not {state}): {got}")
                self.nets[name] = Net(name, taps)

        return Op("define", f"define {name} (taps {taps})", "root", "Define", "sa{sv}",
                  (name, opts), done, unknown)

    def op_undefine(self, name: str) -> Op:
        def done(_):
            del self.nets[name]

        def unknown():
            if name not in self.listed():
                del self.nets[name]

        return Op("undefine", f"undefine {name}", "root", "Undefine", "s", (name,), done,
                  unknown)

    def op_start(self, name: str) -> Op:
        def done(_):
            self.nets[name].running = True

        def unknown():
            self.nets[name].running = self.listed()[name]["state"] == "running"

        net = self.nets[name]
        return Op("start", f"start {name} ({net.dhcp}, {net.taps} taps)", "root", "Start", "s",
                  (name,), done, unknown, f"start/{net.dhcp}")

    def op_stop(self, name: str) -> Op:
        def done(_):
            self.nets[name].running = False
            self._drop_ports(name, all_of_them=True)

        def unknown():
            running = self.listed()[name]["state"] == "running"
            self.nets[name].running = running
            # stopping removes the network's ports first: if it came back running, its ports
            # may be gone, but each wholly
            self._drop_ports(name, all_of_them=not running)

        net = self.nets[name]
        return Op("stop", f"stop {name} ({net.dhcp}, {net.taps} taps, "
                  f"{len(self._ports_on(name))} ports)", "root", "Stop", "s", (name,), done,
                  unknown, f"stop/{net.dhcp}")

    def op_attach(self, name: str) -> Op:
        vm = self.fresh("vm")

        def done(out):
            info = out[0]
            if info["network"] != name or info["vm"] != vm:
                raise Failure(f"attach {name}/{vm} answered {info}")
            self.ports[info["ifname"]] = Port(info["ifname"], name, vm, info["mac"])
            self.macs[(name, vm, 0)] = info["mac"]

        def unknown():
            pass  # without the reply nobody holds the tap: it must be gone (checked)

        return Op("attach", f"attach {name}/{vm} (as {ALICE})", "alice", "Attach", "ssa{sv}",
                  (name, vm, {"nic": 0, "queues": 1}), done, unknown)

    def op_forward_add(self, name: str) -> Op:
        net = self.nets[name]
        self.fwd_port += 1
        port = self.fwd_port
        target = str(net.subnet.network_address + self.rng.randrange(2, 250))
        tport = self.rng.choice([22, 80, 443, 8080])
        spec = {"proto": self.rng.choice(["tcp", "udp"]), "external": str(port),
                "to": f"{target}:{tport}", "family": 4}
        want = (spec["proto"], target, tport)

        def done(_):
            net.forwards[port] = want

        def unknown():
            if port in self.forwards_of(name):
                net.forwards[port] = want

        return Op("forward-add", f"forward add {name} {spec['proto']} {port} {target}:{tport}",
                  "root", "AddForward", "sa{sv}", (name, spec), done, unknown)

    def op_forward_remove(self, name: str) -> Op:
        net = self.nets[name]
        port = self.rng.choice(sorted(net.forwards))
        proto = net.forwards[port][0]

        def done(_):
            del net.forwards[port]

        def unknown():
            if port not in self.forwards_of(name):
                del net.forwards[port]

        return Op("forward-remove", f"forward remove {name} {proto} {port}", "root",
                  "RemoveForward", "sa{sv}",
                  (name, {"proto": proto, "external": str(port), "family": 4}), done, unknown)

    def op_host_add(self, name: str) -> Op:
        net = self.nets[name]
        used = {ip for _, ip in net.hosts.values()}
        free = [str(net.subnet.network_address + i) for i in range(2, 32)
                if str(net.subnet.network_address + i) not in used]
        ip = self.rng.choice(free)
        vm = self.fresh("h")
        n = self.counter
        mac = f"52:54:00:9{SPECS[name]['subnet'].split('.')[2]}:{n >> 8:02x}:{n & 255:02x}"

        def done(_):
            net.hosts[vm] = (mac, ip)

        def unknown():
            hosts = self.hosts_of(name)
            if vm in hosts:
                net.hosts[vm] = (mac, ip)

        return Op("host-add", f"host add {name} {vm} {ip} {mac} ({net.dhcp}, "
                  f"{'running' if net.running else 'stopped'})", "root", "AddHost", "ssa{sv}",
                  (name, vm, {"ip": ip, "mac": mac}), done, unknown,
                  f"host-add/{net.dhcp if net.running else 'stopped'}")

    def op_host_remove(self, name: str) -> Op:
        net = self.nets[name]
        vm = self.rng.choice(sorted(net.hosts))

        def done(_):
            del net.hosts[vm]

        def unknown():
            if vm not in self.hosts_of(name):
                del net.hosts[vm]

        return Op("host-remove", f"host remove {name} {vm}", "root", "RemoveHost", "ss",
                  (name, vm), done, unknown)

    def op_mac(self, name: str) -> Op:
        vm, nic = self.fresh("m"), self.rng.randrange(3)

        def done(out):
            self.macs[(name, vm, nic)] = out[0]

        def unknown():
            pass  # maybe given, maybe not: nobody was told

        return Op("mac", f"mac {name} {vm} nic {nic}", "root", "GetMac", "ssu", (name, vm, nic),
                  done, unknown)

    # --- helpers for the model --------------------------------------------------------------
    def _ports_on(self, name: str) -> list[Port]:
        return [p for p in self.ports.values() if p.network == name]

    def _drop_ports(self, name: str, all_of_them: bool) -> None:
        listed = set() if all_of_them else {p["ifname"] for p in self.q("ListPorts")}
        for p in self._ports_on(name):
            if p.ifname not in listed:
                self.alice.close_port(p.ifname)
                del self.ports[p.ifname]

    def close_port(self, ifname: str) -> None:
        self.alice.close_port(ifname)
        del self.ports[ifname]
        self.history.append(f"close port {ifname}")

    def forwards_of(self, name: str) -> dict[int, tuple[str, str, int]]:
        out = {}
        for f in self.q("ListForwards", "s", name):
            out[int(f["port"])] = (f["proto"], f["target"], int(f["target-port"]))
        return out

    def hosts_of(self, name: str) -> dict[str, tuple[str, str]]:
        return {h["vm"]: (h["mac"], h["ip"]) for h in self.q("ListHosts", "s", name)}

    # --- planning: an operation of the given kind, with what it needs done first ------------
    def defined(self) -> list[str]:
        return sorted(self.nets)

    def plan(self, kind: str) -> tuple[list[Any], Any]:
        """(uninterrupted set-up steps, the step to interrupt): each a thunk that makes its Op
        when its turn comes, from the model as the steps before it left it."""
        rng, nets = self.rng, self.nets
        setup: list[Any] = []
        later = {n: dict(defined=True, running=nets[n].running) for n in nets}

        def define(name: str) -> None:
            setup.append(lambda: self.op_define(name))
            later[name] = dict(defined=True, running=False)

        def start(name: str) -> None:
            setup.append(lambda: self.op_start(name))
            later[name]["running"] = True

        def stop(name: str) -> None:
            setup.append(lambda: self.op_stop(name))
            later[name]["running"] = False

        def undefine(name: str) -> None:
            setup.append(lambda: self.op_undefine(name))
            del later[name]

        def ensure_defined() -> str:
            free = [n for n in SPECS if n not in later]
            if later and (not free or rng.random() < 0.8):
                return rng.choice(sorted(later))
            name = rng.choice(free)
            define(name)
            return name

        def ensure_running() -> str:
            running = sorted(n for n in later if later[n]["running"])
            if running and rng.random() < 0.85:
                return rng.choice(running)
            stopped = sorted(n for n in later if not later[n]["running"])
            if not stopped:
                if running:
                    return rng.choice(running)
                stopped = [ensure_defined()]
            name = rng.choice(stopped)
            start(name)
            return name

        def ensure_stopped() -> str:
            stopped = sorted(n for n in later if not later[n]["running"])
            if stopped:
                return rng.choice(stopped)
            free = [n for n in SPECS if n not in later]
            if free:
                name = rng.choice(free)
                define(name)
                return name
            name = rng.choice(sorted(later))
            stop(name)
            return name

        if kind == "define":
            free = [n for n in SPECS if n not in later]
            if not free:
                name = ensure_stopped()
                undefine(name)
                free = [name]
            name = rng.choice(free)
            return setup, lambda: self.op_define(name)
        if kind == "undefine":
            name = ensure_stopped()
            return setup, lambda: self.op_undefine(name)
        if kind == "start":
            name = ensure_stopped()
            return setup, lambda: self.op_start(name)
        if kind == "stop":
            name = ensure_running()
            if not self._ports_on(name) and rng.random() < 0.5:
                setup.append(lambda: self.op_attach(name))  # a stop with ports to remove
            return setup, lambda: self.op_stop(name)
        if kind == "attach":
            name = ensure_running()
            return setup, lambda: self.op_attach(name)
        if kind == "forward-add":
            name = ensure_running() if rng.random() < 0.75 else ensure_defined()
            return setup, lambda: self.op_forward_add(name)
        if kind == "forward-remove":
            with_fwd = sorted(n for n in later if nets[n].forwards)
            if with_fwd and rng.random() < 0.9:
                name = rng.choice(with_fwd)
            else:
                name = ensure_running()
                setup.append(lambda: self.op_forward_add(name))
            return setup, lambda: self.op_forward_remove(name)
        if kind == "host-add":
            name = ensure_running() if rng.random() < 0.75 else ensure_defined()

            def host_add() -> Op:
                if len(self.nets[name].hosts) >= 12:  # keep the address pool open
                    self.run(self.op_host_remove(name))
                return self.op_host_add(name)

            return setup, host_add
        if kind == "mac":
            name = ensure_defined()
            return setup, lambda: self.op_mac(name)
        raise AssertionError(kind)

    # --- the checks -------------------------------------------------------------------------
    def _settled_spare(self, ifname: str) -> dict | None:
        """A spare tap once its making is surely over: on a bridge, or gone (vnetd holds its
        only fd), within two seconds; as it is then if neither (stranded off its bridge for
        good: a leak)."""
        deadline = time.monotonic() + 2.0
        lk: dict | None = None
        while time.monotonic() < deadline:
            r = self.vnetd.exec("ip", "-j", "-d", "link", "show", "dev", ifname, check=False)
            if r.returncode != 0:
                return {"ifalias": "", "master": None, "gone": True}
            lk = json.loads(r.stdout)[0]
            if lk.get("master"):
                return lk
            time.sleep(0.05)
        return lk

    def check(self) -> list[str]:
        """Everything that is wrong now, as sentences (empty: consistent)."""
        problems: list[str] = []
        v = self.vnetd
        if not v.alive():
            return ["vnetd is not running"]

        # 1. what the daemon says
        listed = self.listed()
        if set(listed) != set(self.nets):
            problems.append(f"networks defined: vnetd lists {sorted(listed)}, the client was "
                            f"told {sorted(self.nets)}")
        for name, net in self.nets.items():
            got = listed.get(name)
            if got is None:
                continue
            want_state = "running" if net.running else "stopped"
            if got["state"] != want_state:
                problems.append(f"{name} is {got['state']}, the client was told {want_state}")
            if got.get("taps", 0) != net.taps or got["subnet"] != net.spec["subnet"]:
                problems.append(f"{name}'s definition changed: {got}")

        running = {n: net for n, net in self.nets.items() if listed.get(n, {}).get("state")
                   == "running"}
        # 2. links and addresses: exactly lo, the running bridges, their taps and held ports
        links = {lk["ifname"]: lk for lk in v.ipj("-d", "link", "show")}
        addrs = {a["ifname"]: {(ai["local"], ai["prefixlen"]) for ai in a.get("addr_info", [])
                               if not ai["local"].startswith("fe80:")}
                 for a in v.ipj("addr", "show")}
        # spare taps (made ahead of attaches): at most two per running network, on its bridge,
        # held pending by the firewall; never any of a network that is not running
        spares = v.spare_taps() & set(links)
        per_net: dict[str, int] = {}
        for x in sorted(spares):
            lk = links[x]
            if (lk.get("ifalias") or "").removeprefix("qemu-vnet:") not in running \
                    or lk.get("master") != (lk.get("ifalias") or "").removeprefix("qemu-vnet:"):
                # one being made right now (a worker thread makes the tap, then puts it on
                # its bridge, all the while held pending): look again once it had time
                lk = self._settled_spare(x) or lk
            if lk.get("gone"):
                continue  # it went with vnetd's fd (or a stop), as a spare must
            alias = lk.get("ifalias") or ""
            owner = alias.removeprefix("qemu-vnet:")
            per_net[owner] = per_net.get(owner, 0) + 1
            if owner not in running or lk.get("master") != owner:
                problems.append(f"spare tap {x} ({alias}, on {lk.get('master')}) is not "
                                "on a running network's bridge")
        problems += [f"{n} has {k} spare taps" for n, k in per_net.items() if k > 2]
        want_links = {"lo"}
        for name, net in running.items():
            want_links |= {name, *net.tap_names}
        live_ports = {p.ifname for p in self.ports.values() if p.network in running}
        # a network's -n taps are guarded ports of root's too
        tap_ports = {t for net in running.values() for t in net.tap_names}
        want_links |= live_ports
        if set(links) - spares != want_links - spares or want_links - set(links):
            extra = [(x, links[x].get("linkinfo", {}).get("info_kind"), links[x].get("ifalias"),
                      sorted(addrs.get(x, ()))) for x in sorted(set(links) - want_links - spares)]
            problems.append(f"links: extra (name, kind, alias, addresses) {extra}, missing "
                            f"{sorted(want_links - set(links))}")
        for name, net in running.items():
            br = links.get(name)
            if br is None:
                continue
            alias = f"qemu-vnet:{name}"
            if br.get("linkinfo", {}).get("info_kind") != "bridge" or br.get("ifalias") != alias \
                    or "UP" not in br["flags"]:
                problems.append(f"bridge {name} is not whole: kind "
                                f"{br.get('linkinfo', {}).get('info_kind')}, alias "
                                f"{br.get('ifalias')}, flags {br['flags']}")
            want_addr = {(str(net.subnet.network_address + 1), net.subnet.prefixlen)}
            if "subnet6" in net.spec:
                s6 = ipaddress.ip_network(net.spec["subnet6"])
                want_addr.add((str(s6.network_address + 1), s6.prefixlen))
            if addrs.get(name, set()) != want_addr:
                problems.append(f"bridge {name} has addresses {sorted(addrs.get(name, set()))}, "
                                f"wants {sorted(want_addr)}")
            for t in net.tap_names:
                lk = links.get(t)
                if lk is None:
                    continue
                if lk.get("master") != name or lk.get("ifalias") != alias or "UP" not in \
                        lk["flags"] or not lk["linkinfo"]["info_data"].get("persist"):
                    problems.append(f"tap {t} is not whole: master {lk.get('master')}, alias "
                                    f"{lk.get('ifalias')}, flags {lk['flags']}")
        for ifname in live_ports:
            lk = links.get(ifname)
            p = self.ports[ifname]
            if lk is not None and (lk.get("master") != p.network
                                   or lk.get("ifalias") != f"qemu-vnet:{p.network}"):
                problems.append(f"port {ifname} is not on its bridge: master {lk.get('master')}, "
                                f"alias {lk.get('ifalias')}")

        # 3. DHCP servers: exactly one per running network (two processes for dhcpd), and the
        # pid file names it (or the next restart would start a second)
        servers: dict[str, list[int]] = {}
        for pid, cmd in proc_cmdlines(str(v.runtime_dir)).items():
            # the program, or the gate it is spawned behind (same pid, about to exec it)
            if any(w.startswith("/") and w.endswith(("/dnsmasq", "/dhcpd"))
                   for w in cmd.split()):
                conf = next((w.split("=", 1)[-1] for w in cmd.split()
                             if w.endswith(("dnsmasq.conf", "dhcpd.conf"))), cmd)
                servers.setdefault(conf, []).append(pid)
        want_servers = {}
        for name, net in running.items():
            if net.dhcp != "none":
                want_servers[str(v.runtime_dir / name / "dnsmasq.conf")] = "dnsmasq.pid"
            if net.dhcp == "dhcpd":
                want_servers[str(v.runtime_dir / name / "dhcpd.conf")] = "dhcpd.pid"
        for conf, pids in sorted(servers.items()):
            if conf not in want_servers:
                problems.append(f"orphan DHCP server(s) {pids} for {conf}")
            elif len(pids) != 1:
                problems.append(f"{len(pids)} servers {pids} for {conf}")
        for conf, pidfile in sorted(want_servers.items()):
            pids = servers.get(conf, [])
            if not pids:
                problems.append(f"no DHCP server for {conf}")
                continue
            try:
                named = int((Path(conf).parent / pidfile).read_text())
            except (OSError, ValueError) as e:
                named = f"unreadable ({e})"
            if named not in pids:
                problems.append(f"pid file {pidfile} of {conf} names {named}, the server is "
                                f"{pids}")

        # ... and bound to their gateway's DNS port, and vnetd's own view agrees
        listening = v.exec("ss", "-H", "-lnup").stdout
        for name, net in running.items():
            if net.dhcp == "none":
                continue
            gw = f"{net.subnet.network_address + 1}:53 "
            owners = [ln for ln in listening.splitlines() if gw in ln]
            dns = servers.get(str(v.runtime_dir / name / "dnsmasq.conf")) or ["?"]
            want_pid = f"pid={dns[0]},"
            if not owners or not all(want_pid in ln for ln in owners):
                problems.append(f"{gw.strip()} of {name} is served by {owners}, not by its "
                                f"supervised dnsmasq ({want_pid.rstrip(',')})")
            status = self.q("GetNetwork", "s", name).get("servers", [])
            if not status or any(st.get("state") != "running" or "pid" not in st
                                 for st in status):
                problems.append(f"vnetd reports the servers of {name} as {status}")
            if net.dhcp == "dhcpd":
                conf = (v.runtime_dir / name / "dhcpd.conf").read_text()
                macs = sorted(re.findall(r"hardware ethernet\s+([0-9a-fA-F:]+);", conf))
                if macs != sorted(mac for mac, _ in net.hosts.values()):
                    problems.append(f"dhcpd.conf of {name} has hosts {macs}, the definition "
                                    f"{sorted(net.hosts.values())}")

        # 4. the firewall: our sets and maps hold exactly the running networks' objects
        sets = nft_sets(v)
        if running or sets:
            bridges = sorted(sets.get(("inet", "bridges"), []))
            if bridges != sorted(running):
                problems.append(f"nft set bridges holds {bridges}, running: {sorted(running)}")
            fwd_ip = Counter()
            fwd_port = Counter()
            for (fam, mname), elems in sets.items():
                if fam != "inet" or not mname.startswith("fwd"):
                    continue
                for key, value in elems:
                    proto, port = key["concat"][-2:]
                    if mname == "fwd4_ip":
                        fwd_ip[(proto, int(port), value)] += 1
                    elif mname == "fwd4_port":
                        fwd_port[(proto, int(port), int(value))] += 1
                    else:
                        problems.append(f"unexpected element {key} -> {value} in map {mname}")
            want_ip = Counter()
            want_port = Counter()
            for net in running.values():
                for port, (proto, target, tport) in net.forwards.items():
                    want_ip[(proto, port, target)] += 1
                    want_port[(proto, port, tport)] += 1
            if fwd_ip != want_ip or fwd_port != want_port:
                problems.append(f"nft forward maps: extra {sorted((fwd_ip - want_ip).elements())}"
                                f", missing {sorted((want_ip - fwd_ip).elements())}; ports extra "
                                f"{sorted((fwd_port - want_port).elements())}, missing "
                                f"{sorted((want_port - fwd_port).elements())}")
            guarded = sorted(sets.get(("bridge", "guarded"), []))
            if guarded != sorted(live_ports | tap_ports):
                problems.append(f"nft set guarded holds {guarded}, ports: "
                                f"{sorted(live_ports | tap_ports)}")

        # 5. definitions, forwards and static hosts: nothing lost, nothing extra or doubled
        nets_dir = v.config_dir / "networks"
        for name in SPECS:
            toml = nets_dir / f"{name}.toml"
            fdir = nets_dir / f"{name}.forwards"
            net = self.nets.get(name)
            if net is None:
                if toml.exists():
                    problems.append(f"{toml} exists but {name} was undefined")
                if fdir.exists() and any(fdir.iterdir()):
                    problems.append(f"{name} was undefined but its forwards are still on disk: "
                                    f"{sorted(p.name for p in fdir.iterdir())} (a network "
                                    f"defined again under that name would get them)")
                continue
            if not toml.exists():
                problems.append(f"the definition file {toml} is gone")
            if name not in listed:
                continue
            fw = self.forwards_of(name)
            if fw != net.forwards:
                problems.append(f"forward list {name}: {fw}, the client was told {net.forwards}")
            listed_fwd = self.q("ListForwards", "s", name)
            if len(listed_fwd) != len(fw):
                problems.append(f"forward list {name} repeats a forward: {listed_fwd}")
            files = sorted(p.name for p in fdir.glob("*.toml")) if fdir.is_dir() else []
            if len(files) != len(net.forwards):
                problems.append(f"{fdir} holds {files} for {len(net.forwards)} forwards")
            hosts = self.hosts_of(name)
            if hosts != net.hosts:
                problems.append(f"host list {name}: {hosts}, the client was told {net.hosts}")
            if name in running and net.dhcp != "none":
                hf = v.runtime_dir / name / "hosts.dhcp"
                lines = sorted(hf.read_text().split()) if hf.exists() else None
                static = [x for x in lines or [] if x.count(",") == 2]
                want = sorted(f"{mac},{ip},{vm.lower()}" for vm, (mac, ip) in net.hosts.items())
                if lines is None or static != want:
                    problems.append(f"{hf} holds {lines}, the definition says {want}")
                # the other lines name registered VMs (MAC,name of a VM's first NIC)
                registry = self.q("ExportMacs", "s", name)
                for line in lines or []:
                    if line.count(",") == 1:
                        mac, vm_name = line.split(",")
                        if not any(registry.get(k) == mac and k.rpartition("/")[0].lower()
                                   == vm_name and k.endswith("/0") for k in registry):
                            problems.append(f"{hf} names {mac} {vm_name}, which is no "
                                            f"registered VM's first NIC: {registry}")

        # 6. ports: the ones their holder has, each once; records for exactly those
        ports = self.q("ListPorts")
        names = [p["ifname"] for p in ports]
        keys = [(p["network"], p["vm"], p["nic"]) for p in ports]
        if len(set(names)) != len(names) or len(set(keys)) != len(keys):
            problems.append(f"duplicate ports: {ports}")
        if set(names) != live_ports | tap_ports:
            problems.append(f"ports listed {sorted(names)}, held by their holder "
                            f"{sorted(live_ports)}, -n taps {sorted(tap_ports)}")
        records = {p.stem for p in (v.runtime_dir / "ports").glob("*.json")}
        if records != live_ports | tap_ports:
            problems.append(f"port records {sorted(records)}, ports "
                            f"{sorted(live_ports | tap_ports)}")

        # 7. MACs handed out: the same from vnetd, and in the registry on disk (a file per
        # network, <network>.macs.json)
        reg: dict[str, dict] = {}
        for f in v.state_dir.glob("*.macs.json"):
            try:
                reg[f.name[:-len(".macs.json")]] = json.loads(f.read_text())["macs"]
            except (OSError, ValueError, KeyError) as e:
                problems.append(f"{f.name} unreadable: {e}")
        for (net_name, vm, nic), mac in sorted(self.macs.items()):
            if reg.get(net_name, {}).get(f"{vm}/{nic}") != mac:
                problems.append(f"MAC of {net_name}/{vm} nic {nic} ({mac}) is not in "
                                f"{net_name}.macs.json "
                                f"(has {reg.get(net_name, {}).get(f'{vm}/{nic}')})")
            if net_name in listed:
                got = self.q("GetMac", "ssu", net_name, vm, nic)
                if got != mac:
                    problems.append(f"mac --br={net_name} --vm={vm} --nic={nic} is {got}, was "
                                    f"{mac}")

        # 8. every file still loads cleanly (nothing half-written), and no crash in the log
        reload = self.q("Reload")
        if reload:
            problems.append(f"reload reports problems: {reload}")
        log = v.log()[self.log_mark:]
        if "Traceback" in log:
            problems.append("the vnetd log has a traceback:\n"
                            + log[log.index("Traceback"):][:3000])
        return problems


# --- the test -----------------------------------------------------------------------------------
def calibrate(w: World) -> dict[str, float]:
    """Each operation's duration here (sent mark to reply), uninterrupted: the kill windows."""
    seen: dict[str, list[float]] = {}

    def timed(op: Op) -> None:
        d = w.drv(op.driver)
        mark = len(w.vnetd.log())
        d.begin(op.member, op.sig, *op.args)
        t0 = time.monotonic()
        try:
            r = d.finish()
        except CallLost:
            if not w.lost(d, mark, op.desc):
                raise
            d = w.drv(op.driver)
            d.begin(op.member, op.sig, *op.args)
            t0 = time.monotonic()
            r = d.finish()
        took = time.monotonic() - t0
        for key in {op.kind, op.window}:
            seen.setdefault(key, []).append(took)
        if "ok" not in r:
            raise Failure(f"calibration: {op.desc} failed: {r}")
        op.done(r["ok"])
        w.history.append(f"{op.desc}: ok (calibration, {took * 1000:.1f} ms)")

    by_dhcp = {}
    for name in SPECS:
        by_dhcp.setdefault(SPECS[name].get("dhcp", "dnsmasq"), name)
    for name in by_dhcp.values():
        for _ in range(2):
            timed(w.op_define(name))
            timed(w.op_host_add(name))
            timed(w.op_start(name))
            for _ in range(2):
                timed(w.op_attach(name))
                timed(w.op_forward_add(name))
                timed(w.op_host_add(name))
                timed(w.op_mac(name))
            timed(w.op_forward_remove(name))
            timed(w.op_stop(name))
            for _vm in list(w.nets[name].hosts):
                w.run(w.op_host_remove(name))
            while w.nets[name].forwards:
                w.run(w.op_forward_remove(name))
            timed(w.op_undefine(name))
    for name in list(by_dhcp.values())[:2]:  # start-up with networks to adopt
        w.run(w.op_define(name))
        w.run(w.op_start(name))
    for _ in range(2):
        w.vnetd.kill()
        t0 = time.monotonic()
        w.restart()
        seen.setdefault("restart", []).append(time.monotonic() - t0)
        w.restarted()
    return {k: max(v) * 1.3 + 0.0005 for k, v in seen.items()}


def schedule(rng: random.Random, kills: int) -> list[str]:
    """Exactly `kills` operation kinds, shared as WEIGHTS says, in a seeded order."""
    total = sum(WEIGHTS.values())
    kinds = [k for k, wt in WEIGHTS.items() for _ in range(int(kills * wt / total))]
    rest = sorted(WEIGHTS, key=lambda k: -(kills * WEIGHTS[k] / total) % 1)
    kinds += rest[:kills - len(kinds)]
    rng.shuffle(kinds)
    return kinds


def test_sigkill_inside_operations_loses_and_duplicates_nothing(vnetd):
    rng = random.Random(SEED)
    replay = f"VNET_CRASH_SEED={SEED} VNET_CRASH_KILLS={KILLS}"
    if os.environ.get("VNET_CRASH_OPS"):
        replay += f" VNET_CRASH_OPS={os.environ['VNET_CRASH_OPS']}"
    w = World(vnetd, rng)
    started = time.monotonic()
    try:
        windows = calibrate(w)
        problems = w.check()
        assert not problems, f"[{replay}] inconsistent before any kill: {problems}"
        strata: dict[str, list[int]] = {}
        stats: Counter = Counter()
        restarts: list[float] = []
        plan = schedule(rng, KILLS)

        def next_cut(window: str) -> int:
            if not strata.get(window):
                strata[window] = rng.sample(range(STRATA), STRATA)
            return strata[window].pop()

        def report(i: int, what: str, problems: list[str]) -> None:
            if not problems:
                return
            log = vnetd.log()
            raise AssertionError(
                f"[{replay}] kill {i}/{len(plan)}: {what}:\n  - " + "\n  - ".join(problems)
                + "\nrecent operations:\n  " + "\n  ".join(w.history[-12:])
                + "\nvnetd log of the killed run's end and the restart:\n"
                + log[max(0, w.log_mark - 2500):][-7000:])

        for i, kind in enumerate(plan, 1):
            # keep a handful of ports held, the rest closed by their holder as a VM would
            while len(w.ports) > 6:
                w.close_port(rng.choice(sorted(w.ports)))
            if kind == "restart":
                cut = next_cut(kind)
                delay = windows["restart"] * (cut + rng.random()) / STRATA
                desc = "restart (kill inside start-up reconcile)"
                try:
                    outcome, took = w.kill_in_startup(delay)
                    restarts.append(took)
                    stats[(kind, outcome)] += 1
                    problems = w.check()
                except Failure as e:
                    problems = [str(e)]
                report(i, f"{desc}, SIGKILL {delay * 1000:.1f} ms after vnetd was started "
                          f"(window {windows['restart'] * 1000:.0f} ms)", problems)
                continue
            setup, main = w.plan(kind)
            for step in setup:
                w.run(step())
            op = main()
            cut = next_cut(op.window)
            window = windows.get(op.window) or windows[op.kind]
            delay = window * (cut + rng.random()) / STRATA
            try:
                outcome, took = w.run_killed(op, delay)
                restarts.append(took)
                stats[(op.window, outcome)] += 1
                problems = w.check()
            except Failure as e:
                problems = [str(e)]
            report(i, f"{op.desc}, SIGKILL {delay * 1000:.2f} ms after the call was sent "
                      f"(window {window * 1000:.1f} ms)", problems)
        elapsed = time.monotonic() - started
        print(f"\ncrash consistency: seed {SEED}, {len(plan)} kills in {elapsed:.1f} s; "
              f"restart mean {sum(restarts) / len(restarts) * 1000:.0f} ms, max "
              f"{max(restarts) * 1000:.0f} ms\n  windows (ms): "
              + ", ".join(f"{k} {v * 1000:.1f}" for k, v in sorted(windows.items()))
              + "\n  kills: " + ", ".join(f"{k} {o}: {n}" for (k, o), n in sorted(stats.items()))
              + "".join(f"\n  (not vnetd's doing, waited out: {f})" for f in w.foreign))
        assert len(plan) == KILLS
    except DriverError as e:  # a call vnetd never answered: say where it waits
        raise DriverError(f"{e}\nrecent operations:\n  " + "\n  ".join(w.history[-12:])
                          + "\n" + vnetd.stacks()) from None
    finally:
        w.close()


# --- damaged files on disk ----------------------------------------------------------------------
DAMAGE = {
    "empty": lambda b: b"",
    "truncated": lambda b: b[: len(b) // 2],
    "zeros": lambda b: b"\0" * len(b),  # what a crash without fsync can leave on ext4
    "garbage": lambda b: bytes(range(128, 256)) + b[10:],
}


@pytest.fixture
def world(vnetd):
    w = World(vnetd, random.Random(SEED))
    # start from a clean slate: whatever the crash test left is not this test's business
    for n in w.listed().values():
        if n["state"] == "running":
            w.q("Stop", "s", n["name"])
        w.q("Undefine", "s", n["name"])
    yield w
    w.close()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_definition_is_reported_and_the_last_good_copy_used(vnetd, world, damage):
    w = world
    w.run(w.op_define("ck2"))
    w.run(w.op_start("ck2"))
    w.run(w.op_forward_add("ck2"))
    w.run(w.op_host_add("ck2"))
    w.run(w.op_attach("ck2"))
    w.run(w.op_define("ck3"))
    path = vnetd.config_dir / "networks" / "ck2.toml"
    good = path.read_bytes()
    for restart in ("kill", "stop"):
        path.write_bytes(DAMAGE[damage](good))
        mark = len(vnetd.log())
        if restart == "kill":
            vnetd.kill()
        else:
            vnetd.stop()
        vnetd.start()  # raises if vnetd does not come up (a crash loop)
        w.restarted()
        w.log_mark = mark
        problems = w.check()  # includes: ck2 still running and whole, forwards, hosts, port
        problems = [p for p in problems if not p.startswith("reload reports problems")]
        assert not problems, f"[{damage}, {restart}] " + "\n".join(problems)
        log = vnetd.log()[mark:]
        assert str(path) in log and "last good copy" in log, log[-3000:]
        reported = w.q("Reload")
        assert len(reported) == 1 and str(path) in reported[0], reported
        assert "last good copy" in reported[0], reported
        assert path.read_bytes() == DAMAGE[damage](good), "the damaged file was not kept for " \
            "the admin to look at"
    # a change through vnetd writes a whole file again
    w.q("SetAutostart", "sb", "ck2", False)
    assert w.q("Reload") == []


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_forward_file_is_reported_and_the_forward_kept(vnetd, world, damage):
    w = world
    w.run(w.op_define("ck1"))
    w.run(w.op_start("ck1"))
    w.run(w.op_forward_add("ck1"))
    w.run(w.op_forward_add("ck1"))
    fdir = vnetd.config_dir / "networks" / "ck1.forwards"
    victim = sorted(fdir.glob("*.toml"))[0]
    damaged = DAMAGE[damage](victim.read_bytes())
    victim.write_bytes(damaged)
    mark = len(vnetd.log())
    vnetd.kill()
    vnetd.start()
    w.restarted()
    w.log_mark = mark
    assert str(victim) in vnetd.log()[mark:], "the damaged forward file was not logged"
    reported = w.q("Reload")
    assert any(str(victim) in p for p in reported), reported
    # the forward is still listed and in the kernel's maps (check), the file kept as it was
    problems = [p for p in w.check() if not p.startswith("reload reports problems")]
    assert not problems, f"[{damage}] a damaged forward file:\n" + "\n".join(problems)
    assert victim.read_bytes() == damaged


@pytest.mark.parametrize("damage", sorted(DAMAGE) + ["wrong-shape"])
def test_damaged_mac_registry_is_reported_and_the_last_good_copy_used(vnetd, world, damage):
    w = world
    w.run(w.op_define("ck4"))
    # MACs that a fresh registry could not derive again (imported), and derived ones
    imported = {f"old{i}": f"52:54:00:ee:00:{i:02x}" for i in range(3)}
    assert w.q("ImportMacs", "sa{ss}", "ck4", imported) == 3
    for vm, mac in imported.items():
        w.macs[("ck4", vm, 0)] = mac
    for _ in range(4):  # the registry's previous copy has all but the last of these
        w.run(w.op_mac("ck4"))
    path = vnetd.state_dir / "ck4.macs.json"  # the network's entries and owners
    good = path.read_bytes()
    damaged = b"[]" if damage == "wrong-shape" else DAMAGE[damage](good)
    path.write_bytes(damaged)
    mark = len(vnetd.log())
    vnetd.kill()
    vnetd.start()
    log = vnetd.log()[mark:]
    said = [ln for ln in log.splitlines() if str(path) in ln and ln.startswith(("ERROR", "WARN"))]
    assert said, f"the damaged {path} was not reported in the log:\n{log[-3000:]}"
    # the good copy now in use must survive the next restart too, also when nothing was handed
    # out in between (which would have written the registry again)
    vnetd.kill()
    vnetd.start()
    files = sorted(p.name for p in path.parent.glob("*macs*"))
    for (net, vm, nic), mac in sorted(w.macs.items()):
        got = w.q("GetMac", "ssu", net, vm, nic)
        assert got == mac, (f"{net}/{vm} nic {nic} was {mac}, is {got} after two restarts "
                            f"(the state directory had {files} after the second)")
    # and on disk again, with all of them, after the next hand-out
    w.run(w.op_mac("ck4"))
    for (net, vm, nic), mac in w.macs.items():
        reg = json.loads((path.parent / f"{net}.macs.json").read_text())["macs"]
        assert reg[f"{vm}/{nic}"] == mac
    bad = path.with_name("ck4.macs.json.bad")
    assert bad.exists() and bad.read_bytes() == damaged, "the damaged file was not kept aside"
