"""VDE switches (qemu-vlan's --vde): one vde_switch per tap of a network, so unprivileged
users in group vnet plug QEMU in with `-netdev vde,sock=/run/qemu-vnet/vde/<tap>` and no D-Bus
call at all. Pure argv building and management-socket parsing here; the supervisor runs it.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

VDE_SWITCH = "/usr/bin/vde_switch"
MAX_PORTS = 1024

def sock_dir(runtime_dir: Path, tap: str) -> Path:
    return Path(runtime_dir) / "vde" / tap


def argv(tap: str, sockdir: Path, mgmt: Path, ports: int, group: str, mgmt_group: str | None,
         extra: tuple[str, ...] = ()) -> list[str]:
    """The data sockets are for `group` (vnet: QEMU users); the management socket only for
    `mgmt_group` (vde_switch's own group, which vnetd joins to count free ports). vde_switch
    takes a group *name* only (`No such group '1234'` for a number): with no name for it
    (`mgmt_group` None), the management socket is 0600, the switch's user's alone, rather than
    left to the data sockets' group. `--dirmode` is required: without it vde_switch makes its
    directory setgid, which the service's RestrictSUIDSGID= refuses."""
    mgmt_access = (["--mgmtmode", "660", "--mgmtgroup", mgmt_group] if mgmt_group is not None
                   else ["--mgmtmode", "600"])
    return [VDE_SWITCH, "--tap", tap, "--sock", str(sockdir), "--mode", "660",
            "--dirmode", "770", "--group", group, "--numports", str(ports),
            "--mgmt", str(mgmt), *mgmt_access, *extra]


MGMT_DEADLINE = 1.0  # seconds for the whole conversation
MGMT_MAX_BYTES = 64 * 1024  # a switch with MAX_PORTS ports prints far less


def active_ports(mgmt: Path, peer_uid: int | None = None, deadline: float = MGMT_DEADLINE,
                 max_bytes: int = MGMT_MAX_BYTES) -> int | None:
    """Ports in use (the tap's own port included), from the management socket; None if the
    switch does not answer properly. Blocking: call it from a worker thread.

    The socket sits in a directory the switches write, so the switch is not trusted: the whole
    exchange must end within `deadline` seconds and `max_bytes` bytes (a switch that trickles
    bytes cannot hold the thread), and with `peer_uid` the process at the other end must run as
    that user (SO_PEERCRED, checked before anything is sent): a socket of another user that
    a symbolic link led to is left alone."""
    end = time.monotonic() + deadline
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(deadline)
            s.connect(str(mgmt))
            if peer_uid is not None and peer_credentials(s)[1] != peer_uid:
                return None
            budget = [max_bytes]
            if _read_until(s, b"vde$ ", end, budget) is None:
                return None
            s.settimeout(max(0.001, end - time.monotonic()))
            s.sendall(b"port/print\n")
            out = _read_until(s, b"vde$ ", end, budget)
    except OSError:  # TimeoutError included
        return None
    return None if out is None else parse_active_ports(out.decode(errors="replace"))


def peer_credentials(s: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected unix socket."""
    return struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            struct.calcsize("3i")))


def parse_active_ports(text: str) -> int:
    return sum(1 for line in text.splitlines()
               if line.startswith("Port ") and " ACTIVE " in f"{line} ")


def _read_until(s: socket.socket, marker: bytes, end: float, budget: list[int]) -> bytes | None:
    """Bytes up to and including `marker`; None at EOF before it, or when the deadline `end`
    passes or more than budget[0] bytes arrive (budget is shared between calls)."""
    out = b""
    while marker not in out:
        left = end - time.monotonic()
        if left <= 0:
            return None
        s.settimeout(left)
        chunk = s.recv(min(65536, budget[0] + 1))
        if not chunk:
            return None
        budget[0] -= len(chunk)
        if budget[0] < 0:
            return None
        out += chunk
    return out
