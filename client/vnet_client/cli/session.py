"""The connection a command makes: the synchronous client plus the authorization dance."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..agent import TextAgent
from ..base import VnetClientError
from ..blocking import BlockingClient


class Session:
    """One client connection plus the authorization dance: a call refused with
    InteractiveAuthorizationRequired is retried once with a text agent on a terminal.
    `run(lambda c: c.method(...))` makes a call (BlockingClient's methods). The connection
    is made by the first call, once its values are known to fit D-Bus: a value that does not
    is a usage error, with a bus or without one."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.ask = not args.no_ask_password
        self.agent: TextAgent | None = None
        interactive = self.ask and not TextAgent.wanted()  # desktop agents may answer
        self.client = BlockingClient(bus_address=args.bus_address, interactive=interactive)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client.close()
        if self.agent is not None:
            self.agent.stop()

    def run(self, fn: Callable[[BlockingClient], Any]) -> Any:
        try:
            return fn(self.client)
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
        return fn(self.client)

