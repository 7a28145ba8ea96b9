"""The one error tree. Provider adapters translate their backend's failures into it, once, at the boundary.

    ImageBrokerError
    ├── ConfigError            bad policy/catalog/settings: names file, line and field
    │   └── MissingExtra       an optional dependency is not installed: names the pip command
    ├── RequestError           invalid request (size not a multiple, n out of range, ...)
    │   └── DuplicateRequest   its idempotency key was already served (in another process)
    ├── NoRouteError           no offering satisfies the constraints; carries every rejection reason
    ├── BudgetExceeded         which budget, spent, reserved, limit
    ├── ProviderError          provider, offering, http status, provider request id, retryable
    │   ├── RateLimited        retry_after
    │   ├── ProviderUnavailable    5xx, connection, timeout
    │   ├── AuthError          missing/invalid key (offering skipped, not retried)
    │   ├── ContentRejected    moderation/safety refusal (not retried on the same provider)
    │   ├── ModelNotFound      retired or unknown model
    │   ├── BadProviderResponse    malformed body, zero/undecodable images
    │   └── AdapterError       the adapter itself failed (a bug): not the provider's fault
    ├── AllAttemptsFailed      carries the attempts
    └── LedgerError            a call could not be recorded; carries its result when it succeeded

Whether an error is worth retrying on the same offering is decided here and nowhere else: the
`retryable` class attribute.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .types import Attempt, Rejection, Skip


class ImageBrokerError(Exception):
    """Base of every error imagebroker raises on purpose."""

    exit_code = 1


class ConfigError(ImageBrokerError):
    """A policy, catalog or setting is wrong. The message names the file, line and field."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field = file, line, field
        where = ":".join(str(p) for p in (file, line) if p is not None)
        prefix = f"{where}: " if where else ""
        prefix += f"{field}: " if field else ""
        super().__init__(prefix + message)


class MissingExtra(ConfigError):
    """An optional dependency is missing; the message says what to install."""

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"{module} is not installed; install it with: pip install 'imagebroker[{extra}]'"
        )
        self.extra = extra


class RequestError(ImageBrokerError):
    """The request itself is invalid; no offering could serve it."""

    exit_code = 2


class DuplicateRequest(RequestError):
    """A request whose `idempotency_key` another process (or an earlier run) already served. The
    ledger keeps image hashes, not images, so it cannot be answered again without paying again."""

    def __init__(self, message: str, request_id: str) -> None:
        super().__init__(message)
        self.request_id = request_id


class NoRouteError(ImageBrokerError):
    """No offering in the catalog satisfies the request and the policy."""

    exit_code = 2

    def __init__(self, message: str, rejections: Sequence[Rejection] = ()) -> None:
        self.rejections = tuple(rejections)
        lines = [message] + [f"  {r.offering}: {'; '.join(r.reasons)}" for r in self.rejections]
        super().__init__("\n".join(lines))


class BudgetExceeded(ImageBrokerError):
    """A call would take a budget over its limit."""

    def __init__(self, budget: str, *, spent: Decimal, reserved: Decimal, limit: Decimal,
                 needed: Decimal) -> None:
        self.budget, self.spent, self.reserved, self.limit, self.needed = (
            budget, spent, reserved, limit, needed)
        super().__init__(
            f"budget {budget!r} would be exceeded: spent ${spent} + reserved ${reserved} "
            f"+ this call ${needed} > limit ${limit}"
        )


class ProviderError(ImageBrokerError):
    """A provider failed. `retryable` says whether the same offering is worth another try."""

    retryable = False

    def __init__(self, message: str, *, provider: str | None = None, offering: str | None = None,
                 status: int | None = None, request_id: str | None = None) -> None:
        self.provider, self.offering, self.status, self.request_id = (
            provider, offering, status, request_id)
        self.attempts: tuple[Attempt, ...] = ()   # set when this error ends a call (a refusal)
        self.skipped: tuple[Skip, ...] = ()
        super().__init__(message)

    def describe(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "message": str(self), "http_status": self.status,
                "provider_request_id": self.request_id}


class RateLimited(ProviderError):
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ProviderUnavailable(ProviderError):
    """5xx, refused connections, resets and timeouts."""

    retryable = True


class AuthError(ProviderError):
    """Missing or invalid credentials."""


class ContentRejected(ProviderError):
    """The provider's moderation refused the prompt or the output."""


class ModelNotFound(ProviderError):
    """The model is retired or unknown to the provider."""


class BadProviderResponse(ProviderError):
    """The provider answered, but not with what was asked: malformed body, too few or broken images."""


class AdapterError(ProviderError):
    """A provider adapter raised something it did not translate into this tree (a `KeyError` on a
    response it did not expect): a bug in imagebroker or a plugin, not an outage. Logged with its
    traceback, counted apart in `costs`, and the call falls back to the next offering."""


class AllAttemptsFailed(ImageBrokerError):
    """Every planned offering failed or was skipped. `attempts` holds the tries in order, `skipped`
    the offerings passed over without a try (circuit open, price unknown, over budget)."""

    def __init__(self, attempts: Sequence[Attempt], skipped: Sequence[Skip] = ()) -> None:
        self.attempts, self.skipped = tuple(attempts), tuple(skipped)
        lines = [f"all {len(self.attempts)} attempts failed:" if self.attempts else "nothing was tried:"]
        lines += [f"  {a.offering}: {a.error_type}: {a.error}" for a in self.attempts]
        lines += [f"  {s.offering}: skipped ({s.reason}): {s.detail}" for s in self.skipped]
        super().__init__("\n".join(lines))


def redact(text: str, secrets: Sequence[str | None]) -> str:
    """Replace every secret value in `text` (keys echoed back by a provider, say) with '***'."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


class LedgerError(ImageBrokerError):
    """The ledger could not record a call (database gone, disk full, schema damaged). When the call
    itself succeeded, `result` holds it: the images were paid for and are not thrown away."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result
