"""
A circuit breaker for one upstream target.

``closed`` (requests flow) → ``open`` after ``failure_threshold`` consecutive failures
(requests are refused at once) → ``half-open`` once ``reset_timeout`` seconds have passed,
where exactly one trial request is let through: its success closes the circuit, its
failure opens it again for another ``reset_timeout``.

Pure logic: the clock is passed in (a :class:`twisted.internet.task.Clock` in tests).
"""

from __future__ import annotations

from typing import Optional, Protocol

from twisted.logger import Logger

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "BreakerSettings", "CircuitBreaker", "Clock"]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"

_log = Logger(namespace="bungate.breaker")


class Clock(Protocol):
    """What a breaker needs of a clock: an :class:`~twisted.internet.interfaces.IReactorTime`."""

    def seconds(self) -> float:
        """The current time in seconds."""
        ...


class BreakerSettings(Protocol):
    """What a breaker reads of its route's ``circuit_breaker`` section."""

    @property
    def enabled(self) -> bool:
        """Whether the breaker ever opens."""
        ...

    @property
    def failure_threshold(self) -> int:
        """Consecutive failures that open the circuit."""
        ...

    @property
    def reset_timeout(self) -> float:
        """Seconds an open circuit waits before its half-open trial."""
        ...


class CircuitBreaker:
    """
    The breaker of one target.

    The gateway asks :meth:`allow` right before it sends a request to the target, and
    reports the outcome with :meth:`record_success` or :meth:`record_failure` (5xx,
    timeouts, refused connections count as failures). A request that ends without a
    verdict (the client went away) is reported with :meth:`record_abandoned`, which frees
    a half-open trial.

    :param config: the route's ``circuit_breaker`` section. When ``config.enabled`` is
        false the breaker always allows and never opens.
    :param clock: provides ``seconds()`` (the reactor, or a ``Clock`` in tests).
    :param name: names the target in log messages.
    """

    def __init__(self, config: BreakerSettings, clock: Clock, name: str = "") -> None:
        self.config = config
        self._clock = clock
        self.name = name
        self._state = CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._trial_started: Optional[float] = None

    @property
    def state(self) -> str:
        """
        ``"closed"``, ``"open"`` or ``"half-open"``; an open breaker whose
        ``reset_timeout`` has passed reads as ``"half-open"``.
        """
        if self._state == OPEN and self._reset_due():
            return HALF_OPEN
        return self._state

    def _reset_due(self) -> bool:
        return self._clock.seconds() - self._opened_at >= self.config.reset_timeout

    def _trial_free(self) -> bool:
        # A trial whose verdict never came (a lost request) is given up after another
        # reset_timeout, so that the breaker cannot stay half-open for ever.
        return (
            self._trial_started is None
            or self._clock.seconds() - self._trial_started >= self.config.reset_timeout
        )

    def would_allow(self) -> bool:
        """
        Whether :meth:`allow` would say yes now, without taking the half-open trial.
        """
        if not self.config.enabled:
            return True
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            return False
        return self._trial_free()

    def allow(self) -> bool:
        """
        Ask to send one request. In ``half-open`` this takes the single trial request, so
        call it once per request actually sent.

        :returns: ``True`` when the request may go to the target.
        """
        if not self.config.enabled:
            return True
        if not self.would_allow():
            return False
        if self.state == HALF_OPEN:
            if self._state != HALF_OPEN:
                _log.info("circuit of {target} is half-open: one trial request", target=self.name)
            self._state = HALF_OPEN
            self._trial_started = self._clock.seconds()
        return True

    def record_success(self) -> None:
        """A request to the target succeeded: reset the failure count, close the circuit."""
        if not self.config.enabled:
            return
        self.failures = 0
        if self._state != CLOSED:
            _log.info("circuit of {target} closed", target=self.name)
        self._state = CLOSED
        self._trial_started = None

    def record_failure(self) -> None:
        """A request to the target failed: count it; open the circuit at the threshold."""
        if not self.config.enabled:
            return
        self.failures += 1
        if self._state == HALF_OPEN or (
            self._state == CLOSED and self.failures >= self.config.failure_threshold
        ):
            self._open()
        elif self._state == OPEN:
            # A request admitted before the circuit opened failed late: keep it open,
            # counting reset_timeout from now.
            self._opened_at = self._clock.seconds()

    def record_abandoned(self) -> None:
        """A request ended without a verdict: free the half-open trial, change nothing else."""
        if self._state == HALF_OPEN:
            self._trial_started = None

    def _open(self) -> None:
        _log.warn(
            "circuit of {target} opened after {failures} consecutive failures; retry in {reset} s",
            target=self.name,
            failures=self.failures,
            reset=self.config.reset_timeout,
        )
        self._state = OPEN
        self._opened_at = self._clock.seconds()
        self._trial_started = None
