"""A vnetd under test: its own network namespace, its own config/state/runtime dirs, the real
system bus and polkitd. Also test users and a runner for `vnet-client` as any of them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from . import services

VENV = services.VENV  # the virtualenv the tests run in ($(VENV) under make)
PY = VENV / "bin/python"
CLIENT = VENV / "bin/vnet-client"
ALICE = "vnet-test-alice"  # in group vnet
BOB = "vnet-test-bob"  # not in group vnet
ADMIN = "vnet-test-admin"  # the admin identity for password prompts
ADMIN_PASSWORD = "vnet-test-Pa55word"
RULES_DIR = Path("/etc/polkit-1/rules.d")


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, **kw)


def ensure_users() -> None:
    if sh("getent", "group", "vnet", check=False).returncode != 0:
        sh("groupadd", "--system", "vnet")
    for user, groups in ((ALICE, ["vnet"]), (BOB, []), (ADMIN, [])):
        if sh("id", user, check=False).returncode != 0:
            argv = ["useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh"]
            if groups:
                argv += ["-G", ",".join(groups)]
            sh(*argv, user)
    subprocess.run(["chpasswd"], input=f"{ADMIN}:{ADMIN_PASSWORD}\n", text=True, check=True)


def as_user(user: str, argv: list[str]) -> list[str]:
    """argv run as `user` with its groups, exec'd in place (no forked parent to outlive)."""
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
            "--", *argv]


def uid_of(user: str) -> int:
    return int(sh("id", "-u", user).stdout)


class PolkitRule:
    """A temporary polkit rules file, in force from entering to leaving: each change returns
    once polkitd has re-read its rules (its Changed signal), not after a guessed while (a
    polkitd slower than the guess would answer the next call under the old rules). Its
    first line is RULE_MARK, so that a killed session's file is swept before the next."""

    def __init__(self, name: str, body: str):
        self.path = RULES_DIR / f"{name}.rules"
        self.body = body

    def __enter__(self) -> PolkitRule:
        RULES_DIR.mkdir(parents=True, exist_ok=True)
        fresh = self.path.with_name(f".{self.path.name}.tmp")  # not a *.rules: not read
        fresh.write_text(f"{RULE_MARK} (pid {os.getpid()})\n{self.body}")
        os.chmod(fresh, 0o644)
        polkit_rules_changed(lambda: os.replace(fresh, self.path))
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.path.exists():  # (a test may have taken it away itself)
            return
        try:
            polkit_rules_changed(lambda: self.path.unlink(missing_ok=True))
        finally:  # gone even if the bus could not be asked (the wait is what failed)
            self.path.unlink(missing_ok=True)


# the first line of every rules file the tests write: a session that was killed (SIGKILL, or
# a machine stopped) leaves its file behind, and polkitd would go on granting what it grants
# in the next session's tests; sweep_stale_rules takes such files away before any test runs
RULE_MARK = "// qemu-vnet test harness rule: removed when its test ends"


def sweep_stale_rules() -> list[str]:
    """Remove the rules files an earlier, killed test session left (their first line is
    RULE_MARK with another process's pid; one session runs at a time), once polkitd has
    re-read its rules: their names."""
    stale = []
    for path in sorted(RULES_DIR.glob("*.rules")) if RULES_DIR.is_dir() else ():
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                first = f.readline()
        except OSError:
            continue
        if first.startswith(RULE_MARK) and f"(pid {os.getpid()})" not in first:
            stale.append(path)  # (this session's own rules are in force on purpose)
    for path in stale:
        polkit_rules_changed(lambda path=path: path.unlink(missing_ok=True))
    return [p.name for p in stale]


