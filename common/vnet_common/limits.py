"""The limits both vnetd and its clients hold values to: lengths, counts and ranges.

Each is stated once here; the daemon refuses past them, the client and the importer of old
qemu-vlan directories check against the same numbers before sending anything.
"""

IFNAMSIZ = 16  # with the trailing NUL: interface names of 15 bytes at most
MAX_IFNAME = IFNAMSIZ - 1
MAX_VM_NAME = 64  # characters in a VM name
MAX_TAPS = 64  # pre-created taps per network (-n)
MIN_MTU, MAX_MTU = 576, 9216
DEFAULT_MTU = 1500
MAX_UID = 2**32 - 2  # (uid_t)-1 means "no uid"
MIN_VDE_PORTS, MAX_VDE_PORTS = 2, 1024
DEFAULT_VDE_PORTS = 32
MAX_NIC = 31  # NIC indexes 0..31 per VM and network
MAX_QUEUES = 8  # queues of a multi-queue tap
MIN_PORT, MAX_PORT = 1, 65535  # TCP/UDP ports
MAX_DOMAIN = 253  # characters in a DNS domain
MAX_LABEL = 63  # characters in one DNS label (a host name)
SUBNET4_PREFIXES = (8, 30)  # an IPv4 subnet's prefix lengths, both ends included
SUBNET6_PREFIXES = (48, 120)  # an IPv6 prefix's lengths, both ends included
MAX_VNI = 2**24 - 1  # VXLAN network identifiers are 24 bits: 1 to 16777215
MAX_PEERS = 256  # hosts in one overlay's peer list
DEFAULT_VXLAN_PORT = 4789  # IANA's
DEFAULT_ASN = 65000  # EVPN: the iBGP AS
MAX_ASN = 2**32 - 1
