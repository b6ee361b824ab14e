"""Stable MACs: mac (a VM's, ether.conf), mac export/import/forget/transfer,
import-ether-conf."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable

from vnet_common.limits import MAX_NIC

from .accounts import uid_of
from .output import read_text
from .parser import EXIT_OK, Failure, Usage, add_common, add_examples
from .session import Session

Command = Callable[[str, str], argparse.ArgumentParser]

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
IMPORT_ETHER_CONF_EPILOG = """\
examples:
  vnet-client import-ether-conf /etc/qemu/vnet3/ether.conf   # ether_<i> -> VM vnet3_<i>
  vnet-client import-ether-conf old/ether.conf --br vnet3 --json
"""


def add_mac(cmd: Command) -> None:
    sp = cmd("mac", "stable MACs: print a VM's; export, import or forget a network's MAC "
             "registry; give a VM to another user")
    sp.usage = ("vnet-client mac --br=NET --vm=NAME [--nic=N]\n"
                "       vnet-client mac --br=NET --export-ether-conf [FILE]\n"
                "       vnet-client mac export NET [--json]\n"
                "       vnet-client mac import NET FILE|-\n"
                "       vnet-client mac forget NET VM\n"
                "       vnet-client mac transfer NET VM USER")
    add_examples(sp, MAC_EPILOG)
    sp.add_argument("--br", metavar="NET", help="the network")
    sp.add_argument("--vm", metavar="NAME", help="the VM")
    sp.add_argument("--nic", type=int, default=0, help="NIC index (default 0)")
    sp.add_argument("--export-ether-conf", nargs="?", const="-", metavar="FILE",
                    help="write qemu-vlan's ether.conf lines (ether_<i>=MAC) to FILE or "
                    "stdout (--json: {\"ether_<i>\": MAC, ...} on stdout)")
    # prog: its actions' usage and errors name 'vnet-client mac ACTION', not mac's usage
    msub = sp.add_subparsers(dest="mac_cmd", metavar="ACTION", prog="vnet-client mac")
    me = msub.add_parser("export", usage="vnet-client mac export NET [--json]",
                         help="print the network's MAC registry, one 'VM/NIC MAC' "
                         "line per NIC (--json: one object)",
                         description="Print the network's MAC registry: one 'VM/NIC MAC' line "
                         "per NIC, or with --json one JSON object. 'mac import' on another "
                         "host takes it in, so VMs that move keep their MACs.")
    add_common(me)
    me.add_argument("network", help="the network")
    mi = msub.add_parser("import", usage="vnet-client mac import NET FILE|- [--json]",
                         help="take in what 'mac export' printed (lines or JSON); "
                         "all or nothing",
                         description="Take in a MAC registry that 'mac export' printed (its "
                         "lines or its JSON; a key without /NIC means NIC 0): all entries or "
                         "none. Refused if a MAC belongs to another VM on the network.")
    add_common(mi)
    mi.add_argument("network", help="the network")
    mi.add_argument("file", help="the file, or - for standard input")
    mf = msub.add_parser("forget", usage="vnet-client mac forget NET VM [--json]",
                         help="drop a VM's MACs (all its NICs) from the network's "
                         "registry",
                         description="Drop every NIC's MAC of a VM from the network's "
                         "registry, making room in it (it holds vnetd's --max-macs-per-network "
                         "entries at most). Refused while the VM is attached to the network. "
                         "Asked again later, the VM most likely gets the same MAC back (it is "
                         "derived from the names).")
    add_common(mf)
    mf.add_argument("network", help="the network")
    mf.add_argument("forget_vm", metavar="VM",  # not "vm": that is mac's --vm
                    help="the VM whose MACs go")
    mt = msub.add_parser("transfer", usage="vnet-client mac transfer NET VM USER [--json]",
                         help="give a VM (its name and MACs on the network) to "
                         "another user",
                         description="Give a VM name on a network, with its MACs, to another "
                         "user: from then on only that user attaches it, with the same MACs. A "
                         "VM name belongs to the user who first registered it. Needs the "
                         "'manage' right; refused while the VM is attached to the network.")
    add_common(mt)
    mt.add_argument("network", help="the network")
    mt.add_argument("transfer_vm", metavar="VM", help="the VM to give away")
    mt.add_argument("user", help="the new owner: a user name or a uid")
    sp.set_defaults(func=run_mac)


def add_import_ether_conf(cmd: Command) -> None:
    sp = cmd("import-ether-conf", "take in an old qemu-vlan ether.conf so VMs keep their MACs")
    add_examples(sp, IMPORT_ETHER_CONF_EPILOG)
    sp.add_argument("file", help="e.g. /etc/qemu/vnet3/ether.conf")
    sp.add_argument("--br", metavar="NET",
                    help="the network (default: the file's directory name, e.g. vnet3)")
    sp.set_defaults(func=run_import_ether_conf)


def run_mac(args: argparse.Namespace) -> int:
    if args.mac_cmd:
        if args.br or args.vm or args.export_ether_conf:
            raise Usage(f"mac {args.mac_cmd} takes the network as its argument: give no "
                        "--br, --vm or --export-ether-conf with it.")
        return run_mac_registry(args)
    if not args.br:
        raise Usage("mac needs --br=NET with --vm=NAME or --export-ether-conf, or an action: "
                    "export, import, forget, transfer (see vnet-client mac --help).")
    if not (args.vm or args.export_ether_conf):
        raise Usage("mac needs --vm=NAME (or --export-ether-conf).")
    if not 0 <= args.nic <= MAX_NIC:
        raise Usage(f"--nic must be between 0 and {MAX_NIC}, not {args.nic}.")
    with Session(args) as s:
        if args.export_ether_conf:
            text = s.run(lambda c: c.export_ether_conf(args.br))
            note_only_yours(args.br)
            if args.export_ether_conf == "-":
                # --json: what the qemu-vlan form's --macaddr --json prints, a flat object
                # as 'mac export --json' is
                sys.stdout.write(json.dumps(ether_map(text), indent=2) + "\n" if args.json
                                 else text)
            else:
                try:
                    with open(args.export_ether_conf, "w", encoding="utf-8") as f:
                        f.write(text)
                except OSError as e:
                    raise Failure(f"cannot write {args.export_ether_conf}: "
                                  f"{e.strerror or e}.") from None
                print(json.dumps({"network": args.br, "file": args.export_ether_conf,
                                  "written": len(ether_map(text))}) if args.json
                      else f"Wrote {args.export_ether_conf}.")
            return EXIT_OK
        mac = s.run(lambda c: c.get_mac(args.br, args.vm, args.nic))
        print(json.dumps({"network": args.br, "vm": args.vm, "nic": args.nic, "mac": mac})
              if args.json else mac)
    return EXIT_OK


def note_only_yours(network: str) -> None:
    """vnetd gives other users' VMs' entries to an administrator of the network only, and
    says nothing when it leaves them out (a copy to another host would lose them quietly)."""
    if os.geteuid() != 0:
        print(f"vnet-client: the entries of other users' VMs are included only for an "
              f"administrator of {network} (root, or whom polkit grants 'manage' without a "
              "password).", file=sys.stderr)


def run_mac_registry(args: argparse.Namespace) -> int:
    """mac export / import / forget / transfer: a network's whole MAC registry."""
    net = args.network
    if args.mac_cmd == "import":
        macs = read_mac_table(args.file)
    if args.mac_cmd == "transfer":
        uid = uid_of(args.user)
    with Session(args) as s:
        if args.mac_cmd == "export":
            macs = s.run(lambda c: c.export_macs(net))
            note_only_yours(net)
            sys.stdout.write(json.dumps(macs, indent=2, sort_keys=True) + "\n" if args.json
                             else render_mac_table(net, macs))
        elif args.mac_cmd == "import":
            n = s.run(lambda c: c.import_macs(net, macs))
            print(json.dumps({"network": net, "imported": n}) if args.json else
                  f"Imported {n} MAC(s) into the registry of {net}.")
        elif args.mac_cmd == "transfer":
            vm = args.transfer_vm
            s.run(lambda c: c.transfer_vm(net, vm, uid))
            print(json.dumps({"network": net, "vm": vm, "uid": uid}) if args.json
                  else f"VM {vm} on {net} now belongs to {args.user} (uid {uid}).")
        else:
            vm = args.forget_vm
            n = s.run(lambda c: c.forget_mac(net, vm))
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
    if path != "-":
        text = read_text(path)
    else:
        try:
            text = sys.stdin.read()
        except (OSError, UnicodeDecodeError) as e:
            raise Failure(f"cannot read standard input: {getattr(e, 'strerror', None) or e}."
                          ) from None
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


def ether_map(text: str) -> dict[str, str]:
    """ether.conf's lines as one object, {"ether_<i>": MAC}, in the file's order (vnetd's
    ExportEtherConf: comments and ether_<i>=MAC lines, a note after some)."""
    out = {}
    for line in text.splitlines():
        m = ETHER_LINE.fullmatch(line)
        if m:
            out[f"ether_{int(m.group(1))}"] = m.group(2).lower()
    return out


def read_ether_conf(path: str, network: str) -> dict[str, str]:
    text = read_text(path)
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


def run_import_ether_conf(args: argparse.Namespace) -> int:
    network = args.br or os.path.basename(os.path.dirname(os.path.abspath(args.file)))
    macs = read_ether_conf(args.file, network)
    with Session(args) as s:
        n = s.run(lambda c: c.import_macs(network, macs))
    print(json.dumps({"network": network, "imported": n}) if args.json  # as 'mac import'
          else f"Imported {n} MAC(s) into {network}: VM '{network}_<i>' keeps ether_<i>'s MAC.")
    return EXIT_OK

