"""vnet-client: the command line for qemu-vnet.

Two forms:
  vnet-client SUBCOMMAND ...             (list, show, define, start, stop, undefine, ...)
  vnet-client --br=vnet3 -n4 --start     (the original qemu-vlan's flags)

Exit codes: 0 ok, 1 failure, 2 usage, 4 not authorized.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import grp
import json
import os
import pwd
import re
import shutil
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import __version__
from .agent import TextAgent
from .api import Attachment, Client, VnetClientError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_AUTH = 0, 1, 2, 4

EPILOG = """\
examples:
  vnet-client define vnet2 --mode=nat            # 172.16.12.0/24, gateway 172.16.12.1
  vnet-client define lab --subnet=10.7.0.0/24 --subnet6=fd00:7::/64 --mode=host-only
  vnet-client start vnet2
  vnet-client list --json
  vnet-client --br=vnet3 -n4 --start             # qemu-vlan style: define if needed, start
  vnet-client --br=vnet3 --stop

Authorization: listing is open to everyone; defining, starting and stopping networks needs
the 'manage' right (an administrator's password by default). On a terminal a password prompt
appears when polkit asks for one; --no-ask-password turns that off.
Exit codes: 0 ok, 1 failure, 2 usage error, 4 not authorized.
"""

COMPAT_EPILOG = """\
This is the qemu-vlan compatible form: qemu-vlan 1.0.0's options, short and long, its
environment (QEMU_VLAN_NUM, QEMU_VLAN_DHCP, QEMU_VLAN_IF, QEMU_VLAN_VDE, QEMU_VLAN_CF, GROUP)
and its configuration file (-c FILE, else /etc/qemu/BRIDGE/BRIDGE.conf when it exists; its
num=, vde=, dhcp=, if=, user=, group=, gateway= and netmask= win over the options, as when
qemu-vlan sourced it), with its defaults: -n 4, no DHCP server, group qemu when it exists.
  vnet-client --br=vnet3 -n4 --start   ==  vnet-client define vnet3 -n 4 --dhcp=none; start vnet3
  vnet-client -b vnet3 -d dnsmasq -s   ==  a nat network with dnsmasq and taps vnet3_0..vnet3_3
  vnet-client -b vnet3 -d dhcpd -s     ==  a host-only network with ISC dhcpd
  vnet-client --br=vnet3 --stop        ==  vnet-client stop vnet3
  vnet-client --br=vnet3 -n2 --macaddr ==  ether_0..ether_15 lines (8 per tap, 32 with --vde):
                                           the MACs vnetd gives VMs vnet3_0..vnet3_15; to
                                           stdout, or appended to the ether.conf beside -c FILE
--start on a network that exists starts it as defined; an option, variable or configuration
line that asks for something else is refused, naming each difference.
Exit codes: 0 ok, 1 failure, 2 usage error, 4 not authorized.
"""


class Usage(Exception):
    """A mistake in the command line: exit 2."""


class Failure(Exception):
    """Something the client itself found wrong (a file, a command): exit 1."""


def _add_common(p: argparse.ArgumentParser, top: bool = False) -> None:
    """The options every command takes. On subcommands their defaults are suppressed, so that
    `vnet-client --json list` and `vnet-client list --json` mean the same."""
    d = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--json", action="store_true", help="print machine-readable JSON", **d)
    p.add_argument("--no-ask-password", action="store_true",
                   help="never prompt for a password; fail with exit code 4 instead", **d)
    p.add_argument("--bus-address", metavar="ADDR",
                   help="talk to a vnetd on this D-Bus address (default: the system bus, "
                   "or $VNET_BUS_ADDRESS)", **d)


def _define_options(p: argparse.ArgumentParser, compat: bool = False) -> None:
    """define's network options. compat: the qemu-vlan form's spellings too (-i, -n/--num,
    -u, -g, -d, -v) and its defaults left to the caller (None when not given)."""
    def o(*names: str) -> list[str]:
        return list(names) if compat else [n for n in names
                                           if n not in ("-i", "-u", "-g", "-v", "--num")]

    p.add_argument("--mode", choices=["nat", "host-only", "bridged"],
                   help="nat (default), host-only, or bridged (with --if: guests on the "
                   "physical network)")
    p.add_argument(*o("-i", "--if"), dest="iface", metavar="NIC",
                   help="bridged: the physical interface to put in the bridge (qemu-vlan's --if)")
    p.add_argument("--force", action="store_true",
                   help="bridged: even if the NIC carries the host's default route")
    p.add_argument("--subnet", metavar="CIDR",
                   help="IPv4 subnet (default from the name: vnetN -> 172.16.(10+N).0/24)")
    p.add_argument("--subnet6", metavar="CIDR", help="an IPv6 prefix too, e.g. fd00:12::/64")
    p.add_argument("--mtu", type=int, help="bridge and tap MTU (default 1500)")
    p.add_argument("--autostart", action="store_true", help="start whenever vnetd starts")
    p.add_argument(*o("-n", "--num", "--taps"), dest="taps", type=int, metavar="COUNT",
                   help="pre-create COUNT persistent taps NAME_0..NAME_{COUNT-1} (qemu-vlan's "
                   "-n" + (", default $QEMU_VLAN_NUM or 4)" if compat else ")"))
    p.add_argument(*o("-u", "--user"), metavar="USER",
                   help="owner of the pre-created taps (default: you)")
    p.add_argument(*o("-g", "--group"), metavar="GROUP",
                   help="group of the pre-created taps (default " + (
                       "$GROUP, else qemu if that group exists, else vnet)" if compat
                       else "vnet)"))
    if compat:
        p.add_argument("-d", "--dhcp", metavar="SERVER",
                       help="dnsmasq (a nat network), dhcpd (host-only) or none; default "
                       "$QEMU_VLAN_DHCP, else none, as qemu-vlan ran no server without it")
    else:
        p.add_argument("--dhcp", choices=["dnsmasq", "dhcpd", "none"],
                       help="DHCP server for the network (default dnsmasq)")
    p.add_argument("--dhcp-start", metavar="IP", help="first dynamic address (default .32)")
    p.add_argument("--dhcp-end", metavar="IP", help="last dynamic address (default .254)")
    p.add_argument("--domain", help="DNS domain of the VMs' names (default: the network name)")
    p.add_argument("--allow-host", action="store_true",
                   help="host-only: guests may reach the host's services (not only DHCP/DNS)")
    p.add_argument("--routed-with", action="append", metavar="NET",
                   help="let this network exchange traffic with NET (repeatable)")
    p.add_argument("--no-spoof-protection", action="store_true",
                   help="let guests send from any MAC/IP (default: locked to their own)")
    p.add_argument(*o("-v", "--vde"), action="store_const", const=True,
                   default=None if compat else False,
                   help="run a VDE switch on each tap (qemu-vlan's --vde; needs -n COUNT)"
                   + ("; default $QEMU_VLAN_VDE" if compat else ""))
    p.add_argument("--vde-ports", type=int, metavar="N",
                   help="ports per VDE switch (default 32)")
    o = p.add_argument_group("VXLAN overlay: one LAN across hosts (docs/overlay.md)")
    o.add_argument("--vni", type=int, metavar="VNI",
                   help="VXLAN network identifier, 1-16777215 (turns the overlay on)")
    o.add_argument("--local", metavar="IP", help="this host's underlay address")
    o.add_argument("--peer", action="append", metavar="IP",
                   help="another host's underlay address (repeatable); with --control=evpn "
                   "its BGP neighbour")
    o.add_argument("--underlay-dev", metavar="IF", help="the underlay interface (optional)")
    o.add_argument("--vxlan-port", type=int, metavar="PORT", help="UDP port (default 4789)")
    o.add_argument("--role", choices=["gateway", "member"],
                   help="gateway (default): holds the gateway address, DHCP/DNS, NAT; "
                   "member: only extends the LAN to this host")
    o.add_argument("--control", choices=["static", "evpn"],
                   help="static (default): flood to the listed peers; evpn: BGP EVPN "
                   "through the system's FRR")
    o.add_argument("--asn", type=int, metavar="AS", help="evpn: the iBGP AS (default 65000)")
    o.add_argument("--route-reflector", action="store_true",
                   help="evpn: this host reflects routes to its peers")


class Parser(argparse.ArgumentParser):
    """argparse with short mistakes: the error, a suggestion for a near miss, and where help
    is, instead of the whole usage."""

    def error(self, message: str):  # type: ignore[override]
        hint = ""
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            close = difflib.get_close_matches(m.group(1), re.findall(r"'([^']*)'", m.group(2)),
                                              n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m and m.group(1).startswith("-"):
            flags = [o for a in self._actions for o in a.option_strings]
            close = difflib.get_close_matches(m.group(1).split("=")[0], flags, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
        lines = self.format_usage().strip().splitlines()
        usage = lines[0] + (" ..." if len(lines) > 1 else "")
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}.{hint}\n{usage}\n"
                              f"See '{self.prog} --help'.\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="vnet-client",
        description="Manage qemu-vnet virtual networks and attach QEMU VMs to them without "
        "root. Talks to the vnetd service over D-Bus; polkit decides who may do what.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(p, top=True)
    p.add_argument("--version", action="version", version=f"vnet-client (qemu-vnet) {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        _add_common(sp)
        return sp

    cmd("list", "list networks and their state")
    sp = cmd("show", "show one network: definition, state, addresses")
    sp.add_argument("name")
    sp.add_argument("--ports", action="store_true",
                    help="list the network's ports with their anti-spoofing drop counters")
    sp = cmd("define", "define a network (it is saved in /etc/qemu-vnet/networks/NAME.toml)")
    sp.add_argument("name", help="network (and bridge) name, at most 15 characters")
    _define_options(sp)
    sp.add_argument("--start", action="store_true", help="start it right away")
    sp.add_argument("--dry-run", action="store_true",
                    help="check everything define checks (with vnetd: names, limits, subnets, "
                    "interfaces, forwards) and print the network it would make; define nothing")
    sp.add_argument("--from", dest="from_file", metavar="FILE",
                    help="take the definition from a TOML file (what 'export' prints); other "
                    "options are not allowed with it")
    sp = cmd("export", "print a network's definition as TOML ('define --from' takes it back)")
    sp.add_argument("name")
    sp = cmd("import-qemu-vlan", "define a network from an old qemu-vlan configuration "
             "directory, keeping its MACs and static addresses")
    sp.add_argument("dir", help="e.g. /etc/qemu/vnet3")
    sp.add_argument("--dry-run", action="store_true",
                    help="only print the definition and what could not be carried over")
    sp.add_argument("--start", action="store_true", help="start the network afterwards")
    sp.add_argument("--if", dest="iface", metavar="NIC",
                    help="a bridged network's physical interface (qemu-vlan did not save it)")
    sp.add_argument("-n", "--num", type=int, metavar="COUNT",
                    help="the tap count qemu-vlan ran with (it did not save it): taps "
                    "NAME_0..NAME_{COUNT-1}")
    sp.add_argument("-u", "--user", metavar="USER",
                    help="owner of the taps (qemu-vlan's -u; default: you). QEMU opens a tap "
                    "by name only as its owner (and a member of its group)")
    sp.add_argument("-g", "--group", metavar="GROUP",
                    help="group of the taps (default: the directory's group=, else vnet)")
    sp = cmd("import-bridge-conf", "turn qemu-bridge-helper's /etc/qemu/bridge.conf (allow "
             "lines, include files per group) into a polkit rules file giving the same groups "
             "the same networks")
    sp.add_argument("file", nargs="?", default="/etc/qemu/bridge.conf",
                    help="default /etc/qemu/bridge.conf")
    sp.add_argument("--group", metavar="GROUP",
                    help="the group its allow lines are for (default: the group owning each "
                    "file, as qemu-bridge-helper's convention has it)")
    for name, help in (("start", "start a network: bridge, addresses, taps"),
                       ("stop", "stop a network and remove what start made"),
                       ("undefine", "remove a stopped network's definition")):
        cmd(name, help).add_argument("name")
    sp = cmd("autostart", "start a network whenever vnetd starts (or not)")
    sp.add_argument("name")
    sp.add_argument("state", choices=["on", "off"])
    cmd("reload", "re-read the definition files after editing them by hand")

    sp = cmd("attach", "attach a VM to a network and run COMMAND (QEMU) with the tap fd(s)")
    sp.usage = ("vnet-client attach --br=NET --vm=NAME [--nic=N] [--queues=N] [--vhost] "
                "[--mac=MAC] [--vde] [--br=NET2 ...] -- COMMAND [ARGS...]")
    sp.description = ATTACH_HELP
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp = cmd("ports", "list your ports (administrators: everyone's)")
    sp = cmd("detach", "remove a port now (its owner or an administrator)")
    sp.add_argument("ifname")
    sp = cmd("mac", "stable MACs: print a VM's; export, import or forget a network's MAC "
             "registry; give a VM to another user")
    sp.usage = ("vnet-client mac --br=NET --vm=NAME [--nic=N]\n"
                "       vnet-client mac --br=NET --export-ether-conf [FILE]\n"
                "       vnet-client mac export NET [--json]\n"
                "       vnet-client mac import NET FILE|-\n"
                "       vnet-client mac forget NET VM\n"
                "       vnet-client mac transfer NET VM USER")
    sp.epilog = MAC_EPILOG
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.add_argument("--br", metavar="NET", help="the network")
    sp.add_argument("--vm", metavar="NAME", help="the VM")
    sp.add_argument("--nic", type=int, default=0, help="NIC index (default 0)")
    sp.add_argument("--export-ether-conf", nargs="?", const="-", metavar="FILE",
                    help="write qemu-vlan's ether.conf lines (ether_<i>=MAC) to FILE or stdout")
    msub = sp.add_subparsers(dest="mac_cmd", metavar="ACTION")
    me = msub.add_parser("export", usage="vnet-client mac export NET [--json]",
                         help="print the network's MAC registry, one 'VM/NIC MAC' "
                         "line per NIC (--json: one object)",
                         description="Print the network's MAC registry: one 'VM/NIC MAC' line "
                         "per NIC, or with --json one JSON object. 'mac import' on another "
                         "host takes it in, so VMs that move keep their MACs.")
    _add_common(me)
    me.add_argument("network")
    mi = msub.add_parser("import", usage="vnet-client mac import NET FILE|- [--json]",
                         help="take in what 'mac export' printed (lines or JSON); "
                         "all or nothing",
                         description="Take in a MAC registry that 'mac export' printed (its "
                         "lines or its JSON; a key without /NIC means NIC 0): all entries or "
                         "none. Refused if a MAC belongs to another VM on the network.")
    _add_common(mi)
    mi.add_argument("network")
    mi.add_argument("file", help="the file, or - for standard input")
    mf = msub.add_parser("forget", usage="vnet-client mac forget NET VM [--json]",
                         help="drop a VM's MACs (all its NICs) from the network's "
                         "registry",
                         description="Drop every NIC's MAC of a VM from the network's "
                         "registry, making room in it (it holds vnetd's --max-macs-per-network "
                         "entries at most). Refused while the VM is attached to the network. "
                         "Asked again later, the VM most likely gets the same MAC back (it is "
                         "derived from the names).")
    _add_common(mf)
    mf.add_argument("network")
    mf.add_argument("forget_vm", metavar="VM")  # not "vm": that is mac's --vm
    mt = msub.add_parser("transfer", usage="vnet-client mac transfer NET VM USER [--json]",
                         help="give a VM (its name and MACs on the network) to "
                         "another user",
                         description="Give a VM name on a network, with its MACs, to another "
                         "user: from then on only that user attaches it, with the same MACs. A "
                         "VM name belongs to the user who first registered it. Needs the "
                         "'manage' right; refused while the VM is attached to the network.")
    _add_common(mt)
    mt.add_argument("network")
    mt.add_argument("transfer_vm", metavar="VM")
    mt.add_argument("user", help="the new owner: a user name or a uid")
    hp = cmd("host", "static hosts: fixed addresses and DNS names for VMs")
    hsub = hp.add_subparsers(dest="host_cmd", metavar="ACTION", required=True)
    ha = hsub.add_parser("add", help="give a VM a fixed address (applied live)",
                         description="Give a VM a fixed address on the network (and the DNS "
                         "name VM.NETWORK), applied live to the DHCP server. Needs the 'manage' "
                         "right. Example: vnet-client host add vnet2 --vm web1 --ip "
                         "172.16.12.5")
    _add_common(ha)
    ha.add_argument("network")
    ha.add_argument("--vm", required=True, help="the VM (also its DNS name: VM.NETWORK)")
    ha.add_argument("--ip", help="the address (default: first free below the DHCP range)")
    ha.add_argument("--mac", help="the VM's MAC (default: its stable MAC on the network)")
    hr = hsub.add_parser("remove", help="remove a VM's fixed address",
                         description="Remove a VM's fixed address; it gets a dynamic lease "
                         "when it next asks. Needs the 'manage' right. Example: vnet-client "
                         "host remove vnet2 --vm web1")
    _add_common(hr)
    hr.add_argument("network")
    hr.add_argument("--vm", required=True)
    hl = hsub.add_parser("list", help="list static hosts",
                         description="List the network's static hosts: VM, address, MAC. "
                         "Example: vnet-client host list vnet2 --json")
    _add_common(hl)
    hl.add_argument("network")
    fp = cmd("forward", "port forwarding from the host into a network")
    fsub = fp.add_subparsers(dest="fwd_cmd", metavar="ACTION", required=True)
    fa = fsub.add_parser("add", help="forward PROTO [EXT_ADDR:]PORT[-PORT] to TARGET:PORT",
                         description="Forward host traffic into a network (applied live, "
                         "kept in the definition). TARGET is an address in the network or a "
                         "VM name (its static host or current lease). IPv6 addresses go in "
                         "brackets: [fd00:12::5]:80.")
    _add_common(fa)
    fa.add_argument("network")
    fa.add_argument("proto", nargs="?", choices=["tcp", "udp"])
    fa.add_argument("external", nargs="?", metavar="[EXT_ADDR:]PORT[-PORT]")
    fa.add_argument("to", nargs="?", metavar="TARGET:PORT")
    fa.add_argument("--if", dest="iface", metavar="IFACE",
                    help="only traffic arriving on IFACE (by incoming interface)")
    fa.add_argument("--addr-of", metavar="IFACE",
                    help="only traffic to IFACE's addresses, whatever they are now, from "
                    "outside, the host and other guests alike")
    fa.add_argument("-6", dest="ipv6", action="store_true", help="an IPv6 forward")
    fa.add_argument("--rule", metavar="RULE",
                    help="qemu-vlan's format instead: interface,proto,port,address:port[/4|6]; "
                    "its interface means the interface's addresses, as in qemu-vlan")
    fa.add_argument("--rule-means", choices=["addresses", "incoming"],
                    help="what --rule's interface means: addresses (default, qemu-vlan's "
                    "-d ADDRESS) or incoming (traffic arriving on it)")
    fr = fsub.add_parser("remove", help="remove the forward of PROTO [EXT_ADDR:]PORT[-PORT]",
                         description="Remove the forward of PROTO [EXT_ADDR:]PORT[-PORT] "
                         "(as 'forward list' shows it). Needs the 'forward' right; another "
                         "user's forward only its owner or root removes. Example: vnet-client "
                         "forward remove vnet2 tcp 8080")
    _add_common(fr)
    fr.add_argument("network")
    fr.add_argument("proto", choices=["tcp", "udp"])
    fr.add_argument("external", metavar="[EXT_ADDR:]PORT[-PORT]")
    fr.add_argument("-6", dest="ipv6", action="store_true", help="an IPv6 forward")
    fl = fsub.add_parser("list", help="list the network's forwards",
                         description="List the network's port forwards: protocol, external "
                         "address and ports, target, owner. Example: vnet-client forward list "
                         "vnet2")
    _add_common(fl)
    fl.add_argument("network")
    op = cmd("overlay", "a network's VXLAN overlay: its peers (other hosts)")
    osub = op.add_subparsers(dest="ov_cmd", metavar="ACTION", required=True)
    for name, text in (("add-peer", "flood to (static) or peer with (evpn) another host, "
                        "live and stored"),
                       ("remove-peer", "stop flooding to / peering with a host, live and "
                        "stored")):
        oa = osub.add_parser(name, help=text, description=text.capitalize() + ".",
                             epilog=OVERLAY_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(oa)
        oa.add_argument("network")
        oa.add_argument("address", help="the other host's underlay address")
    os_ = osub.add_parser("show", help="the overlay's device, MTU, peers, forwarding entries "
                          "and (evpn) BGP sessions",
                          description="Show the overlay of a network: its VXLAN device, "
                          "MTU, peers, forwarding entries and, with evpn, the BGP sessions. "
                          "Example: vnet-client overlay show vnet7")
    _add_common(os_)
    os_.add_argument("network")
    sp = cmd("monitor", "print vnetd's events as they happen (networks, ports, leases)")
    sp.description = ("Print one line per event as it happens: a network defined, started, "
                      "stopped or undefined, a port attached or detached, a lease added, "
                      "changed or removed (ask 'leases NET' for which). With --json, one JSON "
                      "object per line. Until Ctrl-C, or --count events. Example: vnet-client "
                      "monitor vnet2 --json")
    sp.add_argument("network", nargs="?", help="only this network's events")
    sp.add_argument("--count", type=int, metavar="N", help="stop after N events")
    sp = cmd("leases", "show the network's DHCP leases")
    sp.add_argument("network")
    sp = cmd("import-ether-conf", "take in an old qemu-vlan ether.conf so VMs keep their MACs")
    sp.add_argument("file", help="e.g. /etc/qemu/vnet3/ether.conf")
    sp.add_argument("--br", metavar="NET",
                    help="the network (default: the file's directory name, e.g. vnet3)")
    return p


OVERLAY_EPILOG = """\
examples (three hosts, underlay 10.77.0.0/24; host A is the gateway):
  A$ vnet-client define vnet7 --vni 5007 --local 10.77.0.1 --peer 10.77.0.2 --peer 10.77.0.3
  B$ vnet-client define vnet7 --vni 5007 --local 10.77.0.2 --peer 10.77.0.1 --peer 10.77.0.3 \\
         --role member
  A$ vnet-client overlay add-peer vnet7 10.77.0.4      # a fourth host joins
  A$ vnet-client overlay remove-peer vnet7 10.77.0.3   # host C is cut off from A
  A$ vnet-client overlay show vnet7
"""


MAC_EPILOG = """\
examples:
  vnet-client mac --br=vnet2 --vm=web1              # web1's MAC on vnet2 (given out if new)
  vnet-client mac --br=vnet2 --vm=web1 --nic=1      # its second NIC's
  vnet-client mac --br=vnet3 --export-ether-conf    # qemu-vlan's ether.conf lines
  vnet-client mac export vnet2 > vnet2.macs         # the whole registry: 'VM/NIC MAC' lines
  vnet-client mac import vnet2 vnet2.macs           # on the new host: the VMs keep their MACs
  ssh old-host vnet-client mac export vnet2 --json | vnet-client mac import vnet2 -
  vnet-client mac forget vnet2 web1                 # web1 is gone: free its entries
  vnet-client mac transfer vnet2 web1 bob           # web1 is bob's now (same MACs)

Exporting needs nothing; importing, forgetting and transferring need the 'manage' right.
"""


ATTACH_HELP = """\
Ask vnetd for a tap on each network named with --br, then run COMMAND with the fds.
Placeholders in COMMAND are replaced:
  {fd}        the tap fd            {fds}       all queue fds, colon-joined
  {vhostfds}  vhost fds (if any)    {mac}       the VM's stable MAC
  {ifname}    the tap's name        {vde_sock}  with --vde: a VDE switch with a free port
With several --br groups, add the group's index: {fd0}, {mac1}, ...
Options after a --br apply to that group; --vm given once applies to all.

example:
  vnet-client attach --br=vnet2 --vm web1 -- qemu-system-x86_64 -m 512 \\
      -netdev tap,id=n0,fd={fd} -device virtio-net-pci,netdev=n0,mac={mac} disk.img

The tap lives as long as COMMAND holds its fd: when QEMU exits it is gone.
"""


def build_compat_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="vnet-client",
        usage="vnet-client --br=BRIDGE [-n COUNT] [options] --start|--stop|--macaddr",
        description="qemu-vlan compatible form.", epilog=COMPAT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(p, top=True)
    p.add_argument("-b", "--br", required=True, metavar="BRIDGE",
                   help="the network/bridge, e.g. vnet3")
    p.add_argument("-c", "--cf", metavar="FILE",
                   help="qemu-vlan's configuration file (default $QEMU_VLAN_CF, else "
                   "/etc/qemu/BRIDGE/BRIDGE.conf when it exists); read, never written")
    _define_options(p, compat=True)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("-s", "--start", action="store_true", help="define if needed, then start")
    action.add_argument("-S", "--stop", action="store_true", help="stop the network")
    action.add_argument("-m", "--macaddr", "--addr", action="store_true",
                        help="print ether_<i>=MAC lines for COUNT x 8 VMs (x 32 with --vde), "
                        "the MACs vnetd gives VMs BRIDGE_<i>; with -c FILE append them to "
                        "the ether.conf beside it")
    p.add_argument("--use-vnet", action="store_true", help="accepted and ignored, as qemu-vlan did")
    return p


# --- the qemu-vlan compatible form: what it asks for -----------------------------------------
@dataclass
class CompatRequest:
    """The definition the compatible form asks for, each value with where it came from
    (an option, a variable, the configuration file or the original's default)."""

    br: str
    values: dict[str, Any]
    source: dict[str, str]
    cf: str | None
    cf_given: bool
    notes: list[str]

    def given(self) -> dict[str, Any]:
        """The values someone asked for (not defaults): what --start compares."""
        return {k: v for k, v in self.values.items() if self.source[k] != "default"}


def _yesno(text: str, what: str) -> bool:
    """qemu-vlan's yesno: 0/disable/off/false/no and 1/enable/on/true/yes, any case."""
    t = text.strip().lower()
    if t in ("1", "enable", "on", "true", "yes"):
        return True
    if t in ("0", "disable", "off", "false", "no", ""):
        return False
    raise Usage(f"{what}={text!r} is neither yes nor no (qemu-vlan takes true/false, yes/no, "
                "on/off, 1/0).")


def _num(text: str, what: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise Usage(f"{what}={text!r} is not a tap count (1 or more).")
    return int(text)


def compat_request(a: argparse.Namespace, env: dict[str, str],
                   group_exists: Callable[[str], bool]) -> CompatRequest:
    """qemu-vlan 1.0.0's order: its defaults, then the environment, then the options, then
    the configuration file it sources (which wins)."""
    from .migrate import MigrationError, read_shell_assignments

    br = a.br
    values: dict[str, Any] = {"taps": 4, "vde": False, "dhcp": None, "iface": None,
                              "user": None, "group": None, "subnet": None}
    source = dict.fromkeys(values, "default")
    notes: list[str] = []

    def put(key: str, value: Any, where: str) -> None:
        values[key] = value
        source[key] = where

    for var, key, conv in (("QEMU_VLAN_NUM", "taps", _num), ("QEMU_VLAN_VDE", "vde", _yesno),
                           ("QEMU_VLAN_DHCP", "dhcp", None), ("QEMU_VLAN_IF", "iface", None),
                           ("GROUP", "group", None)):
        if env.get(var):
            put(key, conv(env[var], var) if conv else env[var], f"${var}")
    for key, flag in (("taps", "-n"), ("vde", "--vde"), ("dhcp", "--dhcp"), ("iface", "--if"),
                      ("user", "--user"), ("group", "--group"), ("subnet", "--subnet")):
        v = getattr(a, key)
        if v is not None:
            put(key, v, flag)
    if values["taps"] < 1:
        raise Usage("-n takes a tap count of at least 1.")
    cf, cf_given = a.cf or env.get("QEMU_VLAN_CF") or None, True
    if cf is None:
        cf, cf_given = f"/etc/qemu/{br}/{br}.conf", False
    conf: dict[str, tuple[str, int]] = {}
    if os.path.exists(cf) and (cf_given or os.path.getsize(cf)):
        try:
            conf = read_shell_assignments(cf, br)
        except (MigrationError, OSError) as e:
            raise Failure(f"cannot read the qemu-vlan configuration: {e}") from None
    elif cf_given:
        raise Failure(f"{cf} does not exist (the configuration file of -c/--cf or "
                      "$QEMU_VLAN_CF).")
    for ckey, key, conv in (("num", "taps", _num), ("vde", "vde", _yesno),
                            ("dhcp", "dhcp", None), ("if", "iface", None),
                            ("user", "user", None), ("group", "group", None)):
        if ckey in conf and conf[ckey][0].strip():
            text, line = conf[ckey]
            where = f"{cf}:{line}"
            value = conv(text, f"{where}: {ckey}") if conv else text.strip()
            if source[key] not in ("default",) and values[key] != value:
                notes.append(f"{where}: {ckey}={text.strip()} wins over {source[key]} "
                             f"({values[key]}), as when qemu-vlan sourced the file.")
            put(key, value, where)
    if "gateway" in conf and conf["gateway"][0].strip():
        gw, line = conf["gateway"]
        mask = conf.get("netmask", ("255.255.255.0", 0))[0].strip() or "255.255.255.0"
        try:
            import ipaddress
            net = ipaddress.IPv4Network(f"{gw.strip()}/{mask}", strict=False)
        except ValueError:
            raise Failure(f"{cf}:{line}: gateway={gw.strip()} netmask={mask} is not an IPv4 "
                          "gateway and netmask.") from None
        if values["iface"] is None:
            if str(net.network_address + 1) != gw.strip():
                raise Failure(f"{cf}:{line}: gateway={gw.strip()}: vnetd's gateway is the "
                              f"subnet's first address ({net.network_address + 1}); give "
                              "--subnet instead.")
            put("subnet", str(net), f"{cf}:{line}")
    dhcp = values["dhcp"]
    if dhcp == "dnsmask":
        values["dhcp"] = dhcp = "dnsmasq"
    if dhcp in ("dhcpcd", "dhclient"):
        if values["iface"] is None:
            raise Usage(f"--dhcp={dhcp} is a DHCP client for a bridged network: give --if=NIC "
                        "too (or --dhcp=dnsmasq|dhcpd for a DHCP server).")
        notes.append(f"--dhcp={dhcp}: vnetd runs no DHCP client on the bridge; the guests of a "
                     "bridged network take addresses from the physical LAN.")
        values["dhcp"] = dhcp = None
    if dhcp not in (None, "dnsmasq", "dhcpd", "none"):
        raise Usage(f"--dhcp={dhcp!r}: use dnsmasq, dhcpd or none (dhcpcd or dhclient with "
                    "--if).")
    if values["group"] is None:
        if group_exists("qemu"):
            put("group", "qemu", "default")
        else:
            notes.append("there is no group 'qemu' (qemu-vlan's default for the taps): they "
                         "belong to group vnet.")
    return CompatRequest(br, values, source, cf if conf or cf_given else None, cf_given, notes)


def compat_define_opts(a: argparse.Namespace, req: CompatRequest) -> dict[str, Any]:
    """The Define options: define's own for the options both forms have, then what the
    qemu-vlan form resolved. --dhcp=dnsmasq is a nat network, --dhcp=dhcpd a host-only one
    (qemu-vlan: ISC dhcpd for private networks), --if a bridged one."""
    v = req.values
    a2 = argparse.Namespace(**vars(a))
    a2.taps, a2.vde, a2.iface, a2.user, a2.group = (v["taps"], v["vde"] or False, v["iface"],
                                                    v["user"], v["group"])
    a2.subnet = v["subnet"]
    a2.dhcp = None if v["iface"] else (v["dhcp"] or "none")
    opts = _define_opts(a2)
    if a.mode is None and not v["iface"]:
        opts["mode"] = "host-only" if v["dhcp"] == "dhcpd" else "nat"
    return opts


_COMPAT_KEYS = {"taps": "taps", "vde": "vde", "dhcp": "dhcp", "iface": "if",
                "group": "tap-group", "subnet": "subnet"}


def compat_differences(req: CompatRequest, definition: dict[str, Any],
                       uid_of: Callable[[str | None], int | None]) -> list[str]:
    """What the compatible form was asked for and the existing definition does not have,
    one sentence each, naming where the request came from."""
    out = []
    for key, value in req.given().items():
        where = req.source[key]
        if key == "user":
            have: Any = definition.get("tap-user")
            want: Any = uid_of(value)
        elif key == "dhcp":
            have, want = definition.get("dhcp"), value or "none"
            if definition.get("mode") == "bridged" and want == "none":
                continue
        elif key == "vde":
            have, want = bool(definition.get("vde")), bool(value)
        else:
            have, want = definition.get(_COMPAT_KEYS[key]), value
        if key == "taps":
            have = have or 0
        if have != want:
            out.append(f"{_COMPAT_KEYS.get(key, 'tap-user')} is {have if have is not None else 'unset'}, "
                       f"{where} asks for {want}")
    mode = definition.get("mode")
    if req.source["dhcp"] != "default" and not req.values["iface"] and mode != "bridged":
        want_mode = "host-only" if req.values["dhcp"] == "dhcpd" else "nat"
        if mode != want_mode:
            out.append(f"mode is {mode}, {req.source['dhcp']} means {want_mode}")
    return out


def compat_macaddr_count(req: CompatRequest) -> int:
    """qemu-vlan's --macaddr: 8 MACs per tap, 32 per tap with VDE switches."""
    return req.values["taps"] * (32 if req.values["vde"] else 8)


def _uid_of(user: str | None) -> int | None:
    if user is None:
        return None
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise Usage(f"There is no user named '{user}' on this host (give a user name or a "
                    "uid).") from None


def _define_opts(a: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "mode": a.mode, "subnet": a.subnet, "subnet6": a.subnet6, "mtu": a.mtu,
        "taps": a.taps, "tap-user": _uid_of(a.user), "tap-group": a.group, "dhcp": a.dhcp,
        "dhcp-start": a.dhcp_start, "dhcp-end": a.dhcp_end, "domain": a.domain,
        "routed-with": a.routed_with,
    }
    if a.allow_host:
        opts["allow-host"] = True
    if a.no_spoof_protection:
        opts["spoof-protection"] = False
    if a.iface:
        opts["if"] = a.iface
        if a.mode is None:
            opts["mode"] = "bridged"  # qemu-vlan: --if means a bridged network
    if a.force:
        opts["force"] = True
    if a.vde:
        opts["vde"] = True
    if a.vde_ports is not None:
        opts["vde-ports"] = a.vde_ports
    if a.autostart:
        opts["autostart"] = True
    overlay = {"vni": a.vni, "local": a.local, "peers": a.peer, "dev": a.underlay_dev,
               "port": a.vxlan_port, "role": a.role, "control": a.control, "asn": a.asn,
               "route-reflector": True if a.route_reflector else None}
    if any(v is not None for v in overlay.values()):
        if a.vni is None or a.local is None:
            raise Usage("an overlay needs at least --vni and --local.")
        opts["overlay"] = {k: v for k, v in overlay.items() if v is not None}
    if a.group is not None:
        try:
            grp.getgrnam(a.group)
        except KeyError:
            raise Usage(f"There is no group named '{a.group}'.") from None
    return opts


# --- output ------------------------------------------------------------------------------
def _table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [head, *rows])


def _user(uid: int) -> str:
    """A uid as people read it: 'alice (1000)', or the number alone."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except (KeyError, TypeError, OverflowError):
        return str(uid)


def print_networks(nets: list[dict[str, Any]]) -> None:
    if not nets:
        print("No networks defined. Try: vnet-client define vnet2 --mode=nat")
        return
    rows = [[n["name"], n["mode"], n["state"], n["subnet"], n["gateway"],
             "yes" if n.get("autostart") else "no"] for n in nets]
    print(_table(rows, ["NAME", "MODE", "STATE", "SUBNET", "GATEWAY", "AUTOSTART"]))


def print_network(n: dict[str, Any]) -> None:
    order = ["name", "state", "owner", "mode", "bridge", "subnet", "gateway", "subnet6",
             "gateway6", "mtu", "autostart", "dhcp", "taps", "tap-names", "mac", "addresses"]
    keys = [k for k in order if k in n] + sorted(k for k in n if k not in order)
    width = max(len(k) for k in keys)
    for k in keys:
        v = n[k]
        if k == "firewall-warnings":
            v = "\n  ".join([""] + v)
        elif k == "owner":
            v = _user(v)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            v = "; ".join(" ".join(str(x) for x in d.values()) for d in v)
        elif isinstance(v, list):
            v = ", ".join(str(x) for x in v) or "-"
        elif isinstance(v, bool):
            v = "yes" if v else "no"
        print(f"{k + ':':<{width + 1}} {v}")


# --- running -----------------------------------------------------------------------------
class Session:
    """One client connection plus the authorization dance: a call refused with
    InteractiveAuthorizationRequired is retried once with a text agent on a terminal."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.ask = not args.no_ask_password
        self.agent: TextAgent | None = None
        interactive = self.ask and not TextAgent.wanted()  # desktop agents may answer
        self.client = Client(bus_address=args.bus_address, interactive=interactive)

    async def __aenter__(self) -> Session:
        await self.client.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.client.close()
        if self.agent is not None:
            self.agent.stop()

    async def run(self, fn: Callable[[Client], Awaitable[Any]]) -> Any:
        try:
            return await fn(self.client)
        except VnetClientError as e:
            if not (e.needs_interaction and self.ask and TextAgent.wanted()):
                raise
        if self.agent is None:
            self.agent = TextAgent()
            if not self.agent.start():
                raise VnetClientError(
                    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
                    "Authentication is required, but no polkit text agent (pkttyagent) "
                    "could be started.")
        self.client.interactive = True
        return await fn(self.client)


async def run_command(args: argparse.Namespace) -> int:
    out_json = args.json
    async with Session(args) as s:
        cmd = args.cmd
        if cmd == "list":
            nets = await s.run(lambda c: c.list_networks())
            print(json.dumps(nets, indent=2)) if out_json else print_networks(nets)
        elif cmd == "show":
            n = await s.run(lambda c: c.get_network(args.name))
            if args.ports and not out_json:
                ports = n.get("ports", [])
                print(_table([[p["ifname"], p["vm"], str(p["nic"]), p["mac"], str(p["uid"]),
                               str(p["spoof-drops"])] for p in ports],
                             ["PORT", "VM", "NIC", "MAC", "UID", "SPOOF-DROPS"])
                      if ports else f"No ports of yours on {args.name}."
                      if n.get("other-ports") else f"No ports on {args.name}.")
                if n.get("other-ports"):
                    print(f"(and {n['other-ports']} port(s) of other users)")
            elif out_json:
                print(json.dumps(n, indent=2))
            else:
                print_network({k: v for k, v in n.items() if k not in ("ports", "other-ports")}
                              | {"ports": len(n.get("ports", [])) + n.get("other-ports", 0)})
        elif cmd == "define" and args.from_file:
            if any(v for k, v in _define_opts(args).items()):
                raise Usage("define --from FILE takes no other network options.")
            try:
                with open(args.from_file, "rb") as f:
                    opts = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise Failure(f"cannot read {args.from_file}: {e}") from None
            opts.pop("name", None)
            await s.run(lambda c: c.define_from(args.name, opts))
            if args.start:
                await start_defined(s, args.name)
            if out_json:
                print(json.dumps(await s.run(lambda c: c.get_network(args.name)), indent=2))
            else:
                print(f"Defined network {args.name} from {args.from_file}"
                      f"{' and started it' if args.start else ''}.")
        elif cmd == "export":
            text = await s.run(lambda c: c.export_definition(args.name))
            if out_json:  # the same definition as one JSON object
                print(json.dumps(tomllib.loads(text), indent=2, sort_keys=True))
            else:
                sys.stdout.write(text)
        elif cmd == "import-qemu-vlan":
            return await run_import_qemu_vlan(s, args)
        elif cmd == "define" and args.dry_run:
            if args.start:
                raise Usage("define --dry-run defines nothing, so it starts nothing: drop "
                            "--start.")
            opts = _define_opts(args)
            n = await s.run(lambda c: c.check_definition(args.name, **opts))
            if out_json:
                print(json.dumps(n, indent=2))
            else:
                print(f"Would define network {n['name']} ({n['mode']}, {n['subnet']}, gateway "
                      f"{n['gateway']}): every check passed; nothing was defined.")
        elif cmd == "define":
            opts = _define_opts(args)
            await s.run(lambda c: c.define(args.name, **opts))
            if args.start:
                await start_defined(s, args.name)
            n = await s.run(lambda c: c.get_network(args.name))
            if out_json:
                print(json.dumps(n, indent=2))
            else:
                print(f"Defined network {n['name']} ({n['mode']}, {n['subnet']}, gateway "
                      f"{n['gateway']}){' and started it' if args.start else ''}.")
        elif cmd in ("start", "stop", "undefine"):
            await s.run(lambda c: getattr(c, cmd)(args.name))
            if out_json:
                print(json.dumps({"name": args.name, "done": cmd}))
            else:
                past = {"start": "Started", "stop": "Stopped", "undefine": "Undefined"}[cmd]
                print(f"{past} network {args.name}.")
        elif cmd == "autostart":
            await s.run(lambda c: c.set_autostart(args.name, args.state == "on"))
            print(json.dumps({"name": args.name, "autostart": args.state == "on"}) if out_json
                  else f"Autostart of {args.name}: {args.state}.")
        elif cmd == "ports":
            ports = await s.run(lambda c: c.list_ports())
            if out_json:
                print(json.dumps(ports, indent=2))
            elif not ports:
                print("No ports.")
            else:
                print(_table([[p["ifname"], p["network"], p["vm"], str(p["nic"]), p["mac"],
                               str(p["uid"]), str(p.get("holder-pid", "-"))] for p in ports],
                             ["PORT", "NETWORK", "VM", "NIC", "MAC", "UID", "HOLDER"]))
        elif cmd == "host":
            return await run_host(s, args)
        elif cmd == "forward":
            return await run_forward(s, args)
        elif cmd == "overlay":
            return await run_overlay(s, args)
        elif cmd == "leases":
            leases = await s.run(lambda c: c.leases(args.network))
            if out_json:
                print(json.dumps(leases, indent=2))
            elif not leases:
                print(f"No leases on {args.network}.")
            else:
                print(_table([[le["ip"], le["mac"], le["hostname"] or "-", le.get("vm", "-"),
                               le.get("port", "-"), _when(le["expiry"])] for le in leases],
                             ["IP", "MAC", "HOSTNAME", "VM", "PORT", "EXPIRES"]))
        elif cmd == "detach":
            await s.run(lambda c: c.detach(args.ifname))
            print(json.dumps({"ifname": args.ifname, "done": "detach"}) if out_json
                  else f"Detached {args.ifname}.")
        elif cmd == "reload":
            problems = await s.run(lambda c: c.reload())
            if out_json:
                print(json.dumps({"problems": problems}, indent=2))
                if problems:
                    return EXIT_FAIL
            else:
                for p in problems:
                    print(f"problem: {p}", file=sys.stderr)
                print(f"Reloaded definitions ({len(problems)} problem(s)).")
                if problems:
                    return EXIT_FAIL
    return EXIT_OK


async def start_defined(s: Session, name: str) -> None:
    """define --start: a start that fails says that the definition stays, and what next."""
    try:
        await s.run(lambda c: c.start(name))
    except VnetClientError as e:
        e.message = (f"Defined network {name}, but starting it failed: {e.message} The "
                     f"definition stays: correct it and 'vnet-client start {name}', or "
                     f"'vnet-client undefine {name}'.")
        raise


async def run_monitor(args: argparse.Namespace) -> int:
    """One line per event; the signals need no authorization (they name nothing private)."""
    if args.count is not None and args.count < 1:
        raise Usage("--count takes a number of events of at least 1.")
    async with Session(args) as s:
        n = 0
        async for member, ev in s.client.events(args.network):
            if args.json:
                print(json.dumps({"event": member, **ev}), flush=True)
            else:
                print(f"{time.strftime('%H:%M:%S')} {member[:-len('Changed')].lower():7} "
                      + " ".join(f"{k}={v}" for k, v in ev.items()), flush=True)
            n += 1
            if args.count is not None and n >= args.count:
                break
    return EXIT_OK


def _when(expiry: int) -> str:
    import time

    if not expiry:
        return "never"
    left = expiry - int(time.time())
    return f"in {left // 60} min" if left > 0 else "expired"


async def run_host(s: Session, args: argparse.Namespace) -> int:
    if args.host_cmd == "add":
        h = await s.run(lambda c: c.add_host(args.network, args.vm, ip=args.ip, mac=args.mac))
        print(json.dumps(h) if args.json else
              f"{h['vm']} on {args.network}: {h['ip']} for {h['mac']}.")
    elif args.host_cmd == "remove":
        await s.run(lambda c: c.remove_host(args.network, args.vm))
        print(json.dumps({"network": args.network, "vm": args.vm, "removed": True})
              if args.json else f"Removed the static host of {args.vm} on {args.network}.")
    else:
        hosts = await s.run(lambda c: c.list_hosts(args.network))
        if args.json:
            print(json.dumps(hosts, indent=2))
        elif not hosts:
            print(f"No static hosts on {args.network}.")
        else:
            print(_table([[h["vm"], h["ip"], h["mac"]] for h in hosts], ["VM", "IP", "MAC"]))
    return EXIT_OK


async def run_import_qemu_vlan(s: Session, args: argparse.Namespace) -> int:
    from .migrate import MigrationError, read_qemu_vlan_dir, render_definition_toml

    try:
        if args.num is not None and args.num < 1:
            raise Usage("-n takes a tap count of at least 1.")
        imp = read_qemu_vlan_dir(args.dir, iface=args.iface, num=args.num)
        if imp.definition.get("taps") and args.user is not None:
            imp.definition["tap-user"] = _uid_of(args.user)
        if imp.definition.get("taps") and args.group is not None:
            if not _group_exists(args.group):
                raise Usage(f"There is no group named '{args.group}'.")
            imp.definition["tap-group"] = args.group
    except (MigrationError, OSError) as e:
        raise Failure(str(e)) from None
    if not args.json:
        for f in imp.findings:
            print(f"not carried over: {f}", file=sys.stderr)
    if args.dry_run:
        if args.json:
            print(json.dumps({"network": imp.network, "definition": imp.definition,
                              "macs": imp.macs, "not-carried-over": [str(f) for f in
                                                                     imp.findings]},
                             indent=2, default=str))
        else:
            sys.stdout.write(render_definition_toml(imp))
        return EXIT_OK
    await s.run(lambda c: c.define_from(imp.network, imp.definition))
    if imp.macs:
        await s.run(lambda c: c.import_macs(imp.network, imp.macs))
    if args.start:
        await s.run(lambda c: c.start(imp.network))
    if args.json:
        print(json.dumps({"network": imp.network,
                          "hosts": len(imp.definition.get("hosts", [])), "macs": len(imp.macs),
                          "forwards": len(imp.definition.get("forwards", [])),
                          "started": bool(args.start),
                          "not-carried-over": [str(f) for f in imp.findings]}, indent=2))
        return EXIT_OK
    print(f"Imported {imp.network}: {len(imp.definition.get('hosts', []))} static host(s), "
          f"{len(imp.macs)} MAC(s), {len(imp.definition.get('forwards', []))} forward(s); "
          f"{len(imp.findings)} line(s) not carried over (listed above)."
          + (" Started it." if args.start else ""))
    return EXIT_OK


async def run_forward(s: Session, args: argparse.Namespace) -> int:
    family = 6 if getattr(args, "ipv6", False) else 4
    if args.fwd_cmd == "add":
        if args.rule:
            if args.proto or args.external or args.to or args.iface or args.addr_of:
                raise Usage("give either --rule or PROTO PORT TARGET:PORT [--if|--addr-of], "
                            "not both.")
            spec: dict[str, Any] = {"rule": args.rule}
            if args.rule_means:
                spec["interface-means"] = args.rule_means
        else:
            if not (args.proto and args.external and args.to):
                raise Usage("forward add needs PROTO [EXT_ADDR:]PORT[-PORT] TARGET:PORT "
                            "(or --rule).")
            spec = {"proto": args.proto, "external": args.external, "to": args.to,
                    "family": family}
        if args.rule_means and not args.rule:
            raise Usage("--rule-means goes with --rule.")
        if args.iface and args.addr_of:
            raise Usage("give --if (traffic arriving on an interface) or --addr-of (traffic "
                        "to its addresses), not both.")
        if args.iface:
            spec["iface"] = args.iface
        if args.addr_of:
            spec["addr-of"] = args.addr_of
        f = await s.run(lambda c: c.add_forward(args.network, spec))
        print(json.dumps(f) if args.json else
              f"Forwarding {f['proto']} {_fwd_ext(f)}:{f['port']} to "
              f"{f['target']}:{f['target-port']} on {args.network}.")
    elif args.fwd_cmd == "remove":
        spec = {"proto": args.proto, "external": args.external, "family": family}
        await s.run(lambda c: c.remove_forward(args.network, spec))
        print(json.dumps({"network": args.network, "proto": args.proto,
                          "external": args.external, "removed": True}) if args.json
              else f"Removed the forward of {args.proto} {args.external} on {args.network}.")
    else:
        fwds = await s.run(lambda c: c.list_forwards(args.network))
        if args.json:
            print(json.dumps(fwds, indent=2))
        elif not fwds:
            print(f"No forwards on {args.network}.")
        else:
            print(_table([[f["proto"] + ("6" if f["family"] == 6 else ""),
                           _fwd_ext(f), f["port"], f["target"],
                           str(f["target-port"]), f.get("resolved") or "unresolved",
                           f.get("iface", "*"), _user(f.get("owner", 0))] for f in fwds],
                         ["PROTO", "EXT-ADDR", "PORT", "TARGET", "TO-PORT", "NOW", "IFACE",
                          "OWNER"]))
    return EXIT_OK


def _fwd_ext(f: dict[str, Any]) -> str:
    """A forward's external side: an address, an interface's addresses, or any (*)."""
    if f.get("addr-of"):
        return f"<{f['addr-of']}>"
    return f.get("ext-addr", "*")


async def run_overlay(s: Session, args: argparse.Namespace) -> int:
    if args.ov_cmd in ("add-peer", "remove-peer"):
        add = args.ov_cmd == "add-peer"
        await s.run(lambda c: c.set_peer(args.network, args.address, add))
        if args.json:
            print(json.dumps({"network": args.network, "peer": args.address,
                              "added" if add else "removed": True}))
        else:
            print(f"{'Added' if add else 'Removed'} peer {args.address} "
                  f"{'to' if add else 'from'} {args.network}'s overlay.")
        return EXIT_OK
    d = await s.run(lambda c: c.get_network(args.network))
    ov = d.get("overlay")
    if ov is None:
        raise Usage(f"the network '{args.network}' has no overlay.")
    state = d.get("overlay-state", {})
    if args.json:
        print(json.dumps({"overlay": ov, "state": state}, indent=2))
        return EXIT_OK
    print(f"{args.network}: VNI {ov['vni']}, {ov['role']}, {ov['control']} control, "
          f"local {ov['local']}, UDP port {ov.get('port', 4789)}")
    if "device" in state:
        print(f"  device {state['device']}, MTU {state['mtu']} ({state['mtu-source']})")
    print(f"  peers: {', '.join(ov['peers']) or '(none)'}")
    for e in state.get("fdb", []):
        print(f"  fdb {e['mac']} -> {e['dst']} ({e['how']})")
    evpn = state.get("evpn")
    if evpn:
        for ip, st in sorted(evpn.get("peers", {}).items()):
            print(f"  bgp {ip}: {st}")
        if "frr" in evpn:
            print(f"  frr: {evpn['frr']}")
    if d.get("state") != "running":
        print("  (not running)")
    return EXIT_OK


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


async def run_compat(args: argparse.Namespace) -> int:
    name = args.br
    req = compat_request(args, dict(os.environ), _group_exists)
    for n in req.notes:
        print(f"vnet-client: {n}", file=sys.stderr)
    async with Session(args) as s:
        if args.stop:
            await s.run(lambda c: c.stop(name))
            print(json.dumps({"name": name, "done": "stop"}) if args.json
                  else f"Stopped network {name}.")
            return EXIT_OK
        if args.macaddr:
            return await run_compat_macaddr(s, req, args)
        try:
            d = await s.run(lambda c: c.get_network(name))
        except VnetClientError as e:
            if e.short_name != "NotFound":
                raise
            opts = compat_define_opts(args, req)
            await s.run(lambda c: c.define(name, **opts))
            if not args.json:
                print(f"Defined network {name}.")
        else:
            diff = compat_differences(req, d, _uid_of)
            if diff:
                raise Failure(f"{name} is already defined otherwise: " + "; ".join(diff)
                              + f". Start it without those, or change the definition "
                              f"(vnet-client export {name} > FILE, edit it, "
                              f"vnet-client undefine {name}, vnet-client define {name} "
                              "--from FILE).")
        await s.run(lambda c: c.start(name))
        n = await s.run(lambda c: c.get_network(name))
        if args.json:
            print(json.dumps(n, indent=2))
        else:
            print(f"Started network {name}: {n['subnet']} gateway {n['gateway']}"
                  + (f", taps {', '.join(n['tap-names'])}" if n.get("tap-names") else "") + ".")
    return EXIT_OK


async def run_compat_macaddr(s: Session, req: CompatRequest, args: argparse.Namespace) -> int:
    """qemu-vlan's --macaddr: ether_<i>=MAC for i in 0..COUNT-1, COUNT = taps x 8 (x 32 with
    VDE). The MACs are the ones vnetd gives VM BRIDGE_<i> (asking registers them), so the
    lines stay true; to stdout, or appended to the ether.conf beside -c FILE, as the
    original appended to its own."""
    name = req.br
    count = compat_macaddr_count(req)
    macs = []
    for i in range(count):
        macs.append(await s.run(lambda c, i=i: c.get_mac(name, f"{name}_{i}", 0)))
    text = ("##### Hardware MAC Address #####\n# to be used with qemu -device "
            "virtio-net,mac=MAC (qemu-vnet gives VM " + f"{name}_<i> this MAC)\n"
            + "".join(f"ether_{i}={m}\n" for i, m in enumerate(macs)))
    if req.cf_given and req.cf is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(req.cf)), "ether.conf")
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise Failure(f"cannot append to {path}: {e.strerror or e}.") from None
        print(json.dumps({"appended": count, "file": path}) if args.json
              else f"Appended {count} MAC(s) to {path}.")
    elif args.json:
        print(json.dumps({f"ether_{i}": m for i, m in enumerate(macs)}, indent=2))
    else:
        sys.stdout.write(text)
    return EXIT_OK


