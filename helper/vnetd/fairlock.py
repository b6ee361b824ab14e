"""The engine's lock, shared fairly between callers.

Every change vnetd makes (an attach, a forward, a network's start) takes one lock, and a
change can cost milliseconds (files written durably, a firewall transaction). With a plain
FIFO lock, one user who keeps many changes in flight (24 forward changes at once from a
delegated manager's network, say) puts every other user's attach behind all of them: an
attach of 1 ms took 40 ms. Here the waiters queue per caller (the uid the bus is serving,
`caller_key`; vnetd's own background work is one more caller, None), and when the lock is
released it goes to the caller whose turn it is, round robin: another user waits for at
most one change of each user ahead of it, however many each has queued. Within one caller,
changes keep their order.

The lock is handed over directly on release (no other task can take it in between), and a
waiter cancelled after it was handed the lock hands it on.
"""

from __future__ import annotations

import asyncio
import collections
from contextvars import ContextVar
from typing import Any

# who the current task serves: set by the bus for each call (the caller's uid)
caller_key: ContextVar[Any] = ContextVar("vnetd_caller", default=None)


class FairLock:
    """An asyncio lock (``async with``) whose waiters are served by caller in turn."""

    def __init__(self) -> None:
        self._held = False
        # caller -> its waiters in order; the dict's order is the callers' turn
        self._queues: collections.OrderedDict[Any, collections.deque[asyncio.Future]] = (
            collections.OrderedDict())

    def locked(self) -> bool:
        return self._held

    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def acquire(self) -> bool:
        if not self._held and not self._queues:
            self._held = True
            return True
        key = caller_key.get()
        fut = asyncio.get_running_loop().create_future()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = collections.deque()
        queue.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # it was handed the lock as it was cancelled: hand it on
            else:
                self._forget(key, fut)
            raise
        return True

    def _forget(self, key: Any, fut: asyncio.Future) -> None:
        queue = self._queues.get(key)
        if queue is None:
            return
        try:
            queue.remove(fut)
        except ValueError:
            return
        if not queue:
            del self._queues[key]

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("FairLock released while not held")
        while self._queues:
            key, queue = next(iter(self._queues.items()))
            fut = queue.popleft()
            if queue:
                self._queues.move_to_end(key)  # its next waiter comes after everyone else's
            else:
                del self._queues[key]
            if not fut.done():
                fut.set_result(True)  # handed over: the lock stays held
                return
        self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()
