"""VDE switches of a network (`vde = true`): one supervised vde_switch per tap, its sockets
under /run/qemu-vnet/vde/<tap>/ (group vnet, mode 660), so members of vnet plug QEMU in with
`-netdev vde,sock=/run/qemu-vnet/vde/<tap>`. A dead switch is restarted; stopping the network
stops the switches and removes their sockets.

/run/qemu-vnet/vde is root:vnet-vde 0771 with no sticky bit: every switch (supplementary group
vnet-vde) may create, rename and remove any entry in it. So vnetd keeps nothing of its own
there: the switches' pid files are in /run/qemu-vnet/_pids (root 0755), and the management
sockets, which the switches make there, are talked to with a deadline, a byte cap and a check
of the peer's uid (render/vde_switch.py active_ports)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..children import identity
from ..children.supervisor import Child, reap
from ..errors import Busy, Failed
from ..kernel import tap as tap_be
from ..model import Network
from ..render import vde_switch as vde_be

if TYPE_CHECKING:
    from ..networks import Running

log = logging.getLogger("vnetd.vde")

# Pid files of the children whose own directories others may write (the VDE switches). The
# name starts with '_', so no network's runtime directory (/run/qemu-vnet/<network>) can be it.
PID_DIR = "_pids"
# The switches are asked how many ports are in use through their management sockets (up to
# 64 switches a network, a second each at worst), in a thread of their own: anyone may ask
# (GetNetwork), and the event loop's shared workers write the MAC registry and make taps.
# Those who ask while an asking is under way share it.


def give_tap(tap: str, uid: int) -> None:
    """The switch, not a QEMU user, opens a VDE network's tap: make vnet-vde its owner (the
    tun driver lets a user without CAP_NET_ADMIN open a tap only if it owns it and is in its
    group). The caller has stopped any switch left running for this tap, so EBUSY means some
    other process holds it, and the new switch could not open it."""
    try:
        tap_be.set_tap_owner(tap, uid)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise Failed(f"The tap {tap} is held by another process, so its VDE switch cannot "
                         "open it; stop that process and start the network again.") from e
        raise Failed(f"Cannot hand the tap {tap} to the VDE switch: {e.strerror}.") from e


def mgmt_group_name(gid: int) -> str | None:
    """vde_switch's --mgmtgroup takes a name only; None when `gid` has no group entry."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        log.warning("group %d has no name: VDE management sockets will be mode 0600 and vnetd "
                    "cannot count free ports", gid)
        return None


