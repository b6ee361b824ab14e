"""Bringing old setups in: import-qemu-vlan (a qemu-vlan directory) and import-bridge-conf
(qemu-bridge-helper's ACL as a polkit rules file)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from .accounts import file_group, group_exists, uid_of
from .parser import EXIT_OK, Failure, Usage, add_examples
from .session import Session

Command = Callable[[str, str], argparse.ArgumentParser]


IMPORT_QEMU_VLAN_EPILOG = """\
examples:
  vnet-client import-qemu-vlan /etc/qemu/vnet3 -n 4 --dry-run   # what it would define
  vnet-client import-qemu-vlan /etc/qemu/vnet3 -n 4 -u alice --start
  vnet-client import-qemu-vlan /etc/qemu/lan0 --if=eth0   # a bridged one: its NIC
"""
IMPORT_BRIDGE_CONF_EPILOG = """\
examples:
  vnet-client import-bridge-conf > 40-qemu-vnet-bridge-conf.rules
  sudo install -m 644 40-qemu-vnet-bridge-conf.rules /etc/polkit-1/rules.d/
  vnet-client import-bridge-conf /etc/qemu/bridge.conf --group kvm --json
"""


def add_commands(cmd: Command) -> None:
    """import-qemu-vlan, import-bridge-conf."""
    sp = cmd("import-qemu-vlan", "define a network from an old qemu-vlan configuration "
             "directory, keeping its MACs and static addresses")
    add_examples(sp, IMPORT_QEMU_VLAN_EPILOG)
    sp.add_argument("dir", help="e.g. /etc/qemu/vnet3")
    sp.add_argument("--dry-run", action="store_true",
                    help="only print the definition and what could not be carried over")
    sp.add_argument("--start", action="store_true", help="start the network afterwards")
    sp.add_argument("--if", dest="iface", metavar="NIC",
                    help="a bridged network's physical interface (qemu-vlan did not save it)")
    sp.add_argument("-n", "--num", "--taps", type=int, metavar="COUNT",
                    help="the tap count qemu-vlan ran with (it did not save it): taps "
                    "NAME_0..NAME_{COUNT-1}")
    sp.add_argument("-u", "--user", metavar="USER",
                    help="owner of the taps (qemu-vlan's -u; default: you). QEMU opens a tap "
                    "by name only as its owner (and a member of its group)")
    sp.add_argument("-g", "--group", metavar="GROUP",
                    help="group of the taps (default: the directory's group=, else vnet)")
    sp.set_defaults(func=run_import_qemu_vlan)
    sp = cmd("import-bridge-conf", "turn qemu-bridge-helper's /etc/qemu/bridge.conf (allow "
             "lines, include files per group) into a polkit rules file giving the same groups "
             "the same networks")
    add_examples(sp, IMPORT_BRIDGE_CONF_EPILOG)
    sp.add_argument("file", nargs="?", default="/etc/qemu/bridge.conf",
                    help="qemu-bridge-helper's configuration (default /etc/qemu/bridge.conf)")
    sp.add_argument("--group", metavar="GROUP",
                    help="the group its allow lines are for (default: the group owning each "
                    "file, as qemu-bridge-helper's convention has it)")
    sp.set_defaults(func=run_import_bridge_conf)


def run_import_qemu_vlan(args: argparse.Namespace) -> int:
    from ..migrate import MigrationError, read_qemu_vlan_dir, render_definition_toml

    try:
        if args.num is not None and args.num < 1:
            raise Usage("-n takes a tap count of at least 1.")
        imp = read_qemu_vlan_dir(args.dir, iface=args.iface, num=args.num)
        if imp.definition.get("taps") and args.user is not None:
            imp.definition["tap-user"] = uid_of(args.user)
        if imp.definition.get("taps") and args.group is not None:
            if not group_exists(args.group):
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
    with Session(args) as s:
        s.run(lambda c: c.define_from(imp.network, imp.definition))
        if imp.macs:
            s.run(lambda c: c.import_macs(imp.network, imp.macs))
        if args.start:
            s.run(lambda c: c.start(imp.network))
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


def run_import_bridge_conf(args: argparse.Namespace) -> int:
    """No bus: it reads files and prints a polkit rules file for the administrator."""
    from ..migrate import MigrationError, read_bridge_conf, render_bridge_acl_rules

    if args.group is not None and not group_exists(args.group):
        raise Usage(f"There is no group named '{args.group}'.")
    try:
        acl = read_bridge_conf(args.file, file_group, args.group)
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

