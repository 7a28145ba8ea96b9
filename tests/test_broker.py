"""generate() end to end against the scriptable mock and a fake HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import os
import sqlite3
import time
from decimal import Decimal
from pathlib import Path

import pytest
from PIL import Image

from imagebroker import AsyncBroker, Broker
from imagebroker.errors import (
    AllAttemptsFailed,
    DuplicateRequest,
    LedgerError,
    NoRouteError,
    ProviderUnavailable,
    RequestError,
)
from imagebroker.policies.schema import Constraints
from imagebroker.providers.base import ProviderResult, RawImage
from imagebroker.testing.fake_http import FakeImageServer, free_port
from imagebroker.testing.mock import MockProvider, mock_offering, ok_result
from imagebroker.types import SkipReason
from tests.conftest import mock_policy

FAKE_KEY = "sk-test-DEADBEEF-0123456789-recognisable"


def http_offering(model: str, base_url: str, usd: str = "0.01") -> dict:
    o = mock_offering(model, provider="fakehttp", price={"usd": usd})
    o["id"] = f"fakehttp/{model}"
    return o


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_429_with_retry_after_is_retried_after_waiting(tmp_path, monkeypatch):
    """(a) 429 with Retry-After: 1, then success: one call, two attempts, the retry waited >= 1 s."""
    monkeypatch.setenv("FAKEHTTP_API_KEY", FAKE_KEY)
    with FakeImageServer(["status:429:1", "ok"]) as server:
        policy = mock_policy(http_offering("a", server.url),
                             providers={"fakehttp": {"base_url": server.url}})
        with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            result = b.generate("a cat", size="128x128")
    assert [a.status for a in result.attempts] == ["error", "ok"]
    assert result.attempts[0].error_type == "RateLimited" and result.attempts[0].http_status == 429
    gap = result.attempts[1].started_at - result.attempts[0].started_at
    assert gap.total_seconds() >= 1.0
    assert rows(tmp_path / "l.db", "select count(*), sum(attempts) from calls") == [(1, 2)]


def test_fallback_down_then_empty_then_ok_records_every_attempt(tmp_path, monkeypatch):
    """(b) the first offering refuses connections, the second answers 200 with zero images, the third
    succeeds: the result is the third's and the ledger holds the call and all its attempts."""
    monkeypatch.setenv("FAKEHTTP_API_KEY", FAKE_KEY)
    down = f"http://127.0.0.1:{free_port()}"
    with FakeImageServer(["empty"]) as empty, FakeImageServer(["ok"]) as good:
        policy = mock_policy(
            http_offering("first", down, "0.01"), http_offering("second", empty.url, "0.02"),
            http_offering("third", good.url, "0.03"), objective="cheapest",
            retry={"max_attempts": 2, "initial_delay_s": 0.01},
            providers={"fakehttp": {"base_url": down}})
        # each offering has its own server: route by model through per-offering base URLs
        policy = mock_policy(*[dict(o, settings={"base_url": url}) for o, url in zip(
            policy.offerings, [down, empty.url, good.url], strict=True)], objective="cheapest",
            retry={"max_attempts": 2, "initial_delay_s": 0.01})
        with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            result = b.generate("a cat", size="128x128", n=2)
    assert result.offering == "fakehttp/third" and len(result.images) == 2
    assert result.cost.usd == Decimal("0.06")
    kinds = [(a.offering, a.error_type) for a in result.attempts]
    assert kinds == [("fakehttp/first", "ProviderUnavailable"), ("fakehttp/first", "ProviderUnavailable"),
                     ("fakehttp/second", "BadProviderResponse"), ("fakehttp/third", None)]
    db = tmp_path / "l.db"
    assert rows(db, "select status, offering, attempts, cost_nusd from calls") == [
        ("ok", "fakehttp/third", 4, 60_000_000)]
    assert rows(db, "select offering, status, error_type from attempts order by number") == [
        ("fakehttp/first", "error", "ProviderUnavailable"),
        ("fakehttp/first", "error", "ProviderUnavailable"),
        ("fakehttp/second", "error", "BadProviderResponse"), ("fakehttp/third", "ok", None)]


def test_every_offering_failing_raises_all_attempts_failed_and_keeps_every_row(tmp_path):
    """(c) every offering fails: AllAttemptsFailed carrying each attempt, and every row recorded."""
    policy = mock_policy(
        mock_offering("x", settings={"script": ["error:ProviderUnavailable"]}),
        mock_offering("y", settings={"script": ["broken"]}),
        mock_offering("z", settings={"script": ["error:ModelNotFound"]}),
        retry={"max_attempts": 2, "initial_delay_s": 0.01})
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b, \
            pytest.raises(AllAttemptsFailed) as exc:
        b.generate("a cat")
    types = [a.error_type for a in exc.value.attempts]
    assert types == ["ProviderUnavailable", "ProviderUnavailable", "BadProviderResponse",
                     "ModelNotFound"]  # non-retryable errors are tried once
    db = tmp_path / "l.db"
    assert rows(db, "select status, attempts, error_type from calls") == [("error", 4, "AllAttemptsFailed")]
    assert rows(db, "select count(*) from attempts") == [(4,)]


