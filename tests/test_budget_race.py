"""Budgets never overspend when calls settle dearer than expected: six `imagebroker generate`
processes race for a $0.30 budget on gpt-image-2 at quality `auto` (estimated at medium, $0.053; the
fake settles each at $0.125, as the real service may when it picks a higher quality)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from sqlalchemy import func, select

from imagebroker.broker.ledger.schema import budget_counters, calls, from_nusd
from imagebroker.broker.ledger.store import Ledger
from imagebroker.testing.fakes import fakes
from tests.conftest import builtin_providers

ROOT = Path(__file__).resolve().parents[1]


def test_six_processes_never_overspend_a_budget_on_calls_that_settle_dearer(ledger_url, tmp_path):
    fake = fakes()["openai"](["ok"])
    with fake:
        policy = tmp_path / "policy.yaml"
        policy.write_text(json.dumps({
            "name": "race", "deny": builtin_providers("openai"),
            "providers": {"openai": {"base_url": fake.base_url}},
            "budgets": [{"name": "total", "period": "total", "limit_usd": "0.30", "on_exceed": "reject"}]}))
        Ledger(ledger_url).close()  # migrated once, before the race
        env = {**os.environ, "OPENAI_API_KEY": fake.key, "IMAGEBROKER_LEDGER_URL": ledger_url}
        cmd = [sys.executable, "-m", "imagebroker.cli", "generate", "a red circle", "--model", "openai/gpt-image-2",
               "--policy", str(policy), "--json", "--out", str(tmp_path / "out")]
        procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
        outs = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    served = [json.loads(out) for code, out, _ in outs if code == 0]
    refused = [json.loads(out)["error"] for code, out, _ in outs if code != 0]   # --json: errors as JSON too
    assert served, outs
    assert all(e["type"] == "BudgetExceeded" and "'total'" in e["message"] for e in refused), refused
    assert len(served) + len(refused) == 6
    assert all(Decimal(s["cost"]["usd"]) == Decimal("0.125055") for s in served)  # dearer than the estimate
    ledger = Ledger(ledger_url)
    with ledger.engine.connect() as conn:
        spent, reserved = conn.execute(select(budget_counters.c.spent_nusd, budget_counters.c.reserved_nusd)).one()
        statuses = dict(conn.execute(select(calls.c.status, func.count()).group_by(calls.c.status)).all())
    assert from_nusd(spent) <= Decimal("0.30") and reserved == 0
    assert from_nusd(spent) == Decimal("0.125055") * len(served)
    assert statuses == {"ok": len(served), "rejected": len(refused)}
