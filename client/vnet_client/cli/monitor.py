"""monitor: vnetd's events as they happen."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from ..base import VnetClientError
from .parser import EXIT_OK, Usage
from .session import Session

Command = Callable[[str, str], argparse.ArgumentParser]


def add_commands(cmd: Command) -> None:
    sp = cmd("monitor", "print vnetd's events as they happen (networks, ports, leases)")
    sp.description = ("Print one line per event as it happens: a network defined, started, "
                      "stopped or undefined, a port attached or detached, a lease added, "
                      "changed or removed (ask 'leases NET' for which). With --json, one JSON "
                      "object per line. Until Ctrl-C, or --count events. Example: vnet-client "
                      "monitor vnet2 --json")
    sp.add_argument("network", nargs="?", help="only this network's events")
    sp.add_argument("--count", type=int, metavar="N", help="stop after N events")
    sp.set_defaults(func=run_monitor)


def run_monitor(args: argparse.Namespace) -> int:
    """One line per event; the signals need no authorization (they name nothing private)."""
    if args.count is not None and args.count < 1:
        raise Usage("--count takes a number of events of at least 1.")
    with Session(args) as s:
        if args.network is not None:
            # a network defined later is watched all the same; say so, or a typo waits forever
            try:
                s.client.get_network(args.network)
            except VnetClientError as e:
                if not e.name.endswith(".NotFound"):
                    raise
                print(f"vnet-client: no network '{args.network}' is defined (yet): waiting "
                      "for its events all the same.", file=sys.stderr, flush=True)
        n = 0
        for member, ev in s.client.events(args.network):
            if args.json:
                print(json.dumps({"event": member, **ev}), flush=True)
            else:
                print(f"{time.strftime('%H:%M:%S')} {member[:-len('Changed')].lower():7} "
                      + " ".join(f"{k}={v}" for k, v in ev.items()), flush=True)
            n += 1
            if args.count is not None and n >= args.count:
                break
    return EXIT_OK

