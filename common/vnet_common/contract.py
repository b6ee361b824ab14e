"""The D-Bus contract, declared once: every method with its polkit action, the signals and
the error names (the names it is built of, bus name, paths, interfaces and actions, are in
vnet_common.wire).

vnetd serves it (its Introspect replies, the XML in dbus/ and docs/dbus-api.md are made from
it by vnetd.api), and tests hold both clients' calls to it. A method that names no polkit
action cannot be declared: the table refuses it (fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ERROR_PREFIX
from .wire import ACTIONS, ATTACH, FORWARD, INFO, MANAGE, MANAGER, NETWORK


@dataclass(frozen=True)
class Arg:
    name: str
    sig: str


@dataclass(frozen=True)
class Method:
    iface: str
    name: str
    args: tuple[Arg, ...]
    returns: tuple[Arg, ...]
    action: str
    doc: str
    details: tuple[str, ...] = ("name",)  # args passed to polkit ("name" as "network")

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"{self.name}: every method needs a polkit action")

    @property
    def in_sig(self) -> str:
        return "".join(a.sig for a in self.args)

    @property
    def out_sig(self) -> str:
        return "".join(a.sig for a in self.returns)


@dataclass(frozen=True)
class Signal:
    iface: str
    name: str
    args: tuple[Arg, ...]
    doc: str


def _a(*pairs: str) -> tuple[Arg, ...]:
    return tuple(Arg(*p.split(":")) for p in pairs)


METHODS: tuple[Method, ...] = (
    Method(MANAGER, "ListNetworks", (), _a("networks:aa{sv}"), INFO,
           "Every defined network with its definition and state.", details=()),
    Method(MANAGER, "GetNetwork", _a("name:s"), _a("network:a{sv}"), INFO,
           "One network: definition, state, bridge, addresses, ports. Callers without the "
           "manage action see only their own ports, and the others as a count (other-ports)."),
    Method(MANAGER, "Define", _a("name:s", "options:a{sv}"), _a("network:o"), MANAGE,
           "Define a network. Options (the TOML keys): mode, subnet, subnet6, mtu, autostart, "
           "taps, tap-base (0: taps NAME_0.., as qemu-vlan; 1: NAME_1..), tap-user, tap-group, "
           "dhcp, dhcp-start, dhcp-end, domain, hosts, forwards, allow-host, routed-with, "
           "spoof-protection, vde, vde-ports, vde-switch-args, vde-macs, if and "
           "force (bridged mode), overlay (a{sv}: vni, local, peers, dev, port, role, control, "
           "asn, route-reflector; docs/overlay.md). The caller owns the network and its forwards "
           "(not an option: 'owner' is refused); "
           "other than root, one user owns at most vnetd's --max-networks-per-user networks."),
    Method(MANAGER, "CheckDefinition", _a("name:s", "options:a{sv}"), _a("network:a{sv}"),
           MANAGE,
           "Everything Define checks (the options, the name, the caller's limits, the "
           "interfaces, subnets, VNI and forwards the host has), without defining: the network "
           "as Define would make it (state 'not defined'), or Define's error."),
    Method(MANAGER, "Redefine", _a("name:s", "options:a{sv}", "dry_run:b"),
           _a("network:a{sv}", "notes:as"), MANAGE,
           "Replace a defined network's definition (the options of Define, all of them: what "
           "is left out takes its default), checked as Define checks one. A running network "
           "takes the live settings at once (DHCP and DNS, static hosts, forwards, firewall "
           "settings, overlay peers, autostart), all or none; the ones that make its links "
           "(mode, subnets, MTU, taps, VDE, uplink, the overlay's device) change only while "
           "it is stopped (Busy otherwise). Its owner and the owners of the "
           "forwards it keeps stay; forwards it adds are the caller's. With dry_run, only "
           "check and tell."),
    Method(MANAGER, "ExportDefinition", _a("name:s"), _a("toml:s"), INFO,
           "The network's definition as TOML (forwards inline, owners left out): 'define "
           "--from' takes it back."),
    Method(MANAGER, "Undefine", _a("name:s"), (), MANAGE,
           "Remove a stopped network's definition."),
    Method(MANAGER, "Start", _a("name:s"), (), MANAGE,
           "Create the bridge, its addresses and the pre-created taps."),
    Method(MANAGER, "Stop", _a("name:s"), (), MANAGE,
           "Remove everything the network's start made; attached VMs' ports wait, down and "
           "off any bridge, and come back guarded with the next Start."),
    Method(MANAGER, "SetAutostart", _a("name:s", "enabled:b"), (), MANAGE,
           "Start the network whenever vnetd starts."),
    Method(MANAGER, "Reload", (), _a("problems:as"), MANAGE,
           "Re-read the definition files; returns a sentence per file that could not be used.",
           details=()),
    Method(MANAGER, "Attach", _a("network:s", "vm:s", "options:a{sv}"),
           _a("port:a{sv}", "fds:ah", "vhostfds:ah"), ATTACH,
           "Open a tap on the network for a VM and hand its fd(s) to the caller. Options: nic, "
           "queues (1-8, one fd each), vhost, mac (the guest's, when it is not the stable one), "
           "learn-mac (the guest's MAC is not known: the port takes the first source MAC its "
           "guest sends that nobody else holds; not with mac), holder-pid (the caller's "
           "parent, for helpers run by QEMU).",
           details=("network",)),
    Method(MANAGER, "OpenSession", (), _a("session:h"), INFO,
           "A socket of the caller's own to vnetd, for a caller that makes many calls: on it, "
           "D-Bus method calls of these interfaces, written one after another with no bus and "
           "no authentication exchange, are answered as the same calls on the bus from this "
           "connection would be (same polkit subject and checks), without dbus-daemon's two "
           "hops. A session ends with the caller's bus connection, at anything that is not a "
           "D-Bus message of at most 1 MiB, or when an answer stays unread for 30 s. One "
           "connection holds at most 4 sessions, one user 16 (QuotaExceeded). Calls are "
           "answered in order, one at a time; OpenSession itself is a call on the bus.",
           details=()),
    Method(MANAGER, "Detach", _a("ifname:s"), (), ATTACH,
           "Remove a port now, persistent or not. Its owner or an administrator (manage).",
           details=("ifname",)),
    Method(MANAGER, "ListPorts", (), _a("ports:aa{sv}"), INFO,
           "Your ports; administrators (manage) see everyone's.", details=()),
    Method(MANAGER, "GetMac", _a("network:s", "vm:s", "nic:u"), _a("mac:s"), ATTACH,
           "The stable MAC of a VM's NIC on a network (given out and remembered if new; a "
           "network's registry holds at most vnetd's --max-macs-per-network entries).",
           details=("network",)),
    Method(MANAGER, "VdeSocket", _a("network:s", "vm:s", "nic:u"), _a("sock:s", "mac:s"),
           ATTACH, "A VDE switch of the network with a free port (for -netdev vde,sock=) and "
           "the VM's stable MAC. Members of group vnet may then connect with no call at all.",
           details=("network",)),
    Method(MANAGER, "ExportEtherConf", _a("network:s"), _a("text:s"), INFO,
           "The network's MACs as qemu-vlan's ether.conf (ether_<i>=MAC lines); an "
           "administrator (manage) gets every VM's, another caller its own VMs'.",
           details=("network",)),
    Method(MANAGER, "ImportMacs", _a("network:s", "macs:a{ss}"), _a("count:u"), MANAGE,
           "Take in 'VM' (NIC 0; from an old ether.conf: VM '<network>_<i>') or 'VM/NIC' -> "
           "MAC entries, as ExportMacs gives them; all or nothing.", details=("network",)),
    Method(MANAGER, "ExportMacs", _a("network:s"), _a("macs:a{ss}"), INFO,
           "The network's MAC registry, 'VM/NIC' -> MAC: ImportMacs on another host takes it "
           "in, so VMs that move keep their MACs. An administrator (manage) gets every VM's "
           "entries, another caller its own VMs'.", details=("network",)),
    Method(MANAGER, "ForgetMac", _a("network:s", "vm:s"), _a("count:u"), MANAGE,
           "Drop every NIC's MAC of a VM from the network's registry (the network need not be "
           "defined any more); refused while a NIC of the VM is attached there.",
           details=("network", "vm")),
    Method(MANAGER, "TransferVm", _a("network:s", "vm:s", "uid:u"), _a("uid:u"), MANAGE,
           "Give a VM name on a network, and its MACs, to another user (uid): from then on "
           "only that user attaches it (the network need not be defined any more); refused "
           "while a NIC of the VM is attached there.", details=("network", "vm")),
    Method(MANAGER, "Enslave", _a("ifname:s"), _a("network:s"), ATTACH,
           "vnet-ifup: put a tap you own on the bridge its name names (<network>_<n>).",
           details=("ifname",)),
    Method(MANAGER, "Release", _a("ifname:s"), _a("network:s"), ATTACH,
           "vnet-ifdown: take a tap you own off its bridge.", details=("ifname",)),
    Method(MANAGER, "AddHost", _a("network:s", "vm:s", "options:a{sv}"), _a("host:a{sv}"),
           MANAGE, "Give a VM a fixed address. Options: ip (default: the first free one below "
           "the DHCP range), mac (default: the VM's stable MAC).", details=("network", "vm")),
    Method(MANAGER, "RemoveHost", _a("network:s", "vm:s"), (), MANAGE,
           "Remove a VM's fixed address.", details=("network", "vm")),
    Method(MANAGER, "ListHosts", _a("network:s"), _a("hosts:aa{sv}"), INFO,
           "The network's static hosts.", details=("network",)),
    Method(MANAGER, "Leases", _a("network:s"), _a("leases:aa{sv}"), INFO,
           "Current DHCP leases: mac, ip, hostname, expiry, and the vm/port when known. "
           "Callers without the manage action see the leases of their own VMs only.",
           details=("network",)),
    Method(MANAGER, "AddForward", _a("network:s", "forward:a{sv}"), _a("forward:a{sv}"),
           FORWARD, "Forward host traffic into the network. Keys: proto (tcp|udp), family "
           "(4|6), port ('8080' or '8000-8010'), target (an address in the network or a VM "
           "name), target-port, ext-addr (traffic to that address), iface (traffic arriving on "
           "that interface), addr-of (traffic to that interface's addresses, followed as they "
           "change); or rule (qemu-vlan's 'interface,proto,port,address:port[/4|6]') with "
           "interface-means (addresses, the default, or incoming); or the command line's "
           "words: external ('[EXT_ADDR:]PORT[-PORT]') and to ('TARGET:PORT') with proto and "
           "family. Refused if it overlaps "
           "another forward. The "
           "caller owns it; other than root, one user owns at most vnetd's "
           "--max-forwards-per-user forwards.",
           details=("network",)),
    Method(MANAGER, "RemoveForward", _a("network:s", "forward:a{sv}"), (), FORWARD,
           "Remove the forward of proto, family, port (and ext-addr); or of proto, family "
           "and external ('[EXT_ADDR:]PORT[-PORT]'), as the command line says it.",
           details=("network",)),
    Method(MANAGER, "ListForwards", _a("network:s"), _a("forwards:aa{sv}"), INFO,
           "The network's forwards, with their owner's uid and the address each VM-name "
           "target resolves to now.",
           details=("network",)),
    Method(MANAGER, "AddPeer", _a("network:s", "address:s"), (), MANAGE,
           "Add a host to the network's VXLAN overlay, live and stored: with static control "
           "its address joins the flood list (bridge fdb append 00:00:00:00:00:00 dst "
           "ADDRESS); with EVPN it becomes a BGP neighbour. Refused for the host's own local "
           "address, another address family, or a peer already listed.",
           details=("network",)),
    Method(MANAGER, "RemovePeer", _a("network:s", "address:s"), (), MANAGE,
           "Take a host out of the network's VXLAN overlay, live and stored: no more frames "
           "are flooded to it (static) or its BGP session ends (EVPN).",
           details=("network",)),
    Method(NETWORK, "GetInfo", (), _a("network:a{sv}"), INFO,
           "This network, as Manager.GetNetwork returns it."),
    Method(NETWORK, "Start", (), (), MANAGE, "Start this network."),
    Method(NETWORK, "Stop", (), (), MANAGE, "Stop this network."),
)

SIGNALS: tuple[Signal, ...] = (
    Signal(MANAGER, "NetworkChanged", _a("name:s", "state:s"),
           "A network was defined, undefined, started, stopped or reloaded."),
    Signal(MANAGER, "LeaseChanged", _a("network:s", "event:s"),
           "A DHCP lease on the network was added, changed or removed (event). The signal "
           "goes to everyone on the bus, so it names no MAC, address or host: Leases shows "
           "each caller the leases it may see."),
    Signal(MANAGER, "PortChanged", _a("ifname:s", "network:s", "state:s"),
           "A port was attached or detached (its holder closed it, or Detach)."),
)

INTERFACES = (MANAGER, NETWORK)


ERRORS_DOC = (
    (ERROR_PREFIX + "InvalidArgument", "a name, address, number or option is not "
     "acceptable; nothing was changed"),
    (ERROR_PREFIX + "NotFound", "no such network, port or static host"),
    (ERROR_PREFIX + "Exists", "the name, interface, address or MAC is taken"),
    (ERROR_PREFIX + "Busy", "the thing is in use (a running network, an attached "
     "NIC)"),
    (ERROR_PREFIX + "NotRunning", "the network must be started first"),
    (ERROR_PREFIX + "QuotaExceeded", "a limit was reached: a user's ports, "
     "networks or forwards (root has none), or a network's MAC registry; nothing was "
     "changed"),
    (ERROR_PREFIX + "NotOwner", "the VM name, MAC or address belongs to another "
     "user (the uid that first registered it); nothing was changed"),
    (ERROR_PREFIX + "Failed", "the kernel or a server refused; what was done was "
     "rolled back"),
    ("org.freedesktop.DBus.Error.AccessDenied", "polkit said no (or is not running)"),
    ("org.freedesktop.DBus.Error.InteractiveAuthorizationRequired", "a password could help: "
     "call again with the ALLOW_INTERACTIVE_AUTHORIZATION flag and an agent"),
    ("org.freedesktop.DBus.Error.InvalidArgs", "the arguments' D-Bus types are wrong, or "
     "the call could not be decoded"),
    ("org.freedesktop.DBus.Error.LimitsExceeded", "too much at once: a call longer than "
     "1 MiB (not read), or too many of the caller's calls waiting for an answer or for "
     "polkit; nothing was changed"),
)

ACTIONS_DOC = (
    (INFO, "yes", "yes", "everyone may look"),
    (ATTACH, "auth_admin_keep", "auth_admin", "group `vnet`: yes, without a password "
     "(polkit/rules.d/50-qemu-vnet.rules)"),
    (MANAGE, "auth_admin_keep", "auth_admin_keep", "administrators"),
    (FORWARD, "auth_admin_keep", "auth_admin_keep", "administrators (port forwarding)"),
)

