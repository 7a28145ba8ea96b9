"""A per-provider circuit breaker: after `failure_threshold` failures in a row a provider is skipped
for `cooldown_s`, then one probe call is let through; success closes it, failure opens it again."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False


@dataclass
class CircuitBreaker:
    failure_threshold: int
    cooldown_s: float
    clock: object = time.monotonic
    _states: dict[str, _State] = field(default_factory=dict)

    def allow(self, provider: str) -> bool:
        s = self._states.get(provider)
        if s is None or s.failures < self.failure_threshold:
            return True
        if self.clock() < s.open_until or s.probing:  # type: ignore[operator]
            return False
        s.probing = True  # half-open: one probe at a time
        return True

    def is_open(self, provider: str) -> bool:
        """Whether calls to it are being skipped now (read only: no probe is let through)."""
        s = self._states.get(provider)
        return s is not None and s.failures >= self.failure_threshold and (
            self.clock() < s.open_until or s.probing)  # type: ignore[operator]

    def success(self, provider: str) -> None:
        self._states.pop(provider, None)

    def failure(self, provider: str) -> None:
        s = self._states.setdefault(provider, _State())
        s.failures += 1
        s.probing = False
        if s.failures >= self.failure_threshold:
            s.open_until = self.clock() + self.cooldown_s  # type: ignore[operator]
