#!/usr/bin/env python3
"""Boot a systemd-tier image under QEMU TCG and collect what its job left.

One boot per image runs every check (tests/vm/guest_checks.py), across the reboot the job
asks for. The image is attached with snapshot=on (nothing is written to the cached file); the
job (the package, the checks, the project's unit) is a tar on a second raw virtio disk; the
results come back as a tar on a third. The serial console carries VNET-TEST-* and VNET-CHECK
markers, timestamped here as they arrive.

    python3 tests/vm/runner.py build/qemu-vnet_0.1.0_all.deb [bookworm|trixie]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from tests.vm import image as images  # noqa: E402

OUT_DISK_MB = 64
CMDLINE = ("root=/dev/vda rw console=ttyS0,115200 quiet loglevel=3 panic=-1 net.ifnames=0 "
           "systemd.show_status=0 systemd.journald.forward_to_console=0 rd.udev.log_level=3")


class VmError(RuntimeError):
    pass


@dataclass
class Run:
    suite: str
    console: list[tuple[float, str]] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    seconds: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)

    def result(self, name: str) -> dict | None:
        for r in reversed(self.results):
            if r["name"] == name:
                return r
        return None

    def console_text(self) -> str:
        return "\n".join(f"[{t:7.2f}] {ln}" for t, ln in self.console)


def qemu_argv(img: images.Image, job: Path, out: Path) -> list[str]:
    qemu = images.require("qemu-system-x86_64", "qemu-system-x86")
    return [qemu, "-machine", "pc,hpet=off", "-accel", "tcg", "-cpu", "qemu64", "-smp", "2",
            "-m", "1024", "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-kernel", str(img.kernel), "-initrd", str(img.initrd),
            "-append", CMDLINE,
            "-drive", f"file={img.root},format=raw,if=virtio,snapshot=on",
            "-drive", f"file={job},format=raw,if=virtio,readonly=on",
            "-drive", f"file={out},format=raw,if=virtio",
            "-nic", "none"]


def make_job(deb: Path, dest: Path) -> None:
    with tarfile.open(dest, "w") as t:
        t.add(deb, arcname="qemu-vnet.deb")
        t.add(HERE / "guest_checks.py", arcname="guest_checks.py")
        t.add(REPO / "systemd" / "vnetd.service", arcname="vnetd.service")
    # a whole number of 512-byte sectors for the block device
    size = dest.stat().st_size
    with open(dest, "ab") as f:
        f.write(b"\0" * (-size % 512 + 512 * 64))


def boot(suite: str, deb: Path, timeout: float = 900, log=print) -> Run:
    img = images.build(suite, log=log)
    run = Run(suite)
    with tempfile.TemporaryDirectory(prefix=f"vnet-vm-{suite}-") as tmp:
        job, out = Path(tmp) / "job.tar", Path(tmp) / "out.raw"
        make_job(deb, job)
        with open(out, "wb") as f:
            f.truncate(OUT_DISK_MB * 2**20)
        argv = qemu_argv(img, job, out)
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

        def reader() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                t = time.monotonic() - t0
                run.console.append((t, line))
                for mark in ("VNET-TEST-BOOTED", "VNET-TEST-END", "VNET-TEST-REBOOT"):
                    if mark in line:  # the console may put escape sequences first
                        key = mark if mark not in run.marks else f"{mark}-2"
                        run.marks[key] = t

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            th.join(5)
            raise VmError(f"{suite}: the guest did not power off within {timeout:.0f} s; "
                          f"console:\n{run.console_text()[-6000:]}") from None
        th.join(5)
        run.seconds = time.monotonic() - t0
        try:
            with tarfile.open(out) as t:
                for m in t.getmembers():
                    if m.isfile():
                        data = t.extractfile(m).read()  # type: ignore[union-attr]
                        run.files[m.name.removeprefix("./")] = data
        except tarfile.TarError as e:
            raise VmError(f"{suite}: no results on the output disk ({e}); console:\n"
                          f"{run.console_text()[-6000:]}") from None
    for ln in run.files.get("results.jsonl", b"").decode().splitlines():
        run.results.append(json.loads(ln))
    run.figures = json.loads(run.files.get("figures.json", b"{}") or b"{}")
    return run


def main(argv: list[str]) -> int:
    """VNET_VM_KEEP=DIR keeps what each job left (journals, figures) in DIR/<suite>/."""
    deb = Path(argv[0])
    keep = os.environ.get("VNET_VM_KEEP")
    for suite in argv[1:] or images.SUITES:
        run = boot(suite, deb)
        if keep:
            for name, data in run.files.items():
                dest = Path(keep) / suite / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
        print(run.console_text())
        print(json.dumps({"suite": suite, "seconds": round(run.seconds, 1),
                          "marks": run.marks, "figures": run.figures}, indent=1))
        for r in run.results:
            print(f"{'PASS' if r['ok'] else 'FAIL'} phase {r['phase']} {r['name']}: {r['detail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
