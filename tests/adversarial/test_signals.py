"""vnetd's signals go to everyone on the system bus: they must not carry what the methods show
only to those who may see it. Bob (not in group vnet, no manage) listens while Alice's VM
takes a lease: Leases shows him nothing of hers, and neither may LeaseChanged (her VM's MAC,
address and hostname)."""

from __future__ import annotations

import json

import pytest

from tests.harness.daemon import ALICE, BOB, run_client
from tests.harness.users import run_as, spawn_as

from .lab import dhcp_bind

NET = "vnet8"

LISTEN = """
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
async def main():
    bus = await MessageBus(bus_type=__import__("dbus_fast").BusType.SYSTEM).connect()
    got = []
    def on(msg):
        if msg.message_type == MessageType.SIGNAL and msg.interface == "org.qemuvnet.Vnet1.Manager":
            got.append([msg.member, [str(b) for b in msg.body]])
    bus.add_message_handler(on)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           body=["type='signal',sender='org.qemuvnet.Vnet1'"]))
    print("listening", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    print(json.dumps(got), flush=True)
asyncio.run(main())
"""


@pytest.fixture(scope="module", autouse=True)
def network(vnetd, bob_may_attach):
    run_client("define", NET, check=True)
    run_client("start", NET, check=True)
    yield
    run_client("stop", NET)
    run_client("undefine", NET)


def test_lease_signals_carry_no_other_users_identity(vnetd, agents):
    bob = spawn_as(BOB, LISTEN)
    try:
        assert bob.stdout.readline().strip() == "listening", bob.stderr.read()
        alice = agents(ALICE, NET, "secretvm")
        assert alice.error is None, alice.hello
        ip = dhcp_bind(alice, xid=0x5160_0001)
        r = run_as(BOB, """
async def main():
    async with Client() as c:
        print(json.dumps(await c.leases(sys.argv[1])))
asyncio.run(main())
""", NET)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == [], "positive control: Leases hides alice's lease"
        import time
        time.sleep(1.5)  # the lease file poller's turn
        bob.stdin.write("\n")
        bob.stdin.flush()
        heard = json.loads(bob.stdout.readline())
    finally:
        bob.kill()
        bob.wait()
    leases = [body for member, body in heard if member == "LeaseChanged"]
    assert leases, f"positive control: bob heard the lease change happen: {heard}"
    text = json.dumps(heard).lower()
    for secret in (alice.mac.lower(), ip, "secretvm"):
        assert secret not in text, f"bob heard {secret} of alice's VM: {heard}"
