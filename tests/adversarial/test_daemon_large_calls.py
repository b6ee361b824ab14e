"""No caller may stall vnetd by the size of a call it sends on the system bus.

dbus-daemon passes on calls of up to 32 MiB, and anyone may send one to vnetd (Bob is not in
group vnet). dbus-fast turned each whole call into Python values on vnetd's event loop before
vnetd saw it: a call whose argument was an array of millions of variants held the loop, and
every caller behind it on the bus, for seconds before vnetd could refuse it (eight million
variants: 5 s here). vnetd now reads
the bus itself, by each message's fixed header: a message longer than the 1 MiB a session
takes is dropped unread, and a caller who wanted an answer gets LimitsExceeded."""

from __future__ import annotations

import asyncio
import json

from tests.harness.daemon import BOB
from tests.harness.users import read_json, spawn_as

from .test_daemon_close_stall import _calls

BIG_CALLS = """
from dbus_fast import Message, MessageFlag, Variant
async def main():
    count, values, reply = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "reply"
    body = [[Variant("y", 7)] * values]  # four bytes each
    async with Client() as c:
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()
        answers = []
        for i in range(count):
            msg = Message(destination="org.qemuvnet.Vnet1", path="/org/qemuvnet/Vnet1",
                          interface="org.qemuvnet.Vnet1.Manager", member="ListNetworks",
                          signature="av", body=body,
                          flags=MessageFlag.NONE if reply else MessageFlag.NO_REPLY_EXPECTED)
            if reply:
                r = await asyncio.wait_for(c._bus.call(msg), 60)
                answers.append({"error": r.error_name, "text": r.body[0] if r.body else ""})
            else:
                await c._bus.send(msg)
            await asyncio.sleep(0.5)
        print(json.dumps({"sent": count, "answers": answers}), flush=True)
        await asyncio.sleep(30)
asyncio.run(main())
"""


def _attack(count: int, values: int, reply: bool) -> tuple[list[float], dict]:
    attack = spawn_as(BOB, BIG_CALLS, str(count), str(values), "reply" if reply else "none")
    try:
        assert read_json(attack, 30) == {"ready": True}
        attack.stdin.write("go\n")
        attack.stdin.flush()
        # vnetd's own answers, on a session: dbus-daemon itself takes its time over a long
        # message (it checks every value), and holds up everyone on the bus meanwhile,
        # whomever the message is for
        took = asyncio.run(_calls(count * 0.5 + 2.0, session=True))
        out = read_json(attack, 120)
    finally:
        attack.kill()
        attack.wait()
    return took, out


def test_a_call_of_many_values_on_the_bus_is_refused_unread(vnetd):
    # eight million variants: 32 MB, just under what dbus-daemon passes on
    took, out = _attack(2, 8_000_000, reply=True)
    slow = sorted(round(t * 1000, 1) for t in took if t > 0.25)
    assert len(took) > 20 and not slow, (
        f"{len(slow)} of {len(took)} of root's calls took over 250 ms (ms: {slow}) while Bob "
        "sent two calls of eight million variants: vnetd decoded them")
    assert out["sent"] == 2
    for answer in out["answers"]:
        assert answer["error"] == "org.freedesktop.DBus.Error.LimitsExceeded", answer
        assert "1048576" in answer["text"] and "32000" in answer["text"], answer


def test_large_calls_that_want_no_answer_are_dropped_unread(vnetd):
    took, out = _attack(4, 2_000_000, reply=False)
    slow = sorted(round(t * 1000, 1) for t in took if t > 0.25)
    assert len(took) > 20 and not slow, (
        f"{len(slow)} of {len(took)} of root's calls took over 250 ms (ms: {slow}) while Bob "
        "sent four calls of two million variants that wanted no answer")
    assert out == {"sent": 4, "answers": []}
    # and vnetd still answers everyone on the bus after them
    assert asyncio.run(_calls(0.5))


def test_a_call_just_under_the_limit_is_still_read(vnetd):
    """The limit is 1 MiB a message: a call of 200,000 variants (800 kB) is decoded and
    answered as any call with the wrong arguments is."""
    took, out = _attack(1, 200_000, reply=True)
    assert [a["error"] for a in out["answers"]] == ["org.freedesktop.DBus.Error.InvalidArgs"]
    assert json.dumps(out)  # (the answer names the signature it takes)
    assert "takes arguments of type ''" in out["answers"][0]["text"], out
