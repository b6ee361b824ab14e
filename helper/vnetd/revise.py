"""What a new definition of a network means while the network runs (pure; no I/O).

`reload` (a file edited by hand) and `Redefine` (`vnet-client edit`) take a new definition
of a network that may be running. Some settings change live without cutting a guest off:
DHCP and DNS (the server is replaced; leases are kept), static hosts (re-read), forwards and
the firewall's settings (one transaction), overlay peers, autostart. The others make the
network's links what they are (mode, subnets, MTU, taps, VDE switches, the uplink, the
overlay's device), and the live ones are checked against them (a DHCP range, a host's
address, a forward's target lie in the subnet): those change only while the network is
stopped, and a new definition that changes one of them while it runs is refused (`waits`
names them).

`in_force(running, declared)`: what a running network's record becomes under a declaration
(its MTU stays the one it runs with, which an overlay may take from its underlay; a
declaration that would change a restart-only setting leaves the record as it is, though the
callers refuse such a declaration before).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .model import Network
from .networks import vxlan

# the settings a running network keeps until it is stopped and started
RESTART = ("mode", "subnet", "subnet6", "mtu", "mtu_auto", "taps", "tap_base", "tap_user",
           "tap_group", "vde", "vde_ports", "vde_switch_args", "vde_macs", "uplink", "force")
# the live settings, by who applies them
DHCP = frozenset({"dhcp", "dhcp_start", "dhcp_end", "domain"})
HOSTS = frozenset({"hosts"})
FIREWALL = frozenset({"forwards", "allow_host", "routed_with", "spoof_protection", "hosts"})
NOT_COMPARED = frozenset({"name", "owner"})

KEYS = {"uplink": "if", "mtu_auto": "mtu"}  # a field's option key where it is not the name


def key(field: str) -> str:
    """A field's option key, as the TOML file and the CLI name it ('dhcp_start' ->
    'dhcp-start', 'uplink' -> 'if')."""
    return KEYS.get(field, field.replace("_", "-"))


def changed(old: Network, new: Network) -> frozenset[str]:
    """The fields in which two definitions differ ('overlay' for any overlay setting)."""
    return frozenset(f.name for f in dataclasses.fields(Network)
                     if f.name not in NOT_COMPARED
                     and getattr(old, f.name) != getattr(new, f.name))


def waits(running: Network, declared: Network) -> list[str]:
    """The option keys the declaration changes that the running network keeps until it is
    stopped and started (sorted, each once)."""
    out = {key(f) for f in RESTART if getattr(running, f) != getattr(declared, f)
           and not (f == "mtu" and declared.mtu_auto and running.mtu_auto)}
    if vxlan.moved(running, declared):
        out.add("overlay")
    return sorted(out)


def in_force(running: Network, declared: Network) -> Network:
    """A running network's record under a new declaration: the declaration (with the MTU
    the network runs with, which an overlay may take from its underlay), or, when it changes
    a setting only a restart applies, the record as it is."""
    if waits(running, declared):
        return running
    return declared.with_changes(mtu=running.mtu)


@dataclass(frozen=True)
class Plan:
    """What a running network does to go from `old` to `new` (both records in force)."""

    old: Network
    new: Network

    @property
    def fields(self) -> frozenset[str]:
        return changed(self.old, self.new)

    @property
    def dhcp(self) -> bool:
        """The DHCP/DNS server is replaced (its kind, range or domain changed)."""
        return bool(self.fields & DHCP)

    @property
    def hosts(self) -> bool:
        """Only the static hosts changed for the DHCP/DNS server: it re-reads them."""
        return not self.dhcp and bool(self.fields & HOSTS)

    @property
    def peers(self) -> tuple[set[str], set[str]]:
        """Overlay peers (added, removed)."""
        a = {str(p) for p in self.old.overlay.peers} if self.old.overlay else set()
        b = {str(p) for p in self.new.overlay.peers} if self.new.overlay else set()
        return b - a, a - b

    @property
    def firewall(self) -> bool:
        added, removed = self.peers
        return bool(self.fields & FIREWALL) or bool(added or removed)


def notes(name: str, running: Network | None, old: Network, new: Network) -> list[str]:
    """Sentences for the caller: what changes now (a change only a restart applies is
    refused before: `waits`)."""
    if not changed(old, new):
        return [f"{name}: nothing changed."]
    if running is None:
        return [f"{name}: saved; it is not running, so all of it takes effect when it starts."]
    applied = sorted({key(f) for f in changed(running, in_force(running, new))})
    return [f"{name}: changed while it runs: {', '.join(applied)}." if applied else
            f"{name}: nothing changed for the running network."]