@pytest.mark.parametrize("step", ["empty", "broken", "short"])
def test_a_200_without_the_images_asked_for_is_never_a_success(tmp_path, step):
    policy = mock_policy(mock_offering("x", settings={"script": [step]}))
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b, pytest.raises(AllAttemptsFailed) as e:
        b.generate("a cat", n=2)
    assert e.value.attempts[0].error_type == "BadProviderResponse"


def test_no_route_is_recorded_with_every_reason(tmp_path):
    policy = mock_policy(mock_offering("x", capabilities={"max_n": 1})).model_copy(
        update={"constraints": Constraints(split_n=False)})
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b, pytest.raises(NoRouteError) as e:
        b.generate("a cat", n=3)
    assert "mock/x: n=3 above its max of 1 (the policy's split_n is off)" in str(e.value)
    assert rows(tmp_path / "l.db", "select status, error_type from calls") == [("rejected", "NoRouteError")]


def test_sync_and_async_agree(tmp_path):
    policy = mock_policy(mock_offering("x"), mock_offering("y", price={"usd": "0.5"}))
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 's.db'}") as b:
        sync = b.generate("a cat", n=2, seed=3, size="96x64")

    async def run():
        async with AsyncBroker(policy, ledger=f"sqlite:///{tmp_path / 'a.db'}") as ab:
            return await ab.generate("a cat", n=2, seed=3, size="96x64")

    asyn = asyncio.run(run())
    assert (sync.offering, sync.cost, sync.applied) == (asyn.offering, asyn.cost, asyn.applied)
    assert [i.data for i in sync.images] == [i.data for i in asyn.images]
    assert sync.plan == asyn.plan


def test_seeds_dropped_params_and_output_format_are_reported(tmp_path):
    policy = mock_policy(mock_offering("x", capabilities={"seed": False, "negative_prompt": False,
                                                            "output_formats": ["png"]}))
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        result = b.generate("a cat", seed=4, negative_prompt="blur", output_format="webp")
    assert set(result.dropped) == {"seed", "negative_prompt", "output_format"}
    assert Image.open(io.BytesIO(result.images[0].data)).format == "WEBP"  # converted locally


def test_circuit_breaker_skips_a_failing_provider_then_probes_it(tmp_path):
    calls = []

    def handler(request, offering, ctx):
        calls.append(offering.id)
        if offering.id == "mock/flaky" and calls.count("mock/flaky") <= 3:
            raise ProviderUnavailable("down", provider="mock")
        return ok_result(request, offering)

    spare = mock_offering("spare", provider="backup", price={"usd": "0.02"})
    spare["id"] = "backup/spare"
    policy = mock_policy(mock_offering("flaky"), spare, retry={"max_attempts": 1},
                         breaker={"failure_threshold": 2, "cooldown_s": 0.3})
    scripted = MockProvider.with_handler(handler)
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}",
                providers={"mock": scripted, "backup": scripted}) as b:
        assert b.generate("x").offering == "backup/spare"   # flaky fails (1)
        assert b.generate("x").offering == "backup/spare"   # flaky fails (2): circuit opens
        n = len(calls)
        third = b.generate("x")                             # flaky skipped without a call
        assert [(s.offering, s.reason) for s in third.skipped] == [("mock/flaky", SkipReason.CIRCUIT_OPEN)]
        assert len(third.attempts) == 1 and calls[n:] == ["backup/spare"]
        time.sleep(0.35)
        assert b.generate("x").offering == "backup/spare"   # the probe fails (3): open again
        time.sleep(0.35)
        assert b.generate("x").offering == "mock/flaky"   # the next probe succeeds: closed


def test_timeout_moves_to_the_next_offering(tmp_path):
    policy = mock_policy(mock_offering("slow", settings={"script": ["sleep:5"]}),
                         mock_offering("quick", price={"usd": "0.02"}), timeout_s=0.3,
                         retry={"max_attempts": 1})
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        t0 = time.perf_counter()
        result = b.generate("x")
    assert result.offering == "mock/quick" and time.perf_counter() - t0 < 3
    assert "timed out after 0.3 s" in result.attempts[0].error


