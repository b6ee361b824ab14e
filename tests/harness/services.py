"""The system bus, polkitd and vnetd for the tests, where systemd is not PID 1.

Starting and stopping them is the product's own (vnetd.devhost, what `make start` runs); here
it is bound to this checkout (its bus policy, polkit files and systemd unit) and to the
virtualenv the tests run in, with what only tests need on top: one session at a time on the
machine (exclusive) and the activation file parked while daemons are killed on purpose.

vnetd.devhost is imported when first used, not when this module is: the unit tests load this
module through tests/conftest.py before tests/unit/conftest.py puts the checkout's packages
first on sys.path, and must then import vnetd from the checkout.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)  # the virtualenv the tests run in (vnetd.devhost.default_venv)

# vnetd.devhost's names the tests use as services.NAME
_DEVHOST_NAMES = frozenset({
    "ACTIVATION_FILE", "LOGDIR", "bus_up", "dbus_send", "ensure_bus", "ensure_polkitd",
    "has_owner", "name_owner_pid", "reload_bus", "stop_vnetd", "wait_for",
})


def _devhost() -> ModuleType:
    from vnetd import devhost

    return devhost


def __getattr__(name: str):
    if name in _DEVHOST_NAMES:
        return getattr(_devhost(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def unit_capabilities() -> list[str]:
    """CapabilityBoundingSet= of this checkout's systemd/vnetd.service."""
    return _devhost().unit_capabilities(ROOT)


def sandboxed(argv: list[str]) -> list[str]:
    """argv inside the unit's limits (this checkout's unit): see vnetd.devhost.sandboxed."""
    return _devhost().sandboxed(argv, ROOT)


def ensure_vnetd() -> None:
    _devhost().ensure_vnetd(VENV, ROOT)


def start(with_vnetd: bool) -> None:
    _devhost().start(with_vnetd, VENV, ROOT)


@contextlib.contextmanager
def activation_parked(path: Path | None = None):
    """Hide a D-Bus activation file (and tell the bus) for the duration of the block."""
    path = path or _devhost().ACTIVATION_FILE
    parked = path.with_name(path.name + ".parked-by-tests")
    if parked.exists() and not path.exists():
        parked.rename(path)  # left over from an interrupted run
    moved = path.exists()
    if moved:
        path.rename(parked)
        _devhost().reload_bus()
    try:
        yield
    finally:
        if moved and parked.exists():
            parked.rename(path)
            _devhost().reload_bus()


@contextlib.contextmanager
def exclusive(path: str = "/run/qemu-vnet-tests.lock"):
    """One test or bench session at a time on this machine: they share the system bus name
    org.qemuvnet.Vnet1, so a second session waits here for the first to finish."""
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another test session to finish ({path})...", file=sys.stderr,
                  flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
