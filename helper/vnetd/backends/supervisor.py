"""Supervised children: argv lists (never a shell), foreground, restarted when they die.

A child that dies is started again at once (well within a second); one that keeps dying soon
after each start is backed off exponentially (up to 30 s) and reported as a crash loop.
Children run in their own session and outlive vnetd: a network keeps its DHCP while vnetd
restarts. A restarted vnetd finds the ones a previous vnetd left running by scanning
/proc/*/cmdline for the child's marker (its config or socket path, `pids_with`), not through
pid files, and replaces them cleanly (never two servers on one bridge). Each child's pid is
still written to a pid file, for people and scripts; pid files live in directories only root
writes, and are written with O_NOFOLLOW (safefile.write_pid_file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from ..safefile import write_pid_file

log = logging.getLogger("vnetd.children")

QUICK_DEATH = 5.0  # seconds: dying sooner than this counts towards a crash loop
MAX_BACKOFF = 30.0


def pids_with(marker: str) -> list[int]:
    """Processes whose command line contains marker (a child's config path): also finds a
    child a crashed vnetd started but had not yet written the pid file of."""
    out = []
    # a whole argument (ends at its NUL), or a directory prefix given with its '/'
    needle = marker.encode() + (b"" if marker.endswith("/") else b"\0")
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if needle in f.read():
                    out.append(int(entry.name))
        except OSError:
            continue
    return out


def proc_ids(pid: int) -> tuple[int, int] | None:
    """The real uid and gid of a process (None when it is gone)."""
    uid = gid = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                elif line.startswith("Gid:"):
                    gid = int(line.split()[1])
                    break
    except (OSError, ValueError):
        return None
    return None if uid is None or gid is None else (uid, gid)


KILL = shutil.which("kill") or ""


async def send_signal(pid: int, sig: int) -> None:
    """Signal a child, also one that runs as its own user. vnetd runs without CAP_KILL, so a
    child that dropped to 'dnsmasq', 'vnet-dhcp' or 'vnet-vde' is signalled by a one-shot helper
    that runs as that same user: it can hit nothing that user does not own, so a forged pid file
    cannot make vnetd hit another user's process."""
    try:
        os.kill(pid, sig)
        return
    except ProcessLookupError:
        return
    except PermissionError:
        pass
    ids = proc_ids(pid)
    if ids is None:
        return
    uid, gid = ids
    argv = ([KILL, "-s", str(sig), str(pid)] if KILL else
            [sys.executable, "-I", "-S", "-c",
             "import os, sys; os.kill(int(sys.argv[1]), int(sys.argv[2]))", str(pid), str(sig)])
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, user=uid, group=gid, extra_groups=[], stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            close_fds=True)
    except OSError as e:  # the helper could not be started (or could not drop to uid/gid)
        log.warning("cannot signal pid %d (uid %d) with %s: %s", pid, uid,
                    signal.Signals(sig).name, e)
        return
    await proc.wait()


