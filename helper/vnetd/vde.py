"""VDE switches of a network (`vde = true`): one supervised vde_switch per tap, its sockets
under /run/qemu-vnet/vde/<tap>/ (group vnet, mode 660), so members of vnet plug QEMU in with
`-netdev vde,sock=/run/qemu-vnet/vde/<tap>`. A dead switch is restarted; stopping the network
stops the switches and removes their sockets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import shutil
import time
from pathlib import Path

from . import identity
from .backends import tap as tap_be
from .backends import vde as vde_be
from .backends.supervisor import Child
from .errors import Busy, Failed
from .model import Network

log = logging.getLogger("vnetd.vde")


def give_tap(tap: str, uid: int) -> None:
    """The switch, not a QEMU user, opens a VDE network's tap: make vnet-vde its owner (the
    tun driver lets a user without CAP_NET_ADMIN open a tap only if it owns it and is in its
    group). EBUSY: a switch left running by a previous vnetd holds it, already its owner."""
    try:
        tap_be.set_tap_owner(tap, uid)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise Failed(f"Cannot hand the tap {tap} to the VDE switch: {e.strerror}.") from e


class VdeSwitches:
    def __init__(self, runtime_dir: Path):
        self.base = Path(runtime_dir) / "vde"
        self.children: dict[str, list[Child]] = {}

    def _paths(self, tap: str) -> tuple[Path, Path, Path]:
        return (vde_be.sock_dir(self.base.parent, tap), self.base / f"{tap}.mgmt",
                self.base / f"{tap}.pid")

    async def start(self, net: Network) -> None:
        """vde_switch runs as vnet-vde, group = the network's tap group, no capabilities
        (identity.py). The base directory is root:vnet-vde 0771: the switches create their
        directories and management sockets in it; anyone may pass through to a socket
        directory, which only the tap group may enter; nobody else may list or create."""
        if not net.vde or net.name in self.children:
            return
        uid, own_gid = identity.user_ids(identity.VDE_USER)
        _, gid = identity.vde_ids(net.tap_group)
        identity.share_dir(self.base, own_gid, 0o771)
        mgmt_group = grp.getgrgid(own_gid).gr_name
        started: list[Child] = []
        try:
            for tap in net.tap_names:
                sock, mgmt, pid = self._paths(tap)
                give_tap(tap, uid)
                c = Child(f"vde_switch[{tap}]",
                          vde_be.argv(tap, sock, mgmt, net.vde_ports, net.tap_group,
                                      mgmt_group, net.vde_switch_args), pid, str(sock),
                          hold_stdin=True, user=(uid, gid), extra_groups=[own_gid])
                await c.start()
                started.append(c)
            await self._wait_ready(net, started)
        except BaseException:
            for c in started:
                await c.stop()
            self._remove_sockets(net)
            raise
        self.children[net.name] = started

    async def _wait_ready(self, net: Network, children: list[Child]) -> None:
        deadline = time.monotonic() + 3
        for tap, c in zip(net.tap_names, children, strict=True):
            ctl = self._paths(tap)[0] / "ctl"
            while not ctl.exists():
                if c.proc is not None and c.proc.returncode is not None:
                    raise Failed(f"vde_switch for {tap} exited at once (code "
                                 f"{c.proc.returncode}); see the vnetd log.")
                if time.monotonic() > deadline:
                    raise Failed(f"vde_switch for {tap} did not open its socket in 3 s.")
                await asyncio.sleep(0.005)

    async def stop(self, net: Network) -> None:
        for c in self.children.pop(net.name, []):
            await c.stop()
        self._remove_sockets(net)

    def _remove_sockets(self, net: Network) -> None:
        for tap in net.tap_names:
            sock, mgmt, _ = self._paths(tap)
            shutil.rmtree(sock, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                mgmt.unlink()

    def status(self, net: Network) -> list[dict]:
        out = []
        for tap, c in zip(net.tap_names, self.children.get(net.name, []), strict=False):
            sock, mgmt, _ = self._paths(tap)
            used = vde_be.active_ports(mgmt)
            d = {"tap": tap, "sock": str(sock), "ports": net.vde_ports, **c.status()}
            if used is not None:
                d["free"] = max(0, net.vde_ports - used)
            out.append(d)
        return out

    def free_socket(self, net: Network) -> str:
        """The switch with the most free ports."""
        best = max(self.status(net), key=lambda d: d.get("free", 0), default=None)
        if best is None or not best.get("free"):
            raise Busy(f"Every VDE switch of {net.name} is full ({net.vde_ports} ports each).")
        return best["sock"]
