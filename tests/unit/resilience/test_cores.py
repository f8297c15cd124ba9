"""Stateful tests of the bulkhead, rate limiter and retry budget cores."""

import math
from collections import deque
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from seamwork.resilience._budget import BudgetCore
from seamwork.resilience._bulkhead import Admission
from seamwork.resilience._ratelimit import Gcra

FAST = settings(max_examples=100, stateful_step_count=50, deadline=None)


class AdmissionRules(RuleBasedStateMachine):
    """Model: a set of running callers and a FIFO of waiting ones."""

    @initialize(limit=st.integers(1, 4), queue=st.integers(0, 4))
    def setup(self, limit: int, queue: int) -> None:
        self.core: Admission[int] = Admission(limit, queue)
        self.limit, self.queue_limit = limit, queue
        self.running: list[int] = []
        self.waiting: deque[int] = deque()
        self.next_id = 0

    @rule()
    def arrive(self) -> None:
        caller, self.next_id = self.next_id, self.next_id + 1
        if self.core.try_enter():
            assert len(self.running) < self.limit
            assert not self.waiting
            self.running.append(caller)
        elif self.core.enqueue(caller):
            self.waiting.append(caller)
        else:
            assert len(self.waiting) == self.queue_limit

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        self.running.remove(data.draw(st.sampled_from(self.running)))
        successor = self.core.leave()
        if self.waiting:
            assert successor == self.waiting.popleft(), "slots are handed over in FIFO order"
            self.running.append(successor)
        else:
            assert successor is None

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def give_up(self, data: st.DataObject) -> None:
        caller = data.draw(st.sampled_from(list(self.waiting)))
        assert self.core.abandon(caller)
        self.waiting.remove(caller)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def give_up_too_late(self, data: st.DataObject) -> None:
        assert not self.core.abandon(data.draw(st.sampled_from(self.running)))

    @invariant()
    def never_over_the_limits(self) -> None:
        assert self.core.active == len(self.running) <= self.limit
        assert list(self.core.queue) == list(self.waiting)
        assert len(self.core.queue) <= self.queue_limit
        assert not self.waiting or self.core.active == self.limit


TestAdmission = AdmissionRules.TestCase
TestAdmission.settings = FAST


