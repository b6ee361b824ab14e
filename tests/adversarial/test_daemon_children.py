"""Attacks through vnetd's children and leftovers: another user's processes that merely name a
child's files in their command line are never signalled and cannot slow vnetd down; an
undefined network leaves no runtime or state directory behind."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time

import pytest

from tests.harness.daemon import ALICE, BOB, PY, as_user, run_client
from tests.harness.users import run_as

# Ignores SIGTERM, but says so on stdout when one arrives.
STUBBORN = """
import signal, sys, time
def noted(sig, frame):
    print("signalled", sig, flush=True)
signal.signal(signal.SIGTERM, noted)
signal.signal(signal.SIGHUP, noted)
print("ready", flush=True)
while True:
    time.sleep(60)
"""


@pytest.fixture(scope="module", autouse=True)
def networks(vnetd):
    run_client("define", "vnet3", check=True)  # dnsmasq
    run_client("define", "vnet4", "--vde", "-n", "1", "--dhcp=none", check=True)
    run_client("define", "vnet2", "--dhcp=none", check=True)
    run_client("start", "vnet2", check=True)
    yield


@pytest.fixture
def decoys(vnetd):
    """Processes of bob (not in group vnet) whose argv names vnetd's child files."""
    markers = [f"{vnetd.runtime_dir}/vnet3/dnsmasq.conf"] * 4 + [
        f"{vnetd.runtime_dir}/vnet3/", f"{vnetd.runtime_dir}/vde/vnet4_0"]
    procs = [subprocess.Popen(as_user(BOB, [str(PY), "-c", STUBBORN, m]),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              start_new_session=True)
             for m in markers]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    yield procs
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def untouched(procs) -> None:
    for p in procs:
        assert p.poll() is None, "a decoy of bob's was killed"
        ready, _, _ = select.select([p.stdout], [], [], 0)
        assert not ready, f"bob's process {p.pid} was signalled: {p.stdout.readline()}"


ATTACH_TIMED = """
import time
async def main():
    async with Client() as c:
        t = time.monotonic()
        a = await c.attach("vnet2", "victim")
        a.close()
        print(json.dumps(time.monotonic() - t))
asyncio.run(main())
"""


@pytest.fixture
def stopped_after(vnetd):
    yield
    for name in ("vnet3", "vnet4"):
        run_client("stop", name)


def test_other_users_processes_naming_child_files_are_left_alone(vnetd, decoys, stopped_after):
    result = {}

    def start():
        t = time.monotonic()
        result["start"] = run_client("start", "vnet3")
        result["took"] = time.monotonic() - t

    th = threading.Thread(target=start)
    th.start()
    time.sleep(0.2)
    r = run_as(ALICE, ATTACH_TIMED)  # another user's attach while the network starts
    th.join()
    assert result["start"].returncode == 0, result["start"].stderr
    assert result["took"] < 3, f"start took {result['took']:.1f} s"
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) < 2, f"attach waited {float(r.stdout):.1f} s"

    t = time.monotonic()
    run_client("start", "vnet4", check=True)
    assert time.monotonic() - t < 3
    untouched(decoys)

    # a restart adopts the running networks and their children: still nobody else's touched
    t = time.monotonic()
    vnetd.restart()
    assert time.monotonic() - t < 8
    run_client("stop", "vnet3", check=True)
    run_client("stop", "vnet4", check=True)
    vnetd.restart()  # and one with stopped networks whose files are still there
    untouched(decoys)


def test_children_left_by_a_killed_vnetd_are_replaced(vnetd, stopped_after):
    """The other side: vnetd's own children, left by a vnetd that was killed, are still
    found (by their pid files, checked against /proc) and replaced by one child each."""
    run_client("start", "vnet3", check=True)
    try:
        before = {p for p in vnetd.children() if _comm(p) == "dnsmasq"}
        assert len(before) == 1
        vnetd.kill()
        vnetd.start()
        after = {p for p in vnetd.children() if _comm(p) == "dnsmasq"}
        assert len(after) == 1
    finally:
        run_client("stop", "vnet3", check=True)
    assert not [p for p in vnetd.children() if _comm(p) == "dnsmasq"]


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_undefine_removes_the_networks_runtime_and_state_directories(vnetd):
    run_client("define", "vnet6", check=True)
    run_client("start", "vnet6", check=True)
    run_client("stop", "vnet6", check=True)
    assert (vnetd.state_dir / "vnet6").is_dir()  # leases live there while it is defined
    run_client("undefine", "vnet6", check=True)
    assert not (vnetd.runtime_dir / "vnet6").exists()
    assert not (vnetd.state_dir / "vnet6").exists()
    # a new network of that name starts clean
    run_client("define", "vnet6", check=True)
    assert not (vnetd.state_dir / "vnet6").exists()
    run_client("undefine", "vnet6", check=True)
