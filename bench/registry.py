"""The MAC registry as a network fills up: what a new VM's MAC costs vnetd (its checks: room
per network and per user, MACs already held), and what a write of the registry costs, at 0,
1,000 and 4,000 entries in one network (the default limit is 4,096). Then a host whose
registry is full (65,536 entries over 100 networks): what one new VM's round costs, on the
event loop (the copy of what is to be written) and in all (copy, encoding and the atomic,
fsynced write of the file, in a temporary state directory): a file per network, so it
should cost what a network of 655 entries costs. Pure Python, no root.

    /opt/qemu-vnet/bin/python bench/registry.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helper"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))

from vnetd import macs as macs_mod  # noqa: E402
from vnetd.macs import MacRegistry  # noqa: E402
from vnetd.store import Store  # noqa: E402

SIZES = (0, 1000, 4000)


def main() -> None:
    r = MacRegistry({}, lambda *written: None, limit=5000, per_user=5000)
    r.defer = 1  # the writes are measured apart
    out: dict = {"bench": "registry", "new_vm_us": {}, "write_ms": {}}
    filled = 0
    for size in SIZES:
        while filled < size:
            r.get("n1", f"fill{filled}", 0, 1000)
            filled += 1
        runs = []
        for k in range(5):
            t = time.perf_counter()
            for j in range(100):
                r.get("n1", f"new{size}-{k}-{j}", 0, 1001)
            runs.append((time.perf_counter() - t) / 100)
            for j in range(100):  # back to `size` entries, through the registry's own path
                r.forget("n1", f"new{size}-{k}-{j}")
        out["new_vm_us"][str(size)] = round(min(runs) * 1e6, 1)
        t = time.perf_counter()
        json.dumps(r.data, sort_keys=True)  # what each write encodes (then fsyncs)
        out["write_ms"][str(size)] = round((time.perf_counter() - t) * 1000, 2)
    out["new_vm_full_over_empty"] = round(out["new_vm_us"][str(SIZES[-1])]
                                          / out["new_vm_us"][str(SIZES[0])], 2)
    out["full_host"] = full_host()
    print(json.dumps(out, indent=1))


def full_host(networks: int = 100, total: int = 65536, runs: int = 9) -> dict:
    """One new VM's round of writes when the host's registry is full, on a real disk."""
    d = Path(tempfile.mkdtemp(prefix="vnet-registry-bench-", dir="/var/tmp"))
    try:
        st = Store(d / "etc", d / "lib", d / "run")
        r = MacRegistry({}, macs_mod.saver(st), limit=total, per_user=total,
                        total_limit=total + runs)
        r.defer = 1
        for i in range(total):
            r.get(f"n{i % networks}", f"vm{i}", 0, 1000)
        for job in r.take_dirty():
            job()
        loop_ms, round_ms = [], []
        for k in range(runs):
            r.get("n7", f"new{k}", 0, 1000)
            t = time.perf_counter()
            jobs = r.take_dirty()
            t1 = time.perf_counter()
            for job in jobs:
                job()
            t2 = time.perf_counter()
            loop_ms.append((t1 - t) * 1000)
            round_ms.append((t2 - t) * 1000)
        return {"entries": total, "networks": networks,
                "new_vm_round_on_loop_ms": round(sorted(loop_ms)[runs // 2], 3),
                "new_vm_round_ms": round(sorted(round_ms)[runs // 2], 2),
                "files_written_per_round": len(jobs)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
