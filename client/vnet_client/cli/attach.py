"""attach (a VM's taps, then exec the command), ports and detach."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from vnet_common.limits import MAX_NIC, MAX_QUEUES

from ..base import Attachment
from .output import table, user_name
from .parser import EXIT_OK, RawDescriptionHelpFormatter, Usage, add_examples
from .session import Session

if TYPE_CHECKING:
    from ..blocking import BlockingClient

Command = Callable[[str, str], argparse.ArgumentParser]

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
A COMMAND that is not found exits 127 (nothing is attached), one that cannot be run (not
executable, not a program) 126, as in a shell.
"""


PORTS_EPILOG = """\
examples:
  vnet-client ports                  # port, network, VM, NIC, MAC, owner, holder pid
  vnet-client ports --json
  vnet-client show vnet2 --ports     # one network's ports, with their spoof drop counters
"""


def add_commands(cmd: Command) -> None:
    """attach (its --help only: parse_attach reads its command line), ports, detach."""
    sp = cmd("attach", "attach a VM to a network and run COMMAND (QEMU) with the tap fd(s)")
    sp.usage = ("vnet-client attach --br=NET --vm=NAME [--nic=N] [--queues=N] [--vhost] "
                "[--mac=MAC] [--vde] [--br=NET2 ...] -- COMMAND [ARGS...]")
    sp.description = ATTACH_HELP
    sp.formatter_class = RawDescriptionHelpFormatter
    # For --help (and completion) only: parse_attach reads attach's command line.
    nic = sp.add_argument_group("a NIC (each --br starts one; the options after it are its own)")
    nic.add_argument("--br", metavar="NET",
                     help="the network to attach a NIC to (repeatable: one NIC each)")
    nic.add_argument("--vm", metavar="NAME",
                     help="the VM's name, which keys its stable MAC (and belongs to you once "
                     "used); before the first --br it applies to every NIC")
    nic.add_argument("--nic", metavar="N",
                     help=f"which NIC of the VM on this network, 0-{MAX_NIC} (default 0): "
                     "each has its own stable MAC")
    nic.add_argument("--queues", metavar="N",
                     help=f"a multi-queue tap with N queues, 1-{MAX_QUEUES} (default 1), one "
                     "fd each: {fds}, for -netdev tap,fds={fds},queues=N")
    nic.add_argument("--vhost", action="store_true",
                     help="open /dev/vhost-net too, one fd per queue: {vhostfds}, for "
                     "vhost=on,vhostfds={vhostfds} (empty where there is no vhost-net)")
    nic.add_argument("--mac", metavar="MAC",
                     help="the guest's MAC, when it is not the VM's stable one ({mac}); one "
                     "that another VM holds on the network is refused")
    nic.add_argument("--vde", action="store_true",
                     help="no tap: a free port of one of the network's VDE switches (a "
                     "network defined with --vde), {vde_sock}, for -netdev vde,sock={vde_sock}")
    sp = cmd("ports", "list your ports (administrators: everyone's)")
    add_examples(sp, PORTS_EPILOG)
    sp.add_argument("--names", action="store_true",
                    help="only their VMs' names, one a line (for scripts and shell completion)")
    sp.set_defaults(func=run_ports)
    sp = cmd("detach", "remove a port now (its owner or an administrator)")
    add_examples(sp, "example:\n  vnet-client detach vnet2-3fa9c1    # a port's name, as "
                 "'ports' lists it\n")
    sp.add_argument("ifname", help="the port (tap) to remove, as 'vnet-client ports' names it")
    sp.set_defaults(func=run_detach)


# The exit codes of a COMMAND that cannot be run, as a shell's: not found, and found but not
# runnable (not executable, not a program, ...).
EXIT_NOT_FOUND, EXIT_CANNOT_RUN = 127, 126


