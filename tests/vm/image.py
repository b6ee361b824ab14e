#!/usr/bin/env python3
"""Debian 12 and 13 images with systemd as PID 1, for the systemd tier.

mmdebstrap (minbase) builds a root tree with systemd, dbus, polkitd, logind, udev, iproute2,
nftables, dnsmasq-base, the cloud kernel and its initrd, and what the package depends on (so
`dpkg -i` needs no network in the guest); `mkfs.ext4 -d` turns the tree into a file system
without a loop mount. The kernel and initrd are copied out next to it. Images are cached in
/var/cache/qemu-vnet-tests/vm/<suite>-<hash>/, where the hash covers the recipe below and this
file: a changed recipe builds a new image, an unchanged one is reused.

The image carries one systemd unit of the tier's own, vnet-test.service: at boot it unpacks
the tar on the second virtio disk (the package and the checks, tests/vm/guest_checks.py),
runs the checks, writes their results as a tar onto the third virtio disk, prints
VNET-TEST-* markers on the serial console and powers off. The checks are not in the image,
so changing them needs no rebuild.

    python3 tests/vm/image.py [bookworm|trixie ...]     # build (or find) the images
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("VNET_VM_CACHE", "/var/cache/qemu-vnet-tests/vm"))


def host_mirror() -> str:
    """The Debian archive this machine's apt uses, so that a machine that reaches Debian only
    through its own mirror builds from that mirror too."""
    apt = Path("/etc/apt")
    for f in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list")),
              *sorted((apt / "sources.list.d").glob("*.sources"))]:
        try:
            lines = f.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.split()
            if words[:1] == ["deb"]:
                words = [w for w in words[1:] if "=" not in w and not w.startswith("[")]
            elif words[:1] and words[0].lower() == "uris:":
                words = words[1:]
            else:
                continue
            for w in words:
                if w.startswith(("http://", "https://")) and w.rstrip("/").endswith("/debian"):
                    return w.rstrip("/")
    return "http://deb.debian.org/debian"


MIRROR = os.environ.get("VNET_VM_MIRROR") or host_mirror()
SUITES = ("bookworm", "trixie")

# What every image holds. The first line is what the tier is about (polkitd brings pkcheck
# and pkttyagent); the second is what the package depends on (installed offline in the
# guest); the third the checks' own tools (login and util-linux's agetty and setpriv: VT
# sessions and a user without one); the last the host services vnetd must coexist with.
PACKAGES = (
    "systemd systemd-sysv dbus polkitd libpam-systemd udev iproute2 nftables dnsmasq-base "
    "linux-image-cloud-amd64 initramfs-tools "
    "python3 python3-nftables python3-jeepney dbus-bin netbase "
    "procps kmod passwd login util-linux "
    "network-manager firewalld"
)

GUEST_RUNNER = r"""#!/bin/sh
# vnet-test: unpack the job from /dev/vdb, run it, hand the results back on /dev/vdc.
# Results collect in /var/lib/vnet-test/out, which survives a reboot the job asks for.
exec >/dev/ttyS0 2>&1
echo "VNET-TEST-BOOTED $(cut -d' ' -f1 /proc/uptime)"
out=/var/lib/vnet-test/out
mkdir -p /run/vnet-test "$out"
if tar -xf /dev/vdb -C /run/vnet-test; then
    /usr/bin/python3 /run/vnet-test/guest_checks.py /run/vnet-test "$out"
    echo "VNET-TEST-RC $?"
else
    echo "VNET-TEST-RC no-job"
fi
tar -cf /dev/vdc -C "$out" .
sync
# A job may ask for a reboot (its next phase runs after it); otherwise power off.
if [ -e /var/lib/vnet-test/reboot ]; then
    rm -f /var/lib/vnet-test/reboot; echo "VNET-TEST-REBOOT"; systemctl reboot
else
    echo "VNET-TEST-END"; systemctl poweroff -f
fi
"""

GUEST_UNIT = """[Unit]
Description=qemu-vnet systemd tier: run the job on /dev/vdb
After=basic.target dbus.service systemd-logind.service polkit.service network.target
Wants=dbus.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vnet-test
StandardOutput=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""

