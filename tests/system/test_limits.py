"""Limits: a flooding client cannot starve another user's attach; in-flight calls per sender
are capped with a named error; a client retries once while vnetd restarts."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.harness.daemon import ALICE, BOB, run_client
from tests.harness.users import run_as, spawn_as

FLOOD = """
import time
from dbus_fast import Message
async def main():
    async with Client() as c:
        print(json.dumps({"ready": True}), flush=True)
        sent = limited = 0
        t = time.monotonic()
        async def one():
            nonlocal limited
            try:
                await c.call("ListNetworks")
            except VnetClientError as e:
                if e.name.endswith("LimitsExceeded"):
                    limited += 1
        while time.monotonic() - t < float(sys.argv[1]):
            await asyncio.gather(*(one() for _ in range(64)))  # 64 at once: over the cap
            sent += 64
        print(json.dumps({"sent": sent, "limited": limited}), flush=True)
asyncio.run(main())
"""

ATTACH_TIMED = """
import time
async def main():
    async with Client() as c:
        for i in range(20):  # warm: connection, polkit cache, and the VMs' MACs (a MAC
            await c.get_mac("vnet2", f"victim{i}")  # given out for the first time is fsynced)
        samples = []
        for i in range(20):
            t = time.perf_counter()
            a = await c.attach("vnet2", f"victim{i}")
            samples.append((time.perf_counter() - t) * 1000)
            a.close()
            await asyncio.sleep(0.05)
        print(json.dumps(samples))
asyncio.run(main())
"""


@pytest.fixture(scope="module", autouse=True)
def network(vnetd):
    run_client("define", "vnet2", "--dhcp=none", check=True)
    run_client("start", "vnet2", check=True)


def test_a_flood_from_one_user_does_not_starve_another_users_attach(vnetd):
    flood = spawn_as(BOB, FLOOD, "6")
    try:
        assert json.loads(flood.stdout.readline())["ready"]
        time.sleep(0.5)  # the flood is running
        r = run_as(ALICE, ATTACH_TIMED, timeout=60)
        assert r.returncode == 0, r.stderr
        samples = sorted(json.loads(r.stdout))
        stats = json.loads(flood.stdout.readline())
    finally:
        flood.kill()
        flood.wait()
    assert stats["sent"] > 1000, stats  # thousands of calls
    assert stats["limited"] > 0  # the cap on calls in flight per sender was hit
    assert samples[-1] < 100, f"attach took {samples[-1]:.1f} ms under the flood ({samples})"
    assert vnetd.alive()


def test_client_retries_once_while_vnetd_restarts(vnetd):
    vnetd.kill()
    restart = threading.Timer(0.3, vnetd.start)
    restart.start()
    try:
        r = run_client("list", "--json")
    finally:
        restart.join()
    assert r.returncode == 0, r.stderr
    assert [n["name"] for n in json.loads(r.stdout)] == ["vnet2"]


def test_when_vnetd_stays_away_the_message_says_so(vnetd):
    vnetd.stop()
    try:
        t = time.monotonic()
        r = run_client("list")
        assert r.returncode == 1
        assert "vnetd) is not running" in r.stderr
        assert 0.9 < time.monotonic() - t < 10  # it waited for one retry, then gave up
    finally:
        vnetd.start()
