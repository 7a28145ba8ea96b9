"""`imagebroker serve`: the team gateway, an OpenAI-compatible HTTP service on uvicorn."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from ..errors import MissingExtra
from ..gateway.drain import DRAIN_ENV
from ..logs import GATEWAY_LOG_ENV as LOG_ENV
from ..policies.loader import POLICY_ENV, load_policy
from .common import PolicyOpt, handle_errors


@handle_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default: the gateway holds the "
                                           "provider keys).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes (each with its own broker).")] = 1,
    policy: PolicyOpt = None,
    drain_timeout: Annotated[float, typer.Option(min=0, help="On SIGTERM, seconds to let calls under way finish "
                                                            "(new requests get 503) before stopping.")] = 30.0,
    access_log: Annotated[bool, typer.Option(help="One line per request on stderr: request id, key name (never "
                                                  "the key), offering, cost, latency.")] = True,
) -> None:
    """Serve OpenAI's Images API (`/v1/images/generations`, `/v1/images/edits`, `/v1/models`) routed by the
    policy, with `/healthz` and `/readyz`. Set IMAGEBROKER_GATEWAY_KEY to require a Bearer key."""
    try:
        import uvicorn
    except ImportError:
        raise MissingExtra("gateway", "uvicorn") from None
    if policy:
        load_policy(policy)   # a bad policy is a clear error here, before any worker starts
        os.environ[POLICY_ENV] = policy
    os.environ[DRAIN_ENV] = str(drain_timeout)   # the workers read these (`gateway/drain.py`, `gateway/app.py`)
    os.environ[LOG_ENV] = "access" if access_log else "warnings"
    uvicorn.run("imagebroker.gateway.app:create_app", factory=True, host=host, port=port, workers=workers,
                log_level="info", access_log=False, timeout_graceful_shutdown=max(5, int(drain_timeout) + 5))