CUSTOMIZE = f"""set -e
root="$1"
echo vnet-test > "$root/etc/hostname"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\\n' > "$root/etc/fstab"
cat > "$root/usr/local/sbin/vnet-test" <<'RUNNER'
{GUEST_RUNNER}RUNNER
chmod 755 "$root/usr/local/sbin/vnet-test"
cat > "$root/etc/systemd/system/vnet-test.service" <<'UNIT'
{GUEST_UNIT}UNIT
mkdir -p "$root/etc/systemd/system/multi-user.target.wants" "$root/var/lib/vnet-test"
ln -sf /etc/systemd/system/vnet-test.service \\
    "$root/etc/systemd/system/multi-user.target.wants/vnet-test.service"
# Nothing that waits for a network the guest does not have, or runs apt in the background.
# No getty on the serial console either: its vhangup() would cut the job's console output.
for u in apt-daily.timer apt-daily-upgrade.timer systemd-networkd-wait-online.service \\
         e2scrub_all.timer fstrim.timer man-db.timer serial-getty@ttyS0.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$u"
done
# A root password nobody needs, and a console on ttyS0 for debugging by hand.
echo 'root:vnet-test' | chroot "$root" chpasswd
rm -f "$root/etc/machine-id"; : > "$root/etc/machine-id"
"""


class ImageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    suite: str
    root: Path
    kernel: Path
    initrd: Path
    build_seconds: float | None  # None: taken from the cache


def require(program: str, package: str) -> str:
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise ImageError(f"{program} is not installed (Debian package {package}): run "
                         "'sudo make install-test-deps'")
    return path


def recipe_hash(suite: str) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(f"{suite}\0{MIRROR}\0{PACKAGES}".encode())
    return h.hexdigest()[:12]


def image_dir(suite: str) -> Path:
    return CACHE / f"{suite}-{recipe_hash(suite)}"


def build(suite: str, log=print) -> Image:
    """The cached image for `suite`, built first if its recipe changed."""
    if suite not in SUITES:
        raise ImageError(f"unknown suite '{suite}': use one of {', '.join(SUITES)}")
    d = image_dir(suite)
    done = d / "root.img", d / "vmlinuz", d / "initrd.img"
    if all(p.is_file() for p in done):
        return Image(suite, *done, build_seconds=None)
    mmdebstrap = require("mmdebstrap", "mmdebstrap")
    mkfs = require("mkfs.ext4", "e2fsprogs")
    if os.geteuid() != 0:
        raise ImageError("building a systemd-tier image needs root (mmdebstrap in root mode)")
    t0 = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.glob(f"{suite}-*"):  # older recipes of this suite
        if old != d:
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=f".build-{suite}-") as tmp:
        tree = Path(tmp) / "tree"
        hook = Path(tmp) / "customize.sh"
        hook.write_text(CUSTOMIZE)
        hook.chmod(0o755)
        argv = [mmdebstrap, "--mode=root", "--variant=minbase", "--format=directory",
                "--components=main", f"--include={','.join(PACKAGES.split())}",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                f"--customize-hook={hook} \"$1\"",
                suite, str(tree), MIRROR]
        log(f"building the {suite} image: {' '.join(argv)}")
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise ImageError(f"mmdebstrap {suite} failed (rc={r.returncode}):\n"
                             f"{r.stderr[-4000:]}")
        boot = tree / "boot"
        kernels = sorted(boot.glob("vmlinuz-*"))
        initrds = sorted(boot.glob("initrd.img-*"))
        if not kernels or not initrds:
            raise ImageError(f"the {suite} tree has no kernel or initrd in /boot: "
                             f"{sorted(p.name for p in boot.iterdir())}")
        staging = Path(tmp) / "out"
        staging.mkdir()
        shutil.copy2(kernels[-1], staging / "vmlinuz")
        shutil.copy2(initrds[-1], staging / "initrd.img")
        size_mb = int(sum(f.stat().st_size for f in tree.rglob("*") if f.is_file()
                          and not f.is_symlink()) / 2**20 * 1.3) + 600
        r = subprocess.run([mkfs, "-q", "-F", "-t", "ext4", "-L", "vnet-root", "-d", str(tree),
                            str(staging / "root.img"), f"{size_mb}M"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ImageError(f"mkfs.ext4 -d failed (rc={r.returncode}): {r.stderr[-2000:]}")
        if d.exists():
            shutil.rmtree(d)
        staging.rename(d)
    return Image(suite, *done, build_seconds=time.monotonic() - t0)


def main(argv: list[str]) -> int:
    for suite in argv or SUITES:
        img = build(suite)
        how = "cached" if img.build_seconds is None else f"built in {img.build_seconds:.0f} s"
        print(f"{suite}: {img.root} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
