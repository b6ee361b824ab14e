"""Names and their validators: networks, VMs, interfaces, MACs, addresses, ports, counts;
and the MAC registry's key, "VM/NIC".
"""

from __future__ import annotations


# --- the MAC registry's key ---------------------------------------------------------------
def key(vm: str, nic: int) -> str:
    """The MAC registry's key of a VM's NIC: 'web1/0'. ExportMacs and ImportMacs carry it."""
    return f"{vm}/{nic}"


def split_key(k: str) -> tuple[str, int]:
    """key()'s inverse: 'web1/0' -> ('web1', 0). A key without a NIC index ('web1', as an
    import from an ether.conf may give it) is the VM's NIC 0."""
    vm, sep, nic = k.rpartition("/")
    if not sep or not nic.isdigit():
        return k, 0
    return vm, int(nic)
