"""Start/stop latency of a host-only network, from a long-lived client (JSON out).

Target: start p50 <= 20 ms on a 2-core machine.
    sudo /opt/qemu-vnet/bin/python bench/network_start_stop.py [--runs 50]
"""

from __future__ import annotations

import argparse
import asyncio

from _common import bench_daemon, emit, summary_ms, time_start_stop
from vnet_client import Client


async def measure(runs: int) -> dict:
    async with Client() as c:
        await c.define("benchnet", mode="host-only", subnet="10.201.0.0/24", dhcp="none")
        starts, stops = await time_start_stop(c, "benchnet", runs)
        await c.undefine("benchnet")
    return {"start": summary_ms(starts), "stop": summary_ms(stops),
            "target_start_p50_ms": 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=50)
    a = ap.parse_args()
    with bench_daemon("bench"):
        result = asyncio.run(measure(a.runs))
    result["met"] = result["start"]["p50_ms"] <= 20
    emit("network_start_stop", result)


if __name__ == "__main__":
    main()
