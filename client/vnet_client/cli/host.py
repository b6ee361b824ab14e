"""Static hosts (host add/remove/list) and DHCP leases."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from .output import table, when
from .parser import EXIT_OK, add_common, add_examples
from .session import Session

Command = Callable[[str, str], argparse.ArgumentParser]


HOST_EPILOG = """\
examples:
  vnet-client host add vnet2 --vm web1                  # first free address below the range
  vnet-client host add vnet2 --vm web1 --ip 172.16.12.5
  vnet-client host list vnet2
  vnet-client host remove vnet2 --vm web1
"""
LEASES_EPILOG = """\
examples:
  vnet-client leases vnet2          # IP, MAC, hostname, VM, port, expiry
  vnet-client leases vnet2 --json
"""


def add_host(cmd: Command) -> None:
    hp = cmd("host", "static hosts: fixed addresses and DNS names for VMs")
    add_examples(hp, HOST_EPILOG)
    hsub = hp.add_subparsers(dest="host_cmd", metavar="ACTION", required=True)
    ha = hsub.add_parser("add", help="give a VM a fixed address (applied live)",
                         description="Give a VM a fixed address on the network (and the DNS "
                         "name VM.NETWORK), applied live to the DHCP server. Needs the 'manage' "
                         "right. Example: vnet-client host add vnet2 --vm web1 --ip "
                         "172.16.12.5")
    add_common(ha)
    ha.add_argument("network", help="the network")
    ha.add_argument("--vm", required=True, help="the VM (also its DNS name: VM.NETWORK)")
    ha.add_argument("--ip", help="the address (default: first free below the DHCP range)")
    ha.add_argument("--mac", help="the VM's MAC (default: its stable MAC on the network)")
    hr = hsub.add_parser("remove", help="remove a VM's fixed address",
                         description="Remove a VM's fixed address; it gets a dynamic lease "
                         "when it next asks. Needs the 'manage' right. Example: vnet-client "
                         "host remove vnet2 --vm web1")
    add_common(hr)
    hr.add_argument("network", help="the network")
    hr.add_argument("--vm", required=True, help="the VM whose fixed address goes")
    hl = hsub.add_parser("list", help="list static hosts",
                         description="List the network's static hosts: VM, address, MAC. "
                         "Example: vnet-client host list vnet2 --json")
    add_common(hl)
    hl.add_argument("network", help="the network")
    ha.set_defaults(func=run_host_add)
    hr.set_defaults(func=run_host_remove)
    hl.set_defaults(func=run_host_list)


def add_leases(cmd: Command) -> None:
    sp = cmd("leases", "show the network's DHCP leases")
    add_examples(sp, LEASES_EPILOG)
    sp.add_argument("network", help="the network")
    sp.set_defaults(func=run_leases)


def run_host_add(args: argparse.Namespace) -> int:
    with Session(args) as s:
        h = s.run(lambda c: c.add_host(args.network, args.vm, ip=args.ip, mac=args.mac))
    keeps = (f" It keeps its current lease, {h['keeps']}, until it renews the lease and gets "
             f"{h['ip']}." if h.get("keeps") else "")
    inside = (f" Note: {h['ip']} is inside the DHCP range {h['in-dhcp-range']}: the server "
              "keeps it for this VM from now on; addresses below the range are never handed "
              "out dynamically." if h.get("in-dhcp-range") else "")
    print(json.dumps(h) if args.json else
          f"{h['vm']} on {args.network}: {h['ip']} for {h['mac']}.{keeps}{inside}")
    return EXIT_OK


def run_host_remove(args: argparse.Namespace) -> int:
    with Session(args) as s:
        s.run(lambda c: c.remove_host(args.network, args.vm))
    print(json.dumps({"network": args.network, "vm": args.vm, "removed": True})
          if args.json else f"Removed the static host of {args.vm} on {args.network}.")
    return EXIT_OK


def run_host_list(args: argparse.Namespace) -> int:
    with Session(args) as s:
        hosts = s.run(lambda c: c.list_hosts(args.network))
    if args.json:
        print(json.dumps(hosts, indent=2))
    elif not hosts:
        print(f"No static hosts on {args.network}.")
    else:
        print(table([[h["vm"], h["ip"], h["mac"]] for h in hosts], ["VM", "IP", "MAC"]))
    return EXIT_OK


def run_leases(args: argparse.Namespace) -> int:
    with Session(args) as s:
        leases = s.run(lambda c: c.leases(args.network))
    if args.json:
        print(json.dumps(leases, indent=2))
    elif not leases:
        print(f"No leases on {args.network}.")
    else:
        print(table([[le["ip"], le["mac"], le["hostname"] or "-", le.get("vm", "-"),
                      le.get("port", "-"), when(le["expiry"])] for le in leases],
                    ["IP", "MAC", "HOSTNAME", "VM", "PORT", "EXPIRES"]))
    return EXIT_OK
