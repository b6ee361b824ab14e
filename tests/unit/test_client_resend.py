"""The client sends a call again after vnetd went away only when repeating it changes
nothing: a change (Define, Attach, ...) may have been made before the reply was lost, so it is
reported with what to check instead. Both clients keep the rule: the asyncio library
(api.Client, dbus-fast) and the synchronous one the commands use (blocking.BlockingClient,
jeepney)."""

from __future__ import annotations

import asyncio

import pytest
from dbus_fast import Message, MessageType
from jeepney.low_level import Endianness, Header, HeaderFields
from jeepney.low_level import Message as JMessage
from jeepney.low_level import MessageType as JMessageType
from vnet_client import api, base, blocking
from vnetd import api as contract


def error(name: str) -> Message:
    return Message(message_type=MessageType.ERROR, error_name=name, reply_serial=1,
                   signature="s", body=["gone"])


def ok() -> Message:
    return Message(message_type=MessageType.METHOD_RETURN, reply_serial=1)


def j_error(name: str) -> JMessage:
    fields = {HeaderFields.error_name: name, HeaderFields.reply_serial: 1,
              HeaderFields.signature: "s"}
    return JMessage(Header(Endianness.little, JMessageType.error, 0, 1, -1, -1, fields),
                    ("gone",))


def j_ok() -> JMessage:
    fields = {HeaderFields.reply_serial: 1}
    return JMessage(Header(Endianness.little, JMessageType.method_return, 0, 1, -1, -1,
                           fields), ())


class AsyncClient:
    """api.Client answering from a list; run() makes a call and waits for it."""

    error, ok = staticmethod(error), staticmethod(ok)

    def __init__(self, *replies):
        self.client = api.Client()
        self.sent: list[str] = []
        queue = list(replies)

        async def send(msg: Message, member: str = "") -> Message:
            self.sent.append(msg.member)
            return queue.pop(0)

        self.client._send = send

    def run(self, member, signature="", body=None):
        return asyncio.run(self.client.call(member, signature, body))


class SyncClient:
    """blocking.BlockingClient answering from a list."""

    error, ok = staticmethod(j_error), staticmethod(j_ok)

    def __init__(self, *replies):
        self.client = blocking.BlockingClient()
        self.sent: list[str] = []
        queue = list(replies)

        def send(msg: JMessage, member: str) -> JMessage:
            self.sent.append(msg.header.fields[HeaderFields.member])
            return queue.pop(0)

        self.client._send = send

    def run(self, member, signature="", body=None):
        return self.client.call(member, signature, body or ())


CLIENTS = [AsyncClient, SyncClient]


@pytest.fixture(autouse=True)
def no_wait(monkeypatch):
    monkeypatch.setattr(base, "RETRY_AFTER", 0)


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_change_is_not_sent_again_after_no_reply(kind):
    c = kind(kind.error(base.NO_REPLY), kind.ok())
    with pytest.raises(base.VnetClientError) as e:
        c.run("Define", "sa{sv}", ["vnet7", {}])
    assert c.sent == ["Define"]
    assert e.value.name == base.NO_REPLY
    assert "may or may not have been done" in e.value.message and "show NET" in e.value.message


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_read_is_sent_again_after_no_reply(kind):
    c = kind(kind.error(base.NO_REPLY), kind.ok())
    c.run("ListNetworks")
    assert c.sent == ["ListNetworks", "ListNetworks"]


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_read_is_sent_once_more_only(kind):
    c = kind(kind.error(base.NO_REPLY), kind.error(base.NO_REPLY), kind.ok())
    with pytest.raises(base.VnetClientError) as e:
        c.run("ListNetworks")
    assert c.sent == ["ListNetworks", "ListNetworks"]
    assert "vnetd) is not running or not reachable" in e.value.message


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("name", base.NOT_DELIVERED)
def test_any_call_is_sent_again_when_it_never_reached_vnetd(kind, name):
    c = kind(kind.error(name), kind.ok())
    c.run("Define", "sa{sv}", ["vnet7", {}])
    assert c.sent == ["Define", "Define"]


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_refusal_is_not_sent_again_and_keeps_its_sentence(kind):
    c = kind(kind.error("org.qemuvnet.Vnet1.Error.NotFound"), kind.ok())
    with pytest.raises(base.VnetClientError) as e:
        c.run("GetNetwork", "s", ["vnet7"])
    assert c.sent == ["GetNetwork"]
    assert (e.value.short_name, e.value.message) == ("NotFound", "gone")


def test_resendable_calls_are_the_contracts_reads():
    """Every 'info' method of the contract, GetMac (the same MAC again) and CheckDefinition
    (it changes nothing); nothing else."""
    reads = {m.name for m in contract.METHODS if m.action == contract.INFO}
    assert base.RESENDABLE == reads | {"GetMac", "CheckDefinition"}
    assert api.RESENDABLE is base.RESENDABLE
