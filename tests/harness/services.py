"""Start what qemu-vnet needs where systemd is not PID 1: the system bus, polkitd, vnetd.

Used by `make start` and by the test harness. Each step is idempotent: what already runs is
left alone.

    python -m tests.harness.services start [--vnetd]
    python -m tests.harness.services stop-vnetd
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_BUS_SOCKET = Path("/run/dbus/system_bus_socket")
POLKITD = "/usr/lib/polkit-1/polkitd"
VNETD = "/opt/qemu-vnet/bin/vnetd"
LOGDIR = Path("/var/log/qemu-vnet")

POLICY_FILES = {
    ROOT / "dbus/org.qemuvnet.Vnet1.conf": Path("/usr/share/dbus-1/system.d/org.qemuvnet.Vnet1.conf"),
    ROOT / "polkit/org.qemuvnet.Vnet1.policy":
        Path("/usr/share/polkit-1/actions/org.qemuvnet.Vnet1.policy"),
    ROOT / "polkit/rules.d/50-qemu-vnet.rules": Path("/usr/share/polkit-1/rules.d/50-qemu-vnet.rules"),
}


UNIT = ROOT / "systemd/vnetd.service"


def unit_capabilities() -> list[str]:
    """CapabilityBoundingSet= of systemd/vnetd.service, e.g. ['net_admin', ...]."""
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return [c.lower().removeprefix("cap_") for c in line.split("=", 1)[1].split()]
    raise RuntimeError(f"{UNIT} has no CapabilityBoundingSet=")


def sandboxed(argv: list[str]) -> list[str]:
    """argv run as the unit runs it where systemd is not PID 1: root, but holding only the
    unit's capabilities (bounding set, as CapabilityBoundingSet=) and no-new-privs, so tests
    and `make start` prove the daemon works inside the unit's limits."""
    caps = ",".join(f"+{c}" for c in unit_capabilities())
    return ["setpriv", f"--bounding-set=-all,{caps}", f"--inh-caps=-all,{caps}",
            "--no-new-privs", "--", *argv]


def dbus_send(*args: str, timeout: float = 5) -> subprocess.CompletedProcess:
    return subprocess.run(["dbus-send", "--system", "--print-reply", *args],
                          capture_output=True, text=True, timeout=timeout)


def bus_up() -> bool:
    if not SYSTEM_BUS_SOCKET.exists():
        return False
    r = dbus_send("--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                  "org.freedesktop.DBus.GetId")
    return r.returncode == 0


def name_owner_pid(name: str) -> int | None:
    r = dbus_send("--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                  "org.freedesktop.DBus.GetConnectionUnixProcessID", f"string:{name}")
    if r.returncode != 0:
        return None
    return int(r.stdout.split()[-1])


def has_owner(name: str) -> bool:
    r = dbus_send("--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                  "org.freedesktop.DBus.NameHasOwner", f"string:{name}")
    return r.returncode == 0 and r.stdout.split()[-1] == "true"


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def install_policy_files() -> bool:
    """Copy the bus policy and polkit files into place; True if anything changed."""
    changed = False
    for src, dst in POLICY_FILES.items():
        data = src.read_bytes()
        if not dst.exists() or dst.read_bytes() != data:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            os.chmod(dst, 0o644)
            changed = True
    return changed


ACTIVATION_FILE = Path("/usr/share/dbus-1/system-services/org.qemuvnet.Vnet1.service")


@contextlib.contextmanager
def activation_parked(path: Path = ACTIVATION_FILE):
    """Hide a D-Bus activation file (and tell the bus) for the duration of the block."""
    parked = path.with_name(path.name + ".parked-by-tests")
    if parked.exists() and not path.exists():
        parked.rename(path)  # left over from an interrupted run
    moved = path.exists()
    if moved:
        path.rename(parked)
        reload_bus()
    try:
        yield
    finally:
        if moved and parked.exists():
            parked.rename(path)
            reload_bus()


@contextlib.contextmanager
def exclusive(path: str = "/run/qemu-vnet-tests.lock"):
    """One test or bench session at a time on this machine: they share the system bus name
    org.qemuvnet.Vnet1, so a second session waits here for the first to finish."""
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another test session to finish ({path})...", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_bus() -> None:
    if bus_up():
        return
    Path("/run/dbus").mkdir(parents=True, exist_ok=True)
    pidfile = Path("/run/dbus/pid")
    if pidfile.exists():
        pidfile.unlink()  # stale: the bus is not answering
    if SYSTEM_BUS_SOCKET.exists():
        SYSTEM_BUS_SOCKET.unlink()
    subprocess.run(["dbus-daemon", "--system", "--fork"], check=True)
    wait_for(bus_up, 10, "the system bus")


def reload_bus() -> None:
    dbus_send("--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
              "org.freedesktop.DBus.ReloadConfig")


def _spawn(argv: list[str], log: str) -> None:
    LOGDIR.mkdir(parents=True, exist_ok=True)
    out = open(LOGDIR / log, "ab")
    subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                     start_new_session=True, close_fds=True)
    out.close()


def ensure_polkitd() -> None:
    if has_owner("org.freedesktop.PolicyKit1"):
        return
    _spawn([POLKITD, "--no-debug"], "polkitd.log")
    wait_for(lambda: has_owner("org.freedesktop.PolicyKit1"), 15, "polkitd")


def ensure_vnetd() -> None:
    if has_owner("org.qemuvnet.Vnet1"):
        return
    _spawn(sandboxed([VNETD]), "vnetd.log")
    wait_for(lambda: has_owner("org.qemuvnet.Vnet1"), 15, f"vnetd (see {LOGDIR}/vnetd.log)")


def stop_vnetd(timeout: float = 10) -> bool:
    pid = name_owner_pid("org.qemuvnet.Vnet1")
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not has_owner("org.qemuvnet.Vnet1"), timeout, "vnetd to exit")
    return True


def start(with_vnetd: bool) -> None:
    if shutil.which("dbus-daemon") is None:
        sys.exit("dbus-daemon is not installed: run 'sudo make install-deps'.")
    changed = install_policy_files()
    ensure_bus()
    if changed:
        reload_bus()
    ensure_polkitd()
    if with_vnetd:
        ensure_vnetd()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.harness.services")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("--vnetd", action="store_true")
    sub.add_parser("stop-vnetd")
    a = p.parse_args()
    if a.cmd == "start":
        start(a.vnetd)
        print("system bus, polkitd" + (" and vnetd" if a.vnetd else "") + " are running.")
    else:
        print("vnetd stopped." if stop_vnetd() else "vnetd was not running.")


if __name__ == "__main__":
    main()
