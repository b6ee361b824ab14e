"""NAT throughput, guest netns -> outside netns, with iperf3: through vnetd's ruleset (NAT,
forward filtering, anti-spoofing) versus the same path routed with no ruleset at all.
Target: ours >= 95% of the bare path.

    sudo /opt/qemu-vnet/bin/python bench/nat_throughput.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

from _common import bench_daemon, emit

from tests.harness.daemon import run_client
from tests.harness.guests import Guest
from tests.harness.netpeers import Outside


def iperf(guest: Guest, outside: Outside, seconds: int) -> float:
    srv = subprocess.Popen(["ip", "netns", "exec", outside.netns, "iperf3", "-s", "-1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        r = guest.run("iperf3", "-c", Outside.PEER, "-t", str(seconds), "-J",
                      timeout=seconds + 20)
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
    finally:
        srv.kill()
        srv.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with bench_daemon("bench") as d:
        out = Outside(d)
        try:
            run_client("define", "benchnat", "--subnet=10.205.0.0/24", check=True)
            run_client("start", "benchnat", check=True)
            g = Guest(d, "benchnat")
            assert g.dhcp(configure=True), "no lease"
            ours = [iperf(g, out, a.seconds) for _ in range(a.rounds)]
            d.exec("nft", "delete", "table", "inet", "qemu_vnet")
            d.exec("nft", "delete", "table", "bridge", "qemu_vnet")
            subprocess.run(["ip", "-n", out.netns, "route", "add", "10.205.0.0/24", "via",
                            Outside.HOST], check=True)
            bare = [iperf(g, out, a.seconds) for _ in range(a.rounds)]
            g.close()
        finally:
            out.close()
    o, b = statistics.median(ours), statistics.median(bare)
    emit("nat_throughput", {"ours_gbit_s": round(o / 1e9, 3), "bare_gbit_s": round(b / 1e9, 3),
                            "ratio": round(o / b, 3), "rounds": a.rounds,
                            "seconds_each": a.seconds, "target_ratio": 0.95,
                            "met": o / b >= 0.95})


if __name__ == "__main__":
    main()
