"""imagebroker: one `generate()` call for every place an image can come from, routed by a policy,
with fallback, and a ledger of what every call cost.

    >>> import imagebroker
    >>> result = imagebroker.generate("a red circle on a blue background")
    >>> result.offering, result.cost

Everything but the errors is imported on first use, so `import imagebroker` stays fast and never
imports torch or a provider SDK.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (
    AdapterError,
    AllAttemptsFailed,
    AuthError,
    BadProviderResponse,
    BudgetExceeded,
    CallTimedOut,
    ConfigError,
    ContentRejected,
    DuplicateRequest,
    ImageBrokerError,
    LedgerError,
    MissingExtra,
    ModelNotFound,
    NoRouteError,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    RequestError,
)

__version__ = "0.1.0"

_LAZY = {
    "generate": "imagebroker.broker.api",
    "agenerate": "imagebroker.broker.api",
    "Broker": "imagebroker.broker.sync",
    "AsyncBroker": "imagebroker.broker.core",
    "Ledger": "imagebroker.broker.ledger.store",
    "ImageRequest": "imagebroker.types",
    "ImageResult": "imagebroker.types",
    "GeneratedImage": "imagebroker.types",
    "Adapter": "imagebroker.types",
    "Cost": "imagebroker.types",
    "Plan": "imagebroker.types",
    "Skip": "imagebroker.types",
    "SkipReason": "imagebroker.types",
    "Policy": "imagebroker.policies.schema",
    "load_policy": "imagebroker.policies.loader",
    "Provider": "imagebroker.providers.base",
    "ProviderResult": "imagebroker.providers.base",
}

__all__ = sorted([
    *_LAZY, "__version__", "AdapterError", "AllAttemptsFailed", "AuthError", "BadProviderResponse", "BudgetExceeded",
    "CallTimedOut", "ConfigError", "ContentRejected", "DuplicateRequest", "ImageBrokerError", "LedgerError",
    "MissingExtra",
    "ModelNotFound", "NoRouteError", "ProviderError", "ProviderUnavailable", "RateLimited", "RequestError",
])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imagebroker' has no attribute {name!r}")


if TYPE_CHECKING:
    from .broker.api import agenerate, generate
    from .broker.core import AsyncBroker
    from .broker.ledger.store import Ledger
    from .broker.sync import Broker
    from .policies.loader import load_policy
    from .policies.schema import Policy
    from .providers.base import Provider, ProviderResult
    from .types import Adapter, Cost, GeneratedImage, ImageRequest, ImageResult, Plan, Skip, SkipReason
