"""One user's storm of changes against another user's attaches (JSON out).

Bob, a delegated manager of his own network (a polkit rule grants him manage and forward),
keeps 24 forward changes in flight on the bus (3 clients x 8) for VNET_BENCH_SECONDS
(default 10); Alice, a member of group vnet, attaches VMs to her network on a session every
5 ms, alone and then during the storm:

- Alice's attach p50/p99 alone and during the storm (target: p50 during at most 5 x alone;
  every change takes the engine's lock, which serves callers in turn);
- Bob's calls per second and their p50 (his own queue is his to wait for).

    sudo /opt/qemu-vnet/bin/python bench/fairness.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import time

from _common import bench_daemon, emit, summary_ms

from tests.adversarial.test_daemon_fairness import STORM  # (Bob's storm, as the test's)
from tests.harness.daemon import ALICE, BOB, PolkitRule, grant_rule, run_client
from tests.harness.users import read_json, run_as, spawn_as

ATTACHES = """
import time
async def main():
    async with Client() as c:
        await c.open_session()
        a = await c.attach("alicenet", "warm"); a.close()
        took, i = [], 0
        deadline = time.monotonic() + float(sys.argv[1])
        while time.monotonic() < deadline:
            t = time.perf_counter()
            a = await c.attach("alicenet", f"vm{i % 50}")
            took.append(time.perf_counter() - t)
            a.close()
            i += 1
            await asyncio.sleep(0.005)
        print(json.dumps(took))
asyncio.run(main())
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10)
    a = ap.parse_args()
    result: dict = {"seconds": a.seconds}
    rules = "".join(grant_rule(BOB, f"org.qemuvnet.Vnet1.{x}") for x in ("manage", "forward"))
    with bench_daemon("fair") as d, PolkitRule("60-vnet-bench-fairness", rules):
        d.stop()
        d.start(["--log-level", "info"])
        run_client("define", "alicenet", "--subnet=10.215.0.0/24", "--dhcp=none", check=True)
        run_client("start", "alicenet", check=True)
        run_client("define", "bobnet", "--subnet=10.214.0.0/24", "--dhcp=none", user=BOB,
                   check=True)
        run_client("start", "bobnet", user=BOB, check=True)
        alone = json.loads(run_as(ALICE, ATTACHES, str(a.seconds / 2), timeout=300).stdout)
        storms = [spawn_as(BOB, STORM, str(a.seconds + 2), "8", str(20000 + 100 * j))
                  for j in range(3)]
        for s in storms:
            read_json(s, 60)
        time.sleep(1)
        during = json.loads(run_as(ALICE, ATTACHES, str(a.seconds / 2), timeout=300).stdout)
        bob: list[float] = []
        for s in storms:
            bob += read_json(s, 120)["took"]
            s.wait()
        result["alice_attach_alone"] = summary_ms(alone)
        result["alice_attach_during_storm"] = summary_ms(during)
        result["bob_calls_per_s"] = round(len(bob) / (a.seconds + 2), 1)
        result["bob_call"] = summary_ms(bob)
        ratio = result["alice_attach_during_storm"]["p50_ms"] / result["alice_attach_alone"][
            "p50_ms"]
        result["ratio_during_to_alone_p50"] = round(ratio, 2)
        result["target_ratio"] = 5
        result["met"] = ratio <= 5
    emit("fairness", result)


if __name__ == "__main__":
    main()
