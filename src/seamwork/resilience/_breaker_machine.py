"""The circuit breaker's decisions: a pure state machine over a sliding window.

Why: a dependency that is failing (or crawling) should stop receiving traffic for a
while, so it can recover and callers fail fast instead of piling up. After a pause a
few *probe* calls test it; their verdict closes the circuit or opens it again.

States and transitions (``_TRANSITIONS`` below is the whole machine)::

    state        event            next         when
    -----------  ---------------  -----------  -----------------------------------------
    CLOSED       TRIP             OPEN         window has >= minimum_calls and the
                                               failure rate or slow-call rate >= limit
    OPEN         RESET_ELAPSED    HALF_OPEN    reset_timeout passed (checked on acquire)
    HALF_OPEN    PROBES_PASSED    CLOSED       half_open_calls probes all succeeded
    HALF_OPEN    PROBE_FAILED     OPEN         a probe failed or was slow
    any          ISOLATE          FORCED_OPEN  operator: reject everything
    any          DISABLE          DISABLED     operator: let everything through
    any          RESET            CLOSED       operator: start afresh

Theory of operation:

* ``acquire(now)`` asks for permission and returns a *ticket* (the current
  generation, >= 0), ``REJECT`` or ``WAIT``. Every transition increments the
  generation, so an outcome reported with an older ticket (a call admitted before
  the circuit opened) changes no state: only calls admitted in the current state
  decide its fate.
* In HALF_OPEN at most ``half_open_calls`` tickets are out at once and at most that
  many successes are needed; a probe that ends in an excluded error returns its
  permit. Invariant: admitted probes of a generation <= half_open_calls + returned.
* CLOSED records every outcome in the window and trips once ``minimum_calls`` are in
  it and ``failures / calls >= failure_rate`` or ``slow / calls >= slow_call_rate``.
  Excluded errors are never recorded, so they can never open the circuit.
* The OPEN pause grows by ``reset_timeout_multiplier`` for each consecutive opening
  without a close, capped at ``max_reset_timeout``.
* Nothing here reads a clock, sleeps, locks or raises on the normal path: drivers
  pass ``now`` in, hold a lock around each method, and read ``transitions`` (drained
  by them) to emit events.

The quiet success (the lock-free hot path):

* A success that is not slow can only *lower* both rates, so it cannot trip the
  circuit once the window holds ``minimum_calls``; only evicting a slice can raise a
  rate. So while CLOSED, with ``minimum_calls`` in a time window and both rates under
  their thresholds, the machine publishes ``quiet_until``: the end of the current
  slice. Until then a driver may count a plain success of the current generation as
  ``next(machine.tally)`` without taking its lock (``itertools.count.__next__`` is
  one C call, atomic under the GIL, so no count is lost however many threads tick).
* Every method that reads the window first *folds* the tally into the current slice
  (``fold``), so decisions see every counted success; a fold precedes every slice
  eviction, so a quiet success lands in the slice it was observed in.
* Each generation has its own tally. A transition bumps ``generation`` *before* it
  installs the next tally and drivers read ``tally`` *before* they compare their
  ticket with ``generation``: a ticket that still matches guarantees the tally read
  is that generation's, so a stale success can only tick a retired tally, which is
  never read again (the same rule as a stale ticket: it changes nothing).
* Under threads, a quiet success racing a slice roll (or a reopening) is folded at
  the next locked call, into the slice current then; single-threaded, every
  decision is exactly the one the full path would take.
"""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass
from typing import Literal

from seamwork.errors import ConfigError
from seamwork.resilience import _validate as check
from seamwork.resilience._window import FAILURE, SLOW, CountWindow, TimeWindow, Window

_NEVER = -math.inf

REJECT = -1
WAIT = -2


