"""The engine's lock serves callers in turn: one caller's queue of changes cannot keep
another caller waiting behind all of it."""

from __future__ import annotations

import asyncio
import random

import pytest
from vnetd.fairlock import FairLock, caller_key


async def _holder(lock: FairLock, who, order: list, hold: float = 0.0) -> None:
    caller_key.set(who)
    async with lock:
        order.append(who)
        await asyncio.sleep(hold)


def test_a_caller_with_one_change_waits_behind_one_of_each_other_caller():
    async def scene():
        lock, order = FairLock(), []
        await lock.acquire()  # (held: everyone below queues)
        tasks = [asyncio.ensure_future(_holder(lock, "bob", order)) for _ in range(10)]
        await asyncio.sleep(0)
        tasks.append(asyncio.ensure_future(_holder(lock, "alice", order)))
        tasks += [asyncio.ensure_future(_holder(lock, "carol", order)) for _ in range(2)]
        await asyncio.sleep(0)
        assert lock.waiting() == 13
        lock.release()
        await asyncio.gather(*tasks)
        return order, lock

    order, lock = asyncio.run(scene())
    # in turn: bob, alice, carol, bob, carol, then bob's others; each caller's in order
    assert order[:5] == ["bob", "alice", "carol", "bob", "carol"]
    assert order[5:] == ["bob"] * 8
    assert not lock.locked() and lock.waiting() == 0


def test_a_plain_fifo_lock_would_have_kept_alice_behind_all_of_bobs():
    """The control: what the engine's lock was."""
    async def scene():
        lock, order = asyncio.Lock(), []
        await lock.acquire()
        tasks = [asyncio.ensure_future(_holder(lock, "bob", order)) for _ in range(10)]
        await asyncio.sleep(0)
        tasks.append(asyncio.ensure_future(_holder(lock, "alice", order)))
        await asyncio.sleep(0)
        lock.release()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scene()).index("alice") == 10


def test_a_waiter_cancelled_before_or_after_its_turn_never_loses_the_lock():
    async def scene():
        lock, order = FairLock(), []
        await lock.acquire()
        a = asyncio.ensure_future(_holder(lock, "a", order))
        b = asyncio.ensure_future(_holder(lock, "b", order))
        c = asyncio.ensure_future(_holder(lock, "c", order))
        await asyncio.sleep(0)
        a.cancel()  # before its turn: it leaves the queue
        await asyncio.sleep(0)
        lock.release()  # handed to b ...
        b.cancel()  # ... which is cancelled before it runs: b hands it on to c
        await asyncio.gather(a, b, c, return_exceptions=True)
        assert order == ["c"] and not lock.locked() and lock.waiting() == 0
        async with lock:  # and the lock works after all that
            pass

    asyncio.run(scene())


def test_release_of_a_lock_not_held_is_an_error():
    with pytest.raises(RuntimeError):
        FairLock().release()


def test_many_callers_at_random_never_hold_it_together():
    async def scene():
        lock, inside, order = FairLock(), [0], []

        async def one(who):
            caller_key.set(who)
            for _ in range(rng.randrange(1, 6)):
                async with lock:
                    inside[0] += 1
                    assert inside[0] == 1
                    order.append(who)
                    await asyncio.sleep(rng.choice((0, 0, 0.001)))
                    inside[0] -= 1
                if rng.random() < 0.3:
                    await asyncio.sleep(0)

        tasks = [asyncio.ensure_future(one(rng.choice("abcdef"))) for _ in range(60)]
        for t in rng.sample(tasks, 10):  # some give up while waiting, or while inside
            t.cancel()
            await asyncio.sleep(rng.choice((0, 0.0005)))
        await asyncio.gather(*tasks, return_exceptions=True)
        assert not lock.locked() and lock.waiting() == 0 and order

    for seed in range(20):
        rng = random.Random(seed)
        asyncio.run(scene())


async def test_vnetds_own_scheduled_work_is_its_own_caller_whoever_scheduled_it(tmp_path):
    """A user's call that starts background work (a lease pass, a guard for a learned MAC)
    does not make that work wait in the user's own queue for the lock."""
    from vnetd.engine import Engine
    from vnetd.store import Store

    from tests.unit.test_limits import NoLinks

    e = Engine(Store(tmp_path / "etc", tmp_path / "var", tmp_path / "run"), NoLinks())
    seen = []

    async def work():
        seen.append(caller_key.get())

    caller_key.set(1000)  # (as the bus sets it for a call of uid 1000)
    e.schedule(work())
    for _ in range(5):
        await asyncio.sleep(0)
    assert seen == [None]
