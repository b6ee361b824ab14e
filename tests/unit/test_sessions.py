"""What a session's frames are, and what follows an answer: a port's guard put in after the
reply, whatever becomes of the task that answered."""

from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace

import pytest
from dbus_fast import Message
from vnet_common import frames
from vnetd import bus
from vnetd.engine import Engine
from vnetd.errors import Failed


def test_message_length_is_the_whole_message():
    msg = Message(path="/org/qemuvnet/Vnet1", interface="org.qemuvnet.Vnet1.Manager",
                  member="GetMac", signature="ssu", body=["vnet2", "web1", 0], serial=7)
    data = bytes(msg._marshall(True))
    assert frames.message_length(data[:frames.HEADER]) == len(data)


@pytest.mark.parametrize("head, says", [
    (b"GET / HTTP/1.1\r\n", "byte order"),
    (bytes([0x6C, 1, 0, 2]) + struct.pack("<III", 0, 1, 0), "protocol version 2"),
    (bytes([0x6C, 1, 0, 1]) + struct.pack("<III", 100 << 20, 1, 0), "longer than"),
    (bytes([0x42, 1, 0, 1]) + struct.pack(">III", 0, 1, frames.MAX_MESSAGE), "longer than"),
    (b"l\x01\x00\x01", "16 bytes"),
])
def test_what_is_not_a_message_a_session_takes_is_named(head, says):
    with pytest.raises(frames.BadFrame, match=says):
        frames.message_length(head)


class FakeFirewall:
    def __init__(self, refuse: bool = False):
        self.refuse, self.calls = refuse, []

    async def port_attached(self, port):
        self.calls.append(("guard", port.ifname))
        if self.refuse:
            raise Failed("The firewall refused to protect the port; nothing was changed.")

    async def spares_gone(self, names):
        self.calls.append(("drop pending", *names))


class FakePorts:
    def __init__(self, *ports):
        self.by_name = {p.ifname: p for p in ports}
        self.detached = []

    async def detach(self, port):
        self.detached.append(port.ifname)
        self.by_name.pop(port.ifname, None)


def engine(ports, firewall):
    events, restocked = [], []
    return SimpleNamespace(lock=asyncio.Lock(), ports=ports, firewall=firewall,
                           _emit=lambda *e: events.append(e), events=events,
                           spares=SimpleNamespace(restock=restocked.append),
                           restocked=restocked)


PORT = SimpleNamespace(ifname="vnet2-abc123", network="vnet2", vm="web1", uid=1000, parked=False)


def test_a_port_gets_its_guard_after_the_answer_under_the_lock():
    e = engine(FakePorts(PORT), FakeFirewall())

    async def run():
        async with e.lock:  # the engine is busy: the guard waits its turn
            task = asyncio.ensure_future(Engine.guard_port(e, PORT))
            await asyncio.sleep(0)
            assert e.firewall.calls == []
        await task

    asyncio.run(run())
    assert e.firewall.calls == [("guard", PORT.ifname)]
    assert e.events == []
    assert e.restocked == ["vnet2"]  # the spares are made again after the guard


def test_a_port_gone_before_its_guard_only_drops_its_pending_hold():
    e = engine(FakePorts(), FakeFirewall())
    asyncio.run(Engine.guard_port(e, PORT))
    assert e.firewall.calls == [("drop pending", PORT.ifname)]
    assert e.restocked == ["vnet2"]


def test_a_late_guard_leaves_the_pending_hold_of_a_new_port_of_the_same_name_alone():
    """Its port went before the guard came (an answer its reader left unread), and the same
    VM's new port took the name: that port's pending hold is its own, not to be dropped."""
    newer = SimpleNamespace(**vars(PORT))
    e = engine(FakePorts(newer), FakeFirewall())
    asyncio.run(Engine.guard_port(e, PORT))
    assert e.firewall.calls == []


def test_a_guard_the_kernel_refuses_cuts_the_port():
    e = engine(FakePorts(PORT), FakeFirewall(refuse=True))
    asyncio.run(Engine.guard_port(e, PORT))
    assert e.ports.detached == [PORT.ifname]  # its tap deleted: the holder's fd is dead
    assert e.firewall.calls == [("guard", PORT.ifname), ("drop pending", PORT.ifname)]
    assert e.events == [("port", PORT, "detached")]


def test_what_follows_an_answer_runs_to_its_end_when_the_answering_task_is_cancelled():
    done = []

    async def after():
        await asyncio.sleep(0.05)
        done.append(True)

    async def answering():
        await bus.finish(after)

    async def run():
        task = asyncio.ensure_future(answering())
        await asyncio.sleep(0.01)
        task.cancel()  # a session that ends while its last answer's guard goes in
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)

    asyncio.run(run())
    assert done == [True]


def test_a_failure_after_an_answer_is_logged_not_raised(caplog):
    async def after():
        raise RuntimeError("boom")

    asyncio.run(bus.finish(after))
    assert "after answering a call" in caplog.text and "boom" in caplog.text


def test_calls_written_back_to_back_are_each_answered_once_in_order():
    """A read takes what is there: a second call that came in the same read as the first
    waits in the session's buffer and is answered next, as is one split across reads."""
    import socket

    from vnetd.session import Session

    served: list[int] = []

    async def serve(msg, sender):
        served.append(msg.serial)
        return Message.new_method_return(msg, "s", [sender]), [], None

    async def finish(after):
        pass

    async def run():
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        s = Session(":1.7", 1000, ours, serve, finish)
        task = asyncio.ensure_future(s.run())
        calls = [Message(destination="org.qemuvnet.Vnet1", path="/p", interface="i.f", member="M",
                         serial=n)
                 ._marshall(False) for n in (1, 2, 3)]
        theirs.sendall(calls[0] + calls[1] + calls[2][:20])
        await asyncio.sleep(0.05)
        theirs.sendall(calls[2][20:])
        await asyncio.sleep(0.05)
        theirs.close()
        await asyncio.wait_for(task, 2)

    asyncio.run(run())
    assert served == [1, 2, 3]
