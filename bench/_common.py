"""Shared bits for the benchmarks: a daemon in its own namespace, percentiles, JSON out."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness import daemon as hd  # noqa: E402
from tests.harness import services  # noqa: E402


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def summary_ms(samples: list[float]) -> dict:
    ms = [x * 1000 for x in samples]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 3), "p99_ms": round(pct(ms, 99), 3),
            "mean_ms": round(statistics.fmean(ms), 3), "max_ms": round(max(ms), 3)}


def byte_compile() -> None:
    """vnetd's and the client's modules compiled where the test environment's Python imports
    them from, as a package install leaves them (pip compiles on install, the Debian
    package's postinst too). Otherwise a restart counts compiling every module (some 70 ms
    for vnetd), and so does every command (some 15 ms), whenever __pycache__ cannot be
    written or PYTHONDONTWRITEBYTECODE is set."""
    import subprocess

    code = ("import compileall, os, vnetd, vnet_client, vnet_common\n"
            "for m in (vnetd, vnet_client, vnet_common):\n"
            "    compileall.compile_dir(os.path.dirname(m.__file__), quiet=1)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([str(hd.PY), "-c", code], check=True, env=env)


@contextmanager
def bench_daemon(label: str):
    if os.geteuid() != 0:
        sys.exit("benchmarks need root (sudo make bench)")
    byte_compile()
    with services.exclusive():
        services.start(with_vnetd=False)
        host = services.stop_vnetd()
        with services.activation_parked():
            hd.ensure_users()
            d = hd.Daemon(label, runtime_tmpfs=True)  # /run is a tmpfs where vnetd runs
            try:
                d.start()
                yield d
            finally:
                d.close()
        if host:
            services.ensure_vnetd()


async def time_start_stop(client, name: str, runs: int) -> tuple[list[float], list[float]]:
    """Seconds each Start and each Stop of a defined network took, `runs` times."""
    starts, stops = [], []
    for _ in range(runs):
        t = time.perf_counter()
        await client.start(name)
        starts.append(time.perf_counter() - t)
        t = time.perf_counter()
        await client.stop(name)
        stops.append(time.perf_counter() - t)
    return starts, stops


def emit(name: str, result: dict) -> None:
    print(json.dumps({"bench": name, **result}, indent=1))
