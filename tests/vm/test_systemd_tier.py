"""The systemd tier: the Debian package on Debian 12 and 13 booted with systemd as PID 1.

Each image boots once (tests/vm/runner.py) and runs every check of tests/vm/guest_checks.py
in the guest, across one reboot; each test here asserts one check's result. The images are
built on first use and cached (tests/vm/image.py); the package is built with `make deb`.
Needs root, mmdebstrap, e2fsprogs, qemu-system-x86, debhelper, lintian and the Debian mirror.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.vm import guest_checks, runner
from tests.vm import image as images

REPO = Path(__file__).resolve().parents[2]
BENCH_OUT = Path(os.environ.get("VNET_VM_FIGURES", "/var/cache/qemu-vnet-tests/vm/last-run.json"))


@pytest.fixture(scope="session")
def deb() -> Path:
    if os.geteuid() != 0:
        pytest.fail("the systemd tier needs root (images are built with mmdebstrap): "
                    "run 'sudo make test'")
    r = subprocess.run(["make", "-s", "deb"], cwd=REPO, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"make deb failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    debs = sorted((REPO / "build").glob("qemu-vnet_*_all.deb"), key=lambda p: p.stat().st_mtime)
    assert debs, "make deb made no build/qemu-vnet_*_all.deb"
    return debs[-1]


@pytest.fixture(scope="module", params=images.SUITES)
def tier(request, deb) -> runner.Run:
    t0 = time.monotonic()
    img = images.build(request.param, log=lambda m: None)
    run = runner.boot(request.param, deb)
    figures = {"suite": request.param, "image_build_s": img.build_seconds,
               "boot_to_job_s": round(run.marks.get("VNET-TEST-BOOTED", -1), 1),
               "qemu_total_s": round(run.seconds, 1),
               "with_image_s": round(time.monotonic() - t0, 1), **run.figures}
    old = json.loads(BENCH_OUT.read_text()) if BENCH_OUT.is_file() else {}
    old[request.param] = figures
    BENCH_OUT.parent.mkdir(parents=True, exist_ok=True)
    BENCH_OUT.write_text(json.dumps(old, indent=1))
    print(json.dumps(figures))
    return run


@pytest.mark.parametrize("check", guest_checks.check_names())
def test_guest_check(tier, check):
    r = tier.result(check)
    assert r is not None, (
        f"{tier.suite}: check '{check}' never ran (an earlier step stopped the job); console:\n"
        f"{tier.console_text()[-5000:]}")
    assert r["ok"], f"{tier.suite}: {check}: {r['detail']}"