class GcraRules(RuleBasedStateMachine):
    """Every interval [t_i, t_j] between admissions holds <= rate * (t_j - t_i) + burst."""

    @initialize(rate=st.sampled_from([0.5, 1.0, 3.0, 10.0, 7.3]), burst=st.integers(1, 6))
    def setup(self, rate: float, burst: int) -> None:
        self.core, self.rate, self.burst = Gcra(rate, burst), rate, burst
        self.now = 0.0
        self.admitted: list[tuple[float, int]] = []
        self.reservations: list[tuple[float, int, tuple[float, int]]] = []  # (tat, cost, slot)

    @rule(seconds=st.floats(0.0, 2.0))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule(cost=st.integers(1, 3), max_wait=st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    def take(self, cost: int, max_wait: float) -> None:
        cost = min(cost, self.burst)
        wait = self.core.reserve(self.now, cost, max_wait)
        if wait is not None:
            assert 0.0 <= wait <= max_wait + 1e-6
            slot = (self.now + wait, cost)
            self.admitted.append(slot)
            if wait > 0:
                self.reservations.append((self.core.tat, cost, slot))

    @rule(pick=st.integers(0, 5))
    def cancel_a_waiter(self, pick: int) -> None:
        """A waiter still sleeping gives its place back only if it is the latest."""
        self.reservations = [r for r in self.reservations if r[2][0] > self.now]  # ran
        if not self.reservations:
            return
        tat, cost, slot = self.reservations.pop(pick % len(self.reservations))
        latest = self.core.tat == tat
        assert self.core.cancel(tat, cost) is latest
        if latest:
            self.admitted.remove(slot)  # it never runs

    @invariant()
    def no_interval_exceeds_rate_times_length_plus_burst(self) -> None:
        starts = sorted(self.admitted)
        for i, (t_i, _) in enumerate(starts):
            total = 0
            for t_j, cost in starts[i:]:
                total += cost
                assert total <= self.rate * (t_j - t_i) + self.burst + 1e-6


TestGcra = GcraRules.TestCase
TestGcra.settings = FAST


def test_gcra_admits_exactly_a_burst_from_idle_then_the_rate() -> None:
    core = Gcra(rate=10.0, burst=5)
    assert [core.reserve(100.0) is not None for _ in range(6)] == [True] * 5 + [False]
    assert core.reserve(100.1) is not None
    assert core.reserve(100.1) is None


@pytest.mark.parametrize("now", [1e6, 1e7, 3e7, 1e8])  # monotonic readings: 12 days to 3 years up
@pytest.mark.parametrize(("rate", "burst"), [(10.0, 1), (3.0, 5), (1000.0, 10), (7.0, 100)])
def test_gcra_admits_a_full_burst_from_idle_on_a_long_running_clock(
    now: float, rate: float, burst: int
) -> None:
    # Absolute clock readings lose the low bits of a reservation: on a host up for a
    # year, a limiter of 10/s refused the very first call from idle.
    core = Gcra(rate, burst)
    assert [core.reserve(now) is not None for _ in range(burst + 1)] == [True] * burst + [False]
    later = now + 1.5 / rate  # (now + 1 / rate itself rounds, to a reading a bit early)
    assert core.reserve(later) is not None  # one interval later: one more token
    assert core.reserve(later) is None


def test_gcra_admits_a_full_burst_of_a_wide_bucket() -> None:
    # 250 an hour, bursts of 3,000: the bucket spans 12 hours, and 3,000 rounded
    # additions of an interval overshot a slack of a nanosecond.
    core = Gcra(rate=250 / 3600, burst=3000)
    assert sum(core.reserve(0.0) is not None for _ in range(3001)) == 3000


class ExactGcra:
    """The GCRA in exact arithmetic: an absolute TAT, as the algorithm is written."""

    def __init__(self, interval: float, burst: int) -> None:
        self.interval, self.burst = Fraction(interval), burst
        self.tat: Fraction | None = None

    def reserve(self, now: float, cost: int, max_wait: float) -> Fraction | None:
        at = Fraction(now)
        new_tat = max(self.tat, at) if self.tat is not None else at
        new_tat += cost * self.interval
        wait = new_tat - at - self.burst * self.interval
        if wait > Fraction(max_wait):
            return None
        self.tat = new_tat
        return max(wait, Fraction(0))

    def available(self, now: float) -> Fraction:
        ahead = max((self.tat or Fraction(now)) - Fraction(now), Fraction(0))
        return max(self.burst - ahead / self.interval, Fraction(0))


@given(
    uptime=st.sampled_from([0.0, 2.0**20, 2.0**30, 2.0**33]),
    interval=st.integers(-6, 4).map(lambda n: 2.0**n),
    burst=st.integers(1, 20),
    calls=st.lists(
        st.tuples(st.integers(0, 64), st.integers(1, 3), st.integers(0, 8), st.booleans()),
        max_size=40,
    ),
)
def test_gcra_decides_as_exact_arithmetic_does_at_any_uptime(
    uptime: float, interval: float, burst: int, calls: list[tuple[int, int, int, bool]]
) -> None:
    """On readings and intervals floats hold exactly, the TAT kept as a reading plus an
    offset admits, delays, gives back and counts tokens exactly as the algorithm says,
    up to 270 years of uptime."""
    core, exact, now = Gcra(1 / interval, burst), ExactGcra(interval, burst), uptime
    for sixteenths, cost, quarters, cancel in calls:
        now += sixteenths / 16
        cost, max_wait = min(cost, burst), quarters * interval / 4
        wait = core.reserve(now, cost, max_wait)
        expected = exact.reserve(now, cost, max_wait)
        assert wait == expected  # (None for a refusal)
        if wait is not None and cancel:  # the latest reservation: given back
            assert core.cancel(core.tat, cost)
            assert exact.tat is not None
            exact.tat -= cost * exact.interval
        assert core.available(now) == exact.available(now)


class BudgetRules(RuleBasedStateMachine):
    """The budget's counts equal a recount of the live window, and it obeys its rule."""

    @initialize(ratio=st.sampled_from([0.1, 0.2, 0.5, 1.0]), floor=st.integers(0, 3))
    def setup(self, ratio: float, floor: int) -> None:
        self.core = BudgetCore(ratio, floor, window=10.0, buckets=5)
        self.ratio, self.floor, self.width = ratio, floor, 2.0
        self.now = 0.0
        self.log: list[tuple[int, bool]] = []

    def _live(self) -> tuple[int, int]:
        head = math.floor(self.now / self.width)
        live = [retry for index, retry in self.log if index > head - 5]
        return live.count(False), live.count(True)

    @rule(seconds=st.floats(0.0, 4.0))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def call(self) -> None:
        self.core.record_call(self.now)
        self.log.append((math.floor(self.now / self.width), False))

    @rule()
    def retry(self) -> None:
        calls, retries = self._live()
        allowed = self.core.try_spend(self.now)
        assert allowed == (retries + 1 <= self.ratio * calls + self.floor)
        if allowed:
            self.log.append((math.floor(self.now / self.width), True))

    @invariant()
    def counts_match_the_live_window(self) -> None:
        assert self.core.counts(self.now) == self._live()


TestBudget = BudgetRules.TestCase
TestBudget.settings = FAST


def test_budget_holds_under_sustained_failure() -> None:
    core = BudgetCore(ratio=0.2, min_retries=5, window=10.0, buckets=10)
    calls = retries = 0
    for tick in range(20_000):  # 200 s at 100 calls/s; every call fails and wants 2 retries
        now = tick / 100
        core.record_call(now)
        calls += 1
        retries += sum(core.try_spend(now) for _ in range(2))
    windows = 200 / 10 + 1
    assert retries <= 0.2 * calls + 5 * windows
    assert retries >= 0.19 * calls  # the budget is spent, not starved
