"""The MAC registry as a network fills up: what a new VM's MAC costs vnetd (its checks: room
per network and per user, MACs already held), and what a write of the registry costs, at 0,
1,000 and 4,000 entries in one network (the default limit is 4,096). Pure Python, no root.

    /opt/qemu-vnet/bin/python bench/registry.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helper"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))

from vnetd.macs import MacRegistry  # noqa: E402

SIZES = (0, 1000, 4000)


def main() -> None:
    r = MacRegistry({}, lambda data: None, limit=5000, per_user=5000)
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
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
