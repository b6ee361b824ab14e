"""Sustained mixed load from 20 clients (as a member of group vnet): attach + detach, list,
leases, ports, for 60 s. Reports calls/s, p99 latency, failures (target 0) and the daemon's
RSS before and after (target: growth within 10%). "Before" is taken after a warm-up with the
same number of clients (5 s), so that what 20 concurrent connections need once (buffers,
tasks, the polkit cache) is not counted as growth; RSS is also sampled every 5 s during the
run, so a leak shows as a rising series rather than one number.

    sudo /opt/qemu-vnet/bin/python bench/mixed_load.py [--seconds 60] [--clients 20]
"""

from __future__ import annotations

import argparse
import json
import threading

from _common import bench_daemon, emit, pct

from tests.harness.daemon import ALICE, run_client
from tests.harness.users import spawn_as

WORKER = """
import time
async def main():
    me, seconds = sys.argv[1], float(sys.argv[2])
    lat, fails, i = [], [], 0
    async with Client() as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                kind = i % 4
                if kind == 0:
                    a = await c.attach("load1", f"{me}-{i % 8}")
                    a.close()
                elif kind == 1:
                    await c.list_networks()
                elif kind == 2:
                    await c.leases("load1")
                else:
                    await c.list_ports()
            except VnetClientError as e:
                fails.append(e.name)
            lat.append(time.perf_counter() - t)
            i += 1
    print(json.dumps({"lat": lat, "fails": fails}))
asyncio.run(main())
"""


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=20)
    a = ap.parse_args()
    with bench_daemon("bench") as d:
        run_client("define", "load1", "--subnet=10.206.0.0/24", check=True)
        run_client("start", "load1", check=True)
        warm = [spawn_as(ALICE, WORKER, f"w{i}", "5") for i in range(a.clients)]
        for w in warm:
            w.communicate(timeout=120)
        before = rss_kb(d.proc.pid)
        series: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(5):
                series.append(rss_kb(d.proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        procs = [spawn_as(ALICE, WORKER, f"c{i}", str(a.seconds)) for i in range(a.clients)]
        results = [json.loads(p.communicate(timeout=a.seconds + 120)[0]) for p in procs]
        done.set()
        sampler.join()
        after = rss_kb(d.proc.pid)
    lat = [x * 1000 for r in results for x in r["lat"]]
    fails = [f for r in results for f in r["fails"]]
    emit("mixed_load", {
        "clients": a.clients, "seconds": a.seconds, "calls": len(lat),
        "calls_per_s": round(len(lat) / a.seconds, 1),
        "p50_ms": round(pct(lat, 50), 2), "p99_ms": round(pct(lat, 99), 2),
        "failures": len(fails), "failure_kinds": sorted(set(fails)),
        "rss_before_kb": before, "rss_after_kb": after,
        "rss_growth": round(after / before - 1, 3), "rss_series_kb": series,
        "met": not fails and after <= before * 1.10,
    })


if __name__ == "__main__":
    main()
