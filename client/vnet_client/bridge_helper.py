"""vnet-bridge-helper: a drop-in for qemu-bridge-helper that needs no setuid bit.

QEMU runs it for `-netdev bridge,br=vnet2,helper=/usr/libexec/qemu-vnet/vnet-bridge-helper`
as `vnet-bridge-helper --use-vnet --fd=N --br=vnet2`. It asks vnetd, as the user running
QEMU, for a tap on that network and passes the fd back over socket N (SCM_RIGHTS), exactly as
qemu-bridge-helper does. The VM name comes from QEMU's `-name`, the guest MAC from the
`-device ...,netdev=ID,mac=` of the `-netdev bridge` that names this bridge; when the MAC is
not known (a manager runs the helper itself), the port is locked to the first MAC seen on it.
"""

from __future__ import annotations

import os
import socket
import sys

from .base import is_utf8, not_utf8

SHELLS = {"sh", "dash", "bash"}
DEFAULT_BRIDGE = "br0"  # QEMU's DEFAULT_BRIDGE_INTERFACE


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def find_qemu() -> tuple[int, list[str]]:
    """The QEMU process that ran us (directly, or through 'sh -c')."""
    pid = os.getppid()
    argv = _cmdline(pid)
    if argv and os.path.basename(argv[0]) in SHELLS:
        pid = _parent(pid)
        argv = _cmdline(pid)
    return pid, argv


def _opts(text: str) -> tuple[str, dict[str, str]]:
    parts = text.split(",")
    kv = {}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        kv[k] = v
    return parts[0], kv


def guess(argv: list[str], bridge: str) -> tuple[str | None, list[str | None]]:
    """(VM name, guest MACs of this bridge's netdevs in order) from QEMU's command line."""
    name = None
    netdev_ids: list[str] = []
    nic_macs: list[str | None] = []
    devices: list[dict[str, str]] = []
    args = iter(argv[1:])
    for a in args:
        flag = a.lstrip("-") if a.startswith("-") else None
        if flag not in ("name", "netdev", "nic", "device", "net"):
            continue
        val = next(args, "")
        if flag == "name":
            first = val.split(",")[0]
            name = first[len("guest="):] if first.startswith("guest=") else first
            for part in val.split(","):
                if part.startswith("guest="):
                    name = part[len("guest="):]
        elif flag == "netdev":
            kind, kv = _opts(val)
            if kind == "bridge" and kv.get("br", DEFAULT_BRIDGE) == bridge:
                netdev_ids.append(kv.get("id", ""))
        elif flag == "nic":
            kind, kv = _opts(val)
            if kind == "bridge" and kv.get("br", DEFAULT_BRIDGE) == bridge:
                nic_macs.append(kv.get("mac"))
        elif flag == "device":
            _, kv = _opts(val)
            devices.append(kv)
    macs: list[str | None] = []
    for nid in netdev_ids:
        mac = next((d.get("mac") for d in devices if d.get("netdev") == nid), None)
        macs.append(mac)
    return name, macs + nic_macs


USAGE = "usage: vnet-bridge-helper [--use-vnet] --br=BRIDGE --fd=UNIX_FD"


def parse_args(argv: list[str]) -> tuple[str, int]:
    """(bridge, socket fd) of QEMU's command line for us; ValueError for anything else."""
    bridge, fd = None, None
    for a in argv:
        if not is_utf8(a):
            raise ValueError(not_utf8(a))
        if a.startswith("--br="):
            bridge = a[5:]
        elif a.startswith("--fd="):
            fd = int(a[5:]) if a[5:].isascii() and a[5:].isdigit() else None
            fd = fd if fd is not None and fd < 2**31 else None
        elif a == "--use-vnet":
            pass
        else:
            raise ValueError(f"unknown argument {a!r}")
    if bridge is None or fd is None:
        raise ValueError(USAGE)
    return bridge, fd


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(f"{USAGE}\n\n{__doc__}", end="")
        return 0
    if "--version" in argv:
        from . import __version__

        print(f"vnet-bridge-helper (qemu-vnet) {__version__}")
        return 0
    try:
        bridge, sock_fd = parse_args(argv)
    except ValueError as e:
        print(f"vnet-bridge-helper: {e}", file=sys.stderr)
        return 2
    qemu_pid, qemu_argv = find_qemu()
    name, macs = guess(qemu_argv, bridge)
    vm = name or f"qemu-{qemu_pid}"
    from .helper_call import HelperError, attach_for_helper

    try:
        fd = attach_for_helper(bridge, vm, macs, qemu_pid)
    except HelperError as e:  # QEMU shows our stderr: say it plainly
        print(f"vnet-bridge-helper: {e.message}", file=sys.stderr)
        return 1
    try:
        sock = socket.socket(fileno=sock_fd)
        socket.send_fds(sock, [b"\0"], [fd])
        sock.detach()
    except OSError as e:
        print(f"vnet-bridge-helper: cannot pass the tap to QEMU: {e}", file=sys.stderr)
        return 1
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
