"""vnet-client: the command line for qemu-vnet.

Two forms:
  vnet-client SUBCOMMAND ...             (list, show, define, start, stop, undefine, ...)
  vnet-client --br=vnet3 -n4 --start     (the original qemu-vlan's flags)

Exit codes: 0 ok, 1 failure, 2 usage, 4 not authorized.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import json
import os
import pwd
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from .agent import TextAgent
from .api import Client, VnetClientError

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
This is the qemu-vlan compatible form. The same as:
  vnet-client --br=vnet3 -n4 --start   ==  vnet-client define vnet3 --taps 4; vnet-client start vnet3
  vnet-client --br=vnet3 --stop        ==  vnet-client stop vnet3
"""


class Usage(Exception):
    pass


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--no-ask-password", action="store_true",
                   help="never prompt for a password; fail with exit code 4 instead")
    p.add_argument("--bus-address", metavar="ADDR",
                   help="talk to a vnetd on this D-Bus address (default: the system bus, "
                   "or $VNET_BUS_ADDRESS)")


def _define_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["nat", "host-only"], help="nat (default) or host-only")
    p.add_argument("--subnet", metavar="CIDR",
                   help="IPv4 subnet (default from the name: vnetN -> 172.16.(10+N).0/24)")
    p.add_argument("--subnet6", metavar="CIDR", help="an IPv6 prefix too, e.g. fd00:12::/64")
    p.add_argument("--mtu", type=int, help="bridge and tap MTU (default 1500)")
    p.add_argument("--autostart", action="store_true", help="start whenever vnetd starts")
    p.add_argument("-n", "--taps", type=int, metavar="COUNT",
                   help="pre-create COUNT persistent taps NAME_1..NAME_COUNT (qemu-vlan's -n)")
    p.add_argument("--user", metavar="USER", help="owner of the pre-created taps (default: you)")
    p.add_argument("--group", metavar="GROUP", help="group of the pre-created taps (default vnet)")
    p.add_argument("--dhcp", choices=["dnsmasq", "dhcpd", "none"],
                   help="DHCP server for the network (default dnsmasq)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vnet-client",
        description="Manage qemu-vnet virtual networks and attach QEMU VMs to them without "
        "root. Talks to the vnetd service over D-Bus; polkit decides who may do what.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(p)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        _add_common(sp)
        return sp

    cmd("list", "list networks and their state")
    sp = cmd("show", "show one network: definition, state, addresses")
    sp.add_argument("name")
    sp = cmd("define", "define a network (it is saved in /etc/qemu-vnet/networks/NAME.toml)")
    sp.add_argument("name", help="network (and bridge) name, at most 15 characters")
    _define_options(sp)
    sp.add_argument("--start", action="store_true", help="start it right away")
    for name, help in (("start", "start a network: bridge, addresses, taps"),
                       ("stop", "stop a network and remove what start made"),
                       ("undefine", "remove a stopped network's definition")):
        cmd(name, help).add_argument("name")
    sp = cmd("autostart", "start a network whenever vnetd starts (or not)")
    sp.add_argument("name")
    sp.add_argument("state", choices=["on", "off"])
    cmd("reload", "re-read the definition files after editing them by hand")
    return p


def build_compat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vnet-client", usage="vnet-client --br=BRIDGE [-n COUNT] [options] --start|--stop",
        description="qemu-vlan compatible form.", epilog=COMPAT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(p)
    p.add_argument("--br", required=True, metavar="BRIDGE", help="the network/bridge, e.g. vnet3")
    _define_options(p)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--start", action="store_true", help="define if needed, then start")
    action.add_argument("--stop", action="store_true", help="stop the network")
    p.add_argument("--use-vnet", action="store_true", help="accepted and ignored, as qemu-vlan did")
    return p


def _uid_of(user: str | None) -> int | None:
    if user is None:
        return None
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise Usage(f"There is no user named '{user}'.") from None


def _define_opts(a: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "mode": a.mode, "subnet": a.subnet, "subnet6": a.subnet6, "mtu": a.mtu,
        "taps": a.taps, "tap-user": _uid_of(a.user), "tap-group": a.group, "dhcp": a.dhcp,
    }
    if a.autostart:
        opts["autostart"] = True
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


def print_networks(nets: list[dict[str, Any]]) -> None:
    if not nets:
        print("No networks defined. Try: vnet-client define vnet2 --mode=nat")
        return
    rows = [[n["name"], n["mode"], n["state"], n["subnet"], n["gateway"],
             "yes" if n.get("autostart") else "no"] for n in nets]
    print(_table(rows, ["NAME", "MODE", "STATE", "SUBNET", "GATEWAY", "AUTOSTART"]))


def print_network(n: dict[str, Any]) -> None:
    order = ["name", "state", "mode", "bridge", "subnet", "gateway", "subnet6", "gateway6",
             "mtu", "autostart", "dhcp", "taps", "tap-names", "mac", "addresses"]
    keys = [k for k in order if k in n] + sorted(k for k in n if k not in order)
    width = max(len(k) for k in keys)
    for k in keys:
        v = n[k]
        if isinstance(v, list):
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
            print(json.dumps(n, indent=2)) if out_json else print_network(n)
        elif cmd == "define":
            opts = _define_opts(args)
            await s.run(lambda c: c.define(args.name, **opts))
            if args.start:
                await s.run(lambda c: c.start(args.name))
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
            print(f"Autostart of {args.name}: {args.state}.")
        elif cmd == "reload":
            problems = await s.run(lambda c: c.reload())
            if out_json:
                print(json.dumps({"problems": problems}, indent=2))
            else:
                for p in problems:
                    print(f"problem: {p}", file=sys.stderr)
                print(f"Reloaded definitions ({len(problems)} problem(s)).")
                if problems:
                    return EXIT_FAIL
    return EXIT_OK


async def run_compat(args: argparse.Namespace) -> int:
    name = args.br
    async with Session(args) as s:
        if args.stop:
            await s.run(lambda c: c.stop(name))
            print(f"Stopped network {name}.")
            return EXIT_OK
        try:
            await s.run(lambda c: c.get_network(name))
        except VnetClientError as e:
            if e.short_name != "NotFound":
                raise
            opts = _define_opts(args)
            await s.run(lambda c: c.define(name, **opts))
            print(f"Defined network {name}.")
        await s.run(lambda c: c.start(name))
        n = await s.run(lambda c: c.get_network(name))
        print(f"Started network {name}: {n['subnet']} gateway {n['gateway']}"
              + (f", taps {', '.join(n['tap-names'])}" if n.get("tap-names") else "") + ".")
    return EXIT_OK


def is_compat(argv: list[str]) -> bool:
    for a in argv:
        if a in ("-h", "--help"):
            return any(x.startswith("--br") for x in argv)
        if not a.startswith("-"):
            return False
        if a.startswith("--br"):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if is_compat(argv):
            args = build_compat_parser().parse_args(argv)
            runner = run_compat
        else:
            parser = build_parser()
            args = parser.parse_args(argv)
            if not args.cmd:
                parser.print_help(sys.stderr)
                return EXIT_USAGE
            runner = run_command
        return asyncio.run(runner(args))
    except Usage as e:
        print(f"vnet-client: {e}", file=sys.stderr)
        return EXIT_USAGE
    except VnetClientError as e:
        print(f"vnet-client: {e.message}", file=sys.stderr)
        if os.environ.get("VNET_CLIENT_DEBUG"):
            print(f"  ({e.name})", file=sys.stderr)
        return EXIT_AUTH if e.is_auth else EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