# --- attach --------------------------------------------------------------------------------
PLACEHOLDER = re.compile(r"\{(fd|fds|vhostfds|mac|ifname|vde_sock)(\d*)\}")


@dataclass
class Group:
    network: str
    vm: str | None = None
    nic: int = 0
    queues: int = 1
    vhost: bool = False
    mac: str | None = None
    vde: bool = False


@dataclass
class VdePlug:
    """A NIC that QEMU plugs into a VDE switch itself (no fd)."""

    network: str
    vm: str
    nic: int
    sock: str
    mac: str

    def close(self) -> None:
        pass


def parse_attach(argv: list[str]) -> tuple[list[Group], list[str], argparse.Namespace]:
    """attach's own parser: --br starts a group; --vm/--nic/--queues/--vhost/--mac belong to
    the current group; everything after '--' is the command."""
    if "--" not in argv:
        raise Usage("attach needs a command after '--', e.g. "
                    "vnet-client attach --br=vnet2 --vm web1 -- qemu-system-x86_64 ...")
    i = argv.index("--")
    opts, command = argv[:i], argv[i + 1:]
    if not command:
        raise Usage("attach needs a command after '--'.")
    common = argparse.Namespace(json=False, no_ask_password=False, bus_address=None)
    groups: list[Group] = []
    vm_all: str | None = None
    it = iter(opts)

    def value(flag: str, inline: str | None) -> str:
        if inline is not None:
            return inline
        try:
            return next(it)
        except StopIteration:
            raise Usage(f"{flag} needs a value.") from None

    def number(flag: str, text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise Usage(f"{flag} takes a whole number, not '{text}'.") from None

    for tok in it:
        flag, _, inline = tok.partition("=")
        inline = inline if "=" in tok else None
        if flag == "--br":
            groups.append(Group(network=value(flag, inline)))
            continue
        if flag in ("--json", "--no-ask-password"):
            setattr(common, flag[2:].replace("-", "_"), True)
            continue
        if flag == "--bus-address":
            common.bus_address = value(flag, inline)
            continue
        if flag == "--vm" and not groups:
            vm_all = value(flag, inline)
            continue
        if not groups:
            raise Usage(f"{tok}: give --br=NETWORK first.")
        g = groups[-1]
        if flag == "--vm":
            g.vm = value(flag, inline)
            vm_all = vm_all or g.vm
        elif flag == "--nic":
            g.nic = number(flag, value(flag, inline))
        elif flag == "--queues":
            g.queues = number(flag, value(flag, inline))
        elif flag == "--vhost":
            g.vhost = True
        elif flag == "--vde":
            g.vde = True
        elif flag == "--mac":
            g.mac = value(flag, inline)
        else:
            raise Usage(f"attach does not know '{tok}' (see vnet-client attach --help).")
    if not groups:
        raise Usage("attach needs --br=NETWORK.")
    for g in groups:
        g.vm = g.vm or vm_all
        if not g.vm:
            raise Usage("attach needs --vm=NAME (the VM's name keys its stable MAC).")
    return groups, command, common


def substitute(command: list[str], atts: list[Attachment]) -> list[str]:
    def one(m: re.Match) -> str:
        what, idx = m.group(1), m.group(2)
        if idx == "":
            if len(atts) > 1 and what != "fds":
                raise Usage(f"{{{what}}} is ambiguous with {len(atts)} NICs: use "
                            f"{{{what}0}}..{{{what}{len(atts) - 1}}}.")
            a = atts[0]
        else:
            if int(idx) >= len(atts):
                raise Usage(f"{{{what}{idx}}} names NIC {idx}, but only {len(atts)} attached.")
            a = atts[int(idx)]
        if what != "mac" and (what == "vde_sock") != isinstance(a, VdePlug):
            raise Usage(f"{{{what}}} does not fit NIC {atts.index(a)}: {{vde_sock}} goes with "
                        "--vde, {fd}/{fds}/{vhostfds}/{ifname} with a tap.")
        if isinstance(a, VdePlug):
            return {"vde_sock": a.sock, "mac": a.mac}[what]
        return {
            "fd": str(a.fds[0]),
            "fds": ":".join(str(f) for f in a.fds),
            "vhostfds": ":".join(str(f) for f in a.vhostfds),
            "mac": a.mac,
            "ifname": a.ifname,
        }[what]

    return [PLACEHOLDER.sub(one, arg) for arg in command]


async def run_attach(groups: list[Group], command: list[str],
                     common: argparse.Namespace) -> int:
    exe = shutil.which(command[0])
    if exe is None:
        raise Failure(f"command not found: {command[0]} (nothing was attached).")
    atts: list[Attachment] = []
    try:
        async with Session(common) as s:
            for g in groups:
                if g.vde:
                    sock, mac = await s.run(lambda c, g=g: c.vde_socket(g.network, g.vm, g.nic))
                    atts.append(VdePlug(g.network, g.vm, g.nic, sock, g.mac or mac))
                    continue
                atts.append(await s.run(lambda c, g=g: c.attach(
                    g.network, g.vm, nic=g.nic, queues=g.queues, vhost=g.vhost, mac=g.mac)))
        argv = substitute(command, atts)
    except BaseException:
        for a in atts:
            a.close()
        raise
    for a in atts:
        if isinstance(a, VdePlug):
            print(f"vnet-client: {a.vm} nic {a.nic} on {a.network} through VDE switch {a.sock} "
                  f"(mac {a.mac})", file=sys.stderr)
            continue
        for fd in a.fds + a.vhostfds:
            os.set_inheritable(fd, True)
        note = f"attached {a.vm} nic {a.nic} to {a.network} as {a.ifname} (mac {a.mac})"
        print(json.dumps(a.info) if common.json else f"vnet-client: {note}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(exe, argv)


async def run_mac(args: argparse.Namespace) -> int:
    if args.mac_cmd:
        if args.br or args.vm or args.export_ether_conf:
            raise Usage(f"mac {args.mac_cmd} takes the network as its argument: give no "
                        "--br, --vm or --export-ether-conf with it.")
        return await run_mac_registry(args)
    if not args.br:
        raise Usage("mac needs --br=NET with --vm=NAME or --export-ether-conf, or an action: "
                    "export, import, forget, transfer (see vnet-client mac --help).")
    async with Session(args) as s:
        if args.export_ether_conf:
            text = await s.run(lambda c: c.export_ether_conf(args.br))
            if args.export_ether_conf == "-":
                sys.stdout.write(text)
            else:
                with open(args.export_ether_conf, "w") as f:
                    f.write(text)
                print(f"Wrote {args.export_ether_conf}.")
            return EXIT_OK
        if not args.vm:
            raise Usage("mac needs --vm=NAME (or --export-ether-conf).")
        mac = await s.run(lambda c: c.get_mac(args.br, args.vm, args.nic))
        print(json.dumps({"network": args.br, "vm": args.vm, "nic": args.nic, "mac": mac})
              if args.json else mac)
    return EXIT_OK


async def run_mac_registry(args: argparse.Namespace) -> int:
    """mac export / import / forget / transfer: a network's whole MAC registry."""
    net = args.network
    if args.mac_cmd == "import":
        macs = read_mac_table(args.file)
    if args.mac_cmd == "transfer":
        uid = _uid_of(args.user)
    async with Session(args) as s:
        if args.mac_cmd == "export":
            macs = await s.run(lambda c: c.export_macs(net))
            sys.stdout.write(json.dumps(macs, indent=2, sort_keys=True) + "\n" if args.json
                             else render_mac_table(net, macs))
        elif args.mac_cmd == "import":
            n = await s.run(lambda c: c.import_macs(net, macs))
            print(json.dumps({"network": net, "imported": n}) if args.json else
                  f"Imported {n} MAC(s) into the registry of {net}.")
        elif args.mac_cmd == "transfer":
            vm = args.transfer_vm
            await s.run(lambda c: c.transfer_vm(net, vm, uid))
            print(json.dumps({"network": net, "vm": vm, "uid": uid}) if args.json
                  else f"VM {vm} on {net} now belongs to {args.user} (uid {uid}).")
        else:
            vm = args.forget_vm
            n = await s.run(lambda c: c.forget_mac(net, vm))
            print(json.dumps({"network": net, "vm": vm, "forgotten": n}) if args.json
                  else f"Forgot {n} MAC(s) of {vm} on {net}.")
    return EXIT_OK


def render_mac_table(network: str, macs: dict[str, str]) -> str:
    """'mac export's text: a comment, then one 'VM/NIC MAC' line per NIC."""
    lines = [f"# MAC registry of {network} (qemu-vnet), one 'VM/NIC MAC' per line: "
             f"'vnet-client mac import {network} FILE' takes it in."]
    lines += [f"{k} {m}" for k, m in sorted(macs.items())]
    return "\n".join(lines) + "\n"


def read_mac_table(path: str) -> dict[str, str]:
    """What 'mac export' printed, as text lines or JSON, from a file or '-' (stdin).
    Keys and MACs are checked by vnetd; this only reads the shape."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise Failure(f"cannot read {path}: {getattr(e, 'strerror', None) or e}.") from None
    where = "standard input" if path == "-" else path
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise Failure(f"{where} is not valid JSON: {e}.") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise Failure(f"{where}: the JSON object must map 'VM/NIC' to MAC strings.")
        out = data
    else:
        out = {}
        for n, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) != 2:
                raise Failure(f"{where}:{n}: not a 'VM/NIC MAC' line: {line.strip()[:60]!r}")
            if words[0] in out:
                raise Failure(f"{where}:{n}: {words[0]} is given a second time.")
            out[words[0]] = words[1]
    if not out:
        raise Failure(f"{where} holds no MACs.")
    return out


ETHER_LINE = re.compile(r"\s*ether_(\d{1,4})\s*=\s*['\"]?([0-9A-Fa-f:]{17})['\"]?\s*(#.*)?")


def read_ether_conf(path: str, network: str) -> dict[str, str]:
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise Failure(f"cannot read {path}: {e.strerror}.") from None
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = ETHER_LINE.fullmatch(line)
        if not m:
            raise Failure(f"{path}:{n}: not an 'ether_<i>=52:54:00:xx:xx:xx' line: {s[:60]!r}")
        out[f"{network}_{int(m.group(1))}"] = m.group(2).lower()
    if not out:
        raise Failure(f"{path} holds no ether_<i>= lines.")
    return out


async def run_import_ether_conf(args: argparse.Namespace) -> int:
    network = args.br or os.path.basename(os.path.dirname(os.path.abspath(args.file)))
    macs = read_ether_conf(args.file, network)
    async with Session(args) as s:
        n = await s.run(lambda c: c.import_macs(network, macs))
    print(f"Imported {n} MAC(s) into {network}: VM '{network}_<i>' keeps ether_<i>'s MAC.")
    return EXIT_OK


def _file_group(path: Any) -> str | None:
    try:
        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (KeyError, OSError):
        return None


async def run_import_bridge_conf(args: argparse.Namespace) -> int:
    """No bus: it reads files and prints a polkit rules file for the administrator."""
    from .migrate import MigrationError, read_bridge_conf, render_bridge_acl_rules

    if args.group is not None and not _group_exists(args.group):
        raise Usage(f"There is no group named '{args.group}'.")
    try:
        acl = read_bridge_conf(args.file, _file_group, args.group)
    except (MigrationError, OSError) as e:
        raise Failure(str(e)) from None
    for f in acl.findings:
        print(f"bridge.conf: {f}", file=sys.stderr)
    if args.json:
        out = {}
        for g in sorted(set(acl.allow) | set(acl.deny)):
            nets, but = acl.networks(g)
            out[g] = {"networks": "all" if nets is None else nets, "except": but}
        print(json.dumps(out, indent=2))
    else:
        sys.stdout.write(render_bridge_acl_rules(acl, args.file))
    return EXIT_OK


def is_compat(argv: list[str]) -> bool:
    """The qemu-vlan form: --br given and no subcommand. Subcommands take --br too (attach,
    mac), so the first word that is neither an option nor an option's value decides."""
    if not any(a.startswith("--br") or (a.startswith("-b") and not a.startswith("--"))
               for a in argv):
        return False
    takes_value = {"-n", "--taps", "--num", "--mode", "--subnet", "--subnet6", "--mtu",
                   "--user", "-u", "--group", "-g", "--dhcp", "-d", "--dhcp-start",
                   "--dhcp-end", "--domain", "--bus-address", "--br", "-b", "--routed-with",
                   "--vde-ports", "--if", "-i", "--cf", "-c", "--vni", "--local", "--peer",
                   "--underlay-dev", "--vxlan-port", "--role", "--control", "--asn"}
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith("-"):
            skip = a in takes_value
            continue
        return a not in subcommands()
    return True


def subcommands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    return list(sub.choices)


GLOBAL_FLAGS = ("--json", "--no-ask-password")


def hoist_global_options(argv: list[str]) -> list[str]:
    """`vnet-client --no-ask-password attach ...` as `vnet-client attach --no-ask-password
    ...`: attach has a parser of its own, so the options every command takes move behind it."""
    i = 0
    while i < len(argv):
        if argv[i] in GLOBAL_FLAGS or argv[i].startswith("--bus-address="):
            i += 1
        elif argv[i] == "--bus-address":
            i += 2
        else:
            break
    if i and argv[i:i + 1] == ["attach"]:
        return ["attach", *argv[:i], *argv[i + 1:]]
    return argv


def say_error(argv: list[str], name: str, message: str, code: int) -> int:
    """An error on stderr: the sentence, or with --json one object {"error", "message"}."""
    own = argv[:argv.index("--")] if "--" in argv else argv
    if "--json" in own:
        print(json.dumps({"error": name, "message": message}), file=sys.stderr)
    else:
        print(f"vnet-client: {message}", file=sys.stderr)
        if os.environ.get("VNET_CLIENT_DEBUG") and "." in name:
            print(f"  ({name})", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = hoist_global_options(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["attach"] and not {"-h", "--help"} & set(argv[1:argv.index("--")]
                                                                if "--" in argv else argv[1:]):
            groups, command, common = parse_attach(argv[1:])
            return asyncio.run(run_attach(groups, command, common))
        if is_compat(argv):
            args = build_compat_parser().parse_args(argv)
            runner = run_compat
        else:
            parser = build_parser()
            args = parser.parse_args(argv)
            if not args.cmd:
                parser.print_help(sys.stderr)
                return EXIT_USAGE
            runner = {"mac": run_mac, "import-ether-conf": run_import_ether_conf,
                      "import-bridge-conf": run_import_bridge_conf,
                      "monitor": run_monitor}.get(args.cmd, run_command)
        return asyncio.run(runner(args))
    except Usage as e:
        return say_error(argv, "Usage", str(e), EXIT_USAGE)
    except Failure as e:
        return say_error(argv, "Failure", str(e), EXIT_FAIL)
    except VnetClientError as e:
        return say_error(argv, e.name, e.message, EXIT_AUTH if e.is_auth else EXIT_FAIL)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