class CannotRun(Exception):
    """attach's COMMAND cannot be run: exit 127 (not found) or 126."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


PLACEHOLDER = re.compile(r"\{(fd|fds|vhostfds|mac|ifname|vde_sock)(\d*)\}")


class Group:
    """One --br group of attach's command line: a NIC to attach."""

    def __init__(self, network: str, vm: str | None = None, nic: int = 0, queues: int = 1,
                 vhost: bool = False, mac: str | None = None, vde: bool = False):
        self.network, self.vm, self.nic, self.queues = network, vm, nic, queues
        self.vhost, self.mac, self.vde = vhost, mac, vde


class VdePlug:
    """A NIC that QEMU plugs into a VDE switch itself (no fd)."""

    def __init__(self, network: str, vm: str, nic: int, sock: str, mac: str):
        self.network, self.vm, self.nic, self.sock, self.mac = network, vm, nic, sock, mac

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

    def number(flag: str, text: str, low: int, high: int) -> int:
        try:
            n = int(text)
        except ValueError:
            raise Usage(f"{flag} takes a whole number, not '{text}'.") from None
        if not low <= n <= high:
            raise Usage(f"{flag} must be between {low} and {high}, not {text}.")
        return n

    for tok in it:
        flag, _, rest = tok.partition("=")
        inline = rest if "=" in tok else None
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
            g.nic = number(flag, value(flag, inline), 0, MAX_NIC)
        elif flag == "--queues":
            g.queues = number(flag, value(flag, inline), 1, MAX_QUEUES)
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


def substitute(command: list[str], atts: list[Attachment | VdePlug]) -> list[str]:
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


def _vde_socket(g: Group, vm: str) -> Callable[[BlockingClient], tuple[str, str]]:
    return lambda c: c.vde_socket(g.network, vm, g.nic)


def _attach(g: Group, vm: str) -> Callable[[BlockingClient], Attachment]:
    return lambda c: c.attach(g.network, vm, nic=g.nic, queues=g.queues, vhost=g.vhost,
                              mac=g.mac)


def run_attach(groups: list[Group], command: list[str], common: argparse.Namespace) -> int:
    import shutil  # (here: every other command would pay for importing it, bz2 and lzma)

    exe = shutil.which(command[0])
    if exe is None:
        raise CannotRun(f"command not found: {command[0]} (nothing was attached).",
                        EXIT_NOT_FOUND)
    atts: list[Attachment | VdePlug] = []
    try:
        with Session(common) as s:
            for g in groups:
                assert g.vm is not None  # parse_attach gave every group its VM
                if g.vde:
                    sock, mac = s.run(_vde_socket(g, g.vm))
                    atts.append(VdePlug(g.network, g.vm, g.nic, sock, g.mac or mac))
                    continue
                atts.append(s.run(_attach(g, g.vm)))
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
    try:
        os.execv(exe, argv)
    except OSError as e:  # the taps go with our fds when we exit
        raise CannotRun(f"cannot run {command[0]}: {e.strerror or e} (the taps attached for it "
                        "are closed again).",
                        EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_CANNOT_RUN) from None


def run_ports(args: argparse.Namespace) -> int:
    with Session(args) as s:
        ports = s.run(lambda c: c.list_ports())
    if args.names:
        print("\n".join(sorted({p["vm"] for p in ports})))
    elif args.json:
        print(json.dumps(ports, indent=2))
    elif not ports:
        print("No ports.")
    else:
        print(table([[p["ifname"], p["network"], p["vm"], str(p["nic"]), p["mac"],
                      user_name(p["uid"]), str(p.get("holder-pid", "-"))] for p in ports],
                    ["PORT", "NETWORK", "VM", "NIC", "MAC", "UID", "HOLDER"]))
    return EXIT_OK


def run_detach(args: argparse.Namespace) -> int:
    with Session(args) as s:
        s.run(lambda c: c.detach(args.ifname))
    print(json.dumps({"ifname": args.ifname, "done": "detach"}) if args.json
          else f"Detached {args.ifname}.")
    return EXIT_OK
