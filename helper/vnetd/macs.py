"""Stable guest MACs: one per (network, vm, nic), under QEMU's 52:54:00 prefix.

A MAC is derived from a hash of network/vm/nic, so the same VM gets the same MAC on any host
with an empty registry; a collision inside the network is resolved by rehashing with a
counter, and every MAC given out is remembered in the state directory, so it never changes
once given (the original qemu-vlan's MACs depended on the shell's PID).
The registry file also carries MACs imported from an old ether.conf.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .errors import Exists, InvalidArgument
from .model import validate_mac, validate_network_name, validate_vm_name

QEMU_OUI = "52:54:00"
MAX_NIC = 31


def derive_mac(network: str, vm: str, nic: int, attempt: int = 0) -> str:
    seed = f"{network}/{vm}/{nic}" + (f"/{attempt}" if attempt else "")
    d = hashlib.sha256(seed.encode()).digest()
    return f"{QEMU_OUI}:{d[0]:02x}:{d[1]:02x}:{d[2]:02x}"


def key(vm: str, nic: int) -> str:
    return f"{vm}/{nic}"


def validate_nic(nic: object) -> int:
    if isinstance(nic, bool) or not isinstance(nic, int) or not 0 <= nic <= MAX_NIC:
        raise InvalidArgument(f"The NIC index must be a whole number from 0 to {MAX_NIC}.")
    return nic


class MacRegistry:
    """{network: {"vm/nic": mac}}, persisted through a save callback after each change."""

    FILE = "macs.json"

    def __init__(self, data: dict[str, dict[str, str]], save):
        self.data = {n: dict(m) for n, m in data.items() if isinstance(m, dict)}
        self._save = save

    def lookup(self, network: str, vm: str, nic: int) -> str | None:
        return self.data.get(network, {}).get(key(vm, nic))

    def get(self, network: str, vm: str, nic: int) -> str:
        """The MAC of (network, vm, nic), giving one out (and remembering it) if new."""
        validate_network_name(network)
        validate_vm_name(vm)
        validate_nic(nic)
        macs = self.data.setdefault(network, {})
        k = key(vm, nic)
        if k in macs:
            return macs[k]
        used = set(macs.values())
        attempt = 0
        mac = derive_mac(network, vm, nic)
        while mac in used:
            attempt += 1
            mac = derive_mac(network, vm, nic, attempt)
        macs[k] = mac
        self._save(self.data)
        return mac

    def owner_of(self, network: str, mac: str) -> str | None:
        for k, m in self.data.get(network, {}).items():
            if m == mac:
                return k
        return None

    def import_macs(self, network: str, entries: dict[str, str]) -> int:
        """Take in vm -> mac (nic 0) entries; all or nothing."""
        validate_network_name(network)
        macs = dict(self.data.get(network, {}))
        seen: dict[str, str] = {}
        for vm, mac in entries.items():
            validate_vm_name(vm)
            mac = validate_mac(mac)
            if mac in seen:
                raise Exists(f"The MAC {mac} is given twice, to '{seen[mac]}' and '{vm}'.")
            seen[mac] = vm
            holder = next((k for k, m in macs.items() if m == mac and k != key(vm, 0)), None)
            if holder is not None:
                raise Exists(f"The MAC {mac} already belongs to '{holder}' on {network}.")
        for vm, mac in entries.items():
            macs[key(vm, 0)] = mac.lower()
        self.data[network] = macs
        self._save(self.data)
        return len(entries)

    def export_ether_conf(self, network: str) -> str:
        """qemu-vlan's ether.conf: ether_<i>=MAC. VMs named <network>_<i> (the original's tap
        names, which is what an import creates) keep their index; others follow."""
        macs = self.data.get(network, {})
        indexed: dict[int, tuple[str, str]] = {}
        rest: list[tuple[str, str]] = []
        prefix = f"{network}_"
        for k, mac in sorted(macs.items()):
            vm, nic = k.rsplit("/", 1)
            if nic == "0" and vm.startswith(prefix) and vm[len(prefix):].isdigit():
                indexed[int(vm[len(prefix):])] = (k, mac)
            else:
                rest.append((k, mac))
        nxt = max(indexed, default=0) + 1
        for k, mac in rest:
            indexed[nxt] = (k, mac)
            nxt += 1
        lines = [f"# ether.conf for {network}, written by qemu-vnet"]
        for i in sorted(indexed):
            k, mac = indexed[i]
            vm, nic = k.rsplit("/", 1)
            note = "" if vm == f"{prefix}{i}" and nic == "0" else f"  # vm {vm} nic {nic}"
            lines.append(f"ether_{i}={mac}{note}")
        return "\n".join(lines) + "\n"


def valid(data: Any) -> bool:
    """{network: {"vm/nic": mac}}: the registry's shape, checked before it is trusted."""
    return isinstance(data, dict) and all(
        isinstance(n, str) and isinstance(m, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())
        for n, m in data.items())
