"""Scale (JSON out): a host with many networks and ports, through the system bus, as root.

Defines and starts N host-only networks, attaches M ports for new VMs spread over them (fds
held here), then measures what must stay flat as the host grows, and what a crash costs:

- network start p50 of the first 10 and of the last 10 started (target: last <= 1.2 x first);
- attach p50 of a new VM, first 100 and last 100 (target: last <= 1.2 x first), and of the
  same VM again (a known VM re-attaching after its port went) with few and with M ports.
  Each network's first attach comes before those (one VM per network, counted among the M
  ports, its p50 given apart): it makes the tap itself and stocks the network's spare taps,
  where every later attach takes a spare, so the first 100 and the last 100 compare the same
  path at a few ports and at M;
- vnetd's RSS with everything up, per network and per port;
- `vnet-client list` and `show` at that size against an empty host (target <= 1.5 x);
- after SIGKILL: time until vnetd answers ListPorts again (target <= 1 s), until every
  network is back (target <= 5 s), and the ports it still knows (target: all);
- stop p50.

    sudo /opt/qemu-vnet/bin/python bench/scale.py [--networks 100] [--ports 1000] [--dhcp none]

`--dhcp none` starts the networks without a DHCP/DNS server: what vnetd's own costs are when
no dnsmasq runs per network (every dnsmasq wakes at every route change on the host, which
is what makes a start cost more with hundreds of them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import time

from _common import bench_daemon, emit, pct
from vnet_client import Client, VnetClientError

from tests.harness.daemon import CLIENT

# as the packaged service logs (the test harness's default is debug: a line per port and call)
LOG = ["--log-level", "info"]


def p50_ms(samples: list[float]) -> float:
    return round(pct([s * 1000 for s in samples], 50), 3)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children_rss_kib(pid: int) -> int:
    """The RSS of vnetd's servers (dnsmasq, dhcpd, vde_switch: its children)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for kid in f.read().split():
                try:
                    total += rss_kib(int(kid))
                except OSError:
                    pass
    return total


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def subnet(i: int) -> str:
    return f"10.{160 + i // 250}.{i % 250}.0/24"


def cli_ms(*args: str, runs: int = 9) -> float:
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([str(CLIENT), *args], check=True, capture_output=True)
        samples.append(time.perf_counter() - t)
    return round(statistics.median(samples) * 1000, 1)


async def build(n_nets: int, n_ports: int, dhcp: str = "dnsmasq") -> tuple[dict, list]:
    out: dict = {}
    held = []
    async with Client() as c:
        starts = []
        for i in range(n_nets):
            await c.define(f"sc{i}", mode="host-only", subnet=subnet(i), dhcp=dhcp)
            t = time.perf_counter()
            await c.start(f"sc{i}")
            starts.append(time.perf_counter() - t)
        out["network_start_p50_ms"] = {"first_10": p50_ms(starts[:10]),
                                       "last_10": p50_ms(starts[-10:])}
        firsts, new = [], []
        for j in range(n_ports):
            t = time.perf_counter()
            a = await c.attach(f"sc{j % n_nets}", f"vm{j}")
            (firsts if j < n_nets else new).append(time.perf_counter() - t)
            held.append(a)
            if j == n_nets - 1:  # every network stocked with spares before the first 100
                await asyncio.sleep(1.0)
            if j == n_nets + 99:  # the same VM again with few ports on the host
                out["_again_few"] = await again_rounds(c, held, n_nets)
        out["attach_first_on_a_network_p50_ms"] = p50_ms(firsts)
        out["attach_new_vm_p50_ms"] = {"first_100": p50_ms(new[:100]),
                                       "last_100": p50_ms(new[-100:])}
        few, few_rounds = out.pop("_again_few")
        many, many_rounds = await again_rounds(c, held, n_nets)
        few_at, many_at = f"at_{n_nets + 100}_ports", f"at_{n_ports}_ports"
        out["attach_same_vm_again_p50_ms"] = {few_at: few, many_at: many}
        out["attach_same_vm_again_rounds_p50_ms"] = {few_at: few_rounds, many_at: many_rounds}
    return out, held