def test_no_secret_reaches_logs_ledger_errors_or_reprs(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FAKEHTTP_API_KEY", FAKE_KEY)

    def leaky(request, offering, ctx):  # a careless adapter echoing the key back
        raise ProviderUnavailable(f"upstream said: bad token {os.environ['FAKEHTTP_API_KEY']}",
                                  provider="mock")

    caplog.set_level("DEBUG")
    with FakeImageServer(["status:401"]) as server:
        policy = mock_policy(mock_offering("leaky"), http_offering("h", server.url),
                             retry={"max_attempts": 1}, providers={"fakehttp": {"base_url": server.url}})
        with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}",
                    providers={"mock": MockProvider.with_handler(leaky)}) as b:
            b._async.provider("fakehttp")  # so its key is known to the redactor
            with pytest.raises(AllAttemptsFailed) as exc:
                b.generate("x")
            texts = [str(exc.value), repr(exc.value), repr(b), repr(b._async.provider("fakehttp")),
                     repr(exc.value.attempts), caplog.text]
        assert server.requests[0]["headers"]["authorization"] == f"Bearer {FAKE_KEY}"  # sent to the provider...
    db = (tmp_path / "l.db").read_bytes()
    assert FAKE_KEY.encode() not in db                            # ...and stored nowhere
    for text in texts:
        assert FAKE_KEY not in text
    assert "bad token ***" in str(exc.value)


def test_learned_latency_replaces_the_catalog_estimate(tmp_path):
    policy = mock_policy(mock_offering("x", latency={"p50_s": 30, "p95_s": 60}))
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        assert b.plan("x").candidates[0].estimated_latency_s == 30
        for _ in range(20):
            b.generate("x")
        b._async._latency_at = 0  # refresh now rather than in 30 s
        p50 = b.plan("x").candidates[0].estimated_latency_s
    assert p50 < 1  # measured: the mock answers in milliseconds


def test_custom_result_handler_gets_usage_priced(tmp_path):
    def handler(request, offering, ctx):
        res = ok_result(request, offering)
        return ProviderResult([RawImage(i.data, 1) for i in res.images], {"images": 1}, "r-1", {})

    policy = mock_policy(mock_offering("x", price={"usd": "0.04"}))
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}",
                providers={"mock": MockProvider.with_handler(handler)}) as b:
        r = b.generate("x")
    assert (r.cost.usd, r.cost.status) == (Decimal("0.04"), "priced")
    assert r.attempts[0].provider_request_id == "r-1"


def test_a_reset_connection_is_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKEHTTP_API_KEY", FAKE_KEY)
    with FakeImageServer(["reset", "ok"]) as server:
        policy = mock_policy(http_offering("a", server.url), retry={"initial_delay_s": 0.01},
                             providers={"fakehttp": {"base_url": server.url}})
        with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            result = b.generate("a cat", size="128x128")
    assert [a.error_type for a in result.attempts] == ["ProviderUnavailable", None]
    assert "connection failed" in result.attempts[0].error


def test_plans_follow_the_environment_although_they_are_memoised(tmp_path, monkeypatch):
    monkeypatch.delenv("FAKEHTTP_API_KEY", raising=False)
    policy = mock_policy(http_offering("a", "http://127.0.0.1:9"))
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        first = b.plan("a cat")
        assert not first.candidates
        reasons = {r.offering: r.reasons for r in first.rejected}
        assert "no API key: set FAKEHTTP_API_KEY" in reasons["fakehttp/a"]
        monkeypatch.setenv("FAKEHTTP_API_KEY", FAKE_KEY)
        assert [c.offering for c in b.plan("a cat").candidates] == ["fakehttp/a"]
        assert b.plan("a dog") is b.plan("a cow")  # same planning fields, same state: one plan
        monkeypatch.delenv("FAKEHTTP_API_KEY")
        assert not b.plan("a cat").candidates


@pytest.mark.parametrize("broken", [False, True])
def test_large_images_are_decoded_and_counted_too(tmp_path, broken):
    """Images of megabytes are decoded off the event loop; the checks are the same."""
    import hashlib

    noisy = Image.frombytes("RGB", (1024, 768), os.urandom(1024 * 768 * 3))
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    data = os.urandom(len(buf.getvalue())) if broken else buf.getvalue()
    assert len(data) > 2_000_000

    def handler(request, offering, ctx):
        return ProviderResult([RawImage(data, 7)], {"images": 1}, "r-big", {})

    policy = mock_policy(mock_offering("x"))
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}",
                providers={"mock": MockProvider.with_handler(handler)}) as b:
        if broken:
            with pytest.raises(AllAttemptsFailed) as e:
                b.generate("x", size="1024x768")
            assert "image 1 does not decode" in e.value.attempts[0].error
            return
        result = b.generate("x", size="1024x768")
    (image,) = result.images
    assert (image.width, image.height, image.seed) == (1024, 768, 7)
    assert image.sha256 == hashlib.sha256(data).hexdigest()
    assert rows(tmp_path / "l.db", "select image_sha256s from calls") == [(f'["{image.sha256}"]',)]


