"""A network's VXLAN overlay: overlay add-peer/remove-peer/show."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from .parser import EXIT_OK, RawDescriptionHelpFormatter, Usage, add_common, add_examples
from .session import Session

Command = Callable[[str, str], argparse.ArgumentParser]

OVERLAY_EPILOG = """\
examples (three hosts, underlay 10.77.0.0/24; host A is the gateway):
  A$ vnet-client define vnet7 --vni 5007 --local 10.77.0.1 --peer 10.77.0.2 --peer 10.77.0.3
  B$ vnet-client define vnet7 --vni 5007 --local 10.77.0.2 --peer 10.77.0.1 --peer 10.77.0.3 \\
         --role member
  A$ vnet-client overlay add-peer vnet7 10.77.0.4      # a fourth host joins
  A$ vnet-client overlay remove-peer vnet7 10.77.0.3   # host C is cut off from A
  A$ vnet-client overlay show vnet7
"""


def add_commands(cmd: Command) -> None:
    op = cmd("overlay", "a network's VXLAN overlay: its peers (other hosts)")
    add_examples(op, OVERLAY_EPILOG)
    osub = op.add_subparsers(dest="ov_cmd", metavar="ACTION", required=True)
    for name, text in (("add-peer", "flood to (static) or peer with (evpn) another host, "
                        "live and stored"),
                       ("remove-peer", "stop flooding to / peering with a host, live and "
                        "stored")):
        oa = osub.add_parser(name, help=text, description=text.capitalize() + ".",
                             epilog=OVERLAY_EPILOG,
                             formatter_class=RawDescriptionHelpFormatter)
        add_common(oa)
        oa.add_argument("network", help="the network (one with an overlay)")
        oa.add_argument("address", help="the other host's underlay address")
        oa.set_defaults(func=run_peer)
    os_ = osub.add_parser("show", help="the overlay's device, MTU, peers, forwarding entries "
                          "and (evpn) BGP sessions",
                          description="Show the overlay of a network: its VXLAN device, "
                          "MTU, peers, forwarding entries and, with evpn, the BGP sessions. "
                          "Example: vnet-client overlay show vnet7")
    add_common(os_)
    os_.add_argument("network", help="the network (one with an overlay)")
    os_.set_defaults(func=run_show)


def run_peer(args: argparse.Namespace) -> int:
    """add-peer, remove-peer."""
    add = args.ov_cmd == "add-peer"
    with Session(args) as s:
        s.run(lambda c: c.set_peer(args.network, args.address, add))
    if args.json:
        print(json.dumps({"network": args.network, "peer": args.address,
                          "added" if add else "removed": True}))
    else:
        print(f"{'Added' if add else 'Removed'} peer {args.address} "
              f"{'to' if add else 'from'} {args.network}'s overlay.")
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    with Session(args) as s:
        d = s.run(lambda c: c.get_network(args.network))
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