async def again_rounds(c: Client, held: list, n_nets: int, rounds: int = 3
                       ) -> tuple[float, list[float]]:
    """again() in a few rounds: the median of their p50s, and each. One round's p50 moves
    by a third between runs on a small VM; the few and the many ports cannot take turns
    (the ports only grow), so each side is measured more than once instead."""
    each = [await again(c, held, n_nets) for _ in range(rounds)]
    return statistics.median(each), each


async def again(c: Client, held: list, n_nets: int, runs: int = 50) -> float:
    """Detach-free re-attach: close the newest port, wait for it to go, attach it again."""
    samples = []
    for _ in range(runs):
        a = held.pop()
        vm, net = a.vm, a.network
        a.close()
        for _ in range(200):
            try:
                t = time.perf_counter()
                b = await c.attach(net, vm)
                break
            except VnetClientError as e:  # Busy until the old tap's link event
                if not e.name.endswith("Busy"):
                    raise
                await asyncio.sleep(0.005)
        samples.append(time.perf_counter() - t)
        held.append(b)
    return p50_ms(samples)


async def answers(timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            async with Client() as c:
                await c.list_ports()
                return time.perf_counter() - t0
        except (OSError, VnetClientError):
            await asyncio.sleep(0.01)
    raise SystemExit(f"vnetd did not answer within {timeout} s of its restart")


async def adopted(n_nets: int, timeout: float) -> int:
    """Wait until no network is `adopting`; how many were at the first look."""
    first = None
    t0 = time.perf_counter()
    async with Client() as c:
        while time.perf_counter() - t0 < timeout:
            nets = await c.list_networks()
            n = sum(1 for x in nets if x.get("state") == "adopting")
            first = n if first is None else first
            if not n:
                return first
            # not much oftener: listing every network costs vnetd as much as it measures
            await asyncio.sleep(0.1)
    raise SystemExit(f"vnetd was still adopting networks {timeout} s after its restart")


async def count_state(n_nets: int) -> tuple[int, int]:
    async with Client() as c:
        nets = await c.list_networks()
        ports = await c.list_ports()
    running = sum(1 for n in nets if n.get("name", "").startswith("sc")
                  and n.get("state") == "running")
    return running, len(ports)


async def teardown(n_nets: int) -> list[float]:
    stops = []
    async with Client() as c:
        for i in range(n_nets):
            t = time.perf_counter()
            await c.stop(f"sc{i}")
            stops.append(time.perf_counter() - t)
            await c.undefine(f"sc{i}")
    return stops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--networks", type=int, default=100)
    ap.add_argument("--ports", type=int, default=1000)
    ap.add_argument("--dhcp", choices=("dnsmasq", "none"), default="dnsmasq",
                    help="the networks' DHCP/DNS server (none: vnetd's costs alone)")
    a = ap.parse_args()
    if a.ports < a.networks + 200:
        ap.error(f"--ports must be at least --networks + 200 ({a.networks + 200}): each "
                 "network's first attach, then 100 measured at few ports and 100 at many")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * a.ports + 1024)), hard))
    result: dict = {"networks": a.networks, "ports": a.ports, "dhcp": a.dhcp}
    with bench_daemon("bench") as d:
        d.stop()
        d.start(LOG + ["--max-ports-per-user", str(10 * a.ports), "--max-networks-per-user",
                       str(10 * a.networks), "--max-macs-per-user", str(10 * a.ports)])
        # one network of its own (no ports) to show, on the empty host and on the loaded one
        subprocess.run([str(CLIENT), "define", "solo", "--subnet",
                        "10.254.254.0/24"], check=True, capture_output=True)
        subprocess.run([str(CLIENT), "start", "solo"], check=True,
                       capture_output=True)
        empty = {"list": cli_ms("list"), "ports": cli_ms("ports"), "show": cli_ms("show", "solo")}
        rss0, fd0, kids0 = rss_kib(d.proc.pid), fds(d.proc.pid), children_rss_kib(d.proc.pid)
        built, held = asyncio.run(build(a.networks, a.ports, a.dhcp))
        result.update(built)
        rss1, fd1, kids1 = rss_kib(d.proc.pid), fds(d.proc.pid), children_rss_kib(d.proc.pid)
        result["vnetd_fds"] = {"empty": fd0, "loaded": fd1}
        result["servers_rss_kib"] = {"empty": kids0, "loaded": kids1,
                                     "per_network": round((kids1 - kids0) / a.networks, 1)}
        result["vnetd_rss_kib"] = {"empty": rss0, "loaded": rss1,
                                   "per_network_and_port": round((rss1 - rss0) /
                                                                 (a.networks + a.ports), 1)}
        loaded = {"list": cli_ms("list"), "ports": cli_ms("ports"),
                  "show": cli_ms("show", "solo"), "show_with_its_ports": cli_ms("show", "sc0")}
        result["cli_median_ms"] = {"empty": empty, "loaded": loaded}
        # a crash: SIGKILL, then the restart the service manager would make
        os.kill(d.proc.pid, 9)
        d.proc.wait()
        t0 = time.perf_counter()
        d.proc = None
        d.start(LOG + ["--max-ports-per-user", str(10 * a.ports), "--max-networks-per-user",
                       str(10 * a.networks), "--max-macs-per-user", str(10 * a.ports)],
                settled=False)  # it answers first and adopts the running networks meanwhile
        first = time.perf_counter() - t0 + asyncio.run(answers(30))
        adopting = asyncio.run(adopted(a.networks, 60))
        running, ports = asyncio.run(count_state(a.networks))
        result["restart_after_sigkill"] = {
            "first_answer_s": round(first, 3),
            "networks_adopting_at_first_answer": adopting,
            "all_networks_back_s": round(time.perf_counter() - t0, 3),
            "networks_running": f"{running}/{a.networks}",
            "ports_still_known": f"{ports}/{a.ports}"}
        for h in held:
            h.close()
        result["stop_p50_ms"] = p50_ms(asyncio.run(teardown(a.networks)))
    s, n = result["network_start_p50_ms"], result["attach_new_vm_p50_ms"]
    result["ratios"] = {
        "network_start_last_to_first": round(s["last_10"] / s["first_10"], 2),
        "attach_new_last_to_first": round(n["last_100"] / n["first_100"], 2),
        "attach_same_vm_many_to_few": round(
            result["attach_same_vm_again_p50_ms"][f"at_{a.ports}_ports"]
            / result["attach_same_vm_again_p50_ms"][f"at_{a.networks + 100}_ports"], 2),
        "list_loaded_to_empty": round(loaded["list"] / empty["list"], 2),
        "show_loaded_to_empty": round(loaded["show"] / empty["show"], 2)}
    result["targets"] = {"start_ratio": 1.2, "attach_ratio": 1.2, "first_answer_s": 1,
                         "all_back_s": 5, "list_ratio": 1.5, "show_ratio": 1.5}
    r = result["ratios"]
    result["met"] = {
        "start_ratio": r["network_start_last_to_first"] <= 1.2,
        "attach_ratio": r["attach_new_last_to_first"] <= 1.2,
        "first_answer": result["restart_after_sigkill"]["first_answer_s"] <= 1,
        "all_back": result["restart_after_sigkill"]["all_networks_back_s"] <= 5,
        "nothing_lost": result["restart_after_sigkill"]["ports_still_known"]
        == f"{a.ports}/{a.ports}",
        "attach_same_vm_ratio": r["attach_same_vm_many_to_few"] <= 1.2,
        "list_ratio": r["list_loaded_to_empty"] <= 1.5,
        "show_ratio": r["show_loaded_to_empty"] <= 1.5}
    emit("scale", result)


if __name__ == "__main__":
    main()