class BreakerState(enum.StrEnum):
    """Where the circuit is; equal to its value too (``breaker.state == "open"``), as
    ``SagaStatus`` is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


class _Event(enum.Enum):
    TRIP = enum.auto()
    RESET_ELAPSED = enum.auto()
    PROBES_PASSED = enum.auto()
    PROBE_FAILED = enum.auto()
    ISOLATE = enum.auto()
    DISABLE = enum.auto()
    RESET = enum.auto()


CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
FORCED_OPEN, DISABLED = BreakerState.FORCED_OPEN, BreakerState.DISABLED

_OPERATOR = {_Event.ISOLATE: FORCED_OPEN, _Event.DISABLE: DISABLED, _Event.RESET: CLOSED}
_TRANSITIONS: dict[tuple[BreakerState, _Event], BreakerState] = {
    (CLOSED, _Event.TRIP): OPEN,
    (OPEN, _Event.RESET_ELAPSED): HALF_OPEN,
    (HALF_OPEN, _Event.PROBES_PASSED): CLOSED,
    (HALF_OPEN, _Event.PROBE_FAILED): OPEN,
    **{(state, event): target for state in BreakerState for event, target in _OPERATOR.items()},
}

HalfOpenMode = Literal["reject", "wait"]


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """A circuit breaker's settings (see ``CircuitBreaker`` for each field)."""

    failure_rate: float = 0.5
    minimum_calls: int = 10
    window: float | None = None
    window_calls: int | None = None
    window_buckets: int = 10
    reset_timeout: float = 30.0
    reset_timeout_multiplier: float = 1.0
    max_reset_timeout: float | None = None
    half_open_calls: int = 1
    half_open_mode: HalfOpenMode = "reject"
    slow_call: float | None = None
    slow_call_rate: float = 1.0

    def __post_init__(self) -> None:
        check.fraction("failure_rate", self.failure_rate)
        check.fraction("slow_call_rate", self.slow_call_rate)
        check.count("minimum_calls", self.minimum_calls)
        check.count("window_buckets", self.window_buckets)
        check.count("half_open_calls", self.half_open_calls)
        check.seconds("reset_timeout", self.reset_timeout)
        check.seconds("window", self.window)
        check.seconds("slow_call", self.slow_call)
        check.seconds("max_reset_timeout", self.max_reset_timeout)
        if self.max_reset_timeout is not None and self.max_reset_timeout < self.reset_timeout:
            raise ConfigError("max_reset_timeout must be >= reset_timeout")
        if self.window_calls is not None:
            check.count("window_calls", self.window_calls)
            if self.window is not None:
                raise ConfigError("window and window_calls are exclusive; set one of them")
            if self.window_calls < self.minimum_calls:
                raise ConfigError("window_calls must be >= minimum_calls, or it can never trip")
        multiplier = self.reset_timeout_multiplier
        if (
            isinstance(multiplier, bool)
            or not isinstance(multiplier, int | float)
            or not multiplier >= 1.0  # NaN fails too
        ):
            raise ConfigError(
                f"reset_timeout_multiplier must be a number >= 1.0, got {multiplier!r}"
            )
        if self.half_open_mode not in ("reject", "wait"):
            raise ConfigError("half_open_mode must be 'reject' or 'wait'")

    def new_window(self) -> Window:
        """The window these settings describe (time-based, 10 s, unless told)."""
        if self.window_calls is not None:
            return CountWindow(self.window_calls)
        return TimeWindow(self.window if self.window is not None else 10.0, self.window_buckets)


