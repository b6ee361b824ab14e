"""systemd/vnetd.service: the settings vnetd depends on, and the sandbox's exposure score.

No root needed. The score comes from `systemd-analyze security --offline=true`, run on a copy
of the unit in a directory of its own (SYSTEMD_UNIT_PATH), so that drop-ins or an installed
vnetd.service on this machine cannot change the result. docs/sandboxing.md explains each
setting; if a test here fails after a deliberate change, update that document too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "vnetd.service"
DBUS_ACTIVATION = REPO / "dbus" / "org.qemuvnet.Vnet1.service"

MAX_EXPOSURE = 2.5  # systemd-networkd is 2.8, NetworkManager 8.0, libvirtd 9.6
BUS_NAME = "org.qemuvnet.Vnet1"
EXPECTED_CAPS = {
    "CAP_NET_ADMIN",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SETUID",
    "CAP_SETGID",
}
NEEDED_FAMILIES = {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6", "AF_PACKET"}
# Settings that would cut vnetd off from the host's network, users or devices.
ISOLATING = ("PrivateNetwork", "PrivateUsers", "NetworkNamespacePath", "JoinsNamespaceOf",
             "IPAddressDeny", "IPAddressAllow", "RootDirectory", "RootImage")
TRUE = {"1", "yes", "true", "on"}

ANSI = re.compile(r"\x1b\[[0-9;]*m")
OVERALL = re.compile(r"Overall exposure level for \S+: (\d+)\.(\d)\b")


# --- a unit-file reader that keeps repeated keys (configparser would merge or reject them) --

def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> [(key, value), ...] in file order, duplicates kept, as systemd reads them:
    '#'/';' comment lines, trailing-backslash continuation lines, whitespace around '='."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: str | None = None
    pending = ""
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if pending:
            if line.startswith(("#", ";")):
                continue
            line = f"{pending} {line}"
            pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{UNIT.name}:{lineno}: not a 'Key=value' line: {raw!r}"
        assert current is not None, f"{UNIT.name}:{lineno}: setting outside any [Section]"
        sections[current].append((key.strip(), value.strip()))
    assert not pending, f"{UNIT.name}: file ends inside a continued line"
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    assert UNIT.is_file(), f"{UNIT} is missing (make install-files installs it)"
    return parse_unit(UNIT.read_text())


def values(unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def last(unit, section: str, key: str) -> str | None:
    """Single-valued settings: the last assignment wins."""
    vals = values(unit, section, key)
    return vals[-1] if vals else None


def merged(unit, section: str, key: str) -> list[str]:
    """List-valued settings: every assignment appends, an empty one resets."""
    out: list[str] = []
    for v in values(unit, section, key):
        if v == "":
            out = []
        else:
            out.extend(v.split())
    return out


def is_true(value: str | None) -> bool:
    return value is not None and value.lower() in TRUE


# --- what vnetd itself depends on ----------------------------------------------------------

def test_sections(unit):
    assert {"Unit", "Service", "Install"} <= unit.keys()


def test_dbus_service(unit):
    assert last(unit, "Service", "Type") == "dbus"
    assert last(unit, "Service", "BusName") == BUS_NAME
    assert last(unit, "Service", "ExecStart") == "/opt/qemu-vnet/bin/vnetd"
    assert last(unit, "Service", "Restart") == "on-failure"
    assert last(unit, "Service", "RestartSec") == "100ms"


def test_install_and_activation_names_the_unit_itself(unit):
    assert "multi-user.target" in merged(unit, "Install", "WantedBy")
    assert DBUS_ACTIVATION.is_file(), f"{DBUS_ACTIVATION} is missing"
    activation = parse_unit(DBUS_ACTIVATION.read_text())["D-BUS Service"]
    assert dict(activation).get("Name") == BUS_NAME
    # An Alias= exists only while the unit is enabled: activation through it fails with
    # "Unit dbus-....service not found" on a host where vnetd.service is installed but disabled.
    assert dict(activation).get("SystemdService") == UNIT.name, (
        "D-Bus activation must name vnetd.service itself, so it works enabled or not")
    assert f"dbus-{BUS_NAME}.service" not in merged(unit, "Install", "Alias")


def test_run_is_read_only_to_the_service(unit):
    # ProtectSystem=strict leaves /run writable; vnetd and its children write only below
    # /run/qemu-vnet (RuntimeDirectory=, which systemd keeps writable).
    assert "/run" in [p.lstrip("-") for p in merged(unit, "Service", "ReadOnlyPaths")]


def test_directories(unit):
    for key in ("ConfigurationDirectory", "StateDirectory", "RuntimeDirectory"):
        assert merged(unit, "Service", key) == ["qemu-vnet"], key
    # Running networks and VDE sockets outlive a daemon restart.
    assert is_true(last(unit, "Service", "RuntimeDirectoryPreserve"))
    assert last(unit, "Service", "ProtectSystem") == "strict"


def test_children_survive_restart(unit):
    # dnsmasq/dhcpd/vde_switch keep serving while vnetd restarts; it re-adopts them.
    assert last(unit, "Service", "KillMode") == "process"


def test_host_network_and_users_not_isolated(unit):
    for key in ISOLATING:
        v = last(unit, "Service", key)
        assert v is None or (key.startswith("Private") and not is_true(v)), (
            f"{key}={v}: vnetd manages the host's network; it must not be isolated from it")
    assert last(unit, "Service", "User") in (None, "root", "0"), (
        "the bus policy (dbus/org.qemuvnet.Vnet1.conf) lets only root own the name")
    families = merged(unit, "Service", "RestrictAddressFamilies")
    assert families and not families[0].startswith("~"), "expected an allow-list"
    assert set(families) == NEEDED_FAMILIES


def test_devices(unit):
    allow = [" ".join(v.split()) for v in values(unit, "Service", "DeviceAllow")]
    assert "/dev/net/tun rw" in allow
    assert "/dev/vhost-net rw" in allow
    assert last(unit, "Service", "DevicePolicy") == "closed"
    if is_true(last(unit, "Service", "PrivateDevices")):
        # The private /dev has only pseudo devices: the two nodes are bind-mounted in.
        binds = [b.lstrip("-") for b in merged(unit, "Service", "BindPaths")]
        assert "/dev/net/tun" in binds
        assert "/dev/vhost-net" in binds


@pytest.mark.parametrize("path", [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv4/conf/vnet2/forwarding",
    "/proc/sys/net/ipv6/conf/all/forwarding",
    "/proc/sys/net/ipv6/conf/vnet2/forwarding",
])
def test_sysctls_vnetd_writes_stay_writable(unit, path):
    assert last(unit, "Service", "ProcSubset") in (None, "all"), (
        "ProcSubset=pid hides /proc/sys, which vnetd writes")
    if not is_true(last(unit, "Service", "ProtectKernelTunables")):
        return
    writable = [p.lstrip("-+") for p in merged(unit, "Service", "ReadWritePaths")]
    assert any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable), (
        f"ProtectKernelTunables=yes makes {path} read-only unless ReadWritePaths= covers it")


def test_capabilities(unit):
    caps = merged(unit, "Service", "CapabilityBoundingSet")
    assert caps and not caps[0].startswith("~"), "expected an allow-list"
    assert set(caps) == EXPECTED_CAPS, (
        "capability set changed: justify it in docs/sandboxing.md and re-check the score")
    assert merged(unit, "Service", "AmbientCapabilities") == []
    assert is_true(last(unit, "Service", "NoNewPrivileges"))


# --- systemd-analyze -----------------------------------------------------------------------

def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail(
            "systemd-analyze not found: the sandbox score cannot be checked. It comes with "
            "Debian's 'systemd' package (sudo apt-get install systemd; `make install-test-deps` "
            "installs it). systemd need not be PID 1.")
    return exe


def _isolated_copy(tmp_path: Path, exec_start: str | None = None) -> Path:
    d = tmp_path / "units"
    d.mkdir()
    text = UNIT.read_text()
    if exec_start:
        text = re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={exec_start}", text)
    copy = d / UNIT.name
    copy.write_text(text)
    return copy


def _run(args: list[str], unit_path: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    env.update(SYSTEMD_UNIT_PATH=unit_path, SYSTEMD_COLORS="0", SYSTEMD_PAGER="cat",
               LC_ALL="C.UTF-8")
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, cwd="/")


def _worst_items(exe: str, copy: Path) -> str:
    """The settings that cost the most, for the failure message (best effort)."""
    r = _run([exe, "security", "--offline=true", "--json=short", "--no-pager", str(copy)],
             str(copy.parent))
    try:
        items = json.loads(r.stdout)
    except ValueError:
        return ""
    bad = [(float(i["exposure"]), i["name"]) for i in items if i.get("exposure")]
    return ", ".join(f"{name} {x}" for x, name in sorted(bad, reverse=True)[:8])


def test_exposure_score(tmp_path):
    exe = _systemd_analyze()
    copy = _isolated_copy(tmp_path)
    threshold = round(MAX_EXPOSURE * 10)
    r = _run([exe, "security", "--offline=true", f"--threshold={threshold}", "--no-pager",
              str(copy)], str(copy.parent))
    out = ANSI.sub("", r.stdout + r.stderr)
    m = OVERALL.search(out)
    assert m, f"no 'Overall exposure level' in systemd-analyze output (rc={r.returncode}):\n{out}"
    exposure = int(m.group(1)) + int(m.group(2)) / 10
    print(f"vnetd.service overall exposure: {exposure:.1f} (limit {MAX_EXPOSURE})")
    assert exposure <= MAX_EXPOSURE, (
        f"vnetd.service exposure {exposure:.1f} > {MAX_EXPOSURE}; largest items: "
        f"{_worst_items(exe, copy)}. See docs/sandboxing.md before loosening the sandbox.")
    assert r.returncode == 0, f"--threshold={threshold} failed (rc={r.returncode}):\n{out}"


def test_systemd_analyze_verify(tmp_path):
    exe = _systemd_analyze()
    # The daemon need not be installed for this: only the unit's syntax is under test.
    copy = _isolated_copy(tmp_path, exec_start="/bin/true")
    r = _run([exe, "verify", "--no-pager", str(copy)], f"{copy.parent}:")
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines() if UNIT.name in ln]
    assert r.returncode == 0 and not complaints, (
        f"systemd-analyze verify (rc={r.returncode}):\n{r.stdout}{r.stderr}")
