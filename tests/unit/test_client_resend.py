"""The client sends a call again after vnetd went away only when repeating it changes
nothing: a change (Define, Attach, ...) may have been made before the reply was lost, so it is
reported with what to check instead."""

from __future__ import annotations

import asyncio

import pytest
from dbus_fast import Message, MessageType
from vnet_client import api
from vnetd import api as contract


def error(name: str) -> Message:
    return Message(message_type=MessageType.ERROR, error_name=name, reply_serial=1,
                   signature="s", body=["gone"])


def ok() -> Message:
    return Message(message_type=MessageType.METHOD_RETURN, reply_serial=1)


def client_answering(*replies: Message) -> tuple[api.Client, list[str]]:
    c = api.Client()
    sent: list[str] = []
    queue = list(replies)

    async def send(msg: Message, member: str = "") -> Message:
        sent.append(msg.member)
        return queue.pop(0)

    c._send = send
    return c, sent


@pytest.fixture(autouse=True)
def no_wait(monkeypatch):
    monkeypatch.setattr(api, "RETRY_AFTER", 0)


def test_a_change_is_not_sent_again_after_no_reply():
    c, sent = client_answering(error(api.NO_REPLY), ok())
    with pytest.raises(api.VnetClientError) as e:
        asyncio.run(c.call("Define", "sa{sv}", ["vnet7", {}]))
    assert sent == ["Define"]
    assert e.value.name == api.NO_REPLY
    assert "may or may not have been done" in e.value.message and "show NET" in e.value.message


def test_a_read_is_sent_again_after_no_reply():
    c, sent = client_answering(error(api.NO_REPLY), ok())
    asyncio.run(c.call("ListNetworks"))
    assert sent == ["ListNetworks", "ListNetworks"]


@pytest.mark.parametrize("name", api.NOT_DELIVERED)
def test_any_call_is_sent_again_when_it_never_reached_vnetd(name):
    c, sent = client_answering(error(name), ok())
    asyncio.run(c.call("Define", "sa{sv}", ["vnet7", {}]))
    assert sent == ["Define", "Define"]


def test_resendable_calls_are_the_contracts_reads():
    """Every 'info' method of the contract, GetMac (the same MAC again) and CheckDefinition
    (it changes nothing); nothing else."""
    reads = {m.name for m in contract.METHODS if m.action == contract.INFO}
    assert api.RESENDABLE == reads | {"GetMac", "CheckDefinition"}
