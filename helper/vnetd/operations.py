"""The base of the classes beside the engine (definitions.py, forwards.py, hosts.py, vms.py,
peers.py, queries.py, reconcile.py): each is given the engine and reaches its parts under the
same names. The state that changes (`defs`, `running`, `lock`) is always read through
`self.engine`, since start-up and reload replace it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine


class Operations:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.store = engine.store
        self.links = engine.links
        self.ctx = engine.ctx
        self.ports = engine.ports
        self.macs = engine.macs
        self.resolver = engine.resolver
        self.dhcp = engine.dhcp
        self.vde = engine.vde
        self.evpn = engine.evpn
        self.firewall = engine.firewall
