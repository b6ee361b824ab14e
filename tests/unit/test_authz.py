"""Authorizer logic against a stand-in bus: flags, errors, and what is cached."""

from __future__ import annotations

import asyncio

import pytest
from dbus_fast import MessageType
from vnetd.authz import ATTACH, MANAGE, Authorizer, Caller
from vnetd.errors import AccessDenied, InteractiveAuthorizationRequired


class Reply:
    def __init__(self, body, kind=MessageType.METHOD_RETURN, error=None):
        self.body = body
        self.message_type = kind
        self.error_name = error


class StubBus:
    """Answers CheckAuthorization with the queued results; records the calls."""

    def __init__(self, *results):
        self.results = list(results)
        self.calls = []

    async def call(self, msg):
        self.calls.append(msg)
        return Reply([self.results.pop(0)])


def check(authz, caller, action=ATTACH, details=None):
    return asyncio.run(authz.check(caller, action, details or {"network": "vnet2"}))


ALICE = Caller(sender=":1.7", uid=1001, pid=42, interactive=False)


def test_subject_is_the_bus_name_and_interaction_follows_the_flag():
    bus = StubBus((True, False, {}), (True, False, {}))
    a = Authorizer(bus)
    check(a, ALICE)
    check(a, Caller(":1.8", 1001, 42, interactive=True))
    subject, action, details, flags, _ = bus.calls[0].body
    assert subject[0] == "system-bus-name" and subject[1]["name"].value == ":1.7"
    assert action == ATTACH and details == {"network": "vnet2"} and flags == 0
    assert bus.calls[1].body[3] == 1  # AllowUserInteraction only with the message flag


def test_positive_answers_are_cached_per_sender_action_and_details():
    bus = StubBus((True, False, {}), (True, False, {}), (True, False, {}))
    a = Authorizer(bus)
    check(a, ALICE)
    check(a, ALICE)  # cached
    assert len(bus.calls) == 1 and a.cache_hits == 1
    check(a, ALICE, details={"network": "vnet3"})  # other details: asked again
    check(a, ALICE, action=MANAGE)
    assert len(bus.calls) == 3


def test_temporary_authorizations_are_never_cached():
    for key in ("polkit.temporary_authorization_id", "polkit.retains_authorization_after_challenge"):
        bus = StubBus((True, False, {key: "tmpauthz42"}), (True, False, {key: "tmpauthz42"}))
        a = Authorizer(bus)
        check(a, ALICE)
        check(a, ALICE)
        assert len(bus.calls) == 2 and a.cache_size == 0


def test_negative_answers_are_never_cached():
    bus = StubBus((False, True, {}), (True, False, {}))
    a = Authorizer(bus)
    with pytest.raises(InteractiveAuthorizationRequired):
        check(a, ALICE)
    check(a, ALICE)
    assert len(bus.calls) == 2


def test_forget_sender_and_polkit_changed_drop_entries():
    bus = StubBus(*[(True, False, {})] * 4)
    a = Authorizer(bus)
    check(a, ALICE)
    check(a, Caller(":1.9", 1002, 43, False))
    a.forget_sender(":1.7")
    assert a.cache_size == 1
    check(a, ALICE)
    assert len(bus.calls) == 3
    a.polkit_changed()
    assert a.cache_size == 0
    check(a, ALICE)
    assert len(bus.calls) == 4


def test_challenge_with_interaction_allowed_is_access_denied():
    a = Authorizer(StubBus((False, True, {})))
    with pytest.raises(AccessDenied, match="no polkit"):
        check(a, Caller(":1.7", 1001, 42, interactive=True))


def test_root_skips_polkit_and_unknown_actions_fail_closed():
    bus = StubBus()
    a = Authorizer(bus)
    check(a, Caller(":1.1", 0, 1, False))
    assert bus.calls == []
    with pytest.raises(AccessDenied):
        check(a, Caller(":1.1", 0, 1, False), action="org.qemuvnet.Vnet1.nonsense")


def test_polkit_errors_deny():
    class Failing(StubBus):
        async def call(self, msg):
            return Reply(["no"], kind=MessageType.ERROR,
                         error="org.freedesktop.DBus.Error.ServiceUnknown")

    with pytest.raises(AccessDenied, match="not available"):
        check(Authorizer(Failing()), ALICE)
