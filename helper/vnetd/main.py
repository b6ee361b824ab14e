"""vnetd: start-up, arguments, logging, the event loop."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import faulthandler
import logging
import logging.handlers
import os
import signal
import stat
import sys
from pathlib import Path

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from . import __version__, api, busreader, journal
from .authz import CACHE_SECONDS, Authorizer
from .bus import Service
from .children import identity
from .engine import Engine
from .kernel import closing
from .kernel.links import Links
from .store import Store
from .subsystems import spares as spares_mod

log = logging.getLogger("vnetd")

REQUEST_NAME_DO_NOT_QUEUE = 4
PRIMARY_OWNER = 1


def _count(text: str) -> int:
    """A limit: a whole number, 0 or more."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative: a limit is 0 or more")
    return n


# Limits (docs/design.md): each a vnetd option, passed to the Engine under its own name.
LIMITS = (
    ("--max-ports-per-user", 64, "ports one user may hold at once"),
    ("--max-networks-per-user", 8, "networks one user may own (define); root has no limit"),
    ("--max-forwards-per-user", 64, "port forwards one user may own, on all networks "
     "together; root has no limit"),
    ("--max-macs-per-network", 4096, "entries (VM NICs) the MAC registry keeps per network; "
     "'vnet-client mac forget' frees them"),
    ("--max-macs", 65536, "MAC registry entries on all networks together, undefined ones "
     "included"),
    ("--max-macs-per-user", 1024, "MAC registry entries one user other than root brings into "
     "one network"),
)


def _spares(text: str) -> int:
    n = _count(text)
    if n > spares_mod.MOST:
        raise argparse.ArgumentTypeError(f"{n} spare taps a network is more than the "
                                         f"{spares_mod.MOST} vnetd keeps at most")
    return n


def _seconds(text: str) -> float:
    """A duration in seconds, 0 or more."""
    try:
        n = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not 0 <= n <= 86400:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 86400 seconds")
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vnetd",
        description="The qemu-vnet system service: owns bridges, taps, DHCP servers and the "
        "nftables ruleset for QEMU virtual networks, and hands tap file descriptors to "
        "users that polkit authorizes. Normally started by systemd or D-Bus activation.",
    )
    p.add_argument("--bus-address", metavar="ADDRESS",
                   help="connect to this D-Bus address instead of the system bus "
                   "(several daemons on one machine, each on its own bus)")
    p.add_argument("--config-dir", type=Path, default=Path("/etc/qemu-vnet"),
                   help="network definitions live in DIR/networks (default: %(default)s)")
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/qemu-vnet"),
                   help="MAC registry, leases, last good copies (default: %(default)s)")
    p.add_argument("--runtime-dir", type=Path, default=Path("/run/qemu-vnet"),
                   help="generated configs, pids, sockets (default: %(default)s)")
    for flag, default, text in LIMITS:
        p.add_argument(flag, type=_count, default=default, metavar="N",
                       help=f"{text} (default: %(default)s)")
    p.add_argument("--authz-cache-seconds", type=_seconds, default=CACHE_SECONDS, metavar="S",
                   help="how long a positive polkit answer is reused for the same connection, "
                   "action and details before polkit is asked again; a user taken out of "
                   "group vnet loses an open connection's rights within this time; 0: never "
                   "reused (default: %(default)s)")
    p.add_argument("--spare-taps", type=_spares, default=spares_mod.DEFAULT, metavar="N",
                   help="taps each running network with spoof protection keeps made ahead of "
                   "attaches once a VM attached to it, so that an attach hands one out instead "
                   "of making it; each costs vnetd one fd and the kernel one network device; "
                   "0: none (default: %(default)s)")
    p.add_argument("--frr-pathspace", metavar="NAME",
                   help="EVPN: talk to the FRR instance started with -N NAME (vtysh -N NAME); "
                   "default: the system's FRR")
    p.add_argument("--log-level", default=os.environ.get("VNETD_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"vnetd {__version__}")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    for d in (args.state_dir, args.runtime_dir):
        d.mkdir(parents=True, exist_ok=True)
    identity.join_child_groups()
    store = Store(args.config_dir, args.state_dir, args.runtime_dir)
    links = Links()
    await links.open()
    limits = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
              for flag, _, _ in LIMITS}
    engine = Engine(store, links, frr_pathspace=args.frr_pathspace,
                    spare_taps=args.spare_taps, **limits)
    await engine.reconcile.startup()

    busreader.install()  # the bus is read by vnetd's own reader: see busreader
    if args.bus_address:
        bus = MessageBus(bus_address=args.bus_address, negotiate_unix_fd=True)
    else:
        bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
    await bus.connect()
    authz = Authorizer(bus, cache_seconds=args.authz_cache_seconds)
    service = Service(bus, engine, authz)
    service.install()
    await service.subscribe()
    reply = await bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="RequestName", signature="su",
        body=[api.BUS_NAME, REQUEST_NAME_DO_NOT_QUEUE],
    ))
    if reply.message_type != MessageType.METHOD_RETURN or reply.body[0] != PRIMARY_OWNER:
        why = reply.body[0] if reply.message_type == MessageType.METHOD_RETURN else reply.body
        log.error("cannot own %s (%s): is another vnetd running, and is the bus policy "
                  "installed (dbus/org.qemuvnet.Vnet1.conf)?", api.BUS_NAME, why)
        bus.disconnect()
        await links.close()
        return 1
    log.info("vnetd %s ready on %s: %d network(s) defined, %d running%s", __version__,
             args.bus_address or "the system bus", len(engine.defs), len(engine.running),
             f", {len(engine.adopting)} being adopted" if engine.adopting else "")
    settling = None
    if engine.adopting:  # a restart: answer first, adopt the running networks meanwhile
        settling = asyncio.ensure_future(engine.reconcile.settle())
        settling.add_done_callback(_settled)

    stop = asyncio.get_running_loop().create_future()

    def stop_on(sig: int) -> None:
        if not stop.done():
            stop.set_result(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop_on, sig)
    # SIGURG ends a wait in the close of an fd a caller sent (kernel/closing.py)
    closing.arm()
    # SIGUSR1: log what every pending task waits on (the loop runs, something never ends)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _log_tasks)
    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
    done, _ = await asyncio.wait([stop, disconnected], return_when=asyncio.FIRST_COMPLETED)
    if disconnected in done:
        log.error("lost the bus connection; exiting (networks keep running)")
        await engine.flush()
        await links.close()
        return 1
    log.info("stopping on signal %s; networks keep running", stop.result())
    bus.disconnect()
    await engine.flush()
    await links.close()
    return 0


