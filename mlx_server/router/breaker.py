"""The circuit breaker: pure state and policy, no I/O; the router acts on its verdicts."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Admission(StrEnum):
    TRY = "try"  # closed: send the request
    PROBE = "probe"  # the cool-down is over: this caller checks the backend first
    SKIP = "skip"  # open (or another caller is probing): go to the next backend


@dataclass(slots=True)
class Breaker:
    """closed -> open after `threshold` consecutive failures (or one tripped probe);
    after `cooldown` one caller probes (half-open): up closes it, down re-opens it."""

    threshold: int
    cooldown: float
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    reason: str = ""

    def admit(self, now: float) -> Admission:
        if self.state is BreakerState.CLOSED:
            return Admission.TRY
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.cooldown:
            self.state = BreakerState.HALF_OPEN
            return Admission.PROBE
        return Admission.SKIP

    def succeeded(self) -> bool:
        """The backend answered; True when that ends an outage."""
        changed = self.state is not BreakerState.CLOSED
        self.state, self.failures, self.reason = BreakerState.CLOSED, 0, ""
        return changed

    def failed(self, reason: str, now: float, *, trip: bool = False) -> bool:
        """A transport failure; True when it starts an outage (closed -> open)."""
        self.failures += 1
        self.reason = reason
        if self.state is BreakerState.HALF_OPEN:
            self.state, self.opened_at = BreakerState.OPEN, now
        elif self.state is BreakerState.CLOSED and (trip or self.failures >= self.threshold):
            self.state, self.opened_at = BreakerState.OPEN, now
            return True
        return False

    def settle(self) -> None:
        """A probe that ended without a verdict (its caller left) leaves the circuit open."""
        if self.state is BreakerState.HALF_OPEN:
            self.state = BreakerState.OPEN

    def remaining(self, now: float) -> float:
        return max(0.0, self.opened_at + self.cooldown - now)
