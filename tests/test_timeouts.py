"""A call cut off by the caller's own timeout (or Ctrl-C) after its request was sent keeps what it may have
cost: the attempt and the call at the estimate, and the budget charged, never released as if unpaid."""

from __future__ import annotations

import json
import time

import pytest

from imagebroker import Broker
from imagebroker.broker.budgets import period_key
from imagebroker.errors import CallTimedOut
from imagebroker.policies.schema import Policy
from imagebroker.testing.fakes import fakes
from tests.conftest import builtin_providers


def test_a_timeout_after_sending_counts_the_estimate_in_the_call_and_the_budget(tmp_path, monkeypatch):
    import openai  # noqa: F401  (imported here, so that the call's second goes to sending, not importing)

    with fakes()["openai"](["timeout"]) as fake:   # accepts the request, answers after 30 s
        monkeypatch.setenv("OPENAI_API_KEY", fake.key)
        policy = {"name": "t", "deny": builtin_providers("openai"),
                  "providers": {"openai": {"base_url": fake.base_url}},
                  "budgets": [{"name": "day", "period": "day", "limit_usd": "5"}]}
        with Broker(Policy.model_validate(policy)) as b:
            estimate = b.plan("a cat", model="openai/gpt-image-2").candidates[0].estimated_cost.usd
            started = time.monotonic()
            with pytest.raises(CallTimedOut):
                b.generate("a cat", model="openai/gpt-image-2", timeout=2.0)
            assert time.monotonic() - started < 12 and fake.requests   # sent, then given up on
            spent, reserved = b.ledger.counters([("day", period_key("day"))])[("day", period_key("day"))]
            rows = json.loads(b.ledger.engine.connect().exec_driver_sql(
                "SELECT json_object('status', status, 'cost', cost_nusd) FROM calls").scalar())
    assert rows["status"] == "cancelled" and rows["cost"] == int(estimate * 10**9)
    assert spent == estimate and reserved == 0   # charged at the estimate, not released


def test_a_timeout_before_anything_was_sent_costs_nothing(tmp_path):
    from imagebroker.testing.mock import mock_offering

    policy = {"name": "t", "deny": builtin_providers(), "budgets": [{"name": "day", "period": "day",
                                                                     "limit_usd": "5"}],
              "offerings": [mock_offering("slow", settings={"script": ["sleep:5"]})]}
    with Broker(Policy.model_validate(policy)) as b:
        with pytest.raises(CallTimedOut):
            b.generate("a cat", timeout=0.3)
        spent, reserved = b.ledger.counters([("day", period_key("day"))])[("day", period_key("day"))]
    assert spent == 0 and reserved == 0   # the mock never marks a submission: nothing may have been billed