async def wait_gone(pid: int, timeout: float) -> bool:
    """Wait for any process to end (a pidfd: no permission needed, unlike kill(pid, 0))."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await asyncio.wait_for(gone, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def kill_pid(pid: int, timeout: float = 3.0) -> None:
    await send_signal(pid, signal.SIGTERM)
    if not await wait_gone(pid, timeout):
        await send_signal(pid, signal.SIGKILL)
        await wait_gone(pid, 1.0)


async def reap(marker: str, pidfile: Path | None = None) -> None:
    """Stop every process still running with `marker` (left by a previous vnetd)."""
    for pid in pids_with(marker):
        log.info("stopping pid %d (%s): left behind by a previous vnetd", pid, marker)
        await kill_pid(pid)
    if pidfile is not None:
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()


class Child:
    def __init__(self, name: str, argv: list[str], pidfile: Path, marker: str,
                 hold_stdin: bool = False, user: tuple[int, int] | None = None,
                 extra_groups: list[int] | None = None):
        self.name = name
        self.argv = argv
        self.pidfile = Path(pidfile)
        self.marker = marker  # a string of argv that identifies this child (its config path)
        # Some daemons (vde_switch) quit at EOF on stdin: give them a pipe whose write end
        # they hold themselves, so it never ends, even when vnetd restarts.
        self.hold_stdin = hold_stdin
        # (uid, gid) to start the child as, with no supplementary groups; None: as vnetd
        # (a child that drops root by itself, like dnsmasq, or one started through setpriv)
        self.user = user
        self.extra_groups = extra_groups or []
        self.proc: asyncio.subprocess.Process | None = None
        self.wanted = False
        self.restarts = 0
        self.quick_deaths = 0
        self.state = "stopped"
        self.last_exit: int | None = None
        self._task: asyncio.Task | None = None
        self._started_at = 0.0

    # --- control ------------------------------------------------------------------------
    async def start(self) -> None:
        for old in pids_with(self.marker):
            log.info("%s: replacing pid %d left by a previous vnetd", self.name, old)
            await kill_pid(old)
        self.wanted = True
        await self._spawn()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _spawn(self) -> None:
        stdin, keep = asyncio.subprocess.DEVNULL, ()
        if self.hold_stdin:
            stdin, w = os.pipe()
            keep = (w,)
        as_user = ({"user": self.user[0], "group": self.user[1], "extra_groups": self.extra_groups}
                   if self.user is not None else {})
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=stdin, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, close_fds=True,
                pass_fds=keep, **as_user,
            )
        finally:
            if self.hold_stdin:
                os.close(stdin)
                os.close(keep[0])
        self._started_at = time.monotonic()
        try:
            write_pid_file(self.pidfile, self.proc.pid)
        except OSError as e:
            # The child runs; a restarted vnetd finds it by its command line (pids_with), so
            # a missing pid file costs nothing but this warning.
            log.warning("%s: cannot write the pid file %s: %s", self.name, self.pidfile,
                        e.strerror or e)
        self.state = "running"
        asyncio.get_running_loop().create_task(self._log_output(self.proc))

    async def _log_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        with contextlib.suppress(Exception):
            async for line in proc.stdout:
                log.info("%s: %s", self.name, line.decode(errors="replace").rstrip())

    async def _watch(self) -> None:
        while self.wanted:
            if self.proc is not None:
                code = await self.proc.wait()
                if not self.wanted:
                    break
                self.last_exit = code
                lived = time.monotonic() - self._started_at
                self.quick_deaths = self.quick_deaths + 1 if lived < QUICK_DEATH else 0
                log.warning("%s exited with %s after %.1fs", self.name, code, lived)
            delay = 0.0 if self.quick_deaths <= 1 else min(MAX_BACKOFF,
                                                          0.5 * 2 ** (self.quick_deaths - 2))
            self.state = "crash-loop" if self.quick_deaths >= 3 else "restarting"
            if delay:
                log.warning("%s keeps dying; next start in %.1fs", self.name, delay)
            await asyncio.sleep(delay)
            if not self.wanted:
                break
            try:
                await self._spawn()
                self.restarts += 1
                if self.quick_deaths >= 3:
                    self.state = "crash-loop"
            except OSError as e:
                log.error("%s could not be started: %s", self.name, e)
                self.proc = None
                self.quick_deaths += 1

    async def reload(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await send_signal(self.proc.pid, signal.SIGHUP)

    async def stop(self) -> None:
        self.wanted = False
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.proc is not None and self.proc.returncode is None:
            # our own child: its pid cannot be reused before we wait for it
            await send_signal(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 3)
            except TimeoutError:
                await send_signal(self.proc.pid, signal.SIGKILL)
                try:
                    await asyncio.wait_for(self.proc.wait(), 3)
                except TimeoutError:  # not even SIGKILL got through (see send_signal)
                    log.error("%s (pid %d) could not be stopped; it is left running",
                              self.name, self.proc.pid)
        self.proc = None
        self.state = "stopped"
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def status(self) -> dict:
        d = {"name": self.name, "state": self.state, "restarts": self.restarts}
        if self.pid:
            d["pid"] = self.pid
        if self.last_exit is not None:
            d["last-exit"] = self.last_exit
        return d
