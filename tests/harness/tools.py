"""External programs the tests run: a missing one fails with its name and its Debian package
(`make test` installs them all), never as a quiet False."""

from __future__ import annotations

import shutil

# program -> the Debian package that has it (every one is in the Makefile's package lists)
PACKAGES = {
    "ping": "iputils-ping",
    "vde_plug": "vdeplug",
    "vde_switch": "vde2",
    "busybox": "busybox-static",
    "iperf3": "iperf3",
    "bridge": "iproute2",
    "ip": "iproute2",
    "dnsmasq": "dnsmasq-base",
    "vtysh": "frr",
    "qemu-system-x86_64": "qemu-system-x86",
}


class MissingProgram(AssertionError):
    pass


def require(program: str) -> str:
    """The path of `program`; MissingProgram naming its package when it is not installed."""
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        pkg = PACKAGES.get(program, "?")
        raise MissingProgram(f"{program} is not installed (Debian package {pkg}): run "
                             "'sudo make test', which installs what the tests need")
    return path
