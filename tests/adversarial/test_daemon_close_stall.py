"""A user who closes (or detaches) each tap the moment it arrives must not stall vnetd for
everyone.

The last close of a tap makes the kernel remove it, which takes it 15 to 35 ms here. On the
bus, vnetd closed its copy of a port's fd once the reply carrying it had been written, on its
event loop; Alice's client, closing its copy as soon as the reply came, often left vnetd's
the last, and vnetd stalled that long, for every caller, once per such attach. Measured:
while Alice attached and closed in a loop, 72 of root's ListNetworks calls took over 10 ms
(the slowest 40 ms; 2 ms without her). vnetd now closes what it hands out on a thread of its
own; what that thread has yet to close stays Alice's ports, within her quota.

Detach is the same wait another way: vnetd deletes the tap, and the kernel answers the
request once the tap is gone. Sent from the event loop, each of Alice's detaches stalled
everyone (152 calls over 10 ms, up to 42 ms); the request goes from a worker thread now.
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
async def main():
    async with Client() as c:  # on the bus (a session's answer leaves the last copy to her)
        a = await c.attach("stallnet", "warm")
        a.close()
        print(json.dumps({"ready": True}), flush=True)
        t, n, refused = time.monotonic(), 0, 0
        while time.monotonic() - t < float(sys.argv[1]):
            try:
                a = await c.attach("stallnet", f"vm{n % 400}")
            except VnetClientError:  # her quota, or a VM whose last tap is still going
                refused += 1
                await asyncio.sleep(0.001)
                continue
            if sys.argv[2] == "detach":
                await c.detach(a.ifname)
            a.close()  # at once, before vnetd gets to close its own copy
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


@pytest.mark.parametrize("how", ["close", "detach"])
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
            f"{len(slow)} of {len(took)} calls took over 10 ms while Alice attached and "
            f"{how}-ed {out['attaches']} taps (ms: {slow[-10:]}): vnetd's event loop waited "
            "for the kernel to remove her taps")
        # what vnetd had yet to close was hers, and goes: no port of hers is left
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
