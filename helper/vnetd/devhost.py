"""Run qemu-vnet on a machine where systemd is not PID 1 (a container, a chroot, a CI box):
start the system bus, polkitd and vnetd by hand, stop vnetd, and run the demo.

`make start`, `make stop` and `make demo` use it there (with systemd, `make start` uses the
unit instead), and so does the test harness. Each step is idempotent: what already runs is
left alone.

    python -m vnetd.devhost start [--vnetd] [--venv DIR] [--source DIR]
    python -m vnetd.devhost stop-vnetd
    python -m vnetd.devhost demo [--client PATH] [--source DIR]

vnetd is the one of the virtualenv `--venv` (default: the one this Python runs in, so
`$(VENV)/bin/python -m vnetd.devhost` uses `$(VENV)/bin/vnetd`). It runs as the unit runs it
(systemd/vnetd.service's capability bounding set, no-new-privs), its log in
/var/log/qemu-vnet/vnetd.log. `--source`: a source checkout whose bus policy and polkit files
are copied into place first (`make install-files` installs them otherwise), and whose
systemd unit gives the capabilities (default: the installed unit).
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vnet_common.wire import BUS_NAME

SYSTEM_BUS_SOCKET = Path("/run/dbus/system_bus_socket")
POLKITD = "/usr/lib/polkit-1/polkitd"
POLKIT_NAME = "org.freedesktop.PolicyKit1"
LOGDIR = Path("/var/log/qemu-vnet")
INSTALLED_UNITS = (Path("/etc/systemd/system/vnetd.service"),
                   Path("/lib/systemd/system/vnetd.service"))
ACTIVATION_FILE = Path("/usr/share/dbus-1/system-services/org.qemuvnet.Vnet1.service")

# source file (relative to a checkout) -> where the bus and polkitd read it
POLICY_FILES = {
    "dbus/org.qemuvnet.Vnet1.conf": Path("/usr/share/dbus-1/system.d/org.qemuvnet.Vnet1.conf"),
    "polkit/org.qemuvnet.Vnet1.policy":
        Path("/usr/share/polkit-1/actions/org.qemuvnet.Vnet1.policy"),
    "polkit/rules.d/50-qemu-vnet.rules": Path("/usr/share/polkit-1/rules.d/50-qemu-vnet.rules"),
}


def default_venv() -> Path:
    """The virtualenv this Python runs in (`$(VENV)/bin/python -m vnetd.devhost`)."""
    return Path(sys.prefix)


def unit_file(source: Path | None = None) -> Path:
    """systemd/vnetd.service of the checkout `source`, else the installed unit."""
    if source is not None:
        return source / "systemd/vnetd.service"
    for p in INSTALLED_UNITS:
        if p.is_file():
            return p
    raise RuntimeError("vnetd.service is not installed (run 'sudo make install-files', or "
                       "give --source with a checkout)")


def unit_capabilities(source: Path | None = None) -> list[str]:
    """CapabilityBoundingSet= of vnetd.service, e.g. ['net_admin', ...]."""
    unit = unit_file(source)
    for line in unit.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return [c.lower().removeprefix("cap_") for c in line.split("=", 1)[1].split()]
    raise RuntimeError(f"{unit} has no CapabilityBoundingSet=")


def sandboxed(argv: list[str], source: Path | None = None) -> list[str]:
    """argv run as the unit runs it where systemd is not PID 1: root, but holding only the
    unit's capabilities (bounding set, as CapabilityBoundingSet=) and no-new-privs, so the
    daemon is shown to work inside the unit's limits."""
    caps = ",".join(f"+{c}" for c in unit_capabilities(source))
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


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def install_policy_files(source: Path) -> bool:
    """Copy the checkout's bus policy and polkit files into place; True if any changed."""
    changed = False
    for rel, dst in POLICY_FILES.items():
        data = (source / rel).read_bytes()
        if not dst.exists() or dst.read_bytes() != data:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            os.chmod(dst, 0o644)
            changed = True
    return changed


def reload_bus() -> None:
    dbus_send("--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
              "org.freedesktop.DBus.ReloadConfig")


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


def _spawn(argv: list[str], log: str) -> None:
    LOGDIR.mkdir(parents=True, exist_ok=True)
    with open(LOGDIR / log, "ab") as out:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                         start_new_session=True, close_fds=True)


def ensure_polkitd() -> None:
    if has_owner(POLKIT_NAME):
        return
    _spawn([POLKITD, "--no-debug"], "polkitd.log")
    wait_for(lambda: has_owner(POLKIT_NAME), 15, "polkitd")


def ensure_vnetd(venv: Path | None = None, source: Path | None = None) -> None:
    if has_owner(BUS_NAME):
        return
    vnetd = (venv or default_venv()) / "bin/vnetd"
    if not os.access(vnetd, os.X_OK):
        raise RuntimeError(f"{vnetd} is not there: install qemu-vnet into that virtualenv "
                           "first ('sudo make install-files VENV=...')")
    _spawn(sandboxed([str(vnetd)], source), "vnetd.log")
    wait_for(lambda: has_owner(BUS_NAME), 15, f"vnetd (see {LOGDIR}/vnetd.log)")


def stop_vnetd(timeout: float = 10) -> bool:
    """SIGTERM to the process that owns vnetd's bus name; False when none does."""
    pid = name_owner_pid(BUS_NAME)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not has_owner(BUS_NAME), timeout, "vnetd to exit")
    return True


