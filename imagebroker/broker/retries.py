"""The policy's retry settings as tenacity's stop and wait rules, asked by attempt number: the call loop's
one question, "how long before trying this offering again, if at all?"."""

from __future__ import annotations

from dataclasses import dataclass

from tenacity import RetryCallState, stop_after_attempt, wait_random_exponential

from ..errors import OutcomeUnknown, ProviderError, RateLimited
from ..policies.schema import RetrySettings


@dataclass(frozen=True)
class RetryRules:
    """The policy's retry settings as tenacity's stop and wait rules, asked by attempt number."""

    stop: stop_after_attempt
    wait: wait_random_exponential
    max_retry_after_s: float
    retry_unknown: bool

    @classmethod
    def of(cls, r: RetrySettings) -> RetryRules:
        return cls(stop_after_attempt(r.max_attempts),
                   wait_random_exponential(multiplier=r.initial_delay_s, max=r.max_delay_s),
                   r.max_retry_after_s, r.on_unknown_outcome == "retry")

    def delay(self, error: ProviderError, attempt: int) -> float | None:
        """Seconds to wait before trying again after failed attempt number `attempt`; None: stop."""
        if not (error.retryable or (self.retry_unknown and isinstance(error, OutcomeUnknown))):
            return None
        state = RetryCallState(None, None, (), {})
        state.attempt_number = attempt
        if self.stop(state):
            return None
        if isinstance(error, RateLimited) and error.retry_after is not None:
            return error.retry_after if error.retry_after <= self.max_retry_after_s else None
        return self.wait(state)
