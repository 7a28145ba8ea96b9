"""The call loop's outcomes as a user sees them: adapter bugs apart from outages, skips recorded as
skips, refusals that stop, the budget that refused deciding, usage checked before it is believed,
and every log line redacted."""

from __future__ import annotations

import logging
import sqlite3
from decimal import Decimal

import pytest

from imagebroker import AsyncBroker, Broker
from imagebroker.broker.report import cost_report
from imagebroker.errors import AdapterError, AllAttemptsFailed, BudgetExceeded, ContentRejected
from imagebroker.providers.base import ProviderResult
from imagebroker.testing.mock import MockProvider, mock_offering, ok_result
from imagebroker.types import SkipReason
from tests.conftest import mock_policy


def rows(db, sql):
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def two_offerings(**extra):
    spare = mock_offering("spare", price={"usd": "0.02"})
    return mock_policy(mock_offering("first"), spare, **{"retry": {"max_attempts": 2, "initial_delay_s": 0.01},
                                                         **extra})


def test_an_adapter_bug_is_an_adapter_error_logged_with_its_traceback_and_the_next_offering_serves(
        tmp_path, caplog):
    def handler(request, offering, ctx):
        if offering.id == "mock/first":
            return {}["images"]  # a KeyError on a response the adapter did not expect
        return ok_result(request, offering)

    caplog.set_level(logging.ERROR, logger="imagebroker")
    db = tmp_path / "l.db"
    with Broker(two_offerings(), ledger=f"sqlite:///{db}",
                providers={"mock": MockProvider.with_handler(handler)}) as b:
        result = b.generate("a cat")
        _, total = cost_report(b.ledger, by="offering")
    assert result.offering == "mock/spare"
    assert [a.error_type for a in result.attempts] == ["AdapterError", None]  # a bug is not retried
    assert "KeyError" in result.attempts[0].error
    bug = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert bug and "KeyError" in (bug[0].exc_text or "") and "Traceback" in bug[0].exc_text
    assert rows(db, "select status, adapter_errors from calls") == [("ok", 1)]
    assert total.adapter_errors == 1 and total.failures == 0  # counted apart from provider failures