def start(with_vnetd: bool, venv: Path | None = None, source: Path | None = None) -> None:
    """The system bus and polkitd (and vnetd with `with_vnetd`), each only if not running."""
    if shutil.which("dbus-daemon") is None:
        sys.exit("dbus-daemon is not installed: run 'sudo make install-deps'.")
    changed = install_policy_files(source) if source is not None else False
    ensure_bus()
    if changed:
        reload_bus()
    ensure_polkitd()
    if with_vnetd:
        ensure_vnetd(venv, source)


# --- the demo -------------------------------------------------------------------------------
DEMO_USER = "vnet-demo"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(argv), flush=True)
    return subprocess.run(argv, **kw)


def demo_user() -> str:
    """The user who ran sudo (added to group vnet if needed), else a demo user in group vnet."""
    user = os.environ.get("SUDO_USER")
    if user and user != "root":
        groups = subprocess.run(["id", "-nG", user], capture_output=True, text=True).stdout.split()
        if "vnet" not in groups:
            say(f"Adding {user} to group vnet (attach without a password; takes effect at the "
                "next login, the demo uses it right away)")
            run(["usermod", "-aG", "vnet", user], check=True)
        return user
    try:
        pwd.getpwnam(DEMO_USER)
    except KeyError:
        run(["useradd", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", "-G", "vnet",
             DEMO_USER], check=True)
    return DEMO_USER


def _guest_builder(source: Path):
    """The small guest's builder (tests/guest/build_guest.py of the checkout: a Debian kernel
    and a busybox initramfs), which the demo boots."""
    sys.path.insert(0, str(source))
    from tests.guest import build_guest

    return build_guest


def demo(client: str, source: Path) -> int:
    """`sudo make demo`: the NAT network vnet2 (defined and started if needed), the small
    guest booted on it as the user who ran sudo (or a demo user in group vnet) through
    `vnet-client attach`, what the guest got, and its tap gone when it powers off."""
    say("The default NAT network vnet2")
    shown = run([client, "show", "vnet2"], capture_output=True, text=True)
    if shown.returncode != 0:
        run([client, "define", "vnet2", "--mode=nat"], check=True)
    if '"state": "running"' not in run([client, "show", "vnet2", "--json"],
                                        capture_output=True, text=True).stdout:
        run([client, "start", "vnet2"], check=True)
    run([client, "show", "vnet2"], check=True)

    say("Building the demo guest (a Debian kernel and a busybox initramfs; cached)")
    bg = _guest_builder(source)
    guest = bg.build_guest()
    user = demo_user()
    argv = bg.qemu_argv(guest, netdevs=["tap,id=n0,fd={fd}"],
                        devices=["virtio-net-pci,netdev=n0,mac={mac}"],
                        cmdline={"dhcp": 1, "hostname": "demo1", "ping": "172.16.12.1",
                                 "resolve": "demo1.vnet2"})
    say(f"Booting it as user '{user}' (not root) through vnet-client attach")
    cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--",
           client, "attach", "--br=vnet2", "--vm=demo1", "--", *argv]
    print("$ " + " ".join(cmd[:9]) + " -- qemu-system-x86_64 ... -netdev tap,id=n0,fd={fd} "
          "-device virtio-net-pci,netdev=n0,mac={mac} ...", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    sys.stderr.write(r.stderr)
    res = bg.parse_results(r.stdout)
    say("What the guest saw")
    for line in r.stdout.splitlines():
        if line.startswith("VNET-RESULT"):
            print("  " + line)
    say("Leases on vnet2")
    run([client, "leases", "vnet2"])
    ok = r.returncode == 0 and res.get("dhcp") == "ok" and res.get("ping", {}).get(
        "172.16.12.1") == "ok"
    say("Demo " + ("succeeded: the guest got " + res.get("ip", "?") + " and reached its gateway;"
                   " it has powered off and its tap is gone." if ok else "FAILED (see above)"))
    print("Next: vnet-client --help, docs/cli.md. The network vnet2 keeps running; "
          "'vnet-client stop vnet2' stops it.")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vnetd.devhost",
                                description="qemu-vnet where systemd is not PID 1")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start the system bus and polkitd (and vnetd)")
    s.add_argument("--vnetd", action="store_true", help="vnetd too")
    s.add_argument("--venv", type=Path, help="vnetd's virtualenv (default: this Python's)")
    s.add_argument("--source", type=Path,
                   help="a checkout: install its bus policy and polkit files, use its unit")
    sub.add_parser("stop-vnetd", help="stop vnetd")
    d = sub.add_parser("demo", help="boot a small guest on the NAT network vnet2")
    d.add_argument("--client", default="/usr/local/bin/vnet-client",
                   help="the vnet-client to run (default /usr/local/bin/vnet-client)")
    d.add_argument("--source", type=Path, default=Path.cwd(),
                   help="the checkout whose tests/guest builds the guest (default: here)")
    a = p.parse_args(argv)
    if a.cmd == "start":
        start(a.vnetd, a.venv, a.source)
        print("system bus, polkitd" + (" and vnetd" if a.vnetd else "") + " are running.")
        return 0
    if a.cmd == "stop-vnetd":
        print("vnetd stopped." if stop_vnetd() else "vnetd was not running.")
        return 0
    return demo(a.client, a.source.resolve())


if __name__ == "__main__":
    sys.exit(main())
