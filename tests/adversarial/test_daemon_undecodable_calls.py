"""No caller may end vnetd's bus connection with a call it cannot decode.

libdbus, and so dbus-daemon, allows 64 levels of nesting, counted its way; dbus-fast counts
an array of bytes inside 64 variants as a 65th and refuses the message. dbus-fast's reader
took any message it could not decode for a broken connection and ended it, and vnetd exits
when it loses the bus: Bob (not in group vnet) stopped vnetd with one call of 352 bytes.
vnetd's reader (busreader) drops such a message alone and answers InvalidArgs."""

from __future__ import annotations

import asyncio
import json

from tests.harness.daemon import BOB
from tests.harness.users import run_as

from .test_daemon_close_stall import _calls

NESTED = """
from dbus_fast import Message, Variant
async def main():
    v = Variant("ay", b"")
    for _ in range(63):
        v = Variant("v", v)
    async with Client() as c:
        msg = Message(destination="org.qemuvnet.Vnet1", path="/org/qemuvnet/Vnet1",
                      interface="org.qemuvnet.Vnet1.Manager", member="ListNetworks",
                      signature="v", body=[v])
        try:
            r = await asyncio.wait_for(c._bus.call(msg), 20)
            out = {"error": r.error_name, "text": r.body[0] if r.body else ""}
        except Exception as e:
            out = {"failed": repr(e)[:300]}
        print(json.dumps(out), flush=True)
asyncio.run(main())
"""


def test_a_call_nested_past_what_dbus_fast_decodes_is_refused_and_vnetd_stays(vnetd):
    r = run_as(BOB, NESTED, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert vnetd.alive(), "vnetd exited: it lost its bus connection over one call"
    assert out.get("error") == "org.freedesktop.DBus.Error.InvalidArgs", out
    assert out["text"].startswith("The call could not be decoded ("), out
    took = asyncio.run(_calls(1.0))  # and vnetd answers everyone on the bus as before
    assert len(took) > 10
