"""The image store, the deterministic cache, idempotent replay across processes, and files written exactly
as the provider sent them (C2PA content credentials included)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imagebroker import Broker
from imagebroker.broker.cache import cache_key
from imagebroker.broker.images import ImageStore
from imagebroker.cli import app
from imagebroker.policies.schema import Policy
from imagebroker.providers.offering import Offering
from imagebroker.testing.fakes import fakes
from imagebroker.testing.images import make_image, with_c2pa
from imagebroker.testing.mock import mock_offering
from imagebroker.types import Adapter, ImageRequest
from tests.conftest import builtin_providers

ROOT = Path(__file__).resolve().parents[1]


def cached_policy(**extra) -> Policy:
    return Policy.model_validate({
        "name": "cache", "deny": builtin_providers(), "cache": {"enabled": True},
        "offerings": [mock_offering("det", deterministic=True, price={"usd": "0.04"})], **extra})


# -- the store ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["folder", "memory"])
def test_the_store_keeps_bytes_by_hash_on_a_folder_and_on_an_fsspec_url(where, tmp_path):
    pytest.importorskip("fsspec")
    url = str(tmp_path / "store") if where == "folder" else f"memory://imagebroker-test-{time.time_ns()}"
    store = ImageStore(url)
    data = make_image(64, 64, seed=1)
    sha = store.put(data)
    assert store.put(data) == sha and store.count() == 1   # written once
    assert store.get(sha) == data and store.has(sha)
    assert store.get("0" * 64) is None


def test_a_damaged_object_is_never_served(tmp_path):
    store = ImageStore(str(tmp_path))
    sha = store.put(make_image(64, 64, seed=2))
    Path(store.location(sha)).write_bytes(b"not what was stored")
    assert store.get(sha) is None


def test_gc_removes_only_what_the_retention_allows(tmp_path):
    store = ImageStore(str(tmp_path))
    old, new = store.put(make_image(64, 64, seed=3)), store.put(make_image(64, 64, seed=4))
    ten_days_ago = time.time() - 10 * 86_400
    os.utime(store.location(old), (ten_days_ago, ten_days_ago))
    assert store.gc(keep_days=30) == []
    assert store.gc(keep_days=5) == [old]
    assert not store.has(old) and store.has(new)
    out = CliRunner().invoke(app, ["store", "gc", "--keep-days", "5"], env={"IMAGEBROKER_STORE_URL": str(tmp_path)})
    assert out.exit_code == 0 and "removed 0 image(s)" in out.output


# -- the cache ----------------------------------------------------------------------------------------
def test_a_repeat_of_a_seeded_request_is_answered_from_the_store_at_zero(tmp_path):
    from imagebroker.testing.mock import MockProvider

    budget = {"name": "day", "period": "day", "limit_usd": "1"}
    with Broker(cached_policy(budgets=[budget]), store=str(tmp_path / "store")) as b:
        first = b.generate("a red circle", seed=7, n=2)
        spent = b.ledger.counters([("day", time.strftime("%Y-%m-%d", time.gmtime()))])
        second = b.generate("a red circle", seed=7, n=2)
        calls = sum(b._async.provider("mock").calls.values())   # what reached the provider
        assert isinstance(b._async.provider("mock"), MockProvider)
        after = b.ledger.counters([("day", time.strftime("%Y-%m-%d", time.gmtime()))])
        other_seed = b.generate("a red circle", seed=8, n=2)
    assert first.cost.status == "priced" and str(first.cost.usd) == "0.08"
    assert second.cost.status == "cached" and second.cost.usd == 0 and not second.attempts
    assert [i.data for i in second.images] == [i.data for i in first.images]
    assert [i.seed for i in second.images] == [7, 8] and second.request_id != first.request_id
    assert calls == 1 and after == spent   # the hit paid nothing and reserved nothing
    assert other_seed.cost.status == "priced"
    report = json.loads(CliRunner().invoke(app, ["costs", "--format", "json"]).stdout)["total"]
    assert report["cache_hits"] == 1 and report["saved_usd"] == "0.08" and report["cost_usd"] == "0.16"
    table = CliRunner().invoke(app, ["costs"]).stdout
    assert "1 call(s) answered from the cache ($0): cache saved $0.080000" in table


def test_no_seed_or_no_cache_or_a_nondeterministic_offering_is_never_cached():
    policy = cached_policy()
    det = Offering.model_validate(mock_offering("det", deterministic=True, id="mock/det"))
    assert cache_key(ImageRequest(prompt="x"), det, policy) is None
    assert cache_key(ImageRequest(prompt="x", seed=1), det, Policy()) is None
    hosted = Offering.model_validate(mock_offering("hosted", id="mock/hosted"))
    assert cache_key(ImageRequest(prompt="x", seed=1), hosted, policy) is None
    assert cache_key(ImageRequest(prompt="x", seed=1), det, policy) is not None


@pytest.mark.parametrize("change", [
    {"prompt": "y"}, {"negative_prompt": "blurry"}, {"size": "512x512"}, {"n": 2}, {"seed": 2}, {"steps": 9},
    {"guidance_scale": 3.0}, {"scheduler": "euler"}, {"quality": "high"}, {"output_format": "webp"},
    {"background": "opaque"}, {"adapters": (Adapter(ref="org/lora"),)},
    {"adapters": (Adapter(ref="org/lora", scale=0.5),)},
])
def test_every_field_that_changes_the_pixels_changes_the_key(change):
    policy = cached_policy()
    det = Offering.model_validate(mock_offering("det", deterministic=True, id="mock/det"))
    base = {"prompt": "x", "seed": 1}
    assert cache_key(ImageRequest(**base), det, policy) != cache_key(ImageRequest(**{**base, **change}), det, policy)
    assert cache_key(ImageRequest(**base), det, policy) == cache_key(ImageRequest(**base), det, policy)


def test_a_retrained_adapter_or_a_new_model_version_misses(tmp_path):
    policy = cached_policy()
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"weights v1")
    det = Offering.model_validate(mock_offering("det", deterministic=True, id="mock/det",
                                                settings={"version": "v1"}))
    request = ImageRequest(prompt="x", seed=1, adapters=(Adapter(ref=str(lora)),))
    before = cache_key(request, det, policy)
    lora.write_bytes(b"weights v2")
    assert cache_key(request, det, policy) != before
    newer = det.model_copy(update={"settings": {"version": "v2"}})
    assert cache_key(request, newer, policy) != cache_key(request, det, policy)


# -- replay across processes ---------------------------------------------------------------------------
SERVE_ONCE = """
import json, sys
from imagebroker import Broker
from tests.test_store import cached_policy
with Broker(cached_policy(), store=sys.argv[1]) as b:
    r = b.generate("a cat", idempotency_key="order-17")
