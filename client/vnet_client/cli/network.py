"""Networks: list, show, define (also --from, --dry-run), export, start, stop, undefine,
autostart, reload."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from ..base import VnetClientError
from ..blocking import INT64, asv
from .accounts import group_exists, uid_of
from .flags import FLAGS
from .output import read_text, table, user_name
from .parser import EXIT_FAIL, EXIT_OK, Failure, Usage, add_examples
from .session import Session

Command = Callable[[str, str], argparse.ArgumentParser]


# define's network options are the table's (vnet_common.options, through its generated copy
# flags.py): flags, types, choices, metavars, help. The command line's own: define takes the
# qemu-vlan spellings of the tap options too (-n/--num, -u, -g: what import-qemu-vlan and the
# qemu-vlan form take for them); the qemu-vlan form takes all of the table's other spellings
# (`compat`) and has its own defaults, so its help says them.
DEFINE_ALSO = {"taps": ("-n", "--num"), "tap-user": ("-u",), "tap-group": ("-g",)}
COMPAT_HELP = {
    "taps": "pre-create COUNT persistent taps NAME_0..NAME_{COUNT-1} (qemu-vlan's -n, default "
            "$QEMU_VLAN_NUM or 4)",
    "tap-group": "group of the pre-created taps (default $GROUP, else qemu if that group "
                 "exists, else vnet)",
    "dhcp": "dnsmasq (a nat network), dhcpd (host-only) or none; default $QEMU_VLAN_DHCP, "
            "else none, as qemu-vlan ran no server without it",
    "vde": "run a VDE switch on each tap (qemu-vlan's --vde; needs -n COUNT); default "
           "$QEMU_VLAN_VDE",
}
OVERLAY_GROUP = "VXLAN overlay: one LAN across hosts (docs/overlay.md)"

LIST_EPILOG = """\
examples:
  vnet-client list                 # NAME MODE STATE SUBNET GATEWAY AUTOSTART
  vnet-client list --names         # one name a line
  vnet-client list --json
"""
SHOW_EPILOG = """\
examples:
  vnet-client show vnet2           # definition, state, addresses, servers, number of ports
  vnet-client show vnet2 --ports   # its ports: VM, NIC, MAC, owner, anti-spoofing drops
  vnet-client show vnet2 --json    # everything, ports included
"""
DEFINE_EPILOG = """\
examples:
  vnet-client define vnet2 --mode=nat --start        # 172.16.12.0/24, gateway 172.16.12.1
  vnet-client define lab --subnet=10.7.0.0/24 --subnet6=fd00:7::/64 --mode=host-only
  vnet-client define vnet3 -n 4 -u alice -g kvm      # taps vnet3_0..vnet3_3, alice's
  vnet-client define lan0 --mode=bridged --if=eth0   # guests on the physical network
  vnet-client define vnet7 --vni 5007 --local 10.77.0.1 --peer 10.77.0.2   # an overlay
  vnet-client define vnet5 --from vnet5.toml --dry-run   # check a file, define nothing

Without --mtu the MTU is 1500; an overlay's is its underlay's MTU less 50 (70 over IPv6).
"""
EXPORT_EPILOG = """\
examples:
  vnet-client export vnet2 > vnet2.toml             # then on another host:
  vnet-client define vnet2 --from vnet2.toml
"""
LIFECYCLE_EPILOGS = {
    "start": """\
example:
  vnet-client start vnet2
""",
    "stop": """\
examples:
  vnet-client stop vnet2           # refused while VMs are attached, naming them
  vnet-client stop vnet2 --force   # their ports wait, and come back when it starts again
""",
    "undefine": """\
example:
  vnet-client stop vnet2 && vnet-client undefine vnet2
""",
}
AUTOSTART_EPILOG = """\
examples:
  vnet-client autostart vnet2 on
  vnet-client autostart vnet2 off
"""
RELOAD_EPILOG = """\
example:
  sudoedit /etc/qemu-vnet/networks/vnet2.toml && vnet-client reload
