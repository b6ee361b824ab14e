"""Who a VM is on a network, in one place: its MACs (the registry and the ports that hold
it), its addresses (a static host, else the DHCP leases of its own MACs), and whose a MAC is.

Only vnetd's own identity counts: the registry, static hosts and ports. A hostname a guest
chose for itself in a DHCP request never makes it anyone (it names a VM only for `knows_vm`,
where it lets a forward wait for a VM by name)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vnet_common.names import split_key

from .model import Network

if TYPE_CHECKING:
    from .macs import MacRegistry
    from .ports import Ports
    from .render.dnsmasq import Lease
    from .subsystems.dhcp import DhcpServers


def _live(le: Lease) -> bool:
    """A lease not expired (0: one that never expires)."""
    return le.expiry == 0 or le.expiry > time.time()


class Resolver:
    def __init__(self, network: Callable[[str], Network | None], macs: MacRegistry,
                 ports: Ports, dhcp: DhcpServers):
        self.network = network  # a network's definition in force, by name
        self.macs = macs
        self.ports = ports
        self.dhcp = dhcp

    def leases(self, net: Network) -> list[Lease]:
        return self.dhcp.leases(net)

    def one_reading(self):
        """A pass over many ports: each network's leases are read once (DhcpServers)."""
        return self.dhcp.one_reading()

    def vm_macs(self, network: str, vm: str) -> set[str]:
        """The VM's registry MACs and the MACs of the ports that hold it."""
        macs = set(self.macs.macs_of(network, vm))
        macs |= {p.mac for p in self.ports.on_network(network)
                 if p.vm == vm and p.mac_known and p.kind != "vde"}
        return macs

    def address(self, net: Network, target: str, family: int) -> str | None:
        """The address `target` (an address, or a VM name) is now: itself, the lease one of
        the VM's MACs holds, or the VM's static host (IPv4). A lease comes first: a VM given
        a static address keeps the address it leased until it renews, and so do forwards to
        it."""
        try:
            return str(ipaddress.ip_address(target))
        except ValueError:
            pass  # a VM name
        host = net.host(target)
        macs = self.vm_macs(net.name, target) | ({host.mac} if host is not None else set())
        for le in self.leases(net):
            if le.mac in macs and (":" in le.ip) == (family == 6) and _live(le):
                return le.ip
        if host is not None and family == 4:
            return str(host.ip)
        return None

    def port_addresses(self, net: Network, mac: str
                       ) -> tuple[str | None, tuple[str, ...], list[str]]:
        """What a port with `mac` is bound to: its IPv4 address (a static host, else its
        lease: DHCP gives a lease only to that client hardware address), the leased IPv4
        address it keeps beside a static one given since (until the guest renews and gets
        the static one), and its leased IPv6 addresses."""
        leases = [le for le in self.dhcp.leases_of(net, mac) if _live(le)]
        leased4 = next((le.ip for le in leases if ":" not in le.ip), None)
        leased6 = [le.ip for le in leases if ":" in le.ip]
        static = next((h for h in net.hosts if h.mac == mac), None)
        if static is None:
            return leased4, (), leased6
        also = (leased4,) if leased4 is not None and leased4 != str(static.ip) else ()
        return str(static.ip), also, leased6

    def kept_lease(self, net: Network, vm: str) -> str | None:
        """The IPv4 lease the VM holds now, if it differs from its static host's address."""
        host = net.host(vm)
        if host is None:
            return None
        for le in self.leases(net):
            if le.mac == host.mac and ":" not in le.ip and le.ip != str(host.ip) and _live(le):
                return le.ip
        return None

    def owner_of_mac(self, network: str, mac: str) -> str | None:
        """The VM (or the gateway) a MAC belongs to on a network, if any."""
        net = self.network(network)
        if net is not None:
            if mac == net.mac:
                return "the gateway"
            for h in net.hosts:
                if h.mac == mac:
                    return h.vm
        for p in self.ports.on_network(network):
            if p.mac_known and p.mac == mac and p.kind != "vde":
                return p.vm
        k = self.macs.owner_of(network, mac)
        return split_key(k)[0] if k else None

    def knows_vm(self, net: Network, target: str) -> bool:
        """An address, or a VM with a static host, a registry MAC or a lease by that name."""
        try:
            ipaddress.ip_address(target)
            return True
        except ValueError:
            pass
        if net.host(target) is not None:
            return True
        if any(split_key(k)[0] == target for k in self.macs.data.get(net.name, {})):
            return True
        return any(le.hostname.lower() == target.lower() for le in self.leases(net))

    def lease_vms(self, net: Network) -> dict[str, dict[str, Any]]:
        """For `leases`: MAC -> the VM (and port) it belongs to, for every MAC vnetd knows
        on the network: a port's first, then a static host's, then the registry's. One pass
        over each (a lease file holds up to 65,536 leases, a registry thousands of entries,
        and anyone may call Leases)."""
        out: dict[str, dict[str, Any]] = {}
        for k, m in self.macs.data.get(net.name, {}).items():
            out.setdefault(m, {"vm": split_key(k)[0]})
        for h in net.hosts:
            out[h.mac] = {"vm": h.vm}
        for p in self.ports.on_network(net.name):
            out[p.mac] = {"vm": p.vm, "port": p.ifname}
        return out
