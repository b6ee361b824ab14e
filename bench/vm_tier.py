#!/usr/bin/env python3
"""The systemd tier's costs, as JSON: image build time (a fresh build into a temporary cache),
boot to the job (QEMU start to vnet-test.service running under systemd), boot to vnetd's
'ready' (kernel start to the line, after the reboot, with one autostart network), the tier's
total time per image and for all, vnetd's start-up to ready under systemd with 20 autostart
networks (`systemctl start` of a Type=dbus unit returns once vnetd owns its bus name), the
SIGKILL restart and its breakdown, and how much slower the guest's CPU is than this host's
(the same pure-Python loop timed in both: what a QEMU nested in the guest would start from).

    sudo python3 bench/vm_tier.py [--cached] [bookworm|trixie ...]

--cached uses the images in /var/cache/qemu-vnet-tests/vm instead of building fresh ones.
Builds the package with `make deb` first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str]) -> int:
    cached = "--cached" in argv
    suites = [a for a in argv if not a.startswith("--")]
    with tempfile.TemporaryDirectory(prefix="vnet-vm-bench-", dir="/var/tmp") as tmp:
        if not cached:
            os.environ["VNET_VM_CACHE"] = tmp
        from tests.vm import image as images
        from tests.vm import runner
        r = subprocess.run(["make", "-s", "deb"], cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-2000:], r.stderr[-2000:], file=sys.stderr)
            return 1
        deb = sorted((REPO / "build").glob("qemu-vnet_*_all.deb"),
                     key=lambda p: p.stat().st_mtime)[-1]
        from tests.vm.guest_checks import CPU_LOOP
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-I", "-c", CPU_LOOP], check=True)
        host_loop = time.monotonic() - t0
        out = {"bench": "vm_tier", "cores": os.cpu_count(), "accel": "tcg",
               "qemu": "-cpu qemu64 -smp 2 -m 1024", "host_cpu_loop_s": round(host_loop, 2),
               "suites": {}}
        t_all = time.monotonic()
        for suite in suites or images.SUITES:
            t0 = time.monotonic()
            img = images.build(suite, log=lambda m: None)
            run = runner.boot(suite, deb)
            failed = [x["name"] for x in run.results if not x["ok"]]
            out["suites"][suite] = {
                "image_build_s": None if img.build_seconds is None else round(img.build_seconds, 1),
                "image_mb": round(img.root.stat().st_size / 2**20),
                "boot_to_job_s": round(run.marks.get("VNET-TEST-BOOTED", -1), 1),
                "tier_total_s": round(time.monotonic() - t0, 1),
                "qemu_s": round(run.seconds, 1),
                "checks": len(run.results), "failed": failed,
                **{k: v for k, v in run.figures.items() if not k.startswith("phase")},
            }
            loop = run.figures.get("cpu_loop_s")
            if loop:
                out["suites"][suite]["guest_cpu_slowdown"] = round(loop / host_loop, 1)
        out["total_s"] = round(time.monotonic() - t_all, 1)
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