def test_an_adapter_error_is_shown_apart_in_the_costs_command(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from imagebroker.cli import app

    def handler(request, offering, ctx):
        if offering.id == "mock/first":
            raise KeyError("data")
        return ok_result(request, offering)

    url = f"sqlite:///{tmp_path / 'l.db'}"
    with Broker(two_offerings(), ledger=url, providers={"mock": MockProvider.with_handler(handler)}) as b:
        b.generate("a cat")
    out = CliRunner().invoke(app, ["costs", "--since", "1d", "--by", "offering"],
                             env={"IMAGEBROKER_LEDGER_URL": url, "COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "adapter errors" in out.output and "bug in a provider adapter" in out.output


def test_an_open_circuit_is_a_skip_in_its_own_table_not_a_fake_attempt(tmp_path):
    calls = []

    def handler(request, offering, ctx):
        calls.append(offering.id)
        if offering.id == "mock/first":
            from imagebroker.errors import ProviderUnavailable

            raise ProviderUnavailable("down", provider="mock")
        return ok_result(request, offering)

    db = tmp_path / "l.db"
    spare = mock_offering("spare", provider="backup", price={"usd": "0.02"})
    spare["id"] = "backup/spare"
    policy = mock_policy(mock_offering("first"), spare, retry={"max_attempts": 1},
                         breaker={"failure_threshold": 1, "cooldown_s": 60})
    scripted = MockProvider.with_handler(handler)
    with Broker(policy, ledger=f"sqlite:///{db}", providers={"mock": scripted, "backup": scripted}) as b:
        b.generate("x")
        second = b.generate("x")
    assert calls == ["mock/first", "backup/spare", "backup/spare"]
    assert [(s.offering, s.reason) for s in second.skipped] == [("mock/first", SkipReason.CIRCUIT_OPEN)]
    assert [a.offering for a in second.attempts] == ["backup/spare"]
    assert rows(db, "select offering, reason from skips") == [("mock/first", "circuit_open")]
    assert rows(db, "select count(*) from attempts where request_id = ?".replace("?", repr(second.request_id))) \
        == [(1,)]


def test_a_refusal_stops_the_call_by_default_and_falls_back_only_when_the_policy_says_next(tmp_path):
    refusing = mock_offering("first", settings={"script": ["error:ContentRejected"]})
    spare = mock_offering("spare", price={"usd": "0.02"})
    db = tmp_path / "l.db"
    with Broker(mock_policy(refusing, spare), ledger=f"sqlite:///{db}") as b, \
            pytest.raises(ContentRejected) as exc:
        b.generate("something a filter refuses")
    assert [a.offering for a in exc.value.attempts] == ["mock/first"]  # the spare was never asked
    assert rows(db, "select status, error_type from calls") == [("error", "ContentRejected")]
    with Broker(mock_policy(refusing, spare, fallback={"on_refusal": "next"}),
                ledger=f"sqlite:///{tmp_path / 'l2.db'}") as b:
        assert b.generate("x").offering == "mock/spare"


def test_the_budget_that_refused_decides_reject_or_restrict(ledger_url, tmp_path):
    """A $0.50 call over a `reject` budget is refused even when an unrelated tag-scoped `restrict`
    budget exists; it must not be served quietly by a cheaper offering."""
    dear = mock_offering("dear", price={"usd": "0.50"})
    cheap = mock_offering("cheap", price={"usd": "0.01"})
    budgets = [{"name": "total", "period": "total", "limit_usd": "0.40", "on_exceed": "reject"},
               {"name": "drafts", "period": "day", "limit_usd": "5", "on_exceed": "restrict",
                "scope": {"tags": {"stage": "draft"}}}]
    policy = mock_policy(dear, cheap, objective="ordered", prefer=["mock/dear", "mock/cheap"], budgets=budgets)
    with Broker(policy, ledger=ledger_url) as b:
        with pytest.raises(BudgetExceeded) as exc:
            b.generate("x")
        assert exc.value.budget == "total"
        restricting = policy.model_copy(update={"budgets": tuple(
            bud.model_copy(update={"on_exceed": "restrict"}) if bud.name == "total" else bud
            for bud in policy.budgets)})
    with Broker(restricting, ledger=f"sqlite:///{tmp_path / 'l2.db'}") as b:
        served = b.generate("x")  # the same budget as `restrict`: the cheaper offering serves
    assert served.offering == "mock/cheap"
    assert "up to $0.5000/call > budget headroom $0.40" in {
        r.offering: r.reasons for r in served.plan.rejected}["mock/dear"]


@pytest.mark.parametrize("usage", [
    {"images": -30_000}, {"images": "abc"}, {"images": float("nan")}, {"images": float("inf")},
    {"images": 1, "width": "1e999999"}, {"images": 1, "sizes": [["a", 2]]}, {"images": True}])
async def test_usage_that_cannot_be_believed_is_estimated_with_the_raw_units_kept(ledger_url, usage, caplog):
    def handler(request, offering, ctx):
        res = ok_result(request, offering)
        return ProviderResult(res.images, usage, "r-1", {})

    offering = mock_offering("x")
    offering["price"] = {"unit": "per_megapixel", "usd_per_mp": "0.01", "source": "test", "checked": "2026-11-22",
                         "confidence": "high"}
    policy = mock_policy(offering, budgets=[{"name": "all", "period": "total", "limit_usd": "1"}])
    async with AsyncBroker(policy, ledger=ledger_url,
                           providers={"mock": MockProvider.with_handler(handler)}) as b:
        result = await b.generate("x", size="1000x1000")
        counters = b.ledger.counters([("all", "total")])
    assert result.cost.status == "estimated" and result.cost.usd == Decimal("0.01")
    assert "not believed" in result.cost.detail and result.cost.units["reported"]
    assert counters[("all", "total")] == (Decimal("0.01"), Decimal(0))  # charged the estimate, never credited


def test_usage_priced_far_above_the_estimate_is_not_believed(tmp_path):
    def handler(request, offering, ctx):
        res = ok_result(request, offering)
        return ProviderResult(res.images, {"images": 5000}, "r-1", {})

    with Broker(mock_policy(mock_offering("x")), ledger=f"sqlite:///{tmp_path / 'l.db'}",
                providers={"mock": MockProvider.with_handler(handler)}) as b:
        result = b.generate("x")
    assert (result.cost.status, result.cost.usd) == ("estimated", Decimal("0.01"))
    assert "over 10x the most it could cost ($0.01)" in result.cost.detail


def test_attempts_retries_skips_and_settlements_are_logged_and_redacted(tmp_path, caplog, monkeypatch):
    secret = "sk-log-0123456789abcdef"
    monkeypatch.setenv("FAKEHTTP_API_KEY", secret)
    calls = []

    def handler(request, offering, ctx):
        calls.append(1)
        if len(calls) == 1:
            from imagebroker.errors import RateLimited

            raise RateLimited(f"slow down, {secret}", retry_after=0.01, provider="mock")
        return ok_result(request, offering)

    caplog.set_level(logging.DEBUG, logger="imagebroker")
    with Broker(mock_policy(mock_offering("x")), ledger=f"sqlite:///{tmp_path / 'l.db'}",
                providers={"mock": MockProvider.with_handler(handler)}) as b:
        b._async.provider("fakehttp").api_key()  # the key has been read: the redactor knows it
        b.generate("x")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "retries mock/x in 0.01 s after RateLimited" in text
    assert "attempt 1 on mock/x: RateLimited" in text and "settled on mock/x" in text and "recorded: ok" in text
    assert secret not in text and "slow down, ***" in text


def test_nothing_tried_because_every_price_is_unknown_says_so(tmp_path):
    unpriced = mock_offering("free", price=None)
    unpriced.pop("price")
    policy = mock_policy(unpriced, budgets=[{"name": "all", "period": "total", "limit_usd": "1"}])
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b, pytest.raises(AllAttemptsFailed) as exc:
        b.generate("x")
    assert [s.reason for s in exc.value.skipped] == [SkipReason.PRICE_UNKNOWN]
    assert "nothing was tried" in str(exc.value)


def test_an_adapter_error_is_not_retryable_and_names_the_bug():
    assert not AdapterError.retryable


@pytest.mark.parametrize("rule, served, attempts", [("next", "mock/spare", 2), ("retry", "mock/first", 2),
                                                     ("stop", None, 1)])
def test_an_unknown_outcome_moves_on_retries_or_stops_as_the_policy_says(ledger_url, rule, served, attempts):
    from imagebroker.errors import OutcomeUnknown

    first = mock_offering("first", settings={"script": ["error:OutcomeUnknown", "ok"]})
    spare = mock_offering("spare", price={"usd": "0.02"})
    policy = mock_policy(first, spare, retry={"on_unknown_outcome": rule, "initial_delay_s": 0.01},
                         budgets=[{"name": "all", "period": "total", "limit_usd": "1"}])
    with Broker(policy, ledger=ledger_url) as b:
        if served is None:
            with pytest.raises(OutcomeUnknown) as exc:
                b.generate("x")
            result_attempts = exc.value.attempts
        else:
            result = b.generate("x")
            assert result.offering == served
            result_attempts = result.attempts
            assert result.cost.usd == Decimal("0.01") + (Decimal("0.02") if served == "mock/spare" else Decimal("0.01"))
        spent = b.ledger.counters([("all", "total")])[("all", "total")][0]
    assert len(result_attempts) == attempts and result_attempts[0].error_type == "OutcomeUnknown"
    assert result_attempts[0].cost.usd == Decimal("0.01")  # maybe billed: at its estimate, never NULL
    assert spent == sum(a.cost.usd for a in result_attempts)  # and counted in the budget
