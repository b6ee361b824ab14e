"""One user's reads must not slow another user's attaches (JSON out).

A user outside group vnet (reads are open to everyone) keeps GetNetwork calls in flight from
several connections (24 at a time on each, under the limit of 32 per connection), while a
member of group vnet attaches VMs one after another. GetNetwork reads the network's drop
counters and the other tables' drop policies from nftables in a worker thread; the attach
changes the port's guard on the event loop. Reported: the attach p50/p99 alone and during
the flood, and how many reads the flood made.

Target: the attach p50 during the flood at most 2 x the idle p50 (before the reads had their
own libnftables context and lock, it was about 40 x: every guard change waited behind them).

    sudo /opt/qemu-vnet/bin/python bench/query_flood.py [--seconds 25] [--clients 6]
"""

from __future__ import annotations

import argparse
import json
import time

from _common import bench_daemon, emit, summary_ms

from tests.harness.daemon import ALICE, BOB, run_client
from tests.harness.users import run_as, spawn_as

NET = "flood1"

ATTACH = """
import time
async def main():
    async with Client() as c:
        a = await c.attach(sys.argv[1], "warmup"); a.close()  # the first call asks polkit
        samples = []
        for i in range(int(sys.argv[2])):
            t = time.perf_counter()
            a = await c.attach(sys.argv[1], f"vm{i % 20}")
            samples.append(time.perf_counter() - t)
            a.close()
            await asyncio.sleep(0.02)  # the closed tap goes before the next attach
        print(json.dumps(samples))
asyncio.run(main())
"""

FLOOD = """
import time
async def main():
    async with Client() as c:
        deadline = time.monotonic() + float(sys.argv[2])
        n = 0
        async def one():
            nonlocal n
            while time.monotonic() < deadline:
                try:
                    await c.get_network(sys.argv[1])
                    n += 1
                except VnetClientError:
                    await asyncio.sleep(0.001)
        await asyncio.gather(*[one() for _ in range(24)])
        print(json.dumps(n))
asyncio.run(main())
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=25)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--attaches", type=int, default=300)
    a = ap.parse_args()
    with bench_daemon("bench") as d:
        d.stop()
        d.start(["--log-level", "info"])
        run_client("define", NET, "--subnet=10.209.0.0/24", check=True)
        run_client("start", NET, check=True)
        r = run_as(ALICE, ATTACH, NET, str(a.attaches), timeout=600)
        idle = json.loads(r.stdout)
        flood = [spawn_as(BOB, FLOOD, NET, str(a.seconds)) for _ in range(a.clients)]
        time.sleep(1)  # the flood is under way
        r = run_as(ALICE, ATTACH, NET, str(a.attaches), timeout=600)
        loaded = json.loads(r.stdout)
        reads = sum(json.loads(p.communicate(timeout=a.seconds + 120)[0] or "0")
                    for p in flood)
    out = {"attach_idle": summary_ms(idle), "attach_during_flood": summary_ms(loaded),
           "flood_reads": reads, "flood_connections": a.clients}
    out["ratio_p50"] = round(out["attach_during_flood"]["p50_ms"]
                             / out["attach_idle"]["p50_ms"], 2)
    out["target_ratio_p50"] = 2
    out["met"] = out["ratio_p50"] <= 2
    emit("query_flood", out)


if __name__ == "__main__":
    main()
