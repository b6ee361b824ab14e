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
    """vnetd's modules compiled, as a package install leaves them: a restart's time counts
    Python compiling every module from source otherwise (some 70 ms here), as it would under
    PYTHONDONTWRITEBYTECODE."""
    import compileall

    for package in ("helper", "common"):
        compileall.compile_dir(str(ROOT / package), quiet=1)


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
