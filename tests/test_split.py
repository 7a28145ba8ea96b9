"""n above an offering's per-call maximum is split into several provider calls: seeds continue, costs add up,
every call is an attempt of the one call row, and what a failed split already paid for is kept."""

from __future__ import annotations

import io
import json
import sqlite3
from decimal import Decimal

import numpy as np
import pytest
from PIL import Image

from imagebroker import Broker
from imagebroker.errors import ContentRejected, NoRouteError
from imagebroker.policies.schema import Policy
from imagebroker.testing.fakes import fakes
from tests.conftest import builtin_providers


def bfl_policy(fake, **constraints) -> Policy:
    return Policy.model_validate({"name": "s", "deny": builtin_providers("bfl"), "constraints": constraints,
                                  "providers": {"bfl": {"base_url": fake.base_url, "poll_interval_s": 0.02}},
                                  "retry": {"max_attempts": 1}, "fallback": {"max_offerings": 1}})


def test_n_above_the_per_call_maximum_is_several_calls_with_seeds_continuing(tmp_path, monkeypatch):
    monkeypatch.setenv("BFL_API_KEY", fakes()["bfl"].key)
    with fakes()["bfl"](["ok"]) as fake, Broker(bfl_policy(fake), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        plan = b.plan("a cat", n=3, model="bfl/flux-pro-1.1")
        r = b.generate("a cat", n=3, seed=40, model="bfl/flux-pro-1.1")
    assert "n=3 is sent to bfl/flux-pro-1.1 as 3 calls of at most 1" in plan.candidates[0].warnings
    sent = [json.loads(x["body"])["seed"] for x in fake.requests if x["method"] == "POST"]
    assert sent == [40, 41, 42] and [i.seed for i in r.images] == [40, 41, 42]
    assert len(r.attempts) == 3 and r.cost.usd == 3 * Decimal("0.04") and r.cost.status == "priced"
    assert r.applied["split_n"] == [1, 1, 1]
    rows = sqlite3.connect(tmp_path / "l.db").execute("select n, cost_nusd from calls").fetchall()
    assert rows == [(3, 120_000_000)]   # one call row, for all three


def test_a_policy_can_forbid_splitting(tmp_path, monkeypatch):
    monkeypatch.setenv("BFL_API_KEY", fakes()["bfl"].key)
    with fakes()["bfl"](["ok"]) as fake, Broker(bfl_policy(fake, split_n=False),
                                               ledger=f"sqlite:///{tmp_path / 'l.db'}") as b, \
            pytest.raises(NoRouteError, match=r"n=2 above its max of 1 \(the policy's split_n is off\)"):
        b.generate("a cat", n=2, model="bfl/flux-pro-1.1")


def test_what_a_failed_split_already_paid_for_is_counted_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("BFL_API_KEY", fakes()["bfl"].key)
    ledger, store = f"sqlite:///{tmp_path / 'l.db'}", str(tmp_path / "store")
    with fakes()["bfl"](["ok", "refuse"]) as fake, Broker(bfl_policy(fake), ledger=ledger, store=store) as b, \
            pytest.raises(ContentRejected):
        b.generate("a cat", n=2, seed=1, model="bfl/flux-pro-1.1")
    cost, status = sqlite3.connect(tmp_path / "l.db").execute("select cost_nusd, status from calls").fetchone()
    assert status == "error" and cost == 40_000_000   # the first part was paid: never lost from the ledger
    assert len(list((tmp_path / "store").rglob("*"))) >= 1 and fake.generations == 2


def test_a_local_split_is_batch_invariant(tmp_path):
    pytest.importorskip("diffusers")
    policy = Policy.model_validate({"name": "l", "deny": builtin_providers("local")})
    with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        many = b.generate("a red circle on a blue background", n=10, seed=100)   # tiny-shapes takes 8 a call
        alone = b.generate("a red circle on a blue background", seed=109)
    assert len(many.images) == 10 and [i.seed for i in many.images] == list(range(100, 110))
    assert len(many.attempts) == 2 and many.applied["split_n"] == [8, 2]
    px = [np.asarray(Image.open(io.BytesIO(i.data)).convert("RGB")).astype(int)
          for i in (many.images[9], alone.images[0])]
    assert np.abs(px[0] - px[1]).max() <= 1


def test_an_aspect_ratio_is_sent_as_the_size_the_offering_makes_and_priced_at_it(tmp_path, monkeypatch):
    monkeypatch.setenv("BFL_API_KEY", fakes()["bfl"].key)
    with fakes()["bfl"](["ok"]) as fake, Broker(bfl_policy(fake), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        r = b.generate("a cat", aspect_ratio="16:9", resolution="2K", model="bfl/flux-2-pro")
    sent = json.loads(next(x["body"] for x in fake.requests if x["method"] == "POST"))
    assert (sent["width"], sent["height"]) == (2048, 1152) == (r.images[0].width, r.images[0].height)
    assert r.applied["size_resolved"] == "16:9 @ 2048 -> 2048x1152"
    mp = Decimal(2048 * 1152) / 10**6
    assert r.cost.usd == (Decimal("0.03") + (mp - 1) * Decimal("0.015")).quantize(Decimal("1e-9")).normalize()
