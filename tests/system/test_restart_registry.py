"""A crash between an attach and the write of its MAC to the registry loses nothing: the
port's runtime record holds the MAC, and the restart puts it back into the registry. It is
written once per network, off the event loop, while vnetd already answers (one durable
write per port, before answering, held the first answer after a crash 3 s at 5,000 ports)."""

from __future__ import annotations

import json
import time

from tests.harness.daemon import ALICE, run_client
from tests.harness.users import read_json, spawn_as

NET = "regcrash"

HOLD = """
async def main():
    async with Client() as c:
        ports = [await c.attach(sys.argv[1], f"fresh{i}") for i in range(3)]
        print(json.dumps({p.vm: p.mac for p in ports}), flush=True)
        await asyncio.sleep(120)
asyncio.run(main())
"""

GETMAC = """
async def main():
    async with Client() as c:
        print(json.dumps({vm: await c.get_mac(sys.argv[1], vm) for vm in sys.argv[2:]}))
asyncio.run(main())
"""


def _entries(vnetd) -> dict:
    return json.loads((vnetd.state_dir / f"{NET}.macs.json").read_text())


def test_macs_a_crash_kept_from_the_registry_come_back_with_the_restart(vnetd):
    run_client("define", NET, "--subnet=10.219.0.0/24", "--dhcp=none", check=True)
    run_client("start", NET, check=True)
    holder = spawn_as(ALICE, HOLD, NET)
    try:
        macs = read_json(holder, 30)
        assert len(set(macs.values())) == 3
        time.sleep(0.5)  # (written by now)
        vnetd.kill()
        # as if the crash had come before the registry's write: the file without them
        path = vnetd.state_dir / f"{NET}.macs.json"
        on_disk = json.loads(path.read_text())
        text = json.dumps(on_disk)
        assert all(mac in text for mac in macs.values())
        for section in on_disk.values():
            if isinstance(section, dict):
                for k in [k for k in section if k.startswith("fresh")]:
                    del section[k]
        path.write_text(json.dumps(on_disk))
        assert not any(mac in path.read_text() for mac in macs.values())
        vnetd.start()
        # on disk again soon after, with nothing else asking for it (a call that gives out
        # a MAC would write what is pending too)
        end = time.monotonic() + 10
        while time.monotonic() < end and not all(
                mac in path.read_text() for mac in macs.values()):
            time.sleep(0.1)
        assert all(mac in path.read_text() for mac in macs.values()), path.read_text()
        r = spawn_as(ALICE, GETMAC, NET, *macs)  # and the VMs' MACs are theirs still
        assert read_json(r, 30) == macs
    finally:
        holder.kill()
        holder.wait()
        run_client("stop", NET, "--force")
        run_client("undefine", NET)