# --- the unit's limits, whoever started vnetd -------------------------------------------------
# systemd/vnetd.service's CapabilityBoundingSet= (a test keeps the two the same). Started any
# other way (D-Bus activation through dbus-daemon's launch helper where systemd is not PID 1,
# or by hand), vnetd confines itself to the same capabilities with no-new-privs before it does
# anything else, so that neither it nor any child it starts holds more than under systemd.
UNIT_CAPABILITIES = {"net_admin": 12, "net_bind_service": 10, "net_raw": 13, "setuid": 7,
                     "setgid": 6}
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _settled(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("adopting the running networks failed: %r", task.exception(),
                  exc_info=task.exception())
    else:
        log.info("every network found running is adopted, its servers replaced by ours")


def _log_tasks() -> None:
    """Log each pending asyncio task and where it waits: for a call that never answers."""
    tasks = asyncio.all_tasks()
    log.warning("SIGUSR1: %d pending task(s)", len(tasks))
    for task in tasks:
        frames = task.get_stack(limit=8)
        where = " <- ".join(f"{f.f_code.co_name} ({Path(f.f_code.co_filename).name}:"
                            f"{f.f_lineno})" for f in reversed(frames))
        log.warning("task %s: %s", task.get_name(), where or "(not started)")


def _proc_status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def confine() -> list[str]:
    """Drop every capability the unit does not keep (bounding, permitted, effective,
    inheritable and ambient sets) and set no-new-privs. Returns what was changed, in words;
    raises OSError if a capability that was held could not be dropped."""
    allowed = sum(1 << bit for bit in UNIT_CAPABILITIES.values())
    st = _proc_status()
    bounding = int(st["CapBnd"], 16)
    held = int(st["CapPrm"], 16) | int(st["CapEff"], 16) | int(st["CapInh"], 16)
    nnp = st.get("NoNewPrivs") == "1"
    done: list[str] = []
    if not bounding & ~allowed and not held & ~allowed and nnp:
        return done
    libc = ctypes.CDLL(None, use_errno=True)
    extra = bounding & ~allowed
    for cap in range(64):
        if extra >> cap & 1 and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # EINVAL: a capability this kernel does not have
                raise OSError(err, f"cannot drop capability {cap} from the bounding set: "
                              f"{os.strerror(err)}")
    if extra:
        done.append("capability bounding set limited to the unit's "
                    f"({', '.join(sorted(UNIT_CAPABILITIES))})")
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two of (effective, permitted, inheritable)
    if libc.capget(header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    for half in (0, 1):
        mask = allowed >> (32 * half) & 0xFFFFFFFF
        for i in range(3):
            data[3 * half + i] &= mask
    if libc.capset(header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if held & ~allowed:
        done.append("capabilities held limited to the same")
    if not nnp:
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot set no-new-privs: {os.strerror(err)}")
        done.append("no-new-privs set")
    st = _proc_status()
    if int(st["CapPrm"], 16) & ~allowed or int(st["CapEff"], 16) & ~allowed:
        raise OSError(errno.EPERM, "capabilities outside the unit's set are still held")
    return done


# --- logging ---------------------------------------------------------------------------------
LOG_FILE = Path("/var/log/qemu-vnet/vnetd.log")
DEV_LOG = "/dev/log"
FORMAT = "%(levelname)s %(name)s: %(message)s"


def _fd_stat(fd: int) -> os.stat_result | None:
    try:
        return os.fstat(fd)
    except OSError:
        return None


def _stderr_is_journal(st: os.stat_result | None) -> bool:
    """systemd tells its services where their stderr goes (JOURNAL_STREAM=dev:inode)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    return st is not None and want == f"{st.st_dev}:{st.st_ino}"


def _stderr_is_useful(st: os.stat_result | None) -> bool:
    if st is None:
        return False
    if stat.S_ISCHR(st.st_mode):
        try:
            return st.st_rdev != os.stat("/dev/null").st_rdev
        except OSError:
            return True
    return True


def _open_log_file(path: Path) -> logging.Handler:
    """Appended to, never through a symbolic link; the directory is root's."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                 | os.O_NOCTTY | os.O_NONBLOCK, 0o640)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    h = logging.StreamHandler(os.fdopen(fd, "a", buffering=1, encoding="utf-8",
                                        errors="backslashreplace"))
    h.setFormatter(logging.Formatter(f"%(asctime)s vnetd[%(process)d]: {FORMAT}"))
    return h


def setup_logging(level: str, log_file: Path = LOG_FILE, dev_log: str = DEV_LOG) -> list[str]:
    """stderr, when it goes somewhere; and, unless stderr is the journal already, the system
    log at /dev/log (journald or syslog), or failing that log_file: whoever started vnetd (a
    D-Bus launch helper puts stderr on /dev/null), its audit trail is kept. Returns problems
    met, to be logged once logging works."""
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper()))
    problems: list[str] = []
    st = _fd_stat(2)
    if _stderr_is_journal(st) and journal.available():
        # journald's native protocol: the audit lines' VNET_* fields become journal fields
        h: logging.Handler = journal.JournalHandler(fallback=sys.stderr)
        h.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(h)
    elif _stderr_is_useful(st):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(
            f"%(asctime)s {FORMAT}" if sys.stderr.isatty() else FORMAT))
        root.addHandler(h)
    if not _stderr_is_journal(st):
        system: logging.Handler | None = None
        if os.path.exists(dev_log):
            try:
                system = logging.handlers.SysLogHandler(
                    address=dev_log, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
                system.setFormatter(logging.Formatter(f"vnetd[%(process)d]: {FORMAT}"))
            except OSError as e:
                problems.append(f"cannot log to {dev_log}: {e.strerror or e}")
        if system is None:
            on_stderr = False  # stderr is that file already
            try:
                lst = os.stat(log_file)
                on_stderr = st is not None and (lst.st_dev, lst.st_ino) == (st.st_dev, st.st_ino)
            except OSError:
                pass
            if not on_stderr:
                try:
                    system = _open_log_file(log_file)
                except OSError as e:
                    problems.append(f"cannot log to {log_file}: {e.strerror or e}")
        if system is not None:
            system.setLevel(max(logging.INFO, root.level))  # the audit trail, not debugging
            root.addHandler(system)
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    return problems


FD_LIMIT = 1 << 16


def raise_fd_limit() -> int | None:
    """The soft limit of open files up to the hard one (at most 65,536): a host with hundreds
    of networks holds three descriptors per server and one per spare tap, past the 1,024 a
    service starts with (vnetd waits with epoll, never select); None if it could not."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_LIMIT if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT)
    if soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError) as e:
        log.warning("cannot raise the limit of open files from %d: %s", soft, e)
        return None
    return want


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems = setup_logging(args.log_level)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    for p in problems:
        log.warning("%s", p)
    if os.geteuid() != 0:
        log.error("vnetd must run as root (it creates bridges and taps)")
        return 1
    try:
        changed = confine()
    except OSError as e:
        log.error("vnetd cannot confine itself to its unit's limits: %s", e.strerror or e)
        return 1
    if changed:
        log.info("started with more privileges than its unit gives (D-Bus activation or by "
                 "hand?): %s", "; ".join(changed))
    os.umask(0o022)
    fds = raise_fd_limit()
    if fds is not None:
        log.debug("open files: up to %d", fds)
    # SIGUSR2: every thread's Python stack on stderr, even with the event loop stuck
    # (faulthandler reads the other threads' frames without their lock: meant for a vnetd
    # that is stuck; sent while a thread runs Python, it can crash the process)
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
