"""DHCP numbers (JSON out):
- start of a `nat` network with dnsmasq (bridge, addresses, server answering), p50/p99 over
  50 runs: target p50 <= 40 ms;
- DHCPDISCOVER to lease for 100 clients (busybox udhcpc in guest namespaces), p50.

    sudo /opt/qemu-vnet/bin/python bench/dhcp.py
"""

from __future__ import annotations

import argparse
import asyncio
import time

from _common import bench_daemon, emit, summary_ms, time_start_stop
from vnet_client import Client

from tests.harness.guests import Guest


async def start_stop(runs: int) -> tuple[list[float], list[float]]:
    async with Client() as c:
        await c.define("benchnat", mode="nat", subnet="10.203.0.0/24")
        starts, stops = await time_start_stop(c, "benchnat", runs)
        await c.start("benchnat")
    return starts, stops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--clients", type=int, default=100)
    a = ap.parse_args()
    with bench_daemon("bench") as d:
        starts, stops = asyncio.run(start_stop(a.runs))
        leases = []
        guests = []
        try:
            for _ in range(a.clients):
                g = Guest(d, "benchnat")
                guests.append(g)
                t = time.perf_counter()
                got = g.dhcp()
                if got:
                    leases.append(time.perf_counter() - t)
        finally:
            for g in guests:
                g.close()
    start = summary_ms(starts)
    emit("dhcp", {
        "nat_start_with_dnsmasq": start, "nat_stop": summary_ms(stops),
        "discover_to_lease_udhcpc": summary_ms(leases), "clients_with_lease": len(leases),
        "note": "discover_to_lease includes starting the udhcpc process in its namespace",
        "target_start_p50_ms": 40, "met": start["p50_ms"] <= 40,
    })


if __name__ == "__main__":
    main()