print(json.dumps({"request_id": r.request_id, "sha": [i.sha256 for i in r.images]}))
"""


def test_a_key_served_by_another_process_replays_its_stored_images(tmp_path):
    store = str(tmp_path / "store")
    out = subprocess.run([sys.executable, "-c", SERVE_ONCE, store], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout)
    with Broker(cached_policy(), store=store) as b:
        again = b.generate("a cat", idempotency_key="order-17")
        assert sum(b._async.provider("mock").calls.values()) == 0   # nothing paid again
    assert again.request_id == first["request_id"] and [i.sha256 for i in again.images] == first["sha"]
    assert again.applied["replayed_from"] == first["request_id"]


def test_a_key_served_elsewhere_for_another_request_is_an_error_not_its_images(tmp_path):
    from imagebroker.errors import RequestError

    with Broker(cached_policy(), store=str(tmp_path / "s")) as b:
        b.generate("a cat", idempotency_key="k1")
    with Broker(cached_policy(), store=str(tmp_path / "s")) as b, pytest.raises(RequestError, match="different"):
        b.generate("a completely different dog", idempotency_key="k1")


def test_without_the_images_in_the_store_a_replay_is_refused_not_paid_again(tmp_path):
    from imagebroker.errors import DuplicateRequest

    with Broker(cached_policy(), store=str(tmp_path / "a")) as b:
        b.generate("a cat", idempotency_key="k")
    with Broker(cached_policy(), store=str(tmp_path / "elsewhere")) as b, pytest.raises(DuplicateRequest):
        b.generate("a cat", idempotency_key="k")


# -- files as the provider sent them -------------------------------------------------------------------------
def openai_policy(tmp_path: Path, fake) -> str:
    p = tmp_path / "policy.yaml"
    p.write_text(json.dumps({"deny": builtin_providers("openai"),
                             "providers": {"openai": {"base_url": fake.base_url}}}))
    return str(p)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_the_file_written_is_byte_identical_to_what_the_provider_sent(fmt, tmp_path, monkeypatch):
    with fakes()["openai"](["ok"]) as fake:
        monkeypatch.setenv("OPENAI_API_KEY", fake.key)
        out = CliRunner().invoke(app, ["generate", "x", "--model", "openai/gpt-image-2", "--size", "1024x1024",
                                       "--output-format", fmt, "--policy", openai_policy(tmp_path, fake),
                                       "--out", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    image = json.loads(out.stdout)["images"][0]
    assert Path(image["path"]).read_bytes() == make_image(1024, 1024, seed=0, fmt=fmt)
    sha = image["image_sha256"]
    got = CliRunner().invoke(app, ["store", "get", sha, "--out", str(tmp_path / "copy")])
    assert got.exit_code == 0 and (tmp_path / "copy").read_bytes() == make_image(1024, 1024, seed=0, fmt=fmt)


def test_an_image_with_c2pa_credentials_is_reported_and_never_modified(tmp_path, monkeypatch):
    with fakes()["openai"](["c2pa"]) as fake:
        monkeypatch.setenv("OPENAI_API_KEY", fake.key)
        out = CliRunner().invoke(app, ["generate", "x", "--model", "openai/gpt-image-2", "--size", "1024x1024",
                                       "--policy", openai_policy(tmp_path, fake), "--out", str(tmp_path),
                                       "--embed-provenance", "--json"])
    assert out.exit_code == 0, out.output
    image = json.loads(out.stdout)["images"][0]
    sent = with_c2pa(make_image(1024, 1024, seed=0))
    assert Path(image["path"]).read_bytes() == sent   # not even the provenance chunk was added
    assert image["c2pa"] is True and image["embedded"] is False and "C2PA" in image["note"]
    meta = json.loads(Path(image["sidecar"]).read_text())
    assert meta["c2pa"] is True
    assert meta["c2pa_verification"].startswith("invalid")   # present, but the fake's manifest is unsigned
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        assert conn.execute("SELECT c2pa FROM calls").fetchall() == [(1,)]


def test_an_image_without_credentials_has_nothing_to_verify():
    from imagebroker.broker.provenance import c2pa_verification
    from imagebroker.types import GeneratedImage

    assert c2pa_verification(GeneratedImage(data=make_image(64, 64), format="png", width=64, height=64)) is None


def test_c2pa_is_found_in_a_jpeg_app11_segment():
    from imagebroker.broker.validate import describe

    assert describe(with_c2pa(make_image(64, 64, fmt="jpeg")))[3] is True
    assert describe(make_image(64, 64, fmt="jpeg"))[3] is False


def test_storing_an_image_again_restarts_its_retention(tmp_path):
    store = ImageStore(str(tmp_path))
    sha = store.put(make_image(64, 64, seed=5))
    old = time.time() - 100 * 86_400
    os.utime(store.location(sha), (old, old))
    store.put(make_image(64, 64, seed=5))   # paid for again (after the cache's TTL, say)
    assert store.gc(keep_days=90) == [] and store.has(sha)


def test_a_store_url_never_shows_its_password():
    from imagebroker.errors import ConfigError

    try:
        store = ImageStore("sftp://bob:hunter2@127.0.0.1/images")
    except ConfigError as exc:   # no sftp driver installed here
        assert "hunter2" not in str(exc) and "bob:***@" in str(exc)
    else:
        assert "hunter2" not in store.shown_url and "hunter2" not in repr(store)


def test_a_prompt_a_provider_echoes_stays_out_of_the_provenance():
    from imagebroker.broker.provenance import record

    with Broker(cached_policy()) as b:
        result = b.generate("my secret product launch")
    echoed = result.model_copy(update={"applied": {**result.applied, "prompt": "my secret product launch"}})
    meta = record(echoed, ImageRequest(prompt="my secret product launch"), 0, store_prompt=False)
    assert "my secret" not in json.dumps(meta)
    assert record(echoed, ImageRequest(prompt="my secret product launch"), 0, store_prompt=True)["prompt"]


def test_the_cache_answers_from_a_remote_store_too():
    pytest.importorskip("fsspec")
    url = f"memory://imagebroker-cache-{time.time_ns()}"
    with Broker(cached_policy(), store=url) as b:
        first = b.generate("a red circle", seed=3)
        again = b.generate("a red circle", seed=3)
    assert again.cost.status == "cached" and again.images[0].data == first.images[0].data
    assert ImageStore(url).has(first.images[0].sha256)
