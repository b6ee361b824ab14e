"""What the command-line unit tests share: no bus (a path that does not exist: a code path
that tried to connect would fail with exit code 1, never 2), none of qemu-vlan's variables
from the environment, the exit code a vnet-client process would have, and a canned reply."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from jeepney.low_level import Endianness, Header, HeaderFields
from jeepney.low_level import Message as JMessage
from jeepney.low_level import MessageType as JMessageType
from vnet_client import blocking, cli

ROOT = Path(__file__).resolve().parents[2]
NO_BUS = "unix:path=/nonexistent/vnet-unit-test-bus"


@pytest.fixture(autouse=True)
def _no_system_bus(monkeypatch):
    monkeypatch.setenv("VNET_BUS_ADDRESS", NO_BUS)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", NO_BUS)
    for var in ("QEMU_VLAN_NUM", "QEMU_VLAN_VDE", "QEMU_VLAN_DHCP", "QEMU_VLAN_IF",
                "QEMU_VLAN_CF", "GROUP"):
        monkeypatch.delenv(var, raising=False)


def exit_code(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 1


def reply(sig: str = "", *body) -> JMessage:
    fields = {HeaderFields.reply_serial: 1}
    if sig:
        fields[HeaderFields.signature] = sig
    return JMessage(Header(Endianness.little, JMessageType.method_return, 0, 1, -1, -1, fields),
                    body)


def record_sends(monkeypatch, answer: Callable[[str, JMessage, list], JMessage]
                 ) -> list[tuple[str, tuple]]:
    """vnetd's stand-in: every call that reached the wire, (member, body), in a list that
    `answer(member, msg, calls)` replies from."""
    calls: list[tuple[str, tuple]] = []

    def send(self, msg: JMessage, member: str) -> JMessage:
        msg.serialise(serial=1)  # as the connection would
        calls.append((member, msg.body))
        return answer(member, msg, calls)

    monkeypatch.setattr(blocking.BlockingClient, "_send", send)
    return calls
