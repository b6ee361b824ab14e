"""vnetd: the privileged half of qemu-vnet (bridges, taps, DHCP, firewall over D-Bus)."""

__version__ = "0.1.0"
