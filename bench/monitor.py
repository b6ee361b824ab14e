"""Event delay (JSON out): from the start of a change (Define/Undefine through the bus) to
its line from `vnet-client monitor --json`. Target: p50 under 50 ms.

    sudo /opt/qemu-vnet/bin/python bench/monitor.py [--runs 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time

from _common import bench_daemon, emit, summary_ms
from vnet_client import Client

from tests.harness.daemon import CLIENT


async def changes(mon: subprocess.Popen, runs: int) -> list[float]:
    delays = []
    async with Client() as c:
        for i in range(runs):
            name = f"vnet{10 + i % 2}"
            t = time.perf_counter()
            if i % 4 < 2:
                await c.define(name, mode="host-only", dhcp="none")
            else:
                await c.undefine(name)
            line = await asyncio.to_thread(mon.stdout.readline)
            delays.append(time.perf_counter() - t)
            assert json.loads(line)["network"] == name, line
    return delays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=40)
    a = ap.parse_args()
    with bench_daemon("bench"):
        mon = subprocess.Popen([str(CLIENT), "monitor", "--json"], stdout=subprocess.PIPE,
                               text=True)
        time.sleep(0.5)
        try:
            delays = asyncio.run(changes(mon, a.runs - a.runs % 4))
        finally:
            mon.kill()
            mon.wait()
    s = summary_ms(delays)
    emit("monitor", {"change_to_line": s, "target_p50_ms": 50, "met": s["p50_ms"] < 50})


if __name__ == "__main__":
    main()
