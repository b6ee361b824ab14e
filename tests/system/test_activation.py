"""Coming back without a person: without systemd, D-Bus activation alone starts vnetd (through
dbus-daemon's setuid launch helper) when a client calls, and again after a crash."""

from __future__ import annotations

import configparser
import os
import signal
import time
from pathlib import Path

import pytest

from tests.harness import services
from tests.harness.daemon import ALICE, PY, run_client

REPO = Path(__file__).resolve().parents[2]
SERVICE = services.ACTIVATION_FILE


def test_the_activation_file_names_the_real_vnetd():
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str
    cp.read(REPO / "dbus/org.qemuvnet.Vnet1.service")
    sec = cp["D-BUS Service"]
    assert sec["Name"] == "org.qemuvnet.Vnet1"
    assert sec["Exec"] == "/opt/qemu-vnet/bin/vnetd" and sec["User"] == "root"
    # The unit itself, not an Alias= that exists only while the unit is enabled.
    assert sec["SystemdService"] == "vnetd.service"
    unit = (REPO / "systemd/vnetd.service").read_text()
    assert "BusName=org.qemuvnet.Vnet1" in unit and "Restart=on-failure" in unit


@pytest.fixture
def activatable(vnetd):
    """The daemon stopped, and an activation file that starts it in the test namespace
    (the project's file starts /opt/qemu-vnet/bin/vnetd in the host's)."""
    vnetd.stop()
    exec_line = (f"/usr/bin/ip netns exec {vnetd.netns} {PY} -m vnetd "
                 f"--config-dir {vnetd.config_dir} --state-dir {vnetd.state_dir} "
                 f"--runtime-dir {vnetd.runtime_dir}")
    SERVICE.write_text("[D-BUS Service]\nName=org.qemuvnet.Vnet1\n"
                       f"Exec={exec_line}\nUser=root\n")
    services.reload_bus()
    yield
    pid = services.name_owner_pid("org.qemuvnet.Vnet1")
    if pid:
        os.kill(pid, signal.SIGTERM)
        services.wait_for(lambda: not services.has_owner("org.qemuvnet.Vnet1"), 10, "exit")
    SERVICE.unlink(missing_ok=True)
    services.reload_bus()
    vnetd.start()


def test_a_call_activates_vnetd_and_it_comes_back_after_a_crash(vnetd, activatable):
    assert not services.has_owner("org.qemuvnet.Vnet1")
    r = run_client("list", "--json", user=ALICE)  # an unprivileged call starts it
    assert r.returncode == 0, r.stderr
    pid = services.name_owner_pid("org.qemuvnet.Vnet1")
    assert pid and Path(f"/proc/{pid}/cmdline").read_bytes().count(b"vnetd")
    os.kill(pid, signal.SIGKILL)  # a crash
    time.sleep(0.2)
    r = run_client("define", "vnet2")  # the next call brings it back by itself
    assert r.returncode == 0, r.stderr
    new = services.name_owner_pid("org.qemuvnet.Vnet1")
    assert new and new != pid
    assert "vnet2" in run_client("list").stdout
    run_client("undefine", "vnet2", check=True)


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


CAP_BITS = {"chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "kill": 5,
            "setgid": 6, "setuid": 7, "setpcap": 8, "net_bind_service": 10, "net_admin": 12,
            "net_raw": 13, "sys_module": 16, "sys_ptrace": 19, "sys_admin": 21}


def test_an_activated_vnetd_keeps_the_units_limits_and_an_audit_trail(vnetd, activatable):
    """The launch helper starts vnetd as full root with stderr on /dev/null: vnetd itself
    drops to the unit's capability bounding set with no-new-privs, and logs where an
    administrator finds it (the journal or syslog at /dev/log, else a file)."""
    logfile = services.LOGDIR / "vnetd.log"
    mark = logfile.stat().st_size if logfile.exists() else 0
    r = run_client("list", "--json", user=ALICE)
    assert r.returncode == 0, r.stderr
    pid = services.name_owner_pid("org.qemuvnet.Vnet1")
    st = _status(pid)
    allowed = sum(1 << CAP_BITS[c] for c in services.unit_capabilities())
    for field in ("CapBnd", "CapPrm", "CapEff", "CapInh"):
        held = int(st[field], 16)
        assert held & ~allowed == 0, f"{field} {st[field]} holds more than the unit allows"
    assert int(st["CapBnd"], 16) == allowed
    assert st["NoNewPrivs"] == "1"
    if not Path("/dev/log").exists():  # no journal or syslog here: the file has it
        deadline = time.monotonic() + 5
        text = ""
        while time.monotonic() < deadline:
            with open(logfile, "rb") as f:
                f.seek(mark)
                text = f.read().decode(errors="replace")
            if "ready on" in text:
                break
            time.sleep(0.1)
        assert "ready on" in text, text[-2000:]
        assert f"[{pid}]" in text


def test_vnetd_confines_itself_to_the_units_capabilities():
    """main.py's list is the unit's CapabilityBoundingSet=, so that a vnetd started without
    systemd holds exactly what the unit would give it."""
    from vnetd import main

    assert sorted(main.UNIT_CAPABILITIES) == sorted(services.unit_capabilities())
    assert all(CAP_BITS[c] == bit for c, bit in main.UNIT_CAPABILITIES.items())
