"""No caller may stall vnetd, or cost it its bus connection, with a message's header.

An object path may be as long as the message (1 MiB, what vnetd reads on the bus or a session),
and `_` is a path character. vnetd unescaped the element after `.../network/` one character
at a time, in Python, before any limit of its own: Bob (not in group vnet) held vnetd's loop
for about a second per MiB of `_`. And the error for an unknown method repeated the path
whole: a call near the bus's largest message made a reply larger than the bus takes, and
dbus-daemon drops a connection that sends one."""

from __future__ import annotations

import asyncio
import json

from tests.harness.daemon import BOB
from tests.harness.users import read_json, run_as, spawn_as

from .test_daemon_close_stall import _calls

LONG_PATH = """
import socket, time
from dbus_fast import Message
async def main():
    async with Client() as c:
        if sys.argv[1] == "session":
            await c.open_session()
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()
        for i in range(int(sys.argv[2])):
            path = "/org/qemuvnet/Vnet1/network/" + "_" * int(sys.argv[3])
            msg = Message(destination="org.qemuvnet.Vnet1", path=path,
                          interface="org.freedesktop.DBus.Introspectable",
                          member="Introspect", serial=100 + i)
            if sys.argv[1] == "session":
                await asyncio.get_running_loop().sock_sendall(c.session.sock,
                                                              msg._marshall(True))
            else:
                await c._bus.send(msg)
            await asyncio.sleep(0.3)
        print(json.dumps({"sent": int(sys.argv[2])}), flush=True)
        await asyncio.sleep(30)
asyncio.run(main())
"""


def _attack(how: str, count: int, size: int) -> list[float]:
    attack = spawn_as(BOB, LONG_PATH, how, str(count), str(size))
    try:
        assert read_json(attack, 30) == {"ready": True}
        attack.stdin.write("go\n")
        attack.stdin.flush()
        took = asyncio.run(_calls(count * 0.3 + 1.5))
        assert read_json(attack, 60) == {"sent": count}
    finally:
        attack.kill()
        attack.wait()
    return took


def test_a_long_object_path_on_the_bus_does_not_stall_vnetd(vnetd):
    took = _attack("bus", 4, 4 << 20)
    slow = sorted(round(t * 1000, 1) for t in took if t > 0.25)
    assert len(took) > 20 and not slow, (
        f"{len(slow)} of {len(took)} calls took over 250 ms (ms: {slow}) while Bob sent four "
        "Introspect calls on a 4 MiB path: vnetd read the path")


def test_a_long_object_path_on_a_session_does_not_stall_vnetd(vnetd):
    took = _attack("session", 6, 1000000)
    slow = sorted(round(t * 1000, 1) for t in took if t > 0.25)
    assert len(took) > 20 and not slow, (
        f"{len(slow)} of {len(took)} calls took over 250 ms (ms: {slow}) while Bob sent six "
        "Introspect calls on a 1 MB path on his session")


NEAR_LIMIT = """
from dbus_fast import Message
async def main():
    async with Client() as c:
        # an unknown method at a path outside vnetd's objects, the whole call just under the
        # 1 MiB vnetd reads; vnetd's error used to repeat the path whole
        head = Message(destination="org.qemuvnet.Vnet1", path="/x", interface="a.b",
                       member="M" * 255, serial=1)
        room = int(sys.argv[1]) - len(head._marshall(False)) - 64
        msg = Message(destination="org.qemuvnet.Vnet1", path="/x/" + "y" * room,
                      interface="a.b", member="M" * 255)
        try:
            reply = await asyncio.wait_for(c._bus.call(msg), float(sys.argv[2]))
            out = {"type": reply.message_type.name, "error": reply.error_name,
                   "length": len(reply.body[0]) if reply.body else 0}
        except Exception as e:
            out = {"failed": repr(e)[:300]}
        print(json.dumps(out), flush=True)
asyncio.run(main())
"""


def test_an_unknown_method_near_the_largest_message_keeps_vnetd_on_the_bus(vnetd):
    r = run_as(BOB, NEAR_LIMIT, str(1 << 20), "60", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out.get("error") == "org.freedesktop.DBus.Error.UnknownMethod", out
    assert out["length"] < 400, out  # the path clipped
    took = asyncio.run(_calls(1.0))  # and vnetd still answers, on the bus
    assert len(took) > 10


def test_a_call_whose_header_alone_passes_what_vnetd_reads_is_dropped(vnetd):
    """A call of 32 MiB, nearly all of it its object path: vnetd drops it as its bytes come,
    unread. Its caller's name comes last in its header (dbus-daemon adds it), past the 4 KiB
    of header vnetd looks into to answer a call it drops, so it gets no answer; vnetd stays
    on the bus and answers everyone else."""
    r = run_as(BOB, NEAR_LIMIT, str(32 << 20), "5", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"failed": "TimeoutError()"}, out
    took = asyncio.run(_calls(1.0))
    assert len(took) > 10