"""


def dest(row: dict[str, Any]) -> str:
    """The argparse attribute of a flag (--if's is `iface`: `if` is a keyword)."""
    return "iface" if row["key"] == "if" else row["flag"].lstrip("-").replace("-", "_")


def define_options(p: argparse.ArgumentParser, compat: bool = False) -> None:
    """define's network options, one per row of the table that has a flag. compat: the
    qemu-vlan form's spellings too (-i, -n/--num, -u, -g, -d, -v) and its help; what it was
    not given is None (its defaults come from its variables and file)."""
    group = None
    for r in FLAGS:
        if r["section"] == "overlay" and group is None:
            group = p.add_argument_group(OVERLAY_GROUP)
        names = [*r["compat"], r["flag"]] if compat else [*DEFINE_ALSO.get(r["key"], ()),
                                                         r["flag"]]
        kw: dict[str, Any] = {"dest": dest(r), "help": r["help"]}
        if compat and r["key"] in COMPAT_HELP:
            kw["help"] = COMPAT_HELP[r["key"]]
        if r["flag_value"] is not None:
            if compat and r["key"] == "vde":  # $QEMU_VLAN_VDE or the file may say
                kw.update(action="store_const", const=True, default=None)
            else:
                kw["action"] = "store_true"
        else:
            kw["type"] = whole_number if r["type"] == "int" else str
            if r["repeatable"]:
                kw["action"] = "append"
            if r["choices"] and not (compat and r["key"] == "dhcp"):  # -d takes dhcpcd too
                kw["choices"] = list(r["choices"])
            else:
                kw["metavar"] = r["metavar"]
        (group or p).add_argument(*names, **kw)


def whole_number(text: str) -> int:
    """An int flag's value: vnetd checks its range, but it must fit D-Bus to get there."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: '{text}'") from None
    if n not in INT64:
        raise argparse.ArgumentTypeError(f"{text} does not fit in 64 bits, the most D-Bus "
                                         "carries")
    return n


def define_opts(a: argparse.Namespace) -> dict[str, Any]:
    """The Define options (the table's keys) of define's flags: every flag with a value
    (None when not given), a flag without one only when given."""
    opts: dict[str, Any] = {}
    overlay: dict[str, Any] = {}
    for r in FLAGS:
        v = getattr(a, dest(r))
        if r["flag_value"] is not None:
            if not v:
                continue
            v = r["flag_value"]
        elif r["type"] == "uid":
            v = uid_of(v)
        if r["section"] == "overlay":
            if v is not None:
                overlay[r["key"]] = v
        else:
            opts[r["key"]] = v
    if opts.get("if") and a.mode is None:
        opts["mode"] = "bridged"  # qemu-vlan: --if means a bridged network
    if overlay:
        if a.vni is None or a.local is None:
            raise Usage("an overlay needs at least --vni and --local.")
        opts["overlay"] = overlay
    if a.group is not None and not group_exists(a.group):
        raise Usage(f"There is no group named '{a.group}'.")
    return opts


def addressing(n: dict[str, Any]) -> str:
    """'nat, 172.16.12.0/24, gateway 172.16.12.1'; a bridged network: its NIC."""
    if "subnet" not in n:
        return f"{n['mode']} on {n.get('if', 'its NIC')}"
    return f"{n['mode']}, {n['subnet']}, gateway {n['gateway']}"


def print_networks(nets: list[dict[str, Any]]) -> None:
    if not nets:
        print("No networks defined. Try: vnet-client define vnet2 --mode=nat")
        return
    rows = [[n["name"], n["mode"], n["state"], n.get("subnet", "-"), n.get("gateway", "-"),
             "yes" if n.get("autostart") else "no"] for n in nets]
    print(table(rows, ["NAME", "MODE", "STATE", "SUBNET", "GATEWAY", "AUTOSTART"]))


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
            v = user_name(v)
        elif k == "learned-macs":
            v = ("not counted (the kernel cannot bound them before 6.7)" if not isinstance(
                v, dict) else f"{v['count']} of at most {v['most']}" if v["most"] else
                f"{v['count']} (no bound)")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            v = "; ".join(" ".join(f"{kk}={vv}" for kk, vv in d.items()) for d in v)
        elif isinstance(v, list):
            v = ", ".join(str(x) for x in v) or "-"
        elif isinstance(v, bool):
            v = "yes" if v else "no"
        print(f"{k + ':':<{width + 1}} {v}")


def add_commands(cmd: Command) -> None:
    """list, show, define, export."""
    sp = cmd("list", "list networks and their state")
    add_examples(sp, LIST_EPILOG)
    sp.add_argument("--names", action="store_true",
                    help="only the names, one a line (for scripts and shell completion)")
    sp.set_defaults(func=run_list)
    sp = cmd("show", "show one network: definition, state, addresses")
    add_examples(sp, SHOW_EPILOG)
    sp.add_argument("name", help="the network")
    sp.add_argument("--ports", action="store_true",
                    help="list the network's ports with their anti-spoofing drop counters")
    sp.set_defaults(func=run_show)
    sp = cmd("define", "define a network (it is saved in /etc/qemu-vnet/networks/NAME.toml)")
    add_examples(sp, DEFINE_EPILOG)
    sp.add_argument("name", help="network (and bridge) name, at most 15 characters")
    define_options(sp)
    sp.add_argument("--start", action="store_true", help="start it right away")
    sp.add_argument("--dry-run", action="store_true",
                    help="check everything define checks (with vnetd: names, limits, subnets, "
                    "interfaces, forwards) and print the network it would make; define nothing")
    sp.add_argument("--from", dest="from_file", metavar="FILE",
                    help="take the definition from a TOML file (what 'export' prints); other "
                    "options are not allowed with it")
    sp.set_defaults(func=run_define)
    sp = cmd("export", "print a network's definition as TOML ('define --from' takes it back)")
    add_examples(sp, EXPORT_EPILOG)
    sp.add_argument("name", help="the network")
    sp.set_defaults(func=run_export)


def add_lifecycle(cmd: Command) -> None:
    """start, stop, undefine, autostart, reload."""
    for name, help in (("start", "start a network: bridge, addresses, taps (and the ports "
                                 "of VMs that waited for it)"),
                       ("stop", "stop a network and remove what start made"),
                       ("undefine", "remove a stopped network's definition")):
        sp = cmd(name, help)
        add_examples(sp, LIFECYCLE_EPILOGS[name])
        sp.add_argument("name", help="the network")
        if name == "stop":
            sp.add_argument("--force", action="store_true",
                            help="stop it even with VMs attached: their ports leave the network "
                                 "and come back, guarded, when it starts again (their QEMU "
                                 "keeps running; the guests see their link go and return)")
        sp.set_defaults(func=run_lifecycle)
    sp = cmd("autostart", "start a network whenever vnetd starts (or not)")
    add_examples(sp, AUTOSTART_EPILOG)
    sp.add_argument("name", help="the network")
    sp.add_argument("state", choices=["on", "off"],
                    help="on: start it whenever vnetd starts; off: only when asked")
    sp.set_defaults(func=run_autostart)
    sp = cmd("reload", "re-read the definition files after editing them by hand")
    add_examples(sp, RELOAD_EPILOG)
    sp.set_defaults(func=run_reload)


def run_list(args: argparse.Namespace) -> int:
    with Session(args) as s:
        nets = s.run(lambda c: c.list_networks())
    if args.names:
        print("\n".join(n["name"] for n in nets))
    elif args.json:
        print(json.dumps(nets, indent=2))
    else:
        print_networks(nets)
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    with Session(args) as s:
        n = s.run(lambda c: c.get_network(args.name))
    if args.ports and not args.json:
        ports = n.get("ports", [])
        print(table([[p["ifname"], p["vm"], str(p["nic"]), p["mac"], user_name(p["uid"]),
                      str(p.get("spoof-drops", "(waiting for start)"))] for p in ports],
                    ["PORT", "VM", "NIC", "MAC", "UID", "SPOOF-DROPS"])
              if ports else f"No ports of yours on {args.name}."
              if n.get("other-ports") else f"No ports on {args.name}.")
        if n.get("other-ports"):
            print(f"(and {n['other-ports']} port(s) of other users)")
    elif args.json:
        print(json.dumps(n, indent=2))
    else:
        print_network({k: v for k, v in n.items() if k not in ("ports", "other-ports")}
                      | {"ports": len(n.get("ports", [])) + n.get("other-ports", 0)})
    return EXIT_OK


def run_define(args: argparse.Namespace) -> int:
    if args.dry_run and args.start:
        raise Usage("define --dry-run defines nothing, so it starts nothing: drop --start.")
    if args.from_file:
        return run_define_from(args)
    opts = define_opts(args)
    with Session(args) as s:
        if args.dry_run:
            return say_checked(args, s.run(lambda c: c.check_definition(args.name, **opts)))
        s.run(lambda c: c.define(args.name, **opts))
        if args.start:
            start_defined(s, args.name)
        n = s.run(lambda c: c.get_network(args.name))
    if args.json:
        print(json.dumps(n, indent=2))
    else:
        print(f"Defined network {n['name']} ({addressing(n)})"
              f"{' and started it' if args.start else ''}.")
    return EXIT_OK


def say_checked(args: argparse.Namespace, n: dict[str, Any], source: str = "") -> int:
    """What define --dry-run prints: the network that would be defined."""
    if args.json:
        print(json.dumps(n, indent=2))
    else:
        print(f"Would define network {n['name']} ({addressing(n)}){source}: every check "
              "passed; nothing was defined.")
    return EXIT_OK


def run_define_from(args: argparse.Namespace) -> int:
    """define --from FILE: the file's options as they are; with --dry-run only checked
    (CheckDefinition), as the flags are."""
    import tomllib

    if any(v for k, v in define_opts(args).items()):
        raise Usage("define --from FILE takes no other network options.")
    text = read_text(args.from_file)
    try:
        opts = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise Failure(f"cannot read {args.from_file}: {e}") from None
    opts.pop("name", None)
    with Session(args) as s:
        if args.dry_run:  # the file's keys as they are, as Define would get them
            return say_checked(args, s.run(lambda c: c.value(
                "CheckDefinition", "sa{sv}", [args.name, asv(opts)])), f" from {args.from_file}")
        s.run(lambda c: c.define_from(args.name, opts))
        if args.start:
            start_defined(s, args.name)
        if args.json:
            print(json.dumps(s.run(lambda c: c.get_network(args.name)), indent=2))
        else:
            print(f"Defined network {args.name} from {args.from_file}"
                  f"{' and started it' if args.start else ''}.")
    return EXIT_OK


def run_export(args: argparse.Namespace) -> int:
    with Session(args) as s:
        text = s.run(lambda c: c.export_definition(args.name))
    if args.json:  # the same definition as one JSON object
        import tomllib

        print(json.dumps(tomllib.loads(text), indent=2, sort_keys=True))
    else:
        sys.stdout.write(text)
    return EXIT_OK


def run_lifecycle(args: argparse.Namespace) -> int:
    """start, stop, undefine."""
    cmd = args.cmd
    with Session(args) as s:
        if cmd == "stop" and not args.force:
            attached(s, args.name)
        s.run(lambda c: getattr(c, cmd)(args.name))
    if args.json:
        print(json.dumps({"name": args.name, "done": cmd}))
    else:
        past = {"start": "Started", "stop": "Stopped", "undefine": "Undefined"}[cmd]
        print(f"{past} network {args.name}.")
    return EXIT_OK


def attached(s: Session, name: str) -> None:
    """Refuse to stop a network VMs are attached to, naming them (Busy)."""
    n = s.run(lambda c: c.get_network(name))
    count = n.get("attached", 0)
    if n.get("state") != "running" or not count:
        return
    mine = [p for p in n.get("ports", []) if p.get("kind", "attach") == "attach"]
    names = [f"{p['vm']} ({p['ifname']}, {user_name(p['uid'])})" for p in mine]
    if count > len(mine):
        names.append(f"{count - len(mine)} of other users")
    raise VnetClientError(
        "org.qemuvnet.Vnet1.Error.Busy",
        f"{count} VM(s) are attached to {name}: {', '.join(names)}. "
        f"'vnet-client stop {name} --force' stops it anyway: their ports leave the network "
        "and come back, with their guards, when it starts again.")


def run_autostart(args: argparse.Namespace) -> int:
    with Session(args) as s:
        s.run(lambda c: c.set_autostart(args.name, args.state == "on"))
    print(json.dumps({"name": args.name, "autostart": args.state == "on"}) if args.json
          else f"Autostart of {args.name}: {args.state}.")
    return EXIT_OK


def run_reload(args: argparse.Namespace) -> int:
    with Session(args) as s:
        problems = s.run(lambda c: c.reload())
    if args.json:
        print(json.dumps({"problems": problems}, indent=2))
    else:
        for p in problems:
            print(f"problem: {p}", file=sys.stderr)
        print(f"Reloaded definitions ({len(problems)} problem(s)).")
    return EXIT_FAIL if problems else EXIT_OK


def start_defined(s: Session, name: str) -> None:
    """define --start: a start that fails says that the definition stays, and what next."""
    try:
        s.run(lambda c: c.start(name))
    except VnetClientError as e:
        e.message = (f"Defined network {name}, but starting it failed: {e.message} The "
                     f"definition stays: correct it and 'vnet-client start {name}', or "
                     f"'vnet-client undefine {name}'.")
        raise
