"""State several workers share (`broker/shared.py`): circuit breakers, provider rate limits and idempotency keys
under way, in the local Redis server; two brokers in one test stand for two workers (the gateway tests run
them as two processes). The same limits without Redis hold per process."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from imagebroker.broker.breaker import CircuitBreaker
from imagebroker.broker.core import AsyncBroker
from imagebroker.errors import AllAttemptsFailed, ConfigError
from imagebroker.policies.loader import load_policy
from imagebroker.policies.schema import Policy
from imagebroker.testing.fakes import fakes
from imagebroker.types import SkipReason
from tests.conftest import builtin_providers

SCHNELL = "together/black-forest-labs/FLUX.1-schnell"


@pytest.fixture
def together(monkeypatch: pytest.MonkeyPatch) -> Any:
    fake_class = fakes()["together"]
    monkeypatch.setenv("TOGETHER_API_KEY", fake_class.key)
    with fake_class(["ok"]) as fake:
        yield fake


def policy(fake: Any, state: dict[str, str] | None = None, rate_limit: dict[str, int] | None = None,
           **extra: Any) -> Policy:
    together: dict[str, Any] = {"base_url": fake.base_url}
    if rate_limit:
        together["rate_limit"] = rate_limit
    return Policy.model_validate({
        "name": "team", "deny": builtin_providers("together"), "prefer": [SCHNELL], "objective": "ordered",
        "fallback": {"max_offerings": 1}, "retry": {"max_attempts": 1}, "providers": {"together": together},
        **({"state": state} if state else {}), **extra})


async def outcomes(brokers: list[AsyncBroker], calls: int, **fields: Any) -> list[Any]:
    """`calls` concurrent calls spread over the brokers: each result or the exception it raised."""
    async def one(i: int) -> Any:
        try:
            return await brokers[i % len(brokers)].generate(f"call {i}", **fields)
        except Exception as exc:
            return exc
    return await asyncio.gather(*(one(i) for i in range(calls)))


async def close(brokers: list[AsyncBroker]) -> None:
    for b in brokers:
        await b.aclose()


@pytest.mark.redis
async def test_a_circuit_opened_on_one_worker_is_open_on_the_other(together, redis_state, tmp_path: Path):
    together.script = ["500"]
    breaker = {"breaker": {"failure_threshold": 2, "cooldown_s": 60}}
    a, b = (AsyncBroker(policy(together, redis_state, **breaker), f"sqlite:///{tmp_path / n}.db") for n in "ab")
    alone = AsyncBroker(policy(together, **breaker), f"sqlite:///{tmp_path / 'c'}.db")   # its own state
    try:
        for _ in range(2):
            with pytest.raises(AllAttemptsFailed):
                await a.generate("x")
        assert together.generations == 2 and await b.shared_state.is_open("together")
        with pytest.raises(AllAttemptsFailed) as skipped:
            await b.generate("x")
        assert [s.reason for s in skipped.value.skipped] == [SkipReason.CIRCUIT_OPEN]
        assert together.generations == 2    # b never asked the provider a opened the circuit for
        with pytest.raises(AllAttemptsFailed):
            await alone.generate("x")       # without Redis, each process learns for itself
        assert together.generations == 3
    finally:
        await close([a, b, alone])


@pytest.mark.redis
async def test_an_rpm_limit_holds_across_workers_and_the_rest_are_skipped_unsent(together, redis_state,
                                                                              tmp_path: Path):
    limited = policy(together, redis_state, rate_limit={"rpm": 5}, timeout_s=1.0)
    brokers = [AsyncBroker(limited, f"sqlite:///{tmp_path / n}.db") for n in "ab"]
    try:
        results = await outcomes(brokers, 8)
    finally:
        await close(brokers)
    refused = [r for r in results if isinstance(r, Exception)]
    assert together.generations == 5 and len(results) - len(refused) == 5   # five in the minute, fleet-wide
    assert len(refused) == 3 and all(isinstance(r, AllAttemptsFailed) and not r.attempts for r in refused)
    for r in refused:   # nothing sent, so no 429 collected; the wait until the window frees is known
        assert [s.reason for s in r.skipped] == [SkipReason.RATE_LIMITED]
        assert r.retry_after is not None and 55 < r.retry_after <= 60
        assert "5 rpm" in r.skipped[0].detail


@pytest.mark.redis
async def test_a_concurrency_limit_makes_calls_on_both_workers_wait_their_turn(together, redis_state,
                                                                             tmp_path: Path):
    together.latency_s = 0.2
    limited = policy(together, redis_state, rate_limit={"concurrency": 2})
    brokers = [AsyncBroker(limited, f"sqlite:///{tmp_path / n}.db") for n in "ab"]
    try:
        results = await outcomes(brokers, 8)
    finally:
        await close(brokers)
    assert all(not isinstance(r, Exception) for r in results)   # every call served, none refused
    assert together.generations == 8 and together.max_in_flight == 2


async def test_without_shared_state_the_limits_hold_per_process(together, tmp_path: Path):
    together.latency_s = 0.1
    b = AsyncBroker(policy(together, rate_limit={"concurrency": 2, "rpm": 6}, timeout_s=2.0),
                    f"sqlite:///{tmp_path / 'l'}.db")
    try:
        results = await outcomes([b], 8)
    finally:
        await b.aclose()
    assert b.shared_state.where == "this process"
    assert sum(not isinstance(r, Exception) for r in results) == 6 and together.generations == 6
    assert together.max_in_flight == 2
    refused = [r for r in results if isinstance(r, Exception)]
    assert all(isinstance(r, AllAttemptsFailed) and r.skipped[0].reason == SkipReason.RATE_LIMITED for r in refused)


@pytest.mark.redis
async def test_one_idempotency_key_on_two_workers_is_one_paid_call(together, redis_state, tmp_path: Path):
    together.latency_s = 0.5
    ledger, store = f"sqlite:///{tmp_path / 'shared.db'}", str(tmp_path / "images")   # one ledger, one store
    a, b = (AsyncBroker(policy(together, redis_state), ledger, store=store) for _ in range(2))
    try:
        first, second = await asyncio.gather(a.generate("a cat", seed=3, idempotency_key="order-17"),
                                             b.generate("a cat", seed=3, idempotency_key="order-17"))
    finally:
        await close([a, b])
    assert together.generations == 1    # the repeat on the other worker waited for the call, not paid again
    assert first.request_id == second.request_id
    assert [i.data for i in first.images] == [i.data for i in second.images]


async def test_unreachable_redis_serves_from_this_processs_state_and_says_so(together, tmp_path: Path, caplog):
    state = {"url": "redis://:sekrit-password@127.0.0.1:1/0"}   # nothing listens on port 1
    b = AsyncBroker(policy(together, state, rate_limit={"concurrency": 1}), f"sqlite:///{tmp_path / 'u'}.db")
    try:
        with caplog.at_level(logging.WARNING, logger="imagebroker"):
            result = await b.generate("x")
    finally:
        await b.aclose()
    assert result.images and together.generations == 1
    warned = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert warned and "127.0.0.1:1" in warned[0]
    assert "sekrit" not in caplog.text and "sekrit" not in repr(b.shared_state)


def test_a_probe_that_never_reports_stops_blocking_after_its_lease():
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=10, probe_lease_s=60, clock=lambda: now[0])
    breaker.failure("p")
    assert not breaker.allow("p")
    now[0] = 11
    assert breaker.allow("p") and not breaker.allow("p")   # half-open: one probe
    now[0] = 72                                            # its call was cancelled and never reported
    assert breaker.allow("p")


@pytest.mark.parametrize("section, message", [
    ({"providers": {"together": {"rate_limit": {}}}}, "rate_limit needs rpm, concurrency or both"),
    ({"providers": {"together": {"rate_limit": {"rpm": 0}}}}, "greater than or equal to 1"),
    ({"state": {"url": "http://127.0.0.1:6379"}}, "state.url must be a redis://"),
])
def test_bad_state_and_rate_limit_settings_are_named(tmp_path: Path, section: dict[str, Any], message: str):
    import json
    file = tmp_path / "p.yaml"
    file.write_text(json.dumps({"name": "p", **section}))
    with pytest.raises(ConfigError) as err:
        AsyncBroker(load_policy(file), f"sqlite:///{tmp_path / 'x'}.db")
    assert message in str(err.value)
