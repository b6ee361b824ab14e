"""Supervised children: argv lists, foreground, restarted when they die. (The gate they
start behind is a fixed line of bash that runs the argv as "$@": no shell parses it.)

A child that dies is started again at once (well within a second); one that keeps dying soon
after each start is backed off exponentially (up to 30 s) and reported as a crash loop.
Children run in their own session and outlive vnetd: a network keeps its DHCP while vnetd
restarts.

Which processes are vnetd's children is never guessed from command lines (any local user can
start a process whose argv names a child's config file). A child is held by a pidfd from the
moment it is spawned, and every signal goes through that pidfd, so a pid reused by another
process is never hit. Each spawn also leaves a record next to the child's pid file: the pid,
its start time (field 22 of /proc/PID/stat) and the executables it may run. A restarted vnetd
finds what a previous one left only through these records, in directories only root writes,
and only a process whose start time and executable still match is taken for the child; pid
files and records anywhere else, or of another owner, are ignored.

A crash between the spawn and the record would leave a child no record names, so a child is
spawned behind a gate: a one-line shell script that waits on a pipe and runs the real program only
once vnetd has written the record and says so. If vnetd dies first, the gate sees the pipe
close and exits without running it. The pid file itself holds the pid alone, for people and
scripts (written with O_NOFOLLOW, safefile.write_pid_file).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..linebudget import LineBudget
from .safefile import write_pid_file

log = logging.getLogger("vnetd.children")

QUICK_DEATH = 5.0  # seconds: dying sooner than this counts towards a crash loop
MAX_BACKOFF = 30.0
TERM_TIMEOUT = 3.0  # seconds a child of ours gets to exit on SIGTERM before SIGKILL
RECORD_MAX = 4096

# The gate: bash (it starts in about 1 ms, where an interpreter takes 10; dash refuses fd
# numbers above 9) reads a line from the pipe whose fd is its $0; "1" runs the program ("$@",
# an absolute path), anything else (vnetd died: end of file) exits. The pipe is closed before
# the exec; the fd number comes from vnetd (an int), never from anyone else. -p: no
# $BASH_ENV, $ENV or functions from the environment; TMOUT= so that no timeout from it
# applies to the read.
GATE_SHELL = "/bin/bash"
GATE = ('TMOUT= IFS= read -r go <&"$0"; eval "exec $0<&-"; '
        '[ "$go" = 1 ] && exec "$@"; exit 0')
GATE_NAMES = (os.path.basename(GATE_SHELL), os.path.basename(os.path.realpath(GATE_SHELL)))
EXEC_WAIT = 5.0  # seconds a start waits for the gate to run the program
OUTPUT_BURST, OUTPUT_RATE = 100, 5.0  # a child's lines in vnetd's log (see _log_output)

# Signals a child that runs as its own user (vnetd has no CAP_KILL) through the pidfd it was
# handed: run as that same user, it can reach nothing that user does not own.
SIGNAL_HELPER = ("import signal, sys\n"
                 "signal.pidfd_send_signal(int(sys.argv[1]), int(sys.argv[2]))\n")


# --- /proc -------------------------------------------------------------------------------------
def proc_stat(pid: int) -> tuple[str, int] | None:
    """(comm, start time in clock ticks since boot: field 22) of a process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return None
    lpar, rpar = raw.find(b"("), raw.rfind(b")")
    if lpar < 0 or rpar < 0:
        return None
    fields = raw[rpar + 2:].split()
    try:
        return raw[lpar + 1:rpar].decode(errors="replace"), int(fields[19])
    except (IndexError, ValueError):
        return None


