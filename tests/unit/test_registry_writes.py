"""The MAC registry's forget, transfer and import are written off vnetd's event loop, and a
write that fails changes nothing.

A network's registry file is written durably (fsync): a millisecond here, far more on a busy
disk. Written on the event loop, every such call of a network's manager held up every other
user's calls meanwhile (attaches included), as often as the manager liked to call.
"""

from __future__ import annotations

import asyncio
import errno
import threading

import pytest
from vnetd.errors import Failed

from tests.unit.test_limits import ALICE, engine, net  # noqa: F401 (a fixture)

NOBODY = 65534  # a uid with a passwd entry (TransferVm checks it)

CHANGES = {
    "forget": lambda e: e.vms.forget_mac("n1", "web"),
    "transfer": lambda e: e.vms.transfer("n1", "web", NOBODY),
    "import": lambda e: e.vms.import_macs("n1", {"db": "52:54:00:00:00:42"}),
}


async def _with_web(engine):  # noqa: F811 (the fixture's name)
    await engine.definitions.define(net("n1"), 0)
    mac = await engine.vms.get_mac("n1", "web", 0, ALICE)
    return mac


def _gated_save(engine, gate: threading.Event, seen: list):  # noqa: F811
    """The registry's save, held until `gate` opens (at most 5 s); `seen` records the thread
    it ran on and when it returned."""
    real = engine.macs._save

    def save(network, macs, creators):
        seen.append(("save on", threading.current_thread() is threading.main_thread()))
        gate.wait(5)
        real(network, macs, creators)
        seen.append(("saved", network))

    engine.macs._save = save
    return real


@pytest.mark.parametrize("change", sorted(CHANGES))
async def test_a_registry_change_is_written_off_the_event_loop(engine, change):  # noqa: F811
    """While one network's file is being written, the loop serves other calls (here: one
    that opens the gate the write waits at). Written on the loop, the write waited out its
    gate first (5 s), and the other call came after it."""
    await _with_web(engine)
    gate, seen = threading.Event(), []
    _gated_save(engine, gate, seen)

    async def another_call():
        await asyncio.sleep(0.05)
        seen.append(("another call served", None))
        gate.set()

    other = asyncio.ensure_future(another_call())
    await asyncio.wait_for(CHANGES[change](engine), 10)
    await other
    assert seen[0] == ("save on", False)  # a thread of its own, not the loop's
    assert seen.index(("another call served", None)) < seen.index(("saved", "n1"))


@pytest.mark.parametrize("change", sorted(CHANGES))
async def test_a_registry_change_whose_write_fails_changes_nothing(engine, change):  # noqa: F811
    mac = await _with_web(engine)
    before = (dict(engine.macs.data["n1"]), dict(engine.macs.creators["n1"]))
    real = engine.macs._save

    def full_disk(network, macs, creators):
        raise OSError(errno.ENOSPC, "No space left on device")

    engine.macs._save = full_disk
    with pytest.raises(Failed) as e:
        await CHANGES[change](engine)
    assert e.value.message == ("Could not write the MAC registry of n1 (No space left on "
                               "device); nothing was changed.")
    assert (engine.macs.data["n1"], engine.macs.creators["n1"]) == before
    assert engine.macs.lookup("n1", "web", 0) == mac
    assert engine.macs.owner_uid("n1", "web") == ALICE
    engine.macs._save = real  # the disk has room again: the same change goes through
    await CHANGES[change](engine)
    assert (engine.macs.data.get("n1"), engine.macs.creators.get("n1")) != before


async def test_getmac_waits_for_a_change_of_its_network_being_written(engine):  # noqa: F811
    """A forget is made only once written; a GetMac for a new VM of that network meanwhile
    waits for it, so that its own write (of the state after the forget) cannot bring the
    forgotten VM back, and the file ends as the registry is."""
    await _with_web(engine)
    await engine.definitions.define(net("n2"), 0)
    gate, seen = threading.Event(), []
    real = _gated_save(engine, gate, seen)
    forget = asyncio.ensure_future(engine.vms.forget_mac("n1", "web"))
    await asyncio.sleep(0.05)  # its write has begun, and waits at the gate
    engine.macs._save = real  # (the GetMac's own write is not held)
    getmac = asyncio.ensure_future(engine.vms.get_mac("n1", "db", 0, ALICE))
    other = asyncio.ensure_future(engine.vms.get_mac("n2", "x", 0, ALICE))
    await asyncio.wait_for(other, 5)  # another network's GetMac does not wait
    await asyncio.sleep(0.05)
    assert not getmac.done()  # this network's does
    gate.set()
    assert await asyncio.wait_for(forget, 5) == 1
    await asyncio.wait_for(getmac, 5)
    on_disk = engine.store.load_json("n1.macs.json", None)
    assert set(on_disk["macs"]) == {"db/0"} and set(on_disk["creators"]) == {"db"}
    assert set(engine.macs.data["n1"]) == {"db/0"}
