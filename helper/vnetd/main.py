"""vnetd: start-up, arguments, logging, the event loop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from . import __version__, api, identity
from .authz import Authorizer
from .backends.links import Links
from .bus import Service
from .engine import Engine
from .store import Store

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
    engine = Engine(store, links, frr_pathspace=args.frr_pathspace, **limits)
    await engine.startup()

    if args.bus_address:
        bus = MessageBus(bus_address=args.bus_address, negotiate_unix_fd=True)
    else:
        bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
    await bus.connect()
    authz = Authorizer(bus)
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
    log.info("vnetd %s ready on %s: %d network(s) defined, %d running", __version__,
             args.bus_address or "the system bus", len(engine.defs), len(engine.running))

    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(
            sig, lambda s=sig: stop.done() or stop.set_result(s))
    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
    done, _ = await asyncio.wait([stop, disconnected], return_when=asyncio.FIRST_COMPLETED)
    if disconnected in done:
        log.error("lost the bus connection; exiting (networks keep running)")
        await links.close()
        return 1
    log.info("stopping on signal %s; networks keep running", stop.result())
    bus.disconnect()
    await links.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(levelname)s %(name)s: %(message)s" if not sys.stderr.isatty()
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    if os.geteuid() != 0:
        log.error("vnetd must run as root (it creates bridges and taps)")
        return 1
    os.umask(0o022)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