class VdeSwitches:
    def __init__(self, runtime_dir: Path):
        self.base = Path(runtime_dir) / "vde"
        self.pid_dir = Path(runtime_dir) / PID_DIR
        self.children: dict[str, list[Child]] = {}
        self.uid: int | None = None  # the switches' user, once one was started
        self.nets: dict[str, Network] = {}  # the networks whose switches run, as started
        self._asker: ThreadPoolExecutor | None = None
        self._asking: dict[str, asyncio.Future] = {}  # network -> the asking under way

    # --- the subsystem protocol (subsystems/__init__.py) -----------------------------------------
    name = "vde"

    async def apply(self, run: Running) -> None:
        """Switches for each tap of a VDE network (already running ones are kept: their
        sockets are in use)."""
        await self.start(run.net)

    async def remove(self, name: str) -> None:
        net = self.nets.get(name)
        if net is not None:
            await self.stop(net)

    async def adopt(self, run: Running) -> None:
        """A restarted vnetd stops the switches the previous one recorded and starts its
        own (the taps stay, and the guests' VDE ports reconnect)."""
        await self.start(run.net)

    async def sync(self) -> None:
        pass

    async def status(self, name: str) -> list[dict] | None:
        net = self.nets.get(name)
        return await self.ask(net) if net is not None else None

    async def ask(self, net: Network) -> list[dict]:
        """The network's switches as `switches` tells them, asked in vnetd's one thread for
        them, and shared with whoever asks meanwhile (each gets a copy)."""
        loop = asyncio.get_running_loop()
        asking = self._asking.get(net.name)
        if asking is None:
            if self._asker is None:
                self._asker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vde-ask")
            asking = self._asking[net.name] = asyncio.ensure_future(
                loop.run_in_executor(self._asker, self.switches, net))
            asking.add_done_callback(lambda f: self._answered(net.name, f))
        return [dict(d) for d in await asyncio.shield(asking)]

    def _answered(self, name: str, f: asyncio.Future) -> None:
        if self._asking.get(name) is f:
            del self._asking[name]

    def pidfile(self, tap: str) -> Path:
        return self.pid_dir / f"vde_switch-{tap}.pid"

    def _paths(self, tap: str) -> tuple[Path, Path, Path]:
        return (vde_be.sock_dir(self.base.parent, tap), self.base / f"{tap}.mgmt",
                self.pidfile(tap))

    async def start(self, net: Network) -> None:
        """vde_switch runs as vnet-vde, group = the network's tap group, no capabilities
        (identity.py). The base directory is root:vnet-vde 0771: the switches create their
        directories and management sockets in it; anyone may pass through to a socket
        directory, which only the tap group may enter; only the switches (and root) may list
        or create entries (see the module text).

        Per tap: first stop any switch left running for it (by a previous vnetd, perhaps one
        that ran it as root and made root the tap's owner), then hand the tap to vnet-vde,
        then start the new switch."""
        if not net.vde or net.name in self.children:
            return
        uid, own_gid = identity.user_ids(identity.VDE_USER)
        _, gid = identity.vde_ids(net.tap_group)
        identity.share_dir(self.base, own_gid, 0o771)
        identity.private_dir(self.pid_dir)
        mgmt_group = mgmt_group_name(own_gid)
        self.uid = uid
        started: list[Child] = []
        try:
            for k, tap in enumerate(net.tap_names):
                sock, mgmt, pid = self._paths(tap)
                extra = net.vde_switch_args
                if net.vde_macs:
                    extra = (*extra, "--macaddr", net.vde_macs[k])
                await reap(pid)  # the switch a previous vnetd recorded for this tap, if any
                self._remove_legacy_pidfile(tap)
                give_tap(tap, uid)
                c = Child(f"vde_switch[{tap}]",
                          vde_be.argv(tap, sock, mgmt, net.vde_ports, net.tap_group,
                                      mgmt_group, extra), pid, str(sock),
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
        self.nets[net.name] = net

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
        self.nets.pop(net.name, None)
        for c in self.children.pop(net.name, []):
            await c.stop()
        self._remove_sockets(net)

    def _remove_sockets(self, net: Network) -> None:
        for tap in net.tap_names:
            sock, mgmt, _ = self._paths(tap)
            shutil.rmtree(sock, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                mgmt.unlink()
            self._remove_legacy_pidfile(tap)

    def _remove_legacy_pidfile(self, tap: str) -> None:
        """An older vnetd kept the pid file in the base directory (unlink never follows)."""
        with contextlib.suppress(FileNotFoundError):
            (self.base / f"{tap}.pid").unlink()

    def switches(self, net: Network) -> list[dict]:
        out = []
        for tap, c in zip(net.tap_names, self.children.get(net.name, []), strict=False):
            sock, mgmt, _ = self._paths(tap)
            used = vde_be.active_ports(mgmt, peer_uid=self.uid)
            d = {"tap": tap, "sock": str(sock), "ports": net.vde_ports, **c.status()}
            if used is not None:
                d["free"] = max(0, net.vde_ports - used)
            out.append(d)
        return out

    async def free_socket(self, net: Network) -> str:
        """The switch with the most free ports; failing that, a running one whose free ports
        are unknown (its management socket did not answer, or is not vnetd's to use: see
        mgmt_group_name)."""
        switches = await self.ask(net)
        best = max(switches, key=lambda d: d.get("free", 0), default=None)
        if best is not None and best.get("free"):
            return best["sock"]
        unknown = [d for d in switches if "free" not in d and d.get("state") == "running"]
        if unknown:
            return unknown[0]["sock"]
        raise Busy(f"Every VDE switch of {net.name} is full ({net.vde_ports} ports each).")
