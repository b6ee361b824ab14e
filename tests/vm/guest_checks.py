#!/usr/bin/python3
"""The systemd tier's checks, run inside a booted Debian guest (systemd PID 1) by the image's
vnet-test.service: `guest_checks.py JOBDIR OUTDIR`. Standard library only (Debian's python3).

JOBDIR holds qemu-vnet.deb and vnetd.service (the project's unit, to compare with the live
one). Each check appends one JSON line to OUTDIR/results.jsonl ({"phase", "name", "ok",
"detail", "seconds"}) and prints `VNET-CHECK <name> PASS|FAIL` on the console; figures go to
OUTDIR/figures.json. The job runs in phases across reboots (OUTDIR/phase): phase 1 installs
and exercises the service, then asks for a reboot; phase 2 checks autostart after the reboot,
then removes and purges the package.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

JOB = Path("/run/vnet-test")  # main() sets both from its arguments
OUT = Path("/var/lib/vnet-test/out")
REBOOT_FLAG = Path("/var/lib/vnet-test/reboot")
NET = "vt1"
SUBNET = "10.77.0.0/24"
CAPS = {"cap_net_admin", "cap_net_bind_service", "cap_net_raw", "cap_setuid", "cap_setgid"}
CAP_BITS = {"cap_net_admin": 12, "cap_net_bind_service": 10, "cap_net_raw": 13,
            "cap_setuid": 7, "cap_setgid": 6}
MAX_EXPOSURE = 2.5


class Failed(Exception):
    pass


def sh(*argv: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise Failed(f"{' '.join(argv)} -> rc {r.returncode}: {(r.stderr or r.stdout).strip()[-600:]}")
    return r


def say(line: str) -> None:
    """A marker on the console; a console that went away must not end the job."""
    try:
        print(line, flush=True)
    except OSError:
        pass


def figure(name: str, value) -> None:
    path = OUT / "figures.json"
    figs = json.loads(path.read_text()) if path.exists() else {}
    figs[name] = value
    path.write_text(json.dumps(figs, indent=1))


def wait_for(pred, timeout: float, step: float = 0.05):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            return v
        time.sleep(step)


def active() -> bool:
    return sh("systemctl", "is-active", "vnetd.service", check=False).stdout.strip() == "active"


def main_pid() -> int:
    return int(sh("systemctl", "show", "-P", "MainPID", "vnetd.service").stdout.strip() or 0)


def owned() -> bool:
    r = sh("busctl", "--system", "status", "org.qemuvnet.Vnet1", check=False, timeout=10)
    return r.returncode == 0


def networks() -> dict:
    r = sh("vnet-client", "--json", "list")
    data = json.loads(r.stdout)
    items = data if isinstance(data, list) else data.get("networks", data)
    if isinstance(items, dict):
        return items
    return {n["name"]: n for n in items}


def link_exists(name: str) -> bool:
    return sh("ip", "link", "show", "dev", name, check=False).returncode == 0


def vnet_links() -> list[str]:
    """Links whose alias says vnetd made them."""
    out = []
    for d in Path("/sys/class/net").iterdir():
        try:
            if (d / "ifalias").read_text().startswith("qemu-vnet:"):
                out.append(d.name)
        except OSError:
            pass
    return out


def nft_tables() -> list[str]:
    r = sh("nft", "list", "tables", check=False)
    return [ln.strip() for ln in r.stdout.splitlines() if "qemu_vnet" in ln]


def children(name: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "comm").read_text().strip() == name:
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


# --- phase 1 ---------------------------------------------------------------------------------

def check_package_installs():
    t0 = time.monotonic()
    r = sh("dpkg", "-i", str(JOB / "qemu-vnet.deb"), check=False, timeout=600,
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    figure("dpkg_install_s", round(time.monotonic() - t0, 1))
    if r.returncode != 0:
        raise Failed(f"dpkg -i failed (rc {r.returncode}): {(r.stdout + r.stderr)[-1500:]}")
    for u in ("vnet-dhcp", "vnet-vde"):
        sh("getent", "passwd", u)
    sh("getent", "group", "vnet")
    return "installed; users vnet-dhcp, vnet-vde and group vnet exist"


def check_vnetd_active_after_install():
    if not wait_for(active, 60):
        raise Failed("vnetd.service is not active after install: "
                     + sh("systemctl", "status", "vnetd", check=False).stdout[-1500:])
    en = sh("systemctl", "is-enabled", "vnetd.service", check=False).stdout.strip()
    if en != "enabled":
        raise Failed(f"vnetd.service is {en}, not enabled")
    return "active and enabled"


def _unit_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines()
            if ln.strip() and not ln.strip().startswith("#") and not ln.startswith("ExecStart=")]


def check_unit_is_the_shipped_one():
    frag = sh("systemctl", "show", "-P", "FragmentPath", "vnetd.service").stdout.strip()
    drop = sh("systemctl", "show", "-P", "DropInPaths", "vnetd.service").stdout.strip()
    if drop:
        raise Failed(f"drop-ins change the unit: {drop}")
    live = Path(frag).read_text()
    if "ExecStart=/usr/sbin/vnetd" not in live:
        raise Failed(f"{frag}: ExecStart is not /usr/sbin/vnetd")
    want = _unit_lines((JOB / "vnetd.service").read_text())
    if _unit_lines(live) != want:
        raise Failed(f"{frag} differs from systemd/vnetd.service beyond ExecStart")
    return f"{frag}, no drop-ins, same settings as systemd/vnetd.service"


def check_live_process_is_confined():
    pid = main_pid()
    st = dict(ln.split(":\t", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
              if ":\t" in ln)
    bnd = int(st["CapBnd"], 16)
    want = sum(1 << b for b in CAP_BITS.values())
    if bnd != want:
        raise Failed(f"CapBnd {bnd:#x}, expected {want:#x} ({', '.join(sorted(CAPS))})")
    if st["NoNewPrivs"].strip() != "1" or st["Seccomp"].strip() != "2":
        raise Failed(f"NoNewPrivs {st['NoNewPrivs']}, Seccomp {st['Seccomp']}")
    mounts = {}
    for ln in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        f = ln.split()
        mounts[f[4]] = f[5].split(",")
    problems = []
    for path, mode in (("/", "ro"), ("/run", "ro"), ("/run/qemu-vnet", "rw"),
                       ("/etc/qemu-vnet", "rw"), ("/var/lib/qemu-vnet", "rw")):
        if path not in mounts or mode not in mounts[path]:
            problems.append(f"{path}: {mounts.get(path)} (want {mode})")
    if problems:
        raise Failed("; ".join(problems))
    return f"pid {pid}: five capabilities, no-new-privs, seccomp; /run ro, /run/qemu-vnet rw"


def check_security_score():
    r = sh("systemd-analyze", "security", "--no-pager", "vnetd.service", check=False,
           env={**os.environ, "SYSTEMD_COLORS": "0"})
    m = re.search(r"Overall exposure level for vnetd.service: (\d+\.\d)", r.stdout)
    if not m:
        raise Failed(f"no exposure in systemd-analyze output: {r.stdout[-500:]}{r.stderr[-300:]}")
    x = float(m.group(1))
    figure("live_exposure", x)
    if x > MAX_EXPOSURE:
        raise Failed(f"live exposure {x} > {MAX_EXPOSURE}")
    return f"live exposure {x}"


def check_network_starts_writing_only_its_own_directories():
    before = Path("/run/dnsmasq.pid").exists()
    sh("vnet-client", "define", NET, "--subnet", SUBNET, "-n", "1", "--start")
    if not link_exists(NET) or not link_exists(f"{NET}_0"):
        raise Failed(f"bridge {NET} or tap {NET}_0 missing after start")
    if not wait_for(lambda: children("dnsmasq"), 10):
        raise Failed("no dnsmasq serving the network")
    if not before and Path("/run/dnsmasq.pid").exists():
        raise Failed("/run/dnsmasq.pid was written")
    if len(nft_tables()) != 2:
        raise Failed(f"nft tables: {nft_tables()}")
    own = Path(f"/run/qemu-vnet/{NET}")
    if not own.is_dir():
        raise Failed(f"{own} missing")
    return f"{NET}: bridge, tap, dnsmasq, both nft tables; no /run/dnsmasq.pid"


def check_networkmanager_leaves_vnet_devices_alone():
    """NetworkManager runs in the image. The package's snippet
    (/usr/lib/NetworkManager/conf.d/90-qemu-vnet.conf, read at once through the postinst's
    `nmcli general reload conf`) makes taps unmanaged. A bridge not named vnet*/vmnet* is one
    NetworkManager only observes ("connected (externally)", as libvirt's virbr0 on a desktop):
    it must keep its address and its port, also across a restart of NetworkManager."""
    if not wait_for(lambda: sh("systemctl", "is-active", "NetworkManager.service",
                               check=False).stdout.strip() == "active", 30):
        raise Failed("NetworkManager is not running in the image")

    def states() -> dict[str, str]:
        r = sh("nmcli", "-t", "-f", "DEVICE,STATE", "device", "status")
        return dict(ln.rsplit(":", 1) for ln in r.stdout.splitlines() if ":" in ln)

    seen = states()
    if seen.get(f"{NET}_0") != "unmanaged":
        raise Failed(f"tap {NET}_0 is '{seen.get(f'{NET}_0')}' to NetworkManager, not unmanaged")
    if seen.get(NET) not in ("unmanaged", "connected (externally)"):
        raise Failed(f"bridge {NET} is '{seen.get(NET)}' to NetworkManager")
    sh("systemctl", "restart", "NetworkManager.service", timeout=120)
    time.sleep(3)
    addr = sh("ip", "-4", "-o", "addr", "show", "dev", NET).stdout
    if "10.77.0.1/24" not in addr:
        raise Failed(f"the bridge lost its address: {addr.strip()}")
    master = sh("ip", "-o", "link", "show", "dev", f"{NET}_0").stdout
    if f"master {NET}" not in master:
        raise Failed(f"the tap left the bridge: {master.strip()}")
    after = states()
    return (f"tap {after.get(f'{NET}_0')}, bridge {after.get(NET)}; after a restart of "
            "NetworkManager the bridge keeps 10.77.0.1/24 and its tap")


def vnetd_journal(*args: str):
    """vnetd's journal entries (journalctl -o json) whose message is text."""
    r = sh("journalctl", *args, "-u", "vnetd.service", "-o", "json", "--no-pager")
    for ln in r.stdout.splitlines():
        try:
            e = json.loads(ln)
        except ValueError:
            continue
        if isinstance(e.get("MESSAGE"), str):
            yield e


def check_journal_holds_audit_lines():
    hits = [e for e in vnetd_journal()
            if "uid=0" in e["MESSAGE"] and "Define" in e["MESSAGE"] and ": ok" in e["MESSAGE"]]
    if not hits:
        raise Failed("no audit line for Define in journalctl -u vnetd -o json")
    e = hits[-1]
    fields = sorted(k for k in e if not k.startswith("__"))
    if e.get("_SYSTEMD_UNIT") != "vnetd.service" or "PRIORITY" not in e:
        raise Failed(f"audit line lacks _SYSTEMD_UNIT/PRIORITY: {fields}")
    (OUT / "audit-entry.json").write_text(json.dumps(e, indent=1))
    return f"{len(hits)} Define audit line(s); fields {', '.join(fields)}"


def _activation(enabled: bool) -> str:
    sh("systemctl", "enable" if enabled else "disable", "vnetd.service")
    sh("systemctl", "stop", "vnetd.service")
    if active():
        raise Failed("vnetd still active after stop")
    t0 = time.monotonic()
    r = sh("vnet-client", "list", check=False, timeout=60)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise Failed(f"vnet-client list with vnetd stopped ({'enabled' if enabled else 'disabled'})"
                     f" -> rc {r.returncode}: {r.stderr.strip()[-400:]}")
    if not active():
        raise Failed("the call succeeded but vnetd.service is not active")
    if NET not in r.stdout:
        raise Failed(f"{NET} not listed after activation: {r.stdout}")
    figure(f"activation_{'enabled' if enabled else 'disabled'}_s", round(dt, 2))
    return f"{dt:.1f} s"


def check_activation_when_disabled():
    try:
        return "disabled: started by the call in " + _activation(False)
    finally:
        sh("systemctl", "enable", "vnetd.service", check=False)


def check_activation_when_enabled():
    return "enabled: started by the call in " + _activation(True)


def check_back_after_sigkill():
    """Restart= starts a new vnetd RestartSec=1 after a SIGKILL; the check wants the new
    process within 2 s of the kill. Owning the bus name again then takes vnetd's own start-up
    time, which under TCG is seconds (Python and its imports); that figure is recorded, and
    the network must be found reconciled once it is back."""
    if not wait_for(active, 30):
        raise Failed("vnetd not active before the kill")
    old = main_pid()
    dns_before = children("dnsmasq")
    sh("systemctl", "kill", "-s", "KILL", "vnetd.service")
    t0 = time.monotonic()
    wait_for(lambda: main_pid() not in (0, old), 30, step=0.02)
    respawn = time.monotonic() - t0
    back = wait_for(lambda: active() and owned(), 60)
    ready = time.monotonic() - t0
    figure("restart_new_process_s", round(respawn, 2))
    figure("restart_after_sigkill_s", round(ready, 2))
    if not back:
        raise Failed(f"vnetd did not own its name again within 60 s (new process after "
                     f"{respawn:.2f} s)")
    # reconciled: the network is running, its bridge, tap and server are there
    state = networks().get(NET, {})
    if state.get("state") != "running":
        raise Failed(f"{NET} not running after the restart: {state}")
    if not link_exists(NET) or not link_exists(f"{NET}_0"):
        raise Failed("bridge or tap gone after the restart")
    if not wait_for(lambda: children("dnsmasq"), 10):
        raise Failed("no dnsmasq after the restart")
    note = (f"new vnetd {respawn:.2f} s after SIGKILL, owning the name after {ready:.2f} s "
            f"(dnsmasq {dns_before} -> {children('dnsmasq')}); {NET} running, bridge and tap kept")
    if respawn > 2.0:
        raise Failed(note + ": the new process came later than 2 s")
    return note


def check_prepare_reboot():
    sh("vnet-client", "autostart", NET, "on")
    REBOOT_FLAG.touch()
    return "autostart on; reboot requested"


# --- phase 2 ---------------------------------------------------------------------------------

def check_autostart_after_reboot():
    if not wait_for(active, 60):
        raise Failed("vnetd not active after the reboot")
    started = ready = None
    for e in vnetd_journal("-b"):
        msg, t = e["MESSAGE"], int(e["__MONOTONIC_TIMESTAMP"])
        if started is None and f"autostart {NET}: started" in msg:
            started = t
        if ready is None and " ready on " in msg:
            ready = t
    if started is None or ready is None:
        raise Failed(f"journal of this boot: autostart line {started}, ready line {ready}")
    if started > ready:
        raise Failed("vnetd reported ready before the autostart network was up")
    if not link_exists(NET):
        raise Failed(f"bridge {NET} missing after the reboot")
    return f"{NET} up {(ready - started) / 1e6:.2f} s before 'ready'"


def check_startup_with_20_networks():
    """20 autostart definitions written by hand while vnetd is stopped (as an admin may);
    `systemctl start` of the Type=dbus unit returns once vnetd owns its name, which it asks
    for after the autostart networks are up."""
    names = [f"as{i}" for i in range(20)]
    sh("systemctl", "stop", "vnetd.service")
    for i, n in enumerate(names):
        Path(f"/etc/qemu-vnet/networks/{n}.toml").write_text(
            f'subnet = "10.78.{i}.0/24"\nautostart = true\n')
    t0 = time.monotonic()
    sh("systemctl", "start", "vnetd.service", timeout=300)
    dt = time.monotonic() - t0
    figure("startup_20_autostart_networks_s", round(dt, 2))
    missing = [n for n in names if not link_exists(n)]
    dns = len(children("dnsmasq"))
    # Gone again the same way: definitions removed by hand, and a restart's reconcile
    # removes what no definition wants (bridges, taps, servers).
    sh("systemctl", "stop", "vnetd.service")
    for n in names:
        Path(f"/etc/qemu-vnet/networks/{n}.toml").unlink()
    sh("systemctl", "start", "vnetd.service", timeout=300)
    if missing:
        raise Failed(f"not started: {missing}")
    if dns < 21:
        raise Failed(f"{dns} dnsmasq processes for 21 running networks")
    left = [n for n in names if link_exists(n)]
    if left:
        raise Failed(f"reconcile left the bridges of removed definitions: {left}")
    if not link_exists(NET):
        raise Failed(f"reconcile removed {NET}, which is still defined")
    return (f"20 autostart networks (21 with {NET}): systemctl start returned (ready) after "
            f"{dt:.1f} s; removed by hand, reconcile took their bridges away")


def check_no_tables_when_nothing_runs():
    sh("vnet-client", "stop", NET)
    left = nft_tables()
    sh("vnet-client", "start", NET)  # running again: remove must take a live network down
    if left:
        raise Failed(f"every network stopped, yet nft lists {left}")
    if len(nft_tables()) != 2:
        raise Failed(f"after starting {NET} again: {nft_tables()}")
    return "no qemu_vnet table while nothing runs; both back with the next network"


def _leftovers() -> list[str]:
    found = []
    if children("vnetd") or active():
        found.append("vnetd running")
    for name in ("dnsmasq", "vde_switch", "dhcpd"):
        if children(name):
            found.append(f"{name} running")
    found += [f"link {n}" for n in vnet_links()]
    found += [f"nft {t}" for t in nft_tables()]
    return found


def check_apt_remove():
    r = sh("apt-get", "remove", "-y", "qemu-vnet", check=False, timeout=300,
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if r.returncode != 0:
        raise Failed(f"apt-get remove -> rc {r.returncode}: {(r.stdout + r.stderr)[-800:]}")
    left = _leftovers()
    if left:
        raise Failed(f"left after remove: {left}")
    kept = [p for p in ("/etc/qemu-vnet/networks", "/var/lib/qemu-vnet") if Path(p).exists()]
    if f"{NET}.toml" not in os.listdir("/etc/qemu-vnet/networks"):
        raise Failed("the definitions were not kept on remove")
    for u in ("vnet-dhcp", "vnet-vde"):
        sh("getent", "passwd", u)
    return f"nothing running, no vnet links or nft tables; kept {kept}, users, group"


def check_apt_purge():
    r = sh("apt-get", "purge", "-y", "qemu-vnet", check=False, timeout=300,
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if r.returncode != 0:
        raise Failed(f"apt-get purge -> rc {r.returncode}: {(r.stdout + r.stderr)[-800:]}")
    left = _leftovers()
    for p in ("/etc/qemu-vnet", "/var/lib/qemu-vnet", "/run/qemu-vnet", "/var/log/qemu-vnet",
              "/usr/lib/qemu-vnet", "/usr/sbin/vnetd", "/etc/systemd/system/multi-user.target.wants/vnetd.service"):
        if os.path.lexists(p):
            left.append(p)
    for u in ("vnet-dhcp", "vnet-vde"):
        if sh("getent", "passwd", u, check=False).returncode == 0:
            left.append(f"user {u}")
    if sh("getent", "group", "vnet", check=False).returncode == 0:
        left.append("group vnet")
    r = sh("find", "/etc", "/usr", "/var", "/run", "-xdev", "(", "-name", "*qemu-vnet*", "-o",
           "-name", "*qemuvnet*", "-o", "-name", "vnetd*", ")", "-not", "-path",
           "/var/lib/vnet-test/*", "-not", "-path", "/run/vnet-test/*", check=False)
    left += [ln for ln in r.stdout.splitlines() if ln and "/var/lib/dpkg/" not in ln
             and "/var/cache/apt/" not in ln and "/var/log/journal/" not in ln]
    if left:
        raise Failed(f"left after purge: {left}")
    return "no process, link, nft table, file, user or group left"


def check_dpkg_install_without_systemd():
    """The maintainer scripts as on a host without systemd: /run/systemd hidden (a tmpfs over
    it in a mount namespace of the install's own), which is how they and debhelper's snippets
    tell whether systemd runs. The install must succeed and start nothing; the unit is
    enabled for later, and D-Bus activation then starts vnetd on the first call."""
    r = sh("unshare", "--mount", "--propagation", "private", "sh", "-c",
           "mount -t tmpfs none /run/systemd && exec dpkg -i " + str(JOB / "qemu-vnet.deb"),
           check=False, timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if r.returncode != 0:
        raise Failed(f"dpkg -i without systemd -> rc {r.returncode}: {(r.stdout + r.stderr)[-800:]}")
    if active() or children("vnetd"):
        raise Failed("vnetd was started although systemd looked absent")
    if not Path("/etc/systemd/system/multi-user.target.wants/vnetd.service").is_symlink():
        raise Failed("vnetd.service was not enabled")
    sh("systemctl", "daemon-reload")
    r = sh("vnet-client", "list", check=False, timeout=60)
    if r.returncode != 0 or not active():
        raise Failed(f"after the install, D-Bus activation did not start vnetd: {r.stderr[-300:]}")
    sh("apt-get", "purge", "-y", "qemu-vnet", timeout=300,
       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return "installed with nothing started, enabled; activation started it on the first call"


PHASES = {
    1: [check_package_installs, check_vnetd_active_after_install, check_unit_is_the_shipped_one,
        check_live_process_is_confined, check_security_score,
        check_network_starts_writing_only_its_own_directories,
        check_networkmanager_leaves_vnet_devices_alone, check_journal_holds_audit_lines,
        check_activation_when_disabled, check_activation_when_enabled, check_back_after_sigkill,
        check_prepare_reboot],
    2: [check_autostart_after_reboot, check_startup_with_20_networks,
        check_no_tables_when_nothing_runs, check_apt_remove,
        check_apt_purge, check_dpkg_install_without_systemd],
}


def check_names() -> list[str]:
    return [fn.__name__.removeprefix("check_") for phase in sorted(PHASES) for fn in PHASES[phase]]


def main(argv: list[str]) -> int:
    global JOB, OUT
    JOB, OUT = Path(argv[0]), Path(argv[1])
    OUT.mkdir(parents=True, exist_ok=True)
    phase_file = OUT / "phase"
    phase = int(phase_file.read_text()) + 1 if phase_file.exists() else 1
    phase_file.write_text(str(phase))
    figure(f"phase{phase}_job_start_uptime_s",
           float(Path("/proc/uptime").read_text().split()[0]))
    failed = 0
    with open(OUT / "results.jsonl", "a") as res:
        for fn in PHASES.get(phase, []):
            name = fn.__name__.removeprefix("check_")
            t0 = time.monotonic()
            try:
                detail, ok = fn(), True
            except Failed as e:
                detail, ok = str(e), False
            except Exception as e:  # a broken check is a failed check, with its reason
                detail, ok = f"{type(e).__name__}: {e}", False
            dt = round(time.monotonic() - t0, 2)
            failed += not ok
            res.write(json.dumps({"phase": phase, "name": name, "ok": ok, "detail": detail,
                                  "seconds": dt}) + "\n")
            res.flush()
            say(f"VNET-CHECK {name} {'PASS' if ok else 'FAIL'} {dt}s: {detail}")
    j = sh("journalctl", "-b", "--no-pager", "-o", "short-monotonic", check=False)
    (OUT / f"journal-phase{phase}.txt").write_text(j.stdout[-400000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
