"""Authorizer logic against a stand-in bus: flags, errors, and what is cached."""

from __future__ import annotations

import asyncio

import pytest
from dbus_fast import MessageType
from vnet_common.wire import ATTACH, MANAGE
from vnetd.authz import Authorizer, Caller
from vnetd.errors import AccessDenied, InteractiveAuthorizationRequired, LimitsExceeded


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
    for key in ("polkit.temporary_authorization_id",
                "polkit.retains_authorization_after_challenge"):
        bus = StubBus((True, False, {key: "tmpauthz42"}), (True, False, {key: "tmpauthz42"}))
        a = Authorizer(bus)
        check(a, ALICE)
        check(a, ALICE)
        assert len(bus.calls) == 2 and a.cache_size == 0


def test_refusals_without_a_prompt_are_remembered_a_few_seconds_only():
    """A user asking in a loop (every ListPorts of a non-administrator asks about manage)
    costs polkit one check per DENIED_SECONDS; a caller that may be prompted is always
    asked (it may authenticate now)."""
    from vnetd.authz import DENIED_SECONDS

    clock = Clock()
    bus = StubBus((False, True, {}), (True, False, {}), (False, False, {}), (False, False, {}))
    a = Authorizer(bus, clock=clock)
    for _ in range(2):
        with pytest.raises(InteractiveAuthorizationRequired):
            check(a, ALICE)
    assert len(bus.calls) == 1
    clock.now += DENIED_SECONDS + 0.1
    check(a, ALICE)  # asked again, and granted now
    assert len(bus.calls) == 2
    bob = Caller(":1.8", 1002, 43, interactive=True)
    for _ in range(2):
        with pytest.raises(AccessDenied):
            check(a, bob)
    assert len(bus.calls) == 4