def proc_exe_name(pid: int) -> str | None:
    """The basename of /proc/PID/exe; None when it cannot be read (a process of another user
    is not vnetd's to inspect that way: it has no CAP_SYS_PTRACE)."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return None


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


def exe_names(argv: list[str]) -> list[str]:
    """The programs a child may be running: argv[0], and a program a wrapper runs after '--'
    (dhcpd under setpriv)."""
    names = [os.path.basename(argv[0])]
    names += [os.path.basename(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "--"]
    return names


def _matches(pid: int, start: int, names: list[str]) -> bool:
    st = proc_stat(pid)
    if st is None or st[1] != start:
        return False
    exe = proc_exe_name(pid)
    if exe is not None:
        return exe in names
    return st[0] in {n[:15] for n in names}  # comm: the executable's name, cut at 15


# --- records -------------------------------------------------------------------------------
def record_path(pidfile: Path) -> Path:
    return pidfile.with_name(pidfile.name + ".id")


def _root_only(st: os.stat_result) -> bool:
    return st.st_uid == 0 and not st.st_mode & 0o022


def write_record(pidfile: Path, pid: int, start: int, names: list[str]) -> None:
    data = json.dumps({"pid": pid, "start": start, "exe": names}).encode()
    path = record_path(pidfile)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                 | os.O_CLOEXEC, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        os.ftruncate(fd, 0)
        os.write(fd, data)
    finally:
        os.close(fd)


def read_record(pidfile: Path) -> tuple[int, int, list[str]] | None:
    """(pid, start, exe names) of a record that only root could have written: in a directory
    root owns that nobody else may write, a regular file root owns."""
    path = record_path(pidfile)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot read %s: %s", path, e.strerror or e)
        return None
    try:
        if not _root_only(os.stat(path.parent)):
            log.warning("%s is in a directory others may write: ignored", path)
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _root_only(st):
            log.warning("%s is not a regular file of root's: ignored", path)
            return None
        d = json.loads(os.read(fd, RECORD_MAX))
        pid, start, names = d["pid"], d["start"], d["exe"]
        if not (isinstance(pid, int) and pid > 1 and isinstance(start, int)
                and isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError("wrong shape")
        return pid, start, names
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s is unreadable (%s): ignored", path, e)
        return None
    finally:
        os.close(fd)


def remove_files(pidfile: Path) -> None:
    for p in (pidfile, record_path(pidfile)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def open_recorded(pidfile: Path) -> tuple[int, int] | None:
    """(pidfd, pid) of the process a record names, if it is still that process."""
    rec = read_record(pidfile)
    if rec is None:
        return None
    pid, start, names = rec
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone
        return None
    # checked after the pidfd is open: a pid reused since cannot pass for the recorded process
    if not _matches(pid, start, [*names, *GATE_NAMES]):
        os.close(fd)
        log.info("%s names pid %d, which is no longer the child it recorded: left alone",
                 pidfile, pid)
        return None
    return fd, pid


# --- signals -------------------------------------------------------------------------------
async def signal_pidfd(pidfd: int, pid: int, sig: int) -> None:
    """Signal the process of a pidfd, also one that runs as its own user: vnetd runs without
    CAP_KILL, so a child that dropped to 'dnsmasq', 'vnet-dhcp' or 'vnet-vde' is signalled by
    a one-shot helper that runs as that same user and is handed the pidfd."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
        return
    except ProcessLookupError:
        return
    except PermissionError:
        pass
    ids = proc_ids(pid)
    if ids is None:
        return
    uid, gid = ids
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", "-c", SIGNAL_HELPER, str(pidfd), str(sig),
            user=uid, group=gid, extra_groups=[], stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            close_fds=True, pass_fds=(pidfd,))
    except OSError as e:  # the helper could not be started (or could not drop to uid/gid)
        log.warning("cannot signal pid %d (uid %d) with %s: %s", pid, uid,
                    signal.Signals(sig).name, e)
        return
    await proc.wait()


