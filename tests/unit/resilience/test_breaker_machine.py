"""The breaker's pure machine, driven by hypothesis under a manual clock."""

from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from seamwork.resilience._breaker_machine import (
    REJECT,
    WAIT,
    BreakerConfig,
    BreakerMachine,
    BreakerState,
)
from seamwork.resilience._window import FAILURE, SLOW

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
SLOW_CALL = 1.0


class BreakerRules(RuleBasedStateMachine):
    """Model: a count window of the current generation's outcomes, and probe counts."""

    @initialize(
        minimum=st.integers(1, 5),
        extra=st.integers(0, 5),
        rate=st.sampled_from([0.2, 0.25, 0.5, 0.75, 1.0]),
        slow_rate=st.sampled_from([0.5, 1.0]),
        slow_enabled=st.booleans(),
        probes=st.integers(1, 4),
        mode=st.sampled_from(["reject", "wait"]),
    )
    def setup(
        self,
        minimum: int,
        extra: int,
        rate: float,
        slow_rate: float,
        slow_enabled: bool,
        probes: int,
        mode: str,
    ) -> None:
        self.config = BreakerConfig(
            failure_rate=rate,
            minimum_calls=minimum,
            window_calls=minimum + extra,
            reset_timeout=30.0,
            half_open_calls=probes,
            half_open_mode=mode,  # type: ignore[arg-type]
            slow_call=SLOW_CALL if slow_enabled else None,
            slow_call_rate=slow_rate,
        )
        self.machine = BreakerMachine(self.config)
        self.now = 0.0
        self.in_flight: list[int] = []
        self.model: deque[int] = deque(maxlen=minimum + extra)
        self.probes_admitted = 0
        self.permits_returned = 0
        self.seen_generation = 0

    def _sync_generation(self) -> None:
        if self.machine.generation != self.seen_generation:
            self.seen_generation = self.machine.generation
            self.probes_admitted = self.permits_returned = 0
            if self.machine.state is CLOSED:
                self.model.clear()

    @rule()
    def acquire(self) -> None:
        ticket = self.machine.acquire(self.now)
        self._sync_generation()
        state = self.machine.state
        if ticket >= 0:
            self.in_flight.append(ticket)
            if state is HALF_OPEN:
                self.probes_admitted += 1
        elif ticket == WAIT:
            assert state is HALF_OPEN
            assert self.config.half_open_mode == "wait"
        else:
            assert ticket == REJECT

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "fail", "slow_ok", "slow_fail", "ex"]))
    def finish(self, data: st.DataObject, outcome: str) -> None:
        ticket = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        before, current = self.machine.state, ticket == self.machine.generation
        duration = 2.0 if outcome.startswith("slow") else 0.0
        if outcome == "ex":
            self.machine.on_ignored(ticket)
            assert self.machine.state is before, "an excluded error changed the state"
            if current and before is HALF_OPEN:
                self.permits_returned += 1
            return
        if outcome.endswith("fail"):
            self.machine.on_failure(ticket, self.now, duration)
        else:
            self.machine.on_success(ticket, self.now, duration)
        bits = (FAILURE if outcome.endswith("fail") else 0) | (
            SLOW if duration and self.config.slow_call is not None else 0
        )
        if not current:
            assert self.machine.state is before, "a stale outcome changed the state"
        elif before is CLOSED:
            self.model.append(bits)
            assert (self.machine.state is OPEN) == self._model_trips()
        elif before is HALF_OPEN and bits:
            assert self.machine.state is OPEN
        self._sync_generation()

    def _model_trips(self) -> bool:
        calls = len(self.model)
        if calls < self.config.minimum_calls:
            return False
        failures = sum(1 for bits in self.model if bits & FAILURE)
        slow = sum(1 for bits in self.model if bits & SLOW)
        return failures / calls >= self.config.failure_rate or (
            self.config.slow_call is not None and slow / calls >= self.config.slow_call_rate
        )

    @rule(seconds=st.sampled_from([0.5, 10.0, 29.9, 30.0, 45.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule(op=st.sampled_from(["isolate", "disable", "reset"]))
    def operate(self, op: str) -> None:
        getattr(self.machine, op)(self.now)
        self._sync_generation()

    @invariant()
    def half_open_admits_at_most_half_open_calls(self) -> None:
        if self.machine.state is HALF_OPEN:
            limit = self.config.half_open_calls + self.permits_returned
            assert self.probes_admitted <= limit

    @invariant()
    def window_and_probe_counts_stay_in_bounds(self) -> None:
        self.machine.transitions.clear()
        assert self.machine.window.calls <= self.config.window_calls  # type: ignore[operator]
        assert self.machine.rejections >= 0


TestBreakerMachine = BreakerRules.TestCase
TestBreakerMachine.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)


def _tripped(machine: BreakerMachine, now: float = 0.0) -> None:
    while machine.state is CLOSED:
        machine.on_failure(machine.acquire(now), now, 0.0)


def test_reset_timeout_grows_per_consecutive_open_up_to_its_cap() -> None:
    cfg = BreakerConfig(
        minimum_calls=1,
        window_calls=1,
        reset_timeout=1.0,
        reset_timeout_multiplier=2.0,
        max_reset_timeout=5.0,
    )
    machine, now, pauses = BreakerMachine(cfg), 0.0, []
    _tripped(machine)
    for _ in range(5):
        pauses.append(machine.reset_timeout)
        now += machine.reset_timeout
        machine.on_failure(machine.acquire(now), now, 0.0)
        assert machine.state is OPEN
    assert pauses == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_reset_timeout_stays_at_its_cap_through_a_long_outage() -> None:
    # 2.0 ** 1024 overflows a float: after ~1,000 failed probes (17 hours at a
    # 60 s cap) every acquire raised OverflowError instead of probing or rejecting.
    cfg = BreakerConfig(
        minimum_calls=1,
        window_calls=1,
        reset_timeout=1.0,
        reset_timeout_multiplier=2.0,
        max_reset_timeout=60.0,
    )
    machine, now = BreakerMachine(cfg), 0.0
    _tripped(machine)
    for _ in range(1100):
        now += machine.reset_timeout
        machine.on_failure(machine.acquire(now), now, 0.0)
    assert machine.state is OPEN
    assert machine.reset_timeout == 60.0
    assert machine.acquire(now + 59.0) == REJECT
    assert machine.acquire(now + 60.0) >= 0


def test_a_call_admitted_before_opening_does_not_decide_half_open() -> None:
    machine = BreakerMachine(BreakerConfig(minimum_calls=1, window_calls=1, reset_timeout=1.0))
    early = machine.acquire(0.0)
    _tripped(machine)
    probe = machine.acquire(1.0)
    machine.on_success(early, 1.0, 0.0)
    assert machine.state is HALF_OPEN
    machine.on_success(probe, 1.0, 0.0)
    assert machine.state is CLOSED


def test_open_circuit_rejects_until_reset_timeout_then_admits_one_probe() -> None:
    machine = BreakerMachine(BreakerConfig(minimum_calls=2, window_calls=2, reset_timeout=30.0))
    _tripped(machine)
    assert machine.acquire(29.999) == REJECT
    assert machine.acquire(30.0) >= 0
    assert machine.acquire(30.0) == REJECT
    assert machine.rejections == 2


@pytest.mark.parametrize(
    ("failures", "calls", "opens"), [(4, 10, False), (5, 10, True), (9, 9, False)]
)
def test_trips_at_the_rate_only_with_minimum_calls(failures: int, calls: int, opens: bool) -> None:
    machine = BreakerMachine(BreakerConfig(failure_rate=0.5, minimum_calls=10, window_calls=20))
    for i in range(calls):
        ticket = machine.acquire(0.0)
        if i < failures:
            machine.on_failure(ticket, 0.0, 0.0)
        else:
            machine.on_success(ticket, 0.0, 0.0)
    assert (machine.state is OPEN) is opens
