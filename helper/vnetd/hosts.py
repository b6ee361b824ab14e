"""Static hosts (a VM's fixed address on a network, which also makes its name resolve) and
the leases the network's DHCP server gave out.

A static host changes the network's definition: under the engine's lock, written to its file,
handed to the DHCP server and to the firewall (a port's addresses, forwards to the VM).
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any

from . import model
from .errors import Exists, InvalidArgument, NotFound
from .model import Network
from .operations import Operations

if TYPE_CHECKING:
    pass


class Hosts(Operations):
    """Every network's static hosts and leases (`engine.hosts`)."""

    async def add(self, network: str, vm: str, options: dict[str, Any]) -> model.StaticHost:
        unknown = sorted(model._printable(k) for k in options if k not in ("ip", "mac"))
        if unknown:
            raise InvalidArgument(f"Unknown host option(s): {', '.join(unknown)}. Known: ip, mac.")
        await self.engine._adopted()  # their firewall elements: once the ruleset is whole
        async with self.engine.lock:
            net = self.engine.get(network)
            model.validate_vm_name(vm)
            model.validate_hostname(vm)
            taken = net.host(vm)
            if taken is not None:
                raise Exists(f"VM '{vm}' already has a static host on {network} "
                             f"({taken.ip}); remove it first.")
            mac: str | None
            if options.get("mac") is not None:
                mac = model.validate_mac(options["mac"])
            else:
                mac = self.macs.lookup(network, vm, 0)
                if mac is None:
                    raise InvalidArgument(f"VM '{vm}' has no MAC on {network} yet: give --mac "
                                          "(or attach it once, or 'vnet-client mac').")
            if options.get("ip") is not None:
                ip = model.parse_ip4(options["ip"], "address")
                model.check_host_ip(net.subnet, ip)
                self._check_not_leased(net, ip, mac)
            else:
                ip = self._free_static_ip(net)
            for h in net.hosts:
                if h.ip == ip:
                    raise Exists(f"The address {ip} is already given to '{h.vm}' on {network}.")
                if h.mac == mac:
                    raise Exists(f"The MAC {mac} is already given to '{h.vm}' on {network}.")
            host = model.StaticHost(vm=vm, mac=mac, ip=ip)
            new = net.with_changes(hosts=(*net.hosts, host))
            self.store.save(new)
            self.engine._put(new)
            await self.dhcp.apply_hosts(self.engine.network(network) or new)
            await self.firewall.leases_changed(network)
        return host

    def _check_not_leased(self, net: Network, ip, mac: str) -> None:
        """An address inside the DHCP range may be given to a VM only while no other MAC
        holds a lease on it (the server would otherwise hand one address to two guests)."""
        start, end = net.dhcp_range
        if net.dhcp == "none" or not start <= ip <= end:
            return
        for le in self.dhcp.leases(net):
            if le.ip == str(ip) and le.mac != mac:
                who = f" ({le.hostname})" if le.hostname else ""
                raise Exists(f"The address {ip} is leased to {le.mac}{who} on {net.name}: "
                             f"choose another, best one below the DHCP range {start}-{end} "
                             "(never handed out dynamically), or leave --ip out for the first "
                             "free one there.")

    def _free_static_ip(self, net: Network):
        used = {h.ip for h in net.hosts} | {net.gateway}
        start, _ = net.dhcp_range
        ip = net.subnet.network_address + 2
        while ip < start and ip < net.subnet.broadcast_address:
            if ip not in used:
                return ip
            ip += 1
        raise InvalidArgument(f"No free static address left in {net.subnet.network_address + 2}-"
                              f"{start - 1} on {net.name}: give --ip.")

    async def remove(self, network: str, vm: str) -> None:
        await self.engine._adopted()  # their firewall elements: once the ruleset is whole
        async with self.engine.lock:
            net = self.engine.get(network)
            model.validate_vm_name(vm)
            if net.host(vm) is None:
                raise NotFound(f"VM '{vm}' has no static host on {network}.")
            new = net.with_changes(hosts=tuple(h for h in net.hosts if h.vm != vm))
            self.store.save(new)
            self.engine._put(new)
            await self.dhcp.apply_hosts(self.engine.network(network) or new)
            await self.firewall.leases_changed(network)

    def leases(self, network: str, uid: int | None = None) -> builtins.list[dict[str, Any]]:
        """The network's leases, by address, each with the VM (and port) its MAC is; with
        `uid`, only those of that uid's VMs, chosen before anything is built or sorted (a
        lease file holds up to 65,536 leases, and anyone may ask for their own)."""
        net = self.engine.get(network)
        vms = self.resolver.lease_vms(net)
        owner = self.engine.macs.owner_uid
        out = []
        for le in self.dhcp.leases(net):
            who = vms.get(le.mac, {})
            if uid is not None and ("vm" not in who or owner(network, who["vm"]) != uid):
                continue
            out.append({"mac": le.mac, "ip": le.ip, "hostname": le.hostname,
                        "expiry": le.expiry, **who})
        return sorted(out, key=lambda d: tuple(int(x) for x in d["ip"].split(".")))
