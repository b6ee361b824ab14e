"""Start of a --vde -n4 network (4 vde_switch processes, 4 x 32 ports, dnsmasq), p50/p99
over 20 runs. Target: p50 <= 150 ms.

    sudo /opt/qemu-vnet/bin/python bench/vde_start.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio

from _common import bench_daemon, emit, summary_ms, time_start_stop
from vnet_client import Client


async def measure(runs: int) -> tuple[list[float], list[float]]:
    async with Client() as c:
        await c.define("benchvde", subnet="10.207.0.0/24", taps=4, vde=True)
        starts, stops = await time_start_stop(c, "benchvde", runs)
    return starts, stops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    with bench_daemon("bench"):
        starts, stops = asyncio.run(measure(a.runs))
    s = summary_ms(starts)
    emit("vde_start", {"start_vde_n4": s, "stop_vde_n4": summary_ms(stops),
                       "target_start_p50_ms": 150, "met": s["p50_ms"] <= 150})


if __name__ == "__main__":
    main()
