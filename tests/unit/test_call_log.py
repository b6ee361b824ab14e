"""The per-uid budget of per-call log lines (vnetd.bus.CallLog): a user calling in a loop gets
BURST lines and then RATE a second; what is held back is counted into the next line; root is
never held back; the buckets are bounded."""

from __future__ import annotations

from vnetd.bus import CallLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate_and_the_count_of_what_was_held_back():
    clock = Clock()
    log = CallLog(burst=5, rate=2.0, clock=clock)
    assert [log.take(1000) for _ in range(5)] == [0] * 5
    assert [log.take(1000) for _ in range(7)] == [None] * 7
    clock.now += 0.5  # one line's worth at 2 a second
    assert log.take(1000) == 7
    assert log.take(1000) is None
    clock.now += 100  # refills to the burst, no more
    assert [log.take(1000) for _ in range(5)] == [1, 0, 0, 0, 0]
    assert log.take(1000) is None


def test_one_users_loop_does_not_hold_back_anothers_lines_nor_roots():
    log = CallLog(burst=3, rate=0.0, clock=Clock())
    for _ in range(50):
        log.take(1000)
    assert log.take(1000) is None
    assert log.take(1001) == 0
    assert all(log.take(0) == 0 for _ in range(1000))


def test_the_buckets_are_bounded():
    log = CallLog(burst=1, rate=0.0, clock=Clock())
    for uid in range(1, CallLog.MAX_UIDS + 500):
        log.take(uid)
    assert len(log._buckets) == CallLog.MAX_UIDS


def test_what_was_held_back_is_said_once():
    log = CallLog(burst=1, rate=0.0, clock=Clock())
    assert log.take(1000) == 0
    assert log.take(1000) is None and log.take(1000) is None
    assert log.held(1000) == 2  # said in the line of a change, which is never held back
    assert log.held(1000) == 0 and log.held(1001) == 0