async def wait_pidfd(pidfd: int, timeout: float) -> bool:
    """Wait for the process of a pidfd to end (it becomes readable)."""
    loop = asyncio.get_running_loop()
    gone = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await asyncio.wait_for(gone, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


async def stop_pidfd(pidfd: int, pid: int, timeout: float = TERM_TIMEOUT) -> bool:
    """SIGTERM, then SIGKILL after `timeout` s; True once it is gone."""
    await signal_pidfd(pidfd, pid, signal.SIGTERM)
    if await wait_pidfd(pidfd, timeout):
        return True
    await signal_pidfd(pidfd, pid, signal.SIGKILL)
    return await wait_pidfd(pidfd, 1.0)


async def reap(pidfile: Path) -> None:
    """Stop the child a previous vnetd recorded in `pidfile` (and its record), if that
    process still runs; then remove both files."""
    found = open_recorded(Path(pidfile))
    if found is not None:
        fd, pid = found
        try:
            log.info("stopping pid %d (%s): left behind by a previous vnetd", pid, pidfile)
            if not await stop_pidfd(fd, pid):
                log.error("pid %d (%s) could not be stopped; it is left running", pid, pidfile)
        finally:
            os.close(fd)
    remove_files(Path(pidfile))


class Process:
    """A spawned child, waited for through a pidfd on the event loop. asyncio's own
    subprocesses are not used for children: before Python 3.12 each keeps a thread blocked in
    waitpid (a thread per network), and their transports kill a child still running when
    they are collected, where vnetd's children outlive it by design."""

    def __init__(self, argv: list[str], **popen: Any):
        self._loop = asyncio.get_running_loop()
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      **popen)
        self.pid = self.popen.pid
        self.returncode: int | None = None
        self._exit: asyncio.Future[int] = self._loop.create_future()
        # our own child, not yet waited for: its pid cannot have been reused
        self._waitfd = os.pidfd_open(self.pid)
        self._loop.add_reader(self._waitfd, self._exited)
        self.stdout = asyncio.StreamReader()

    async def connect_output(self) -> None:
        assert self.popen.stdout is not None
        await self._loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(self.stdout), self.popen.stdout)

    def _exited(self) -> None:
        self._loop.remove_reader(self._waitfd)
        os.close(self._waitfd)
        self.returncode = self.popen.wait()  # dead already: reaps it at once
        if not self._exit.done():
            self._exit.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)


