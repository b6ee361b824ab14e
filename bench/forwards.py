"""Port-forward add + remove latency with 10, 1,000 and 10,000 forwards present (JSON out).

Two figures per size: the firewall change alone (render + one libnftables transaction: the
part held in nft maps), and the whole call through vnetd (D-Bus, validation, firewall, and
saving the network's definition file).
Target: p99 <= 5 ms and flat (10,000 / 10 <= 1.5).

    sudo /opt/qemu-vnet/bin/python bench/forwards.py [--runs 100]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from _common import bench_daemon, emit, pct
from vnet_client import Client

from tests.harness.daemon import run_client

NFT_WORKER = r"""
import ipaddress, json, sys, time
sys.path.insert(0, sys.argv[1])
import nftables
from vnetd.render import nft as fw
n, runs = int(sys.argv[2]), int(sys.argv[3])
nft = nftables.Nftables(); nft.set_json_output(True)
net = fw.FwNetwork(name="benchfw", mode="nat", subnet=ipaddress.IPv4Network("10.204.0.0/16"),
                   gateway=ipaddress.IPv4Address("10.204.0.1"))
def fwd(i):
    return fw.FwForward(network="benchfw", proto="tcp", family=4, ext_addr=None,
                        port_lo=10000 + i, port_hi=10000 + i,
                        target=str(ipaddress.IPv4Address("10.204.1.0") + i % 60000),
                        target_port=80)
fw.apply(fw.render_ruleset([net], [fwd(i) for i in range(n)], []), nft)
samples = []
for r in range(runs):
    f = fwd(n + 1 + r)
    t = time.perf_counter()
    fw.apply(fw.render_forward_add(f), nft)
    fw.apply(fw.render_forward_remove(f), nft)
    samples.append(time.perf_counter() - t)
fw.apply(fw.render_delete_all(), nft)
print(json.dumps(samples))
"""


def ms(samples: list[float]) -> dict:
    v = [x * 1000 for x in samples]
    return {"n": len(v), "p50_ms": round(pct(v, 50), 3), "p99_ms": round(pct(v, 99), 3)}


async def through_vnetd(runs: int) -> list[float]:
    samples = []
    async with Client() as c:
        for r in range(runs):
            spec = {"proto": "tcp", "external": str(60000 + r), "to": "10.204.2.2:80"}
            t = time.perf_counter()
            await c.add_forward("benchfw", spec)
            await c.remove_forward("benchfw", {"proto": "tcp", "external": str(60000 + r)})
            samples.append(time.perf_counter() - t)
    return samples


def main() -> None:
    import json
    import shutil
    import subprocess
    from pathlib import Path

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=100)
    a = ap.parse_args()
    helper = str(Path(__file__).resolve().parents[1] / "helper")
    out: dict = {"firewall_only": {}, "through_vnetd": {}}
    with bench_daemon("bench") as d:
        for n in (10, 1000, 10000):
            r = subprocess.run(["ip", "netns", "exec", d.netns, "/opt/qemu-vnet/bin/python",
                                "-c", NFT_WORKER, helper, str(n), str(a.runs)],
                               capture_output=True, text=True, check=True)
            out["firewall_only"][str(n)] = ms(json.loads(r.stdout))
        run_client("define", "benchfw", "--subnet=10.204.0.0/16", "--dhcp=none", check=True)
        run_client("start", "benchfw", check=True)
        present = 0
        for n in (10, 1000, 10000):
            # load n forwards at once: one file each in the network's forwards directory,
            # as vnetd keeps them, then reload
            fdir = d.config_dir / "networks" / "benchfw.forwards"
            shutil.rmtree(fdir, ignore_errors=True)
            fdir.mkdir()
            for i in range(n):
                (fdir / f"tcp4-any-any-{20000 + i}.toml").write_text(
                    f'proto = "tcp"\nfamily = 4\nport = "{20000 + i}"\n'
                    f'target = "10.204.1.{1 + i % 250}"\ntarget-port = 80\n')
            run_client("reload", check=True)
            run_client("stop", "benchfw", check=True)
            run_client("start", "benchfw", check=True)
            present = n
            out["through_vnetd"][str(present)] = ms(asyncio.run(through_vnetd(a.runs)))
    for k in out:
        p99 = {n: v["p99_ms"] for n, v in out[k].items()}
        out[k]["flat_ratio_p99_10000_to_10"] = round(p99["10000"] / p99["10"], 2)
    out["target"] = {"p99_ms": 5, "ratio": 1.5}
    emit("forwards", out)


if __name__ == "__main__":
    main()
