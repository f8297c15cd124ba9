"""CircuitBreaker: the async and sync drivers around ``BreakerMachine``.

The machine decides (see ``_breaker_machine`` for the state table); this module
reads the clock, holds a lock around each decision (never across the protected
call), runs the call, reports its outcome, emits events and parks callers in
``half_open_mode="wait"``. Both drivers share every helper; only the lines that
``await`` differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from seamwork._core.clock import Clock, SystemClock
from seamwork._core.hooks import Hooks
from seamwork.errors import CallTimeout, CircuitOpenError, ConfigError
from seamwork.resilience import _validate as check
from seamwork.resilience._breaker_machine import (
    CLOSED,
    HALF_OPEN,
    REJECT,
    WAIT,
    BreakerConfig,
    BreakerMachine,
    BreakerState,
    HalfOpenMode,
)
from seamwork.resilience._policy import (
    Policy,
    monotonic_reader,
    refuse_async_handler,
    resolve,
    sync_value,
)
from seamwork.resilience._timeout import check_overrun, run_with_timeout

P = ParamSpec("P")
R = TypeVar("R")

_logger = logging.getLogger("seamwork.resilience")
_STATE_EVENTS = {
    BreakerState.CLOSED: "close",
    BreakerState.OPEN: "open",
    BreakerState.HALF_OPEN: "half_open",
    BreakerState.FORCED_OPEN: "forced_open",
    BreakerState.DISABLED: "disabled",
}
EVENTS = (*_STATE_EVENTS.values(), "reject", "success", "failure", "slow", "timeout")
_CALL_EVENTS = frozenset({"success", "failure", "slow", "timeout"})
_UNTIMED = math.nan  # a call's start when no duration mattered as it began


@dataclass(frozen=True, slots=True)
class BreakerStats:
    """A snapshot of a breaker for metrics and dashboards.

    ``window_*`` describe the current window; the ``*_total`` counters only grow.
    """

    name: str
    state: BreakerState
    window_calls: int
    window_failures: int
    window_slow: int
    failure_rate: float
    slow_call_rate: float
    successes_total: int
    failures_total: int
    rejections_total: int
    ignored_total: int
    opens_total: int
    reset_timeout: float


class CircuitBreaker(Policy):
    """Stop calling a dependency that fails or crawls; probe it before trusting it again.

    Trips from CLOSED to OPEN when, over the window and once ``minimum_calls`` are in
    it, the failure rate reaches ``failure_rate`` or the share of calls slower than
    ``slow_call`` reaches ``slow_call_rate``. After ``reset_timeout`` it lets exactly
    ``half_open_calls`` probes through, however many callers race; the others are
    rejected with ``CircuitOpenError`` or, with ``half_open_mode="wait"``, parked until
    the probes' verdict. A failed probe reopens it; all probes succeeding close it.

    opossum users find their options here: ``timeout`` -> ``timeout`` (seconds, not
    ms); ``errorThresholdPercentage: 50`` -> ``failure_rate=0.5`` (or
    ``error_threshold_percentage=50``); ``resetTimeout`` ->
    ``reset_timeout``; ``volumeThreshold`` -> ``minimum_calls``; ``rollingCountTimeout``
    / ``rollingCountBuckets`` -> ``window`` / ``window_buckets``; ``errorFilter`` ->
    ``exclude`` (types) ; ``allowWarmUp``: none (``minimum_calls`` covers it);
    ``.fallback(fn)`` -> ``fallback=fn``; events ``open``, ``halfOpen``, ``close``,
    ``reject``, ``success``, ``failure``, ``timeout`` -> ``on("open" | "half_open" |
    "close" | "reject" | "success" | "failure" | "timeout", cb)``; ``shutdown``/
    ``disable()`` -> ``disable()``; ``open()`` -> ``isolate()``; ``close()`` ->
    ``reset()``; ``stats`` -> ``stats()``.

    Args:
        name: identifies the breaker in errors, events and metrics.
        failure_rate: fraction of failed calls in the window that trips it, (0, 1]
            (default 0.5).
        minimum_calls: calls the window must hold before it may trip.
        window: time-based window length in seconds (default 10 s).
        window_calls: count-based window of the last N calls (instead of ``window``).
        window_buckets: slices of a time-based window (its eviction granularity).
        reset_timeout: seconds OPEN before probing.
        reset_timeout_multiplier: growth of the pause per consecutive opening (>= 1).
        max_reset_timeout: cap on the grown pause.
        half_open_calls: probes admitted in HALF_OPEN; all must succeed to close.
        half_open_mode: ``"reject"`` (fail fast) or ``"wait"`` for the verdict.
        slow_call: seconds from which a call counts as slow (None: never).
        slow_call_rate: fraction of slow calls in the window that trips it.
        timeout: cancel an async call after this many seconds (``CallTimeout``,
            counted as a failure); a sync call that overruns raises ``CallTimeout``
            after it returns (a plain function cannot be interrupted).
        exclude: exception types that count neither as success nor failure.
        failure_if: predicate on a returned value that counts it as a failure (the
            value is still returned).
        fallback: called with the error when a call is rejected or fails (counted
            failures only); its result (awaited if needed) is returned instead.
            ``call_sync`` cannot await: an awaitable result there raises
            ``ConfigError``, and decorating a plain function with an async fallback
            is refused (``ConfigError``).
        clock: time source; ``SystemClock()`` by default.
        error_threshold_percentage: opossum's name for the threshold, in percent
            (``50`` is ``failure_rate=0.5``); give one of the two.
    """

    __slots__ = (
        "_async_waiters",
        "_clock",
        "_emitting",
        "_epoch",
        "_failure_if",
        "_fallback",
        "_hooks",
        "_lean",
        "_lock",
        "_machine",
        "_monotonic",
        "_parked",
        "_pending",
        "_timed",
        "_timeout",
        "_watch_calls",
        "config",
        "exclude",
        "name",
    )

    def __init__(
        self,
        name: str,
        *,
        failure_rate: float | None = None,
        minimum_calls: int = 10,
        window: float | None = None,
        window_calls: int | None = None,
        window_buckets: int = 10,
        reset_timeout: float = 30.0,
        reset_timeout_multiplier: float = 1.0,
        max_reset_timeout: float | None = None,
        half_open_calls: int = 1,
        half_open_mode: HalfOpenMode = "reject",
        slow_call: float | None = None,
        slow_call_rate: float = 1.0,
        timeout: float | None = None,
        exclude: tuple[type[BaseException], ...] = (),
        failure_if: Callable[[Any], bool] | None = None,
        fallback: Callable[[BaseException], Any] | None = None,
        clock: Clock | None = None,
        error_threshold_percentage: float | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty str, got {name!r}")
        failure_rate = _failure_rate(failure_rate, error_threshold_percentage)
        check.seconds("timeout", timeout)
        _check_exclude(exclude)
        for field, hook in (("failure_if", failure_if), ("fallback", fallback)):
            if hook is not None and not callable(hook):
                raise ConfigError(f"{field} must be callable, got {hook!r}")
        self.name = name
        self.config = BreakerConfig(
            failure_rate, minimum_calls, window, window_calls, window_buckets,
            reset_timeout, reset_timeout_multiplier, max_reset_timeout,
            half_open_calls, half_open_mode, slow_call, slow_call_rate,
        )  # fmt: skip
        self.exclude = exclude
        self._timeout, self._failure_if, self._fallback = timeout, failure_if, fallback
        self._clock: Clock = clock or SystemClock()
        self._machine = BreakerMachine(self.config)
        self._lock = threading.Lock()
        self._parked = threading.Condition(self._lock)
        self._async_waiters: dict[asyncio.Future[None], asyncio.AbstractEventLoop] = {}
        self._epoch = 0
        self._pending: deque[tuple[BreakerState, BreakerState]] = deque()
        self._emitting = False
        self._hooks = Hooks(EVENTS, _logger)
        self._monotonic = monotonic_reader(self._clock)
        self._watch_calls = False
        self._shape()

    def _shape(self) -> None:
        """Decide which readings and reports the success path needs."""
        self._timed = (
            self._timeout is not None or self.config.slow_call is not None or self._watch_calls
        )
        self._lean = not self._timed and self._failure_if is None

    # --- the two drivers -----------------------------------------------------------

    async def call(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        machine = self._machine
        ticket = machine.generation  # read before the state: see _fast_ticket_is_safe
        if machine.state is not CLOSED:
            ticket = self._acquire()
            while ticket == WAIT:
                ticket = await self._park_async()
            if ticket == REJECT:
                return await resolve(self._on_rejected())  # type: ignore[no-any-return]
        started = self._monotonic() if self._timed else _UNTIMED
        try:
            if self._timeout is None:
                result = await fn(*args, **kwargs)
            else:
                result = await run_with_timeout(self._clock, self._timeout, fn, args, kwargs)
        except BaseException as error:
            if not self._settle_error(ticket, started, error):
                raise
            return await resolve(self._on_failed(error))  # type: ignore[no-any-return]
        tally = machine.tally  # before the ticket check: see "the quiet success"
        if self._lean and ticket == machine.generation and self._monotonic() < machine.quiet_until:
            next(tally)
        else:
            self._settle_result(ticket, started, result)
        return result

    def call_sync(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        machine = self._machine
        ticket = machine.generation  # read before the state: see _fast_ticket_is_safe
        if machine.state is not CLOSED:
            ticket = self._acquire()
            while ticket == WAIT:
                ticket = self._park_sync()
            if ticket == REJECT:
                return self._on_rejected_sync()  # type: ignore[no-any-return]
        started = self._monotonic() if self._timed else _UNTIMED
        try:
            result = fn(*args, **kwargs)
            if self._timeout is not None:
                check_overrun(self._clock, self._timeout, started)
        except BaseException as error:
            if not self._settle_error(ticket, started, error):
                raise
            return sync_value(self, self._on_failed(error), error)  # type: ignore[no-any-return]
        tally = machine.tally  # before the ticket check: see "the quiet success"
        if self._lean and ticket == machine.generation and self._monotonic() < machine.quiet_until:
            next(tally)
        else:
            self._settle_result(ticket, started, result)
        return result

    # --- shared steps --------------------------------------------------------------

    # A plain success (no slow_call, failure_if or call-event listener: ``_lean``) that
    # the machine calls quiet is ticked without the lock; the machine's docstring ("the
    # quiet success") says why no count is lost and a stale one changes nothing.
    # ``started`` is read only when a duration matters (``_timed``); otherwise it is
    # NaN, so a call that began before a listener subscribed (and made durations
    # matter) is not reported to it with a made-up duration, and is never slow.
    #
    # A CLOSED call takes its ticket without the lock (the GIL makes each read atomic).
    # _fast_ticket_is_safe: the generation is read *before* the state and transitions
    # write the state before bumping the generation, so a ticket taken while CLOSED was
    # observed is either a CLOSED generation's or already stale when it is settled
    # (settling holds the lock); a stale ticket changes nothing. HALF_OPEN permits are
    # only ever handed out under the lock.

    def _acquire(self) -> int:
        with self._lock:
            ticket = self._machine.acquire(self._clock.monotonic())
            moved = self._take_transitions() if self._machine.transitions else None
        if moved:
            self._publish(moved)
        return ticket

    def _settle_result(self, ticket: int, started: float, result: object) -> None:
        now = self._monotonic()
        try:
            failed = self._failure_if is not None and self._failure_if(result)
        except BaseException:
            # The predicate could not judge the call: its outcome counts for nothing,
            # and a HALF_OPEN probe's permit goes back (else the circuit never closes).
            self._settle_ignored(ticket)
            raise
        machine, lock = self._machine, self._lock
        lock.acquire()  # explicit acquire/release: half the cost of `with` on CPython 3.11
        try:
            if failed:
                machine.on_failure(ticket, now, now - started)
            else:
                machine.on_success(ticket, now, now - started)
            moved = self._take_transitions() if machine.transitions else None
        finally:
            lock.release()
        if moved:
            self._publish(moved)
        if self._watch_calls and started == started:  # NaN: began unwatched
            self._emit_outcome("failure" if failed else "success", now - started, result)

    def _settle_error(self, ticket: int, started: float, error: BaseException) -> bool:
        """Report ``error``; True if it counted as a failure (fallback applies)."""
        now = self._monotonic()
        counted = isinstance(error, Exception) and not isinstance(error, self.exclude)
        with self._lock:
            if counted:
                self._machine.on_failure(ticket, now, now - started)
            else:
                self._machine.on_ignored(ticket)
            wake = not counted and self._machine.state is HALF_OPEN
            moved = self._take_transitions(wake) if self._machine.transitions or wake else None
        if moved is not None:
            self._publish(moved)
        if counted and self._watch_calls and started == started:  # NaN: began unwatched
            self._emit_outcome("failure", now - started, error)
            if isinstance(error, CallTimeout):
                self._hooks.emit("timeout", self, error)
        return counted

    def _settle_ignored(self, ticket: int) -> None:
        """Report an outcome that does not count; wake callers parked for a permit."""
        with self._lock:
            self._machine.on_ignored(ticket)
            wake = self._machine.state is HALF_OPEN
            moved = self._take_transitions(wake) if self._machine.transitions or wake else None
        if moved is not None:
            self._publish(moved)

    def _on_rejected(self) -> Any:
        error = self._rejection()
        if self._fallback is None:
            raise error
        return self._fallback(error)

    def _on_rejected_sync(self) -> Any:
        error = self._rejection()
        if self._fallback is None:
            raise error
        return sync_value(self, self._fallback(error), error)

    def _rejection(self) -> CircuitOpenError:
        error = CircuitOpenError(f"circuit {self.name!r} is {self._machine.state.value}")
        self._hooks.emit("reject", self, error)
        return error

    def _on_failed(self, error: BaseException) -> Any:
        if self._fallback is None:
            raise error
        return self._fallback(error)

    def _check_sync_driver(self, fn: Callable[..., Any]) -> None:
        refuse_async_handler(self, self._fallback, fn)

    def _emit_outcome(self, event: str, duration: float, detail: object) -> None:
        self._hooks.emit(event, self, detail, duration)
        slow = self.config.slow_call
        if slow is not None and duration >= slow:
            self._hooks.emit("slow", self, duration)

    # --- transitions and parking -------------------------------------------------

    # State events go out in the order of the transitions, even when threads race:
    # transitions are queued under the lock (so in the order they happened) and one
    # caller at a time emits the queue. A caller whose transitions queue up while
    # another emits (a slow "open" hook, or a hook that itself resets the breaker)
    # leaves them to that emitter instead of overtaking it.

    def _take_transitions(self, wake: bool = False) -> Any:
        """Under the lock: queue transitions and hand over parked async callers; wake
        sync ones. Returns (whether this caller must emit the queue, async waiters)."""
        moved = self._machine.transitions
        self._machine.transitions = []
        waiters: dict[asyncio.Future[None], asyncio.AbstractEventLoop] = {}
        if moved or wake:
            self._epoch += 1
            self._parked.notify_all()
            waiters, self._async_waiters = self._async_waiters, {}
        emit = False
        if moved:
            self._pending.extend(moved)
            if not self._emitting:
                self._emitting = emit = True
        return emit, waiters

    def _publish(self, taken: Any) -> None:
        emit, waiters = taken
        for future, loop in waiters.items():
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody to wake
                loop.call_soon_threadsafe(_wake, future)
        if emit:
            self._emit_pending()

    def _emit_pending(self) -> None:
        """Emit queued state events, oldest first, until none is left."""
        lock, pending = self._lock, self._pending
        try:
            while True:
                with lock:
                    if not pending:
                        self._emitting = False
                        return
                    old, new = pending.popleft()
                self._hooks.emit(_STATE_EVENTS[new], self, old)
        except BaseException:  # a hook raised KeyboardInterrupt: the next emitter goes on
            with lock:
                self._emitting = False
            raise

    async def _park_async(self) -> int:
        """Ask again under the lock; if still WAIT, sleep until the next verdict or
        returned permit and return WAIT (the caller loops). A caller cancelled while
        parked leaves the waiters at once (a hung probe must not let them pile up)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            ticket = self._machine.acquire(self._clock.monotonic())
            if ticket == WAIT:
                self._async_waiters[future] = loop
            moved = self._take_transitions() if self._machine.transitions else None
        if moved:
            self._publish(moved)
        if ticket == WAIT:
            try:
                await future
            except BaseException:
                with self._lock:
                    self._async_waiters.pop(future, None)
                raise
        return ticket

    def _park_sync(self) -> int:
        """``_park_async`` for threads: sleeps on the lock's condition."""
        with self._lock:
            ticket = self._machine.acquire(self._clock.monotonic())
            if ticket == WAIT:
                epoch = self._epoch
                self._parked.wait_for(lambda: self._epoch != epoch)
            moved = self._take_transitions() if self._machine.transitions else None
        if moved:
            self._publish(moved)
        return ticket

    # --- operators, events and metrics -------------------------------------------

    def on(self, event: str, callback: Callable[..., object]) -> Callable[[], None]:
        """Subscribe ``callback`` to ``event``; returns an unsubscribe function.

        Events and arguments: ``open``/``half_open``/``close``/``forced_open``/
        ``disabled`` (breaker, previous state); ``reject`` (breaker, error);
        ``success`` (breaker, result, seconds); ``failure`` (breaker, error or
        result, seconds); ``slow`` (breaker, seconds); ``timeout`` (breaker, error).
        State events reach each listener in the order of the transitions, even across
        threads or when a hook itself moves the breaker.
        """
        unsubscribe = self._hooks.on(event, callback)
        if event in _CALL_EVENTS:
            self._watch_calls = True
            self._shape()
        return unsubscribe

    @property
    def state(self) -> BreakerState:
        """The state a call arriving now would meet."""
        with self._lock:
            return self._machine.state_at(self._clock.monotonic())

    def stats(self) -> BreakerStats:
        """A consistent snapshot of the state and counters."""
        machine = self._machine
        with self._lock:
            now = self._clock.monotonic()
            window = machine.refresh(now)
            calls = window.calls
            return BreakerStats(
                self.name, machine.state_at(now), calls, window.failures, window.slow,
                window.failures / calls if calls else 0.0,
                window.slow / calls if calls else 0.0,
                machine.successes, machine.failures, machine.rejections, machine.ignored,
                machine.opens, machine.reset_timeout,
            )  # fmt: skip

    def isolate(self) -> None:
        """Force the circuit open (every call rejected) until ``reset()``."""
        self._operate(self._machine.isolate)

    def disable(self) -> None:
        """Let every call through, recording nothing, until ``reset()``."""
        self._operate(self._machine.disable)

    def reset(self) -> None:
        """Close the circuit with an empty window."""
        self._operate(self._machine.reset)

    def _operate(self, action: Callable[[float], None]) -> None:
        with self._lock:
            action(self._clock.monotonic())
            moved = self._take_transitions()
        self._publish(moved)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._machine.state.value!r})"


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _failure_rate(failure_rate: float | None, percentage: float | None) -> float:
    """``failure_rate`` (default 0.5), or opossum's ``error_threshold_percentage`` as one."""
    if percentage is None:
        return 0.5 if failure_rate is None else failure_rate
    if failure_rate is not None:
        raise ConfigError(
            "give failure_rate or error_threshold_percentage (the same threshold in "
            f"percent), not both: got {failure_rate!r} and {percentage!r}"
        )
    if (
        isinstance(percentage, bool)
        or not isinstance(percentage, int | float)
        or not 0 < percentage <= 100  # NaN fails too
    ):
        raise ConfigError(
            f"error_threshold_percentage must be a number in (0, 100], got {percentage!r}"
        )
    return percentage / 100


def _check_exclude(exclude: object) -> None:
    ok = isinstance(exclude, tuple) and all(
        isinstance(kind, type) and issubclass(kind, BaseException) for kind in exclude
    )
    if not ok:
        raise ConfigError(f"exclude must be a tuple of exception types, got {exclude!r}")
