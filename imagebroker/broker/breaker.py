"""A per-provider circuit breaker: after `failure_threshold` failures in a row a provider is skipped
for `cooldown_s`, then one probe call is let through; success closes it, failure opens it again. A probe
that never reports (its call cancelled) stops counting after `probe_lease_s`, so the provider is not shut
out for good. `shared.py` keeps the same state in Redis for several workers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0
    probe_until: float = 0.0


@dataclass
class CircuitBreaker:
    failure_threshold: int
    cooldown_s: float
    probe_lease_s: float = 300.0
    clock: object = time.monotonic
    _states: dict[str, _State] = field(default_factory=dict)

    def allow(self, provider: str) -> bool:
        s = self._states.get(provider)
        if s is None or s.failures < self.failure_threshold:
            return True
        now = self.clock()  # type: ignore[operator]
        if now < s.open_until or now < s.probe_until:
            return False
        s.probe_until = now + self.probe_lease_s  # half-open: one probe at a time
        return True

    def is_open(self, provider: str) -> bool:
        """Whether calls to it are being skipped now (read only: no probe is let through)."""
        s = self._states.get(provider)
        if s is None or s.failures < self.failure_threshold:
            return False
        now = self.clock()  # type: ignore[operator]
        return now < s.open_until or now < s.probe_until

    def success(self, provider: str) -> None:
        self._states.pop(provider, None)

    def failure(self, provider: str) -> None:
        s = self._states.setdefault(provider, _State())
        s.failures += 1
        s.probe_until = 0.0
        if s.failures >= self.failure_threshold:
            s.open_until = self.clock() + self.cooldown_s  # type: ignore[operator]
