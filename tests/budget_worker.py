"""Run in child processes by the ledger tests (importable, so multiprocessing can spawn it)."""

from __future__ import annotations

import sys

from imagebroker import Broker
from imagebroker.errors import BudgetExceeded
from imagebroker.testing.mock import mock_offering
from tests.conftest import mock_policy


def budget_policy(limit: str, script: list[str] | None = None):
    return mock_policy(mock_offering("x", price={"usd": "0.01"}, settings={"script": script or ["ok"]}),
                       budgets=[{"name": "all", "period": "total", "limit_usd": limit}])


def run_calls(args: tuple[str, str, int]) -> tuple[int, int]:
    url, limit, calls = args
    ok = rejected = 0
    with Broker(budget_policy(limit), ledger=url) as b:
        for _ in range(calls):
            try:
                b.generate("a cat")
                ok += 1
            except BudgetExceeded:
                rejected += 1
    return ok, rejected


if __name__ == "__main__":  # a call that hangs mid-flight, holding its reservation (kill -9 test)
    with Broker(budget_policy("1", ["sleep:600"]), ledger=sys.argv[1]) as b:
        b.generate("a cat")
