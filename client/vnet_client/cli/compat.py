"""The qemu-vlan form: vnet-client --br=vnet3 [-n4 -d dnsmasq ...] --start|--stop|--macaddr."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vnet_common.limits import MAX_TAPS

from ..base import VnetClientError
from .accounts import group_exists, uid_of
from .network import addressing, define_options, define_opts
from .parser import EXIT_OK, Failure, Parser, RawDescriptionHelpFormatter, Usage, add_common
from .session import Session

if TYPE_CHECKING:
    from ..blocking import BlockingClient

COMPAT_EPILOG = f"""\
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
line that asks for something else is refused, naming each difference. --macaddr asks vnetd
for each MAC: it takes at most {MAX_TAPS} taps (a network's most; a usage error past that) and says
how far it got on stderr every 100 MACs.
Exit codes: 0 ok, 1 failure, 2 usage error, 4 not authorized, 130 interrupted (Ctrl-C),
141 the reader of the output went away (as for SIGPIPE).
"""


def build_compat_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="vnet-client",
        usage="vnet-client --br=BRIDGE [-n COUNT] [options] --start|--stop|--macaddr",
        description="qemu-vlan compatible form.", epilog=COMPAT_EPILOG,
        formatter_class=RawDescriptionHelpFormatter,
    )
    add_common(p, top=True)
    p.add_argument("-b", "--br", required=True, metavar="BRIDGE",
                   help="the network/bridge, e.g. vnet3")
    p.add_argument("-c", "--cf", metavar="FILE",
                   help="qemu-vlan's configuration file (default $QEMU_VLAN_CF, else "
                   "/etc/qemu/BRIDGE/BRIDGE.conf when it exists); read, never written")
    define_options(p, compat=True)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("-s", "--start", action="store_true", help="define if needed, then start")
    action.add_argument("-S", "--stop", action="store_true", help="stop the network")
    action.add_argument("-m", "--macaddr", "--addr", action="store_true",
                        help="print ether_<i>=MAC lines for COUNT x 8 VMs (x 32 with --vde), "
                        f"COUNT at most {MAX_TAPS}: the MACs vnetd gives VMs BRIDGE_<i>; with "
                        "-c FILE append them to the ether.conf beside it")
    p.add_argument("--use-vnet", action="store_true", help="accepted and ignored, as qemu-vlan did")
    return p


# --- the qemu-vlan compatible form: what it asks for -----------------------------------------
class CompatRequest:
    """The definition the compatible form asks for, each value with where it came from
    (an option, a variable, the configuration file or the original's default)."""

    def __init__(self, br: str, values: dict[str, Any], source: dict[str, str], cf: str | None,
                 cf_given: bool, notes: list[str]):
        self.br, self.values, self.source, self.cf = br, values, source, cf
        self.cf_given, self.notes = cf_given, notes

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
    if not (text.strip().isascii() and text.strip().isdigit()) or int(text) < 1:
        raise Usage(f"{what}={text!r} is not a tap count (1 or more).")
    return int(text)


def compat_request(a: argparse.Namespace, env: dict[str, str],
                   group_exists: Callable[[str], bool]) -> CompatRequest:
    """qemu-vlan 1.0.0's order: its defaults, then the environment, then the options, then
    the configuration file it sources (which wins)."""
    from ..migrate import MigrationError, read_shell_assignments

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
    opts = define_opts(a2)
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
            shown = have if have is not None else "unset"
            out.append(f"{_COMPAT_KEYS.get(key, 'tap-user')} is {shown}, "
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


# --macaddr asks vnetd for each MAC (a bus call each): past this many, a line on stderr every
# this many
MACADDR_PROGRESS = 100


def check_macaddr_count(req: CompatRequest) -> None:
    """--macaddr for no more taps than a network has (each MAC is a bus call): a usage error,
    before any call, naming where the tap count came from."""
    taps = req.values["taps"]
    if taps > MAX_TAPS:
        per_tap = 32 if req.values["vde"] else 8
        raise Usage(f"--macaddr makes {per_tap} MACs per tap for at most {MAX_TAPS} taps (a "
                    f"network's most), but {req.source['taps']} asks for {taps} taps "
                    f"({taps * per_tap} MACs).")


def run_compat(args: argparse.Namespace) -> int:
    name = args.br
    req = compat_request(args, dict(os.environ), group_exists)
    if args.macaddr:
        check_macaddr_count(req)
    for n in req.notes:
        print(f"vnet-client: {n}", file=sys.stderr)
    with Session(args) as s:
        if args.stop:
            s.run(lambda c: c.stop(name))
            print(json.dumps({"name": name, "done": "stop"}) if args.json
                  else f"Stopped network {name}.")
            return EXIT_OK
        if args.macaddr:
            return run_compat_macaddr(s, req, args)
        try:
            d = s.run(lambda c: c.get_network(name))
        except VnetClientError as e:
            if e.short_name != "NotFound":
                raise
            opts = compat_define_opts(args, req)
            s.run(lambda c: c.define(name, **opts))
            if not args.json:
                print(f"Defined network {name}.")
        else:
            diff = compat_differences(req, d, uid_of)
            if diff:
                raise Failure(f"{name} is already defined otherwise: " + "; ".join(diff)
                              + f". Start it without those, or change the definition "
                              f"(vnet-client export {name} > FILE, edit it, "
                              f"vnet-client undefine {name}, vnet-client define {name} "
                              "--from FILE).")
        s.run(lambda c: c.start(name))
        n = s.run(lambda c: c.get_network(name))
        if args.json:
            print(json.dumps(n, indent=2))
        else:
            print(f"Started network {name}: {addressing(n)}"
                  + (f", taps {', '.join(n['tap-names'])}" if n.get("tap-names") else "") + ".")
    return EXIT_OK


def _mac_of(network: str, vm: str) -> Callable[[BlockingClient], str]:
    return lambda c: c.get_mac(network, vm, 0)


def run_compat_macaddr(s: Session, req: CompatRequest, args: argparse.Namespace) -> int:
    """qemu-vlan's --macaddr: ether_<i>=MAC for i in 0..COUNT-1, COUNT = taps x 8 (x 32 with
    VDE). The MACs are the ones vnetd gives VM BRIDGE_<i> (asking registers them), so the
    lines stay true; to stdout, or appended to the ether.conf beside -c FILE, as the
    original appended to its own. More than MACADDR_PROGRESS MACs (bus calls): a line on
    stderr every MACADDR_PROGRESS."""
    name = req.br
    count = compat_macaddr_count(req)  # run_compat checked it (check_macaddr_count)
    macs = []
    for i in range(count):
        macs.append(s.run(_mac_of(name, f"{name}_{i}")))
        if count > MACADDR_PROGRESS and (i + 1) % MACADDR_PROGRESS == 0:
            print(f"vnet-client: {i + 1} of {count} MACs", file=sys.stderr, flush=True)
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