class BreakerMachine:
    """The pure breaker: permissions, outcomes and transitions; no I/O, no clock."""

    __slots__ = (
        "_consecutive_opens",
        "_opened_at",
        "_probe_successes",
        "_probes_out",
        "_tallied",
        "_timed",
        "config",
        "failures",
        "generation",
        "ignored",
        "opens",
        "quiet_until",
        "rejections",
        "state",
        "successes",
        "tally",
        "transitions",
        "window",
    )

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.window = config.new_window()
        self.state = CLOSED
        self.generation = 0
        self.transitions: list[tuple[BreakerState, BreakerState]] = []
        self.successes = self.failures = self.rejections = self.ignored = self.opens = 0
        self._opened_at = 0.0
        self._consecutive_opens = 0
        self._probes_out = self._probe_successes = 0
        self._timed = isinstance(self.window, TimeWindow)
        self.quiet_until = _NEVER
        self.tally = itertools.count()
        self._tallied = 0

    def acquire(self, now: float) -> int:
        """A ticket (>= 0) to run the call, ``REJECT``, or ``WAIT`` (for a verdict)."""
        state = self.state
        if state is CLOSED or state is DISABLED:
            return self.generation
        if state is OPEN and now - self._opened_at >= self.reset_timeout:
            self._fire(_Event.RESET_ELAPSED, now)
            state = HALF_OPEN
        if state is HALF_OPEN:
            if self._probes_out + self._probe_successes < self.config.half_open_calls:
                self._probes_out += 1
                return self.generation
            if self.config.half_open_mode == "wait":
                return WAIT
        self.rejections += 1
        return REJECT

    def on_success(self, ticket: int, now: float, duration: float) -> None:
        """Report a call that returned (slow if it took ``slow_call`` or longer)."""
        self.fold()
        self.successes += 1
        slow = self.config.slow_call
        if slow is not None and duration >= slow:
            self._settle(ticket, now, SLOW)
        elif ticket == self.generation and self.state is CLOSED:  # the hot path, inlined
            window = self.window
            window.record(now, 0)
            if window.calls >= self.config.minimum_calls and self._over_threshold():
                self._fire(_Event.TRIP, now)
            else:
                self._quiet()
        else:
            self._settle(ticket, now, 0)

    def fold(self) -> None:
        """Move the successes ticked on ``tally`` into the window (and the totals)."""
        ticked = int(repr(self.tally)[6:-1]) - self._tallied  # "count(N)": read, not advance
        if ticked:
            self._tallied += ticked
            self.successes += ticked
            self.window.add_calls(ticked)

    def refresh(self, now: float) -> Window:
        """The window as of ``now``, every ticked success included."""
        self.fold()
        self.window.refresh(now)
        self._quiet()
        return self.window

    def on_failure(self, ticket: int, now: float, duration: float) -> None:
        """Report a call that failed with a counted (not excluded) error."""
        self.fold()
        self.failures += 1
        slow = self.config.slow_call is not None and duration >= self.config.slow_call
        self._settle(ticket, now, FAILURE | SLOW if slow else FAILURE)

    def on_ignored(self, ticket: int) -> None:
        """Report a call whose outcome does not count (excluded error, cancellation)."""
        self.ignored += 1
        if ticket == self.generation and self.state is HALF_OPEN:
            self._probes_out -= 1

    def isolate(self, now: float) -> None:
        """Operator: hold the circuit open until ``reset()``."""
        self._fire(_Event.ISOLATE, now)

    def disable(self, now: float) -> None:
        """Operator: let every call through and record nothing until ``reset()``."""
        self._fire(_Event.DISABLE, now)

    def reset(self, now: float) -> None:
        """Operator: close the circuit with an empty window."""
        self._fire(_Event.RESET, now)

    @property
    def reset_timeout(self) -> float:
        """The current OPEN pause, grown for each consecutive opening."""
        cfg = self.config
        try:
            growth = cfg.reset_timeout_multiplier ** max(self._consecutive_opens - 1, 0)
        except OverflowError:  # a long outage: grown past any float, so past any cap
            growth = math.inf
        pause = cfg.reset_timeout * growth
        return pause if cfg.max_reset_timeout is None else min(pause, cfg.max_reset_timeout)

    def state_at(self, now: float) -> BreakerState:
        """The state a call arriving at ``now`` would see (OPEN ages into HALF_OPEN)."""
        if self.state is OPEN and now - self._opened_at >= self.reset_timeout:
            return HALF_OPEN
        return self.state

    def _settle(self, ticket: int, now: float, outcome: int) -> None:
        if ticket != self.generation:
            return
        if self.state is CLOSED:
            self.window.record(now, outcome)
            if self._over_threshold():
                self._fire(_Event.TRIP, now)
            else:
                self._quiet()
        elif self.state is HALF_OPEN:
            self._probes_out -= 1
            if outcome:
                self._fire(_Event.PROBE_FAILED, now)
            else:
                self._probe_successes += 1
                if self._probe_successes >= self.config.half_open_calls:
                    self._fire(_Event.PROBES_PASSED, now)

    def _quiet(self) -> None:
        """Publish until when a plain success may be ticked (see the module docstring)."""
        window = self.window
        if (
            self._timed
            and self.state is CLOSED
            and window.calls >= self.config.minimum_calls
            and not self._over_threshold()
        ):
            self.quiet_until = window.slice_end
        else:
            self.quiet_until = _NEVER

    def _over_threshold(self) -> bool:
        window, cfg = self.window, self.config
        calls = window.calls
        if calls < cfg.minimum_calls:
            return False
        if window.failures / calls >= cfg.failure_rate:
            return True
        return cfg.slow_call is not None and window.slow / calls >= cfg.slow_call_rate

    def _fire(self, event: _Event, now: float) -> None:
        self.fold()
        old = self.state
        new = _TRANSITIONS[old, event]
        self.quiet_until = _NEVER
        self.state = new
        self.generation += 1  # before the new tally: see "the quiet success" above
        self.tally, self._tallied = itertools.count(), 0
        self._probes_out = self._probe_successes = 0
        if new is OPEN:
            self.opens += 1
            self._consecutive_opens += 1
            self._opened_at = now
        elif new is CLOSED:
            self._consecutive_opens = 0
            self.window.clear()
        self.transitions.append((old, new))
