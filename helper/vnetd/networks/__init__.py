"""Network drivers: one per kind of network behind one protocol (base.NetworkDriver)."""

from __future__ import annotations

from ..model import Network
from .base import Context, NetworkDriver, Rollback, Running
from .bridged import BridgedDriver
from .routed import RoutedDriver

DRIVERS: dict[str, NetworkDriver] = {}
for _driver in (RoutedDriver(), BridgedDriver()):
    for _mode in _driver.modes:
        DRIVERS[_mode] = _driver


def driver_for(net: Network) -> NetworkDriver:
    return DRIVERS[net.mode]


__all__ = ["DRIVERS", "Context", "NetworkDriver", "Rollback", "Running", "driver_for"]
