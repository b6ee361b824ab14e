"""VDE switches (qemu-vlan's --vde): one vde_switch per tap of a network, so unprivileged
users in group vnet plug QEMU in with `-netdev vde,sock=/run/qemu-vnet/vde/<tap>` and no D-Bus
call at all. Pure argv building and management-socket parsing here; the supervisor runs it.
"""

from __future__ import annotations

import socket
from pathlib import Path

VDE_SWITCH = "/usr/bin/vde_switch"
MAX_PORTS = 1024

def sock_dir(runtime_dir: Path, tap: str) -> Path:
    return Path(runtime_dir) / "vde" / tap


def argv(tap: str, sockdir: Path, mgmt: Path, ports: int, group: str, mgmt_group: str,
         extra: tuple[str, ...] = ()) -> list[str]:
    """The data sockets are for `group` (vnet: QEMU users); the management socket only for
    `mgmt_group` (vde_switch's own group, which vnetd joins to count free ports).
    `--dirmode` is required: without it vde_switch makes its directory setgid, which the
    service's RestrictSUIDSGID= refuses."""
    return [VDE_SWITCH, "--tap", tap, "--sock", str(sockdir), "--mode", "660",
            "--dirmode", "770", "--group", group, "--numports", str(ports),
            "--mgmt", str(mgmt), "--mgmtmode", "660", "--mgmtgroup", mgmt_group, *extra]


def active_ports(mgmt: Path, timeout: float = 0.5) -> int | None:
    """Ports in use (the tap's own port included), from the management socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(mgmt))
            _read_until(s, b"vde$ ")
            s.sendall(b"port/print\n")
            text = _read_until(s, b"vde$ ").decode(errors="replace")
    except OSError:
        return None
    return parse_active_ports(text)


def parse_active_ports(text: str) -> int:
    return sum(1 for line in text.splitlines()
               if line.startswith("Port ") and " ACTIVE " in f"{line} ")


def _read_until(s: socket.socket, marker: bytes) -> bytes:
    out = b""
    while marker not in out:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    return out
