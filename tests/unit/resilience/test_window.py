"""Sliding windows: running totals always equal a recount of what is in the window."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from seamwork.resilience._window import FAILURE, SLOW, CountWindow, TimeWindow

outcomes = st.sampled_from([0, FAILURE, SLOW, FAILURE | SLOW])


def _totals(kept: list[int]) -> tuple[int, int, int]:
    return len(kept), sum(o & FAILURE for o in kept), sum(1 for o in kept if o & SLOW)


@given(size=st.integers(1, 12), seq=st.lists(outcomes, max_size=60))
def test_count_window_totals_match_the_last_n_outcomes(size: int, seq: list[int]) -> None:
    window = CountWindow(size)
    for i, outcome in enumerate(seq):
        window.record(0.0, outcome)
        kept = seq[max(0, i + 1 - size) : i + 1]
        assert (window.calls, window.failures, window.slow) == _totals(kept)


@settings(max_examples=150)
@given(
    buckets=st.integers(1, 8),
    steps=st.lists(st.tuples(st.floats(0, 3.0), outcomes), max_size=60),
)
def test_time_window_totals_match_a_recount_of_live_slices(
    buckets: int, steps: list[tuple[float, int]]
) -> None:
    window, width = TimeWindow(4.0, buckets), 4.0 / buckets
    now, log = 0.0, []
    for gap, outcome in steps:
        now += gap
        window.record(now, outcome)
        log.append((math.floor(now / width), outcome))
        head = math.floor(now / width)
        kept = [o for index, o in log if index > head - buckets]
        assert (window.calls, window.failures, window.slow) == _totals(kept)


def test_time_window_forgets_everything_after_a_long_silence() -> None:
    window = TimeWindow(10.0, 10)
    for _ in range(5):
        window.record(1.0, FAILURE)
    window.refresh(100.0)
    assert (window.calls, window.failures) == (0, 0)
