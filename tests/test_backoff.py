"""The one reconnect pause: exponential ceilings, full jitter, reset on success."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from dispatcher.backoff import Backoff


def test_delays_are_full_jitter_under_a_doubling_capped_ceiling() -> None:
    backoff = Backoff(0.5, 4.0, random.Random(7))
    expected = random.Random(7)
    for ceiling in (0.5, 1.0, 2.0, 4.0, 4.0, 4.0):
        assert backoff.ceiling() == ceiling
        assert backoff.next_delay() == expected.uniform(0, ceiling)


def test_full_jitter_reaches_near_zero_and_near_the_ceiling() -> None:
    backoff = Backoff(1.0, 1.0, random.Random(1))
    delays = [backoff.next_delay() for _ in range(2000)]
    assert all(0 <= d <= 1.0 for d in delays)
    # Full jitter, not "equal jitter": the lower half is used as well.
    assert min(delays) < 0.05 and max(delays) > 0.95


def test_reset_goes_back_to_the_shortest_delays() -> None:
    backoff = Backoff(0.1, 10.0, random.Random(3))
    for _ in range(8):
        backoff.next_delay()
    assert backoff.ceiling() == 10.0
    backoff.reset()
    assert backoff.ceiling() == 0.1
    assert backoff.next_delay() <= 0.1


def test_a_loop_that_fails_for_days_does_not_overflow() -> None:
    backoff = Backoff(0.1, 30.0, random.Random(0), attempt=100_000)
    assert backoff.ceiling() == 30.0
    assert 0 <= backoff.next_delay() <= 30.0


@pytest.mark.parametrize(("initial", "maximum"), [(0, 1), (-1, 1), (1, -1)])
def test_nonsense_bounds_are_refused(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(initial, maximum)


async def test_sleep_waits_the_drawn_delay_on_trios_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backoff = Backoff(2.0, 8.0, random.Random(5))
    expected = random.Random(5)
    for ceiling in (2.0, 4.0, 8.0):
        started = trio.current_time()
        await backoff.sleep()
        assert trio.current_time() - started == pytest.approx(expected.uniform(0, ceiling))
