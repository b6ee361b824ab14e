"""Port forwarding: forward add/remove/list."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from .output import table, user_name
from .parser import EXIT_OK, Usage, add_common, add_examples
from .session import Session

Command = Callable[[str, str], argparse.ArgumentParser]


FORWARD_EPILOG = """\
examples:
  vnet-client forward add vnet2 tcp 8080 172.16.12.5:80    # host port 8080 to a guest's 80
  vnet-client forward add vnet2 tcp 2222 web1:22 --if eth0 # by VM name, from eth0 only
  vnet-client forward add vnet2 -6 tcp 8080 [fd00:12::5]:80
  vnet-client forward list vnet2
  vnet-client forward remove vnet2 tcp 8080
"""


def add_commands(cmd: Command) -> None:
    fp = cmd("forward", "port forwarding from the host into a network")
    add_examples(fp, FORWARD_EPILOG)
    fsub = fp.add_subparsers(dest="fwd_cmd", metavar="ACTION", required=True)
    fa = fsub.add_parser("add", help="forward PROTO [EXT_ADDR:]PORT[-PORT] to TARGET:PORT",
                         description="Forward host traffic into a network (applied live, "
                         "kept in the definition). TARGET is an address in the network or a "
                         "VM name (its static host or current lease). IPv6 addresses go in "
                         "brackets: [fd00:12::5]:80.")
    add_common(fa)
    fa.add_argument("network", help="the network the target is on")
    fa.add_argument("proto", nargs="?", choices=["tcp", "udp"], help="the protocol")
    fa.add_argument("external", nargs="?", metavar="[EXT_ADDR:]PORT[-PORT]",
                    help="the host's port or port range, only at EXT_ADDR if given")
    fa.add_argument("to", nargs="?", metavar="TARGET:PORT",
                    help="an address in the network or a VM's name, and its port")
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
    add_common(fr)
    fr.add_argument("network", help="the network")
    fr.add_argument("proto", choices=["tcp", "udp"], help="the protocol")
    fr.add_argument("external", metavar="[EXT_ADDR:]PORT[-PORT]",
                    help="the forward's host side, as 'forward list' shows it")
    fr.add_argument("-6", dest="ipv6", action="store_true", help="an IPv6 forward")
    fl = fsub.add_parser("list", help="list the network's forwards",
                         description="List the network's port forwards: protocol, external "
                         "address and ports, target, owner. Example: vnet-client forward list "
                         "vnet2")
    add_common(fl)
    fl.add_argument("network", help="the network")
    fa.set_defaults(func=run_forward_add)
    fr.set_defaults(func=run_forward_remove)
    fl.set_defaults(func=run_forward_list)


def run_forward_add(args: argparse.Namespace) -> int:
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
                "family": 6 if args.ipv6 else 4}
    if args.rule_means and not args.rule:
        raise Usage("--rule-means goes with --rule.")
    if args.iface and args.addr_of:
        raise Usage("give --if (traffic arriving on an interface) or --addr-of (traffic "
                    "to its addresses), not both.")
    if args.iface:
        spec["iface"] = args.iface
    if args.addr_of:
        spec["addr-of"] = args.addr_of
    with Session(args) as s:
        f = s.run(lambda c: c.add_forward(args.network, spec))
    print(json.dumps(f) if args.json else
          f"Forwarding {f['proto']} {fwd_ext(f)}:{f['port']} to "
          f"{f['target']}:{f['target-port']} on {args.network}.")
    return EXIT_OK


def run_forward_remove(args: argparse.Namespace) -> int:
    spec = {"proto": args.proto, "external": args.external, "family": 6 if args.ipv6 else 4}
    with Session(args) as s:
        s.run(lambda c: c.remove_forward(args.network, spec))
    print(json.dumps({"network": args.network, "proto": args.proto,
                      "external": args.external, "removed": True}) if args.json
          else f"Removed the forward of {args.proto} {args.external} on {args.network}.")
    return EXIT_OK


def run_forward_list(args: argparse.Namespace) -> int:
    with Session(args) as s:
        fwds = s.run(lambda c: c.list_forwards(args.network))
    if args.json:
        print(json.dumps(fwds, indent=2))
    elif not fwds:
        print(f"No forwards on {args.network}.")
    else:
        print(table([[f["proto"] + ("6" if f["family"] == 6 else ""),
                      fwd_ext(f), f["port"], f["target"],
                      str(f["target-port"]), f.get("resolved") or "unresolved",
                      f.get("iface", "*"), user_name(f.get("owner", 0))] for f in fwds],
                    ["PROTO", "EXT-ADDR", "PORT", "TARGET", "TO-PORT", "NOW", "IFACE",
                     "OWNER"]))
    return EXIT_OK


def fwd_ext(f: dict[str, Any]) -> str:
    """A forward's external side: an address, an interface's addresses, or any (*)."""
    if f.get("addr-of"):
        return f"<{f['addr-of']}>"
    return f.get("ext-addr", "*")
