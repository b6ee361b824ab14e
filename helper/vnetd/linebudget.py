"""How many log lines a source may have: a token bucket per key (BURST lines at once, then
RATE a second). What is held back is counted and said in that key's next line, so the log
stays honest about what it left out. Bounded: MAX_KEYS buckets, the least recently used go
first. Used for refused calls per uid (bus.CallLog) and for the output of each child
(children/supervisor.py), whose lines a guest's traffic can cause."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class LineBudget:
    MAX_KEYS = 4096

    def __init__(self, burst: float, rate: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.rate, self.clock = burst, rate, clock
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()  # [tokens, at, held]

    def take(self, key: Hashable) -> int | None:
        """None: hold this line back. Otherwise log it, with the count of lines held back
        since the last one of this key."""
        now = self.clock()
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = [self.burst, now, 0]
            while len(self._buckets) > self.MAX_KEYS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        if b[0] < 1:
            b[2] += 1
            return None
        b[0] -= 1
        held, b[2] = int(b[2]), 0
        return held

    def held(self, key: Hashable) -> int:
        """The lines of this key held back since its last line (said now, so counted no
        more)."""
        b = self._buckets.get(key)
        if b is None or not b[2]:
            return 0
        held, b[2] = int(b[2]), 0
        return held
