"""A user who makes vnetd remove her taps at a high rate must not stall it for everyone.

Removing a tap is a wait inside the kernel: some 15 ms here, up to 48 ms under load, under
its network lock. vnetd asked for it on its event loop in two ways a user can repeat:

- Detach: vnetd deletes the tap, and the kernel answers the request once it is gone. While
  Alice attached and detached in a loop, 125 of root's 480 calls took over 10 ms (up to
  48 ms). The request goes from a worker thread now.
- an Attach that wants no reply: the port's fds were vnetd's alone, and closing them, on the
  loop, removed the tap. They are closed on a thread of their own now; what it has yet to
  close stays Alice's ports, within her quota.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.harness.daemon import ALICE, run_client
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
            await c.detach(a.ifname)
            a.close()
            n += 1
        print(json.dumps({"attaches": n, "refused": refused}), flush=True)
asyncio.run(main())
"""


async def _calls(seconds: float) -> list[float]:
    from vnet_client import Client

    took = []
    async with Client() as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            await c.list_networks()
            took.append(time.perf_counter() - t)
            await asyncio.sleep(0.002)
    return took


@pytest.mark.parametrize("how", ["detach", "no-reply"])
def test_closing_each_tap_at_once_does_not_stall_vnetd_for_others(vnetd, how):
    run_client("define", "stallnet", "--subnet=10.216.0.0/24", "--dhcp=none", check=True)
    run_client("start", "stallnet", check=True)
    attack = spawn_as(ALICE, ATTACK, "4", how)
    try:
        assert read_json(attack, 30) == {"ready": True}
        took = asyncio.run(_calls(4))
        out = read_json(attack, 60)
    finally:
        if attack.poll() is None:
            attack.kill()
        attack.wait()
    try:
        assert out["attaches"] >= 50, f"the attack made only {out} attaches"
        slow = sorted(round(t * 1000, 1) for t in took if t > 0.010)
        assert len(slow) <= 2, (
            f"{len(slow)} of {len(took)} calls took over 10 ms while Alice made {out['attaches']} "
            f"ports go ({how}; ms: {slow[-10:]}): vnetd's event loop waited for the kernel to "
            "remove her taps")
        # what vnetd had yet to close or delete was hers, and goes: no port of hers is left
        end = time.monotonic() + 20
        while time.monotonic() < end:
            ports = json.loads(run_client("ports", "--json", check=True).stdout)
            if not [p for p in ports if p["network"] == "stallnet"]:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"ports still attached 20 s after the attack: {ports}")
    finally:
        run_client("stop", "stallnet")
        run_client("undefine", "stallnet")