def sweep_stale_namespaces() -> list[str]:
    """Delete the network namespaces of a killed test session's daemons and guests (vnt-*,
    vng-*) that no process is in any more (one session runs at a time): their names."""
    gone = []
    for line in sh("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(("vnt-", "vng-")):
            continue
        if sh("ip", "netns", "pids", name, check=False).stdout.strip():
            continue  # something still runs there: not ours to take
        sh("ip", "netns", "del", name, check=False)
        gone.append(name)
    return gone


POLKIT_RELOAD_TIMEOUT = 20.0
POLKIT_QUIET = 0.2  # a reload's signals come together; this long without one: all came


def polkit_rules_changed(change) -> None:
    """Run `change` (one change to polkit's rules directory) and return once polkitd has
    re-read its rules: after its Changed signal, and a moment without another (a new file
    can be two events, each a reload). Without a running polkitd, it reads them as it
    starts: nothing to wait for. AssertionError if polkitd stays silent."""
    from jeepney import MatchRule
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    rule = MatchRule(type="signal",
                     interface="org.freedesktop.PolicyKit1.Authority", member="Changed")
    owned = services.has_owner("org.freedesktop.PolicyKit1")
    with open_dbus_connection(bus="SYSTEM") as conn:
        with conn.filter(rule) as signals:
            conn.send_and_get_reply(message_bus.AddMatch(rule), timeout=10)
            change()
            if not owned:
                return
            try:
                conn.recv_until_filtered(signals, timeout=POLKIT_RELOAD_TIMEOUT)
            except TimeoutError:
                raise AssertionError(
                    f"polkitd did not re-read its rules within {POLKIT_RELOAD_TIMEOUT:.0f} s "
                    "of a change to them") from None
            deadline = time.monotonic() + POLKIT_RELOAD_TIMEOUT  # (Changed for other reasons
            while time.monotonic() < deadline:  # may keep coming: never wait on without end)
                try:
                    conn.recv_until_filtered(signals, timeout=POLKIT_QUIET)
                except TimeoutError:
                    return


def grant_rule(user: str, action: str) -> str:
    return (
        "polkit.addRule(function(action, subject) {\n"
        f'  if (action.id == "{action}" && subject.user == "{user}") return polkit.Result.YES;\n'
        "});\n"
    )


def run_client(*args: str, user: str | None = None, timeout: float = 60,
               env: dict[str, str] | None = None,
               check: bool = False) -> subprocess.CompletedProcess:
    """Run vnet-client as root or as `user` (no terminal: no password prompt)."""
    argv = [str(CLIENT), *args]
    if user:
        argv = as_user(user, argv)
    e = dict(os.environ, VNET_CLIENT_DEBUG="1")
    e.pop("VNET_BUS_ADDRESS", None)
    if env:
        e.update(env)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=e,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


class Daemon:
    def __init__(self, label: str = "t", runtime_tmpfs: bool = False):
        """`runtime_tmpfs`: the runtime directory on a tmpfs (/dev/shm), as /run is on a
        host vnetd runs on (for the benches: a file written there costs 20 us, not the
        0.3 ms of this disk)."""
        self.netns = f"vnt-{label[:8]}-{uuid.uuid4().hex[:6]}"
        self.dir = Path(tempfile.mkdtemp(prefix="vnetd-test-"))
        os.chmod(self.dir, 0o755)  # as /run and /var/lib are: dnsmasq reads its files as itself
        self.config_dir = self.dir / "etc"
        self.state_dir = self.dir / "lib"
        self.runtime_dir = self.dir / "run"
        self._tmpfs_dir: Path | None = None
        if runtime_tmpfs and Path("/dev/shm").is_dir():
            self._tmpfs_dir = Path(tempfile.mkdtemp(prefix="vnetd-run-", dir="/dev/shm"))
            os.chmod(self._tmpfs_dir, 0o755)
            self.runtime_dir = self._tmpfs_dir / "run"
        self.log_path = self.dir / "vnetd.log"
        self.proc: subprocess.Popen | None = None
        sh("ip", "netns", "add", self.netns)
        sh("ip", "-n", self.netns, "link", "set", "lo", "up")

    # --- process --------------------------------------------------------------------------
    def start(self, extra: list[str] | None = None, settled: bool = True) -> None:
        """Start vnetd and wait until it owns its bus name; with `settled`, also until it
        has adopted the networks it found running (after a restart it answers first and
        adopts them in the background)."""
        assert self.proc is None or self.proc.poll() is not None
        services.wait_for(lambda: not services.has_owner("org.qemuvnet.Vnet1"), 10,
                          "the previous vnetd to release its bus name")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *services.sandboxed([
                str(PY), "-m", "vnetd",
                "--config-dir", str(self.config_dir), "--state-dir", str(self.state_dir),
                "--runtime-dir", str(self.runtime_dir), "--log-level", "debug", *(extra or [])])],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        mark = len(self.log())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vnetd exited ({self.proc.returncode}):\n{self.log()}")
            if services.name_owner_pid("org.qemuvnet.Vnet1") == self.proc.pid:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"vnetd did not come up:\n{self.log()}")
        while settled and time.monotonic() < deadline + 30:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vnetd exited ({self.proc.returncode}):\n{self.log()}")
            text = self.log()[mark:]
            if " ready on " in text and ("being adopted" not in text or any(
                    m in text for m in ("every network found running is adopted",
                                        "adopting the running networks failed"))):
                return
            time.sleep(0.01)
        if settled:
            raise RuntimeError(f"vnetd did not finish adopting its networks:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stacks(self) -> str:
        """vnetd's pending tasks (SIGUSR1) and threads' stacks (SIGUSR2), with its log's end:
        for a call it never answered."""
        if not self.alive():
            return f"vnetd is not running:\n{self.log()[-6000:]}"
        mark = len(self.log())
        self.proc.send_signal(signal.SIGUSR1)
        # SIGUSR2 only once SIGUSR1's lines are written and the loop waits again:
        # faulthandler reads every thread's frames from a signal handler, and a thread that
        # runs Python meanwhile (the loop logging the tasks) can make that read crash vnetd
        # (seen once in CI, with both signals sent back to back)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and "pending task(s)" not in self.log()[mark:]:
            time.sleep(0.02)
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGUSR2)
        time.sleep(1)
        log = self.log()
        # does it answer a new caller? (a deaf connection, or one call lost on the way)
        try:
            probe = run_client("list", timeout=10)
            answers = f"a new caller's 'list': exit {probe.returncode} {probe.stderr[-300:]}"
        except subprocess.TimeoutExpired:
            answers = "a new caller's 'list' got no answer in 10 s either"
        return f"vnetd's log before the dump:\n{log[max(0, mark - 6000):mark]}\n" \
               f"the dump:\n{log[mark:][:12000]}\n{answers}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def children(self) -> list[int]:
        """Processes (DHCP servers...) started for this daemon: they outlive vnetd by design.
        Their command lines name its directory, or its runtime directory when that is on a
        tmpfs of its own (the benchmarks': missed, their servers outlived every run)."""
        mine = [str(self.dir).encode()]
        if self._tmpfs_dir is not None:
            mine.append(str(self._tmpfs_dir).encode())
        out = []
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmdline = f.read()
                if any(m in cmdline for m in mine):
                    out.append(int(p))
            except OSError:
                pass
        return out

    def close(self) -> None:
        self.stop()
        for pid in self.children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        keep = Path("/tmp/vnetd-test-logs")
        keep.mkdir(exist_ok=True)
        if self.log_path.exists():
            shutil.copy(self.log_path, keep / f"{self.netns}.log")
        sh("ip", "netns", "del", self.netns, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._tmpfs_dir is not None:
            shutil.rmtree(self._tmpfs_dir, ignore_errors=True)

    # --- looking at the namespace ---------------------------------------------------------
    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "-n", self.netns, *args, check=check)

    def ipj(self, *args: str) -> list[dict]:
        return json.loads(self.ip("-j", *args).stdout or "[]")

    def links(self) -> list[dict]:
        return self.ipj("-d", "link", "show")

    def spare_taps(self) -> set[str]:
        """The taps vnetd made ahead of attaches (the firewall's ``pending`` set: a spare is
        in it before its tap exists and until it is handed out)."""
        r = self.exec("nft", "-j", "list", "set", "bridge", "qemu_vnet", "pending",
                      check=False)
        if r.returncode != 0:
            return set()  # no table: no spares
        return {e for o in json.loads(r.stdout)["nftables"] if "set" in o
                for e in o["set"].get("elem", []) if isinstance(e, str)}

    def links_but_spares(self) -> list[dict]:
        """`ip -j link`, less the spare taps (they come and go by themselves, under names
        of their own): read after the links, so a spare made meanwhile is left out too."""
        links = self.ipj("link", "show")
        spares = self.spare_taps()
        return [lk for lk in links if lk["ifname"] not in spares]

    def link_names(self) -> set[str]:
        return {lk["ifname"] for lk in self.links_but_spares()}

    def snapshot(self) -> tuple[list, list]:
        """What `ip -j link` and `ip -j addr` say, less what moves by itself (operstate,
        carrier, lifetimes, spare taps), for 'unchanged' checks."""
        links = sorted(
            (lk["ifname"], lk.get("master"), lk["mtu"], lk.get("address"), lk.get("ifalias"),
             "UP" in lk["flags"])
            for lk in self.links_but_spares())
        addrs = sorted(
            (a["ifname"], ai["local"], ai["prefixlen"])
            for a in self.ipj("addr", "show") for ai in a.get("addr_info", [])
            if not ai["local"].startswith("fe80:"))
        return links, addrs

    def exec(self, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.netns, *argv, check=check, **kw)
