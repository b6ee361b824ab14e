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
    assert sec["SystemdService"] == "dbus-org.qemuvnet.Vnet1.service"
    unit = (REPO / "systemd/vnetd.service").read_text()
    assert "Alias=dbus-org.qemuvnet.Vnet1.service" in unit and "Restart=on-failure" in unit


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