# -- idempotency keys: at most one paid call per key ------------------------------------------------
def counting_handler(calls: list, delay: float = 0.0, fail_first: int = 0):
    async def handler(request, offering, ctx):
        calls.append(request.prompt)
        await asyncio.sleep(delay)
        if len(calls) <= fail_first:
            raise ProviderUnavailable("down", provider="mock", offering=offering.id)
        return ok_result(request, offering)
    return MockProvider.with_handler(handler)


def test_a_repeated_idempotency_key_gets_the_same_result_without_a_second_call(tmp_path):
    calls: list = []
    policy = mock_policy(mock_offering("x", price={"usd": "0.04"}))
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}",
                providers={"mock": counting_handler(calls)}) as b:
        first = b.generate("a cat", idempotency_key="order-17")
        again = b.generate("a cat", idempotency_key="order-17")
        other = b.generate("a cat", idempotency_key="order-18")
        with pytest.raises(RequestError, match="used for a different request"):
            b.generate("a dog", idempotency_key="order-17")
    assert again.request_id == first.request_id and again.images == first.images
    assert other.request_id != first.request_id
    assert len(calls) == 2
    assert rows(tmp_path / "l.db", "select idempotency_key, cost_nusd from calls order by created_at") == [
        ("order-17", 40_000_000), ("order-18", 40_000_000)]


def test_concurrent_repeats_share_one_call_and_a_caller_giving_up_does_not_cancel_it(tmp_path):
    calls: list = []
    policy = mock_policy(mock_offering("x"))

    async def main():
        async with AsyncBroker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}",
                               providers={"mock": counting_handler(calls, delay=0.3)}) as b:
            with pytest.raises(TimeoutError):  # the first caller gives up early...
                await asyncio.wait_for(b.generate("x", idempotency_key="k"), 0.05)
            results = await asyncio.gather(*[b.generate("x", idempotency_key="k") for _ in range(5)])
            return results

    results = asyncio.run(main())
    assert len(calls) == 1  # ...and its retries get the call it started
    assert len({r.request_id for r in results}) == 1
    assert rows(tmp_path / "l.db", "select status from calls") == [("ok",)]


def test_a_failed_call_is_not_remembered_under_its_key(tmp_path):
    calls: list = []
    policy = mock_policy(mock_offering("x"), retry={"max_attempts": 1})
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}",
                providers={"mock": counting_handler(calls, fail_first=1)}) as b:
        with pytest.raises(AllAttemptsFailed):
            b.generate("x", idempotency_key="k")
        assert b.generate("x", idempotency_key="k").images
    assert len(calls) == 2


def test_a_key_served_by_another_process_is_refused_not_paid_twice(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    policy = mock_policy(mock_offering("x"))
    with Broker(policy, ledger=url) as b:
        served = b.generate("x", idempotency_key="job-9")
    with Broker(policy, ledger=url) as b:  # a new process, as far as memory goes
        with pytest.raises(DuplicateRequest, match=f"served by request {served.request_id}") as e:
            b.generate("x", idempotency_key="job-9")
        assert e.value.request_id == served.request_id
        assert served.images[0].sha256[:12] in str(e.value)
        assert b.generate("x", idempotency_key="job-10").images  # a new key generates anew
    assert rows(tmp_path / "l.db", "select count(*) from calls") == [(2,)]


# -- a ledger that cannot record ----------------------------------------------------------------------
def break_ledger(db: Path) -> None:
    """Damage the ledger's schema from outside, as a bad hand edit or a broken disk would."""
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE attempts")


def test_a_paid_call_the_ledger_cannot_record_still_hands_over_its_images(tmp_path):
    db = tmp_path / "l.db"
    with Broker(mock_policy(mock_offering("x")), ledger=f"sqlite:///{db}") as b:
        b.generate("x")
        break_ledger(db)
        with pytest.raises(LedgerError, match=r"could not record call .* no such table: attempts") as e:
            b.generate("x", n=2)
    assert len(e.value.result.images) == 2 and e.value.result.offering == "mock/x"


def test_a_failed_call_the_ledger_cannot_record_keeps_its_own_error(tmp_path):
    db = tmp_path / "l.db"
    policy = mock_policy(mock_offering("x", settings={"script": ["ok", "error:ModelNotFound"]}))
    with Broker(policy, ledger=f"sqlite:///{db}") as b:
        b.generate("x")
        break_ledger(db)
        with pytest.raises(AllAttemptsFailed) as e:
            b.generate("x")
    assert any("could not record call" in note for note in e.value.__notes__)
