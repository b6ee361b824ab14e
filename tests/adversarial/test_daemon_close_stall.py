"""No caller may stall vnetd for everyone by what a close costs.

Removing a tap is a wait inside the kernel: some 15 ms here, up to 48 ms under load, under
its network lock; whoever closes a tap's last fd waits for it. vnetd waited for it on its
event loop in three ways a member of group vnet can repeat:

- Detach: vnetd deletes the tap, and the kernel answers the request once it is gone. While
  Alice attached and detached in a loop, 125 of root's 480 calls took over 10 ms (up to
  48 ms). The request goes from a worker thread now.
- an Attach that wants no reply: the port's fds were vnetd's alone, and closing them, on the
  loop, removed the tap. They are closed on a thread of their own now; what it has yet to
  close stays Alice's ports, within her quota.
- an Attach whose fds Alice closes the moment the reply comes: vnetd closed its copies once
  its write of the reply was done, and a quarter of the time hers were closed by then (34 of
  147 of vnetd's closes took over 5 ms, up to 33 ms). The reply now goes to dbus-daemon in
  two writes, vnetd's copies closed in between (vnetd.handover), so hers is the last close.

And anyone at all (Bob is not in group vnet) could send vnetd fds with a call, which vnetd
closed on its loop: a TCP socket with unsent data and SO_LINGER set held vnetd's loop for
its linger time (four such calls with 3 s each: root's call took 12.3 s). vnetd closes what
it is sent on a thread of its own, lingering turned off first.
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.harness import fdkinds
from tests.harness.daemon import ALICE, BOB, run_client
from tests.harness.users import read_json, spawn_as

ATTACK = """
import time
from dbus_fast import Message, MessageFlag
async def main():
    async with Client() as c:
        a = await c.attach("stallnet", "warm")
        a.close()
        print(json.dumps({"ready": True}), flush=True)
        t, n, refused = time.monotonic(), 0, 0
        while time.monotonic() - t < float(sys.argv[1]):
            if sys.argv[2] == "no-reply":  # vnetd makes the port and keeps its fds itself
                await c._bus.send(Message(
                    destination="org.qemuvnet.Vnet1", path="/org/qemuvnet/Vnet1",
                    interface="org.qemuvnet.Vnet1.Manager", member="Attach",
                    signature="ssa{sv}", body=["stallnet", f"nr{n}", {}],
                    flags=MessageFlag.NO_REPLY_EXPECTED))
                n += 1
                await asyncio.sleep(0.004)
                continue
            try:
                a = await c.attach("stallnet", f"vm{n % 400}")
            except VnetClientError:  # her quota
                refused += 1
                await asyncio.sleep(0.001)
                continue
            if sys.argv[2] == "detach":
                await c.detach(a.ifname)
            a.close()  # (close: at once, maybe before vnetd closed its own copy)
            n += 1
        print(json.dumps({"attaches": n, "refused": refused}), flush=True)
asyncio.run(main())
"""


async def _calls(seconds: float, session: bool = False) -> list[float]:
    """Root's calls meanwhile, and what each took: on the bus, or on a session (vnetd's
    own answers, without dbus-daemon between)."""
    from vnet_client import Client

    took = []
    async with Client() as c:
        if session:
            await c.open_session()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            await c.list_networks()
            took.append(time.perf_counter() - t)
            await asyncio.sleep(0.002)
    return took


@pytest.mark.parametrize("how", ["detach", "no-reply", "close"])
def test_closing_each_tap_at_once_does_not_stall_vnetd_for_others(vnetd, how):
    run_client("define", "stallnet", "--subnet=10.216.0.0/24", "--dhcp=none", check=True)
    run_client("start", "stallnet", check=True)
    attack = spawn_as(ALICE, ATTACK, "4", how)
    try:
        assert read_json(attack, 30) == {"ready": True}
        # (a tap Alice got through dbus-daemon is its last close now and then: its own
        # wait, and the bus's, which no service it passes fds for can prevent; vnetd's
        # answers are measured on a session)
        took = asyncio.run(_calls(4, session=how == "close"))
        out = read_json(attack, 60)
    finally:
        if attack.poll() is None:
            attack.kill()
        attack.wait()
    try:
        assert out["attaches"] >= 50, f"the attack made only {out} attaches"
        # (a loop that waits for the kernel to remove taps makes every call wait 15-48 ms,
        # dozens of them in 4 s; a few calls a little over 10 ms are the machine's two CPUs
        # busy with her ports)
        slow = sorted(round(t * 1000, 1) for t in took if t > 0.010)
        assert len(slow) <= 5, (
            f"{len(slow)} of {len(took)} calls took over 10 ms while Alice made {out['attaches']} "
            f"ports go ({how}; ms: {slow[-10:]}): vnetd's event loop waited for the kernel to "
            "remove her taps")
    finally:
        # what vnetd had yet to close or delete was hers, and goes: no port of hers is left
        # (and the network can go: the next attack defines it again)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            ports = json.loads(run_client("ports", "--json", check=True).stdout)
            if not [p for p in ports if p["network"] == "stallnet"]:
                break
            time.sleep(0.2)
        run_client("stop", "stallnet")
        run_client("undefine", "stallnet")
    assert not [p for p in ports if p["network"] == "stallnet"], (
        f"ports still attached 20 s after the attack: {ports}")

LINGER = fdkinds.SOURCE + """
import array
from dbus_fast import Message, MessageFlag
def call():
    return Message(destination="org.qemuvnet.Vnet1", path="/org/qemuvnet/Vnet1",
                   interface="org.qemuvnet.Vnet1.Manager", member="ListNetworks",
                   signature="h", body=[0], flags=MessageFlag.NO_REPLY_EXPECTED)
async def main():
    keep = []
    async with Client() as c:
        if sys.argv[3] == "session":
            await c.open_session()
        print(json.dumps({"ready": True}), flush=True)
        for i in range(int(sys.argv[2])):
            s = lingering(keep, int(sys.argv[1]))
            msg = call()
            if sys.argv[3] == "session":  # straight to vnetd, on his own session
                msg.serial = 1000 + i
                data = msg._marshall(True)
                c.session.sock.sendmsg([data[:1]], [(
                    socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))])
                s.close()  # before vnetd has the whole call: vnetd's copy is the last
                c.session.sock.sendall(data[1:])
            else:
                msg.unix_fds = [s.fileno()]
                await c._bus.send(msg)
                s.close()  # vnetd's or dbus-daemon's copy is the last
            await asyncio.sleep(0.2)
        print(json.dumps({"sent": int(sys.argv[2])}), flush=True)
        await asyncio.sleep(30)
asyncio.run(main())
"""


@pytest.mark.parametrize("path", ["bus", "session"])
def test_fds_anyone_sends_with_a_call_never_hold_vnetd_up(vnetd, path):
    attack = spawn_as(BOB, LINGER, "3", "4", path)
    try:
        assert read_json(attack, 30) == {"ready": True}
        # on the bus: whoever drops the last copy waited (vnetd, or dbus-daemon once
        # vnetd had closed its copy first), and either way root's calls with it
        took = asyncio.run(_calls(2.5))
        assert read_json(attack, 30) == {"sent": 4}
    finally:
        attack.kill()
        attack.wait()
    slow = sorted(round(t * 1000, 1) for t in took if t > 0.5)
    assert len(took) > 50 and not slow, (
        f"{len(slow)} of {len(took)} calls took over 0.5 s (ms: {slow}) while Bob sent vnetd "
        f"four lingering sockets ({path}): their last close waited out the linger time")