class HangingBus:
    """Answers no check until released (or cancelled through CancelCheckAuthorization, as
    polkit does: the pending call then gets an error); counts the checks in flight per uid."""

    def __init__(self, uid_of):
        self.uid_of = uid_of
        self.now: dict[int, int] = {}
        self.most: dict[int, int] = {}
        self.release = None
        self.cancelled: dict[str, asyncio.Event] = {}

    async def call(self, msg):
        if msg.member == "CancelCheckAuthorization":
            self.cancelled.setdefault(msg.body[0], asyncio.Event()).set()
            return Reply([])
        uid = self.uid_of[msg.body[0][1]["name"].value]
        self.now[uid] = self.now.get(uid, 0) + 1
        self.most[uid] = max(self.most.get(uid, 0), self.now[uid])
        cancel = self.cancelled.setdefault(msg.body[4], asyncio.Event())
        waits = [asyncio.ensure_future(self.release.wait()),
                 asyncio.ensure_future(cancel.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.now[uid] -= 1
            for w in waits:
                w.cancel()
        if cancel.is_set():
            return Reply([], MessageType.ERROR, "org.freedesktop.PolicyKit1.Error.Cancelled")
        return Reply([(True, False, {})])


def test_one_user_cannot_take_every_polkit_check_in_flight():
    """vnetd's connection may wait for 128 replies at most; Bob calling from many
    connections waits for his own checks beyond POLKIT_PER_UID, and Alice's goes at once.
    Each call waiting holds its message: past POLKIT_WAITING_PER_UID, his are refused."""
    from vnetd.authz import POLKIT_PER_UID, POLKIT_WAITING_PER_UID

    bobs = [Caller(f":1.{100 + i}", 1002, None, False) for i in range(40)]
    alice = Caller(":1.7", 1001, 42, False)
    bus = HangingBus({c.sender: c.uid for c in [*bobs, alice]})

    async def scene():
        bus.release = asyncio.Event()
        a = Authorizer(bus)
        flood = [asyncio.ensure_future(a.check(c, ATTACH, {"network": "vnet2"})) for c in bobs]
        await asyncio.sleep(0.01)
        assert bus.now[1002] == POLKIT_PER_UID
        mine = asyncio.ensure_future(a.check(alice, ATTACH, {"network": "vnet2"}))
        await asyncio.sleep(0.01)
        assert bus.now.get(1001) == 1  # asked at once, beside Bob's
        # past his 32 waiting (each holding its call), Bob's further calls are refused
        refused = [f for f in flood if f.done()]
        assert len(refused) == len(bobs) - POLKIT_WAITING_PER_UID
        for f in refused:
            with pytest.raises(LimitsExceeded, match="32 of your calls are waiting"):
                f.result()
        bus.release.set()
        await asyncio.gather(mine, *[f for f in flood if f not in refused])
        assert bus.most[1002] == POLKIT_PER_UID and not a._per_uid

    asyncio.run(scene())


def test_a_check_polkit_never_answers_times_out_and_is_cancelled_there(monkeypatch):
    """dbus-daemon never times out a reply vnetd waits for, and lets its connection wait for
    128: a check that times out is cancelled at polkit (by its cancellation id), which ends
    the pending call, before its slot is given to another."""
    from vnetd import authz

    monkeypatch.setattr(authz, "POLKIT_TIMEOUT", 0.05)
    bus = HangingBus({ALICE.sender: ALICE.uid})

    async def scene():
        bus.release = asyncio.Event()
        a = Authorizer(bus)
        with pytest.raises(AccessDenied, match="did not answer in time"):
            await a.check(ALICE, ATTACH, {"network": "vnet2"})
        assert bus.now[ALICE.uid] == 0  # the call at polkit ended
        (cid,) = bus.cancelled
        assert cid.startswith("vnetd-") and bus.cancelled[cid].is_set()
        assert not a._per_uid
        return a

    a = asyncio.run(scene())
    # a failure to get an answer is not remembered as a refusal
    bus2 = StubBus((True, False, {}))
    a.bus = bus2
    check(a, ALICE)
    assert len(bus2.calls) == 1


def test_a_remembered_refusal_is_a_fresh_exception_each_time():
    """Raising one exception object again would grow its traceback with every call."""
    a = Authorizer(StubBus((False, False, {})))
    seen = []
    for _ in range(3):
        with pytest.raises(AccessDenied) as e:
            check(a, ALICE)
        seen.append(e.value)
    assert len({id(x) for x in seen}) == 3 and len({x.message for x in seen}) == 1


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


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_answers_expire_so_polkit_is_asked_again():
    clock = Clock()
    bus = StubBus(*[(True, False, {})] * 3)
    a = Authorizer(bus, cache_seconds=60, clock=clock)
    check(a, ALICE)
    clock.now += 59
    check(a, ALICE)  # still cached
    assert len(bus.calls) == 1
    clock.now += 2
    check(a, ALICE)  # expired: asked again (a user taken out of group vnet is refused now)
    assert len(bus.calls) == 2
    assert a.cache_size == 1


def test_no_cache_at_zero_seconds():
    bus = StubBus(*[(True, False, {})] * 2)
    a = Authorizer(bus, cache_seconds=0)
    check(a, ALICE)
    check(a, ALICE)
    assert len(bus.calls) == 2 and a.cache_size == 0


def test_the_cache_is_bounded_in_entries_least_recently_used_first_out():
    bus = StubBus(*[(True, False, {})] * 20)
    a = Authorizer(bus, max_entries=3)
    for vm in ("a", "b", "c"):
        check(a, ALICE, details={"network": "vnet2", "vm": vm})
    check(a, ALICE, details={"network": "vnet2", "vm": "a"})  # a is used again: kept
    check(a, ALICE, details={"network": "vnet2", "vm": "d"})  # b, the oldest, goes
    assert a.cache_size == 3 and len(bus.calls) == 4
    check(a, ALICE, details={"network": "vnet2", "vm": "a"})
    assert len(bus.calls) == 4
    check(a, ALICE, details={"network": "vnet2", "vm": "b"})
    assert len(bus.calls) == 5


def test_the_cache_is_bounded_in_bytes():
    bus = StubBus(*[(True, False, {})] * 100)
    a = Authorizer(bus, max_bytes=2000)
    for i in range(50):
        check(a, ALICE, details={"network": "vnet2", "vm": f"{i:02d}" + "v" * 62})
    assert 0 < a.cache_bytes <= 2000
    assert a.cache_size < 50
    a.forget_sender(ALICE.sender)
    assert a.cache_size == 0 and a.cache_bytes == 0


def test_credentials_are_bounded():
    class CredBus:
        async def call(self, msg):
            from dbus_fast import Variant
            return Reply([{"UnixUserID": Variant("u", 1001), "ProcessID": Variant("u", 7)}])

    from vnetd import authz
    a = Authorizer(CredBus())
    for i in range(authz.CREDS_ENTRIES + 10):
        asyncio.run(a.caller(f":1.{i}", False))
    assert len(a._creds) == authz.CREDS_ENTRIES


@pytest.mark.parametrize("action,method,says,never", [
    (MANAGE, "Define", "to define a network", "group 'vnet'"),
    (ATTACH, "Detach", "to detach a port", "to attach"),
    (ATTACH, "Attach", "to attach a virtual machine", ""),
])
def test_refusals_name_the_method_and_the_right_fix(action, method, says, never):
    """A vnet member denied define is not told to join vnet (vnet grants attach only); a user
    denied detach is not told it was attach."""
    for result in ((False, True, {}), (False, False, {})):
        a = Authorizer(StubBus(result))
        with pytest.raises((AccessDenied, InteractiveAuthorizationRequired)) as e:
            asyncio.run(a.check(ALICE, action, {"network": "vnet2"}, method))
        text = str(e.value)
        assert says in text, text
        assert not never or never not in text, text
        if action == ATTACH:
            assert "group 'vnet'" in text
        else:
            assert "polkit rule" in text and "org.qemuvnet.Vnet1.manage" in text


def test_a_disconnect_drops_its_own_entries_through_an_index_that_follows_evictions():
    """forget_sender runs for every name that leaves the bus: it looks up that sender's keys
    instead of walking the whole cache; the index follows LRU evictions and expiry."""
    now = [0.0]
    bus = StubBus(*[(True, False, {})] * 200)
    a = Authorizer(bus, cache_seconds=10, max_entries=50, clock=lambda: now[0])
    for i in range(120):
        check(a, Caller(f":1.{100 + i % 30}", 1001, 42, False), details={"network": f"n{i}"})
    assert a.cache_size == 50
    assert sum(map(len, a._by_sender.values())) == 50
    a.forget_sender(":1.100")
    assert all(k[0] != ":1.100" for k in a._cache) and ":1.100" not in a._by_sender
    now[0] = 20.0  # everything expired: each lookup drops its key
    for i in range(90, 120):
        check(a, Caller(f":1.{100 + i % 30}", 1001, 42, False), details={"network": f"n{i}"})
    for name in list(a._by_sender):
        a.forget_sender(name)
    assert a.cache_size == 0 and a._by_sender == {}


class ChangingBus(StubBus):
    """polkit's configuration changes while a check is at polkit: its Changed signal reaches
    vnetd before the answer, which was given under the rules from before."""

    def __init__(self, authz_of, *results):
        super().__init__(*results)
        self.authz_of = authz_of

    async def call(self, msg):
        self.authz_of().polkit_changed()
        await asyncio.sleep(0)
        return await super().call(msg)


def test_an_answer_polkit_gave_before_its_rules_changed_is_not_kept():
    """A rule taken away while a check was at polkit: the yes from before it went must not
    be kept for the cache's minute (nor a refusal from before a rule that grants)."""
    holder: list[Authorizer] = []
    bus = ChangingBus(lambda: holder[0], (True, False, {}), (True, False, {}),
                      (False, False, {}), (False, False, {}))
    a = Authorizer(bus)
    holder.append(a)
    check(a, ALICE)  # authorized, but under the rules from before the change
    assert a.cache_size == 0
    check(a, ALICE)
    assert len(bus.calls) == 2  # asked again, not answered from the cache
    for _ in range(2):
        with pytest.raises(AccessDenied):
            check(a, ALICE)
    assert len(bus.calls) == 4  # nor a refusal remembered


def test_a_polkitd_that_restarts_empties_the_cache():
    """A polkitd that (re)starts sends no Changed, and may have read other rules (an
    upgrade, an edited rules file while it was down): its arrival on the bus counts as
    one."""
    from dbus_fast import Message
    from vnetd.bus import Service

    bus = StubBus((True, False, {}), (True, False, {}))
    a = Authorizer(bus)
    s = Service.__new__(Service)
    s.authz, s.polkit_owner, s._ignored_logged = a, ":1.3", 0.0
    check(a, ALICE)
    assert a.cache_size == 1
    s._on_signal(Message.new_signal("/org/freedesktop/DBus", "org.freedesktop.DBus",
                                    "NameOwnerChanged", "sss",
                                    ["org.freedesktop.PolicyKit1", ":1.3", ":1.99"]))
    # (new_signal leaves the sender empty: only the bus daemon's own is believed)
    assert a.cache_size == 1 and s.polkit_owner == ":1.3"
    msg = Message.new_signal("/org/freedesktop/DBus", "org.freedesktop.DBus",
                             "NameOwnerChanged", "sss",
                             ["org.freedesktop.PolicyKit1", ":1.3", ":1.99"])
    msg.sender = "org.freedesktop.DBus"
    s._on_signal(msg)
    assert s.polkit_owner == ":1.99" and a.cache_size == 0
    check(a, ALICE)
    assert len(bus.calls) == 2  # asked the new polkitd