class Child:
    def __init__(self, name: str, argv: list[str], pidfile: Path, marker: str = "",
                 hold_stdin: bool = False, user: tuple[int, int] | None = None,
                 extra_groups: list[int] | None = None):
        self.name = name
        self.argv = argv
        self.pidfile = Path(pidfile)  # in a directory only root writes; its record next to it
        self.marker = marker  # the child's main file (its config path or socket), for people
        # Some daemons (vde_switch) quit at EOF on stdin: give them a pipe whose write end
        # they hold themselves, so it never ends, even when vnetd restarts.
        self.hold_stdin = hold_stdin
        # (uid, gid) to start the child as, with no supplementary groups; None: as vnetd
        # (a child that drops root by itself, like dnsmasq, or one started through setpriv)
        self.user = user
        self.extra_groups = extra_groups or []
        self.proc: Process | None = None
        self.pidfd: int | None = None
        self.wanted = False
        self.restarts = 0
        self.quick_deaths = 0
        self.state = "stopped"
        self.last_exit: int | None = None
        self._task: asyncio.Task | None = None
        self._started_at = 0.0

    # --- control ------------------------------------------------------------------------
    async def start(self) -> None:
        await reap(self.pidfile)  # one a previous vnetd left: replaced, never two
        self.wanted = True
        await self._spawn()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _spawn(self) -> None:
        self._close_pidfd()
        stdin: int = subprocess.DEVNULL
        keep: tuple[int, ...] = ()
        if self.hold_stdin:
            stdin, w = os.pipe()
            keep = (w,)
        gate_r, gate_w = os.pipe()
        # None (the defaults): as vnetd
        uid, gid = self.user if self.user is not None else (None, None)
        extra_groups = self.extra_groups if self.user is not None else None
        try:
            try:
                self.proc = Process(
                    [GATE_SHELL, "-p", "-c", GATE, str(gate_r), *self.argv],
                    stdin=stdin, start_new_session=True, close_fds=True,
                    pass_fds=(*keep, gate_r), user=uid, group=gid, extra_groups=extra_groups,
                )
            finally:
                os.close(gate_r)
                if self.hold_stdin:
                    os.close(stdin)
                    os.close(keep[0])
            # our own child, not yet waited for: its pid cannot have been reused
            self.pidfd = os.pidfd_open(self.proc.pid)
            st = proc_stat(self.proc.pid)
            try:
                if st is None:
                    raise OSError(errno.ESRCH, "it is gone already")
                write_record(self.pidfile, self.proc.pid, st[1], exe_names(self.argv))
            except OSError as e:
                # without its record, a restarted vnetd could not find it: not started at all
                os.close(gate_w)
                gate_w = -1
                await self.proc.wait()
                if self.proc.popen.stdout is not None:
                    self.proc.popen.stdout.close()  # never connected: nobody else closes it
                raise OSError(e.errno, f"cannot record {self.name} in "
                              f"{record_path(self.pidfile)}: {e.strerror or e}") from None
            os.write(gate_w, b"1\n")
        finally:
            if gate_w >= 0:
                os.close(gate_w)
        self._started_at = time.monotonic()
        try:
            write_pid_file(self.pidfile, self.proc.pid)
        except OSError as e:
            # The child runs, and its record says which process it is: a missing pid file
            # costs nothing but this warning.
            log.warning("%s: cannot write the pid file %s: %s", self.name, self.pidfile,
                        e.strerror or e)
        self.state = "running"
        await self.proc.connect_output()
        asyncio.get_running_loop().create_task(self._log_output(self.proc))
        await self._until_exec(self.proc.pid)

    async def _until_exec(self, pid: int) -> None:
        """Return once the gate has run the program (the process's name is no longer the
        gate's) or it ended: a started child is the program, never still the gate."""
        deadline = time.monotonic() + EXEC_WAIT
        while time.monotonic() < deadline:
            st = proc_stat(pid)
            if st is None or st[0] not in {n[:15] for n in GATE_NAMES} or (
                    self.proc is not None and self.proc.returncode is not None):
                return
            await asyncio.sleep(0.001)
        log.warning("%s: still not running its program %.0f s after its start", self.name,
                    EXEC_WAIT)

    async def _log_output(self, proc: Process) -> None:
        """Its lines into vnetd's log, OUTPUT_BURST at once and OUTPUT_RATE a second at
        most: what a child prints can follow from what guests send, and a flood here would
        push everyone's lines past journald's rate limit, vnetd's audit lines with them."""
        budget = LineBudget(OUTPUT_BURST, OUTPUT_RATE)
        with contextlib.suppress(Exception):
            async for line in proc.stdout:
                held = budget.take(0)
                if held is not None:
                    log.info("%s: %s%s", self.name, line.decode(errors="replace").rstrip(),
                             f" ({held} earlier line(s) held back: too many)" if held else "")
        held = budget.held(0)
        if held:
            log.info("%s: %d last line(s) held back: too many", self.name, held)

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
        if self.proc is not None and self.proc.returncode is None and self.pidfd is not None:
            await signal_pidfd(self.pidfd, self.proc.pid, signal.SIGHUP)

    async def stop(self) -> None:
        self.wanted = False
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.proc is not None and self.proc.returncode is None and self.pidfd is not None:
            if not await stop_pidfd(self.pidfd, self.proc.pid):
                # not even SIGKILL got through (see signal_pidfd)
                log.error("%s (pid %d) could not be stopped; it is left running",
                          self.name, self.proc.pid)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 1.0)
        self._close_pidfd()
        self.proc = None
        self.state = "stopped"
        remove_files(self.pidfile)

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

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
