"""One user's storm of changes must not make every other user wait behind all of it.

Every change vnetd makes takes one lock. Bob, a delegated manager of his own network (a
polkit rule grants him manage and forward), keeps 24 forward changes in flight, each a
durable file write and a firewall transaction. With a first-come lock, Alice's attach
waited behind every one of Bob's queued changes: as long as each of Bob's own calls took
(measured: 0.9 ms alone, 40 ms during the storm). The lock now serves callers in turn, so
Alice waits for about one of Bob's changes while Bob's calls wait for his own others.

What is compared is machine-independent: Alice's attach time during the storm against the
time Bob's own calls take in it (they share the daemon, the disk and the lock)."""

from __future__ import annotations

import json
import statistics

from tests.harness.daemon import ALICE, BOB, PolkitRule, grant_rule, run_client
from tests.harness.users import read_json, run_as, spawn_as

MANAGE_ACTION = "org.qemuvnet.Vnet1.manage"
FORWARD_ACTION = "org.qemuvnet.Vnet1.forward"

STORM = """
import time
async def one(c, port, deadline, took):
    spec = {"proto": "tcp", "port": port, "target": "10.214.0.5", "target-port": 80}
    while time.monotonic() < deadline:
        for call in (c.add_forward, c.remove_forward):
            t = time.perf_counter()
            await call("bobnet", spec)
            took.append(time.perf_counter() - t)
async def main():
    seconds, width, base = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    async with Client() as c:  # (on the bus: a session serves one call at a time)
        print(json.dumps({"ready": True}), flush=True)
        took = []
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(one(c, base + k, deadline, took) for k in range(width)))
        print(json.dumps({"calls": len(took), "took": took}), flush=True)
asyncio.run(main())
"""

ATTACHES = """
import time
async def main():
    async with Client() as c:
        await c.open_session()
        took = []
        for i in range(int(sys.argv[1])):
            t = time.perf_counter()
            a = await c.attach("alicenet", f"vm{i}")
            took.append(time.perf_counter() - t)
            a.close()
            await asyncio.sleep(0.02)
        print(json.dumps(took))
asyncio.run(main())
"""


def test_a_storm_of_one_users_changes_does_not_queue_another_users_attach(vnetd):
    run_client("define", "alicenet", "--subnet=10.213.0.0/24", "--dhcp=none", check=True)
    run_client("start", "alicenet", check=True)
    rules = "".join(grant_rule(BOB, a) for a in (MANAGE_ACTION, FORWARD_ACTION))
    storms = []
    try:
        with PolkitRule("60-vnet-adv-bob-manages", rules):
            run_client("define", "bobnet", "--subnet=10.214.0.0/24", "--dhcp=none", user=BOB,
                       check=True)
            run_client("start", "bobnet", user=BOB, check=True)
            r = run_as(ALICE, ATTACHES, "3")  # (warm: polkit's answer is cached after)
            assert r.returncode == 0, r.stderr
            storms = [spawn_as(BOB, STORM, "8", "12", str(20000 + 100 * j)) for j in range(2)]
            for s in storms:
                assert read_json(s, 30) == {"ready": True}
            r = run_as(ALICE, ATTACHES, "60", timeout=120)
            assert r.returncode == 0, r.stderr
            alice = statistics.median(json.loads(r.stdout))
            bob_took = []
            for s in storms:
                out = read_json(s, 60)
                bob_took += out["took"]
    finally:
        for s in storms:
            if s.poll() is None:
                s.kill()
            s.wait()
        run_client("stop", "bobnet")
        run_client("undefine", "bobnet")
        run_client("stop", "alicenet")
        run_client("undefine", "alicenet")
    assert len(bob_took) > 200, f"Bob's storm made only {len(bob_took)} calls"
    bob = statistics.median(bob_took)
    assert alice < 0.35 * bob, (
        f"Alice's attach took {alice * 1000:.1f} ms (median) while Bob's {len(bob_took)} "
        f"changes took {bob * 1000:.1f} ms each: she waited behind his queue")
