"""The team gateway, end to end: the official `openai` SDK (sync and async) as the client, over real HTTP on
127.0.0.1 to the gateway on uvicorn, and the gateway to fake providers. Costs are worked by hand from the
catalog's formulas; errors are asserted as the SDK's own exception classes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from decimal import Decimal

import httpx
import openai
import pytest
from PIL import Image

from imagebroker.gateway import create_app
from imagebroker.policies.schema import Policy
from imagebroker.providers.catalog import builtin_catalog
from imagebroker.testing.fakes import fakes
from tests.conftest import png

uvicorn = pytest.importorskip("uvicorn")
FAKES = fakes()
SCHNELL = "together/black-forest-labs/FLUX.1-schnell"


@contextmanager
def gateway(tmp_path, monkeypatch, script=("ok",), also=None, **policy_extra):
    """The gateway in this process on a free loopback port, in front of the Together fake (and the fakes in `also`,
    by provider name): (base URL, fake)."""
    monkeypatch.setenv("TOGETHER_API_KEY", FAKES["together"].key)
    also = also or {}
    with FAKES["together"](list(script)) as fake:
        policy = Policy.model_validate({
            "name": "gateway", "deny": [p for p in builtin_catalog().providers() if p != "together" and p not in also],
            "prefer": [SCHNELL], "objective": "ordered",
            "providers": {"together": {"base_url": fake.base_url},
                          **{name: {"base_url": other.base_url} for name, other in also.items()}},
            "retry": {"max_attempts": 2, "initial_delay_s": 0.01}, **policy_extra})
        app = create_app(policy, f"sqlite:///{tmp_path / 'l.db'}")
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not start"
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}", fake
        finally:
            server.should_exit = True
            thread.join(10)


def client(base: str, key: str = "team-key", cls=openai.OpenAI):
    return cls(base_url=f"{base}/v1", api_key=key, max_retries=0)


def test_the_openai_sdk_generates_through_the_gateway_with_the_cost_in_its_headers(tmp_path, monkeypatch):
    with gateway(tmp_path, monkeypatch) as (base, fake):
        raw = client(base).images.with_raw_response.generate(model=SCHNELL, prompt="a red circle", n=2,
                                                            size="512x512", user="team-a")
        images = raw.parse()
    assert [Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size for d in images.data] == [(512, 512)] * 2
    # FLUX.1 [schnell] on Together: $0.0027/MP x 0.262144 MP x 2 images
    expected = (Decimal("0.0027") * Decimal(512 * 512) / 10**6 * 2).quantize(Decimal("1e-9")).normalize()
    assert raw.headers["x-imagebroker-offering"] == SCHNELL
    assert Decimal(raw.headers["x-imagebroker-cost-usd"]) == expected
    assert raw.headers["x-imagebroker-cost-status"] == "priced"
    with sqlite3.connect(tmp_path / "l.db") as conn:
        rid, offering, nusd = conn.execute("select request_id, offering, cost_nusd from calls").fetchone()
    assert (rid, offering, nusd) == (raw.headers["x-request-id"], SCHNELL, int(expected * 10**9))
    assert fake.generations == 1


def test_model_auto_lets_the_policy_choose_and_the_async_sdk_works_too(tmp_path, monkeypatch):
    async def go(base: str):
        async with client(base, cls=openai.AsyncOpenAI) as c:
            return await asyncio.gather(*(c.images.generate(model="auto", prompt=f"shape {i}") for i in range(4)))

    with gateway(tmp_path, monkeypatch) as (base, fake):
        results = asyncio.run(go(base))
    assert all(len(r.data) == 1 for r in results) and fake.generations == 4
    assert {r.model_extra["imagebroker"]["offering"] for r in results} == {SCHNELL}


def test_an_edit_goes_as_openai_multipart_and_reaches_the_provider(tmp_path, monkeypatch):
    init = png((640, 480))
    with gateway(tmp_path, monkeypatch) as (base, fake):
        result = client(base).images.edit(model="together/black-forest-labs/FLUX.1-kontext-pro",
                                          image=("init.png", init, "image/png"), prompt="make it blue")
    sent = fake.state["edits"][0]
    assert sent["input"].width == 640 and result.data[0].b64_json
    assert result.model_extra["imagebroker"]["cost"]["usd"] == "0.04"


@pytest.mark.parametrize("script, call, error, status", [
    (["refuse"], {"prompt": "x"}, openai.BadRequestError, 400),
    (["ok"], {"prompt": "x", "n": 0}, openai.BadRequestError, 400),
    (["ok"], {"prompt": "x", "model": "together/no-such-model"}, openai.BadRequestError, 400),
    (["500"], {"prompt": "x"}, openai.InternalServerError, 503),
    (["malformed"], {"prompt": "x"}, openai.InternalServerError, 502),
])
def test_failures_reach_the_sdk_as_its_own_exception_classes(tmp_path, monkeypatch, script, call, error, status):
    with gateway(tmp_path, monkeypatch, script) as (base, _), pytest.raises(error) as caught:
        client(base).images.generate(**call)
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict) and body["message"]
    if script == ["refuse"]:
        assert body["code"] == "content_policy_violation"
    assert "Traceback" not in body["message"] and FAKES["together"].key not in body["message"]


def test_a_spent_budget_is_a_429_with_retry_after(tmp_path, monkeypatch):
    budget = [{"name": "tiny", "period": "total", "limit_usd": "0.004", "on_exceed": "reject"}]
    with gateway(tmp_path, monkeypatch, budgets=budget) as (base, fake):
        c = client(base)
        c.images.generate(prompt="first")   # $0.002831155 of $0.004
        with pytest.raises(openai.RateLimitError) as caught:
            c.images.generate(prompt="second")
    assert caught.value.response.headers["retry-after"] and fake.generations == 1


def test_a_gateway_key_is_required_when_one_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEBROKER_GATEWAY_KEY", "s3cret-team-key")
    with gateway(tmp_path, monkeypatch) as (base, fake):
        with pytest.raises(openai.AuthenticationError):
            client(base, key="wrong").images.generate(prompt="x")
        assert fake.generations == 0
        assert client(base, key="s3cret-team-key").images.generate(prompt="x").data


def test_models_health_and_readiness(tmp_path, monkeypatch):
    with gateway(tmp_path, monkeypatch) as (base, _):
        ids = [m.id for m in client(base).models.list()]
        health = httpx.get(f"{base}/healthz").json()
        ready = httpx.get(f"{base}/readyz")
    assert SCHNELL in ids and all(i.startswith("together/") or i.startswith("local/") for i in ids)
    assert health == {"status": "ok"} and ready.status_code == 200


def test_serve_refuses_a_bad_policy_before_listening(tmp_path):
    from typer.testing import CliRunner

    from imagebroker.cli import app

    (tmp_path / "bad.yaml").write_text("name: x\nobjective: fastest-ish\n")
    result = CliRunner().invoke(app, ["serve", "--policy", str(tmp_path / "bad.yaml"), "--port", "1"])
    assert result.exit_code == 2 and "objective" in result.output


# -- gateway keys ---------------------------------------------------------------------------------------------
def make_key(tmp_path, *args: str) -> str:
    import json

    from typer.testing import CliRunner

    from imagebroker.cli import app

    result = CliRunner().invoke(app, ["keys", "create", *args, "--json", "--ledger", f"sqlite:///{tmp_path / 'l.db'}"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["key"]


def test_keys_are_shown_once_and_kept_as_hashes_and_their_calls_carry_their_tags(tmp_path, monkeypatch):
    key = make_key(tmp_path, "team-a", "--tag", "team=a")
    with sqlite3.connect(tmp_path / "l.db") as conn:
        dump = "\n".join(conn.iterdump())
    assert key.startswith("ibk-") and key not in dump and key[12:] not in dump
    with gateway(tmp_path, monkeypatch) as (base, fake):
        with pytest.raises(openai.AuthenticationError):   # once a key exists, none is no entry
            client(base, key="ibk-not-a-key").images.generate(prompt="x")
        assert fake.generations == 0
        raw = client(base, key=key).images.with_raw_response.generate(prompt="x")
    with sqlite3.connect(tmp_path / "l.db") as conn:
        tags = dict(conn.execute("select key, value from call_tags where request_id = ?",
                                 (raw.headers["x-request-id"],)).fetchall())
    assert tags == {"team": "a", "gateway_key": "team-a"}


def test_a_keys_budget_is_enforced_like_a_policy_budget(tmp_path, monkeypatch):
    small, big = make_key(tmp_path, "small", "--budget", "0.004/total"), make_key(tmp_path, "big")
    with gateway(tmp_path, monkeypatch) as (base, fake):
        client(base, key=small).images.generate(prompt="first")      # $0.002831155 of its $0.004
        with pytest.raises(openai.RateLimitError) as caught:
            client(base, key=small).images.generate(prompt="second")
        assert "key:small" in caught.value.message
        assert client(base, key=big).images.generate(prompt="other team").data   # its budget is its own
    assert fake.generations == 2


def test_a_revoked_key_is_refused_and_an_allow_list_limits_the_offerings(tmp_path, monkeypatch):
    import imagebroker.gateway.keys as gateway_keys
    from imagebroker.broker.ledger.store import Ledger
    from imagebroker.gateway.keys import KeyStore

    monkeypatch.setattr(gateway_keys, "KEY_TTL_S", 0.0)
    key = make_key(tmp_path, "dev-only", "--allow", "together/black-forest-labs/FLUX.1-dev")
    with gateway(tmp_path, monkeypatch) as (base, fake):
        c = client(base, key=key)
        with pytest.raises(openai.PermissionDeniedError):
            c.images.generate(model=SCHNELL, prompt="x")
        auto = c.images.generate(prompt="x")   # the policy prefers schnell; the key may only use dev
        assert auto.model_extra["imagebroker"]["offering"] == "together/black-forest-labs/FLUX.1-dev"
        assert [m.id for m in c.models.list()] == ["together/black-forest-labs/FLUX.1-dev"]
        KeyStore(Ledger(f"sqlite:///{tmp_path / 'l.db'}")).revoke("dev-only")
        with pytest.raises(openai.AuthenticationError):
            c.images.generate(prompt="x")
        no_key = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x"})
        assert no_key.status_code == 401   # revoking the last key does not open the gateway
    assert fake.generations == 1


# -- imagebroker's own endpoints ---------------------------------------------------------------------------------
def test_route_answers_the_plan_as_route_json_does(tmp_path, monkeypatch):
    with gateway(tmp_path, monkeypatch) as (base, fake):
        plan = httpx.post(f"{base}/v1/route", json={"prompt": "x", "aspect_ratio": "16:9"}).json()
        bad = httpx.post(f"{base}/v1/route", json={"prompt": "x", "model": "nope/none"})
    assert plan["candidates"][0] == {**plan["candidates"][0], "offering": SCHNELL, "size": "1024x576"}
    assert Decimal(plan["candidates"][0]["estimated_cost_usd"]) > 0 and fake.generations == 0   # nothing paid
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_costs_show_a_team_only_its_own_calls_and_an_admin_everything(tmp_path, monkeypatch):
    a, b = make_key(tmp_path, "team-a"), make_key(tmp_path, "team-b")
    admin = make_key(tmp_path, "ops", "--admin")
    with gateway(tmp_path, monkeypatch) as (base, _):
        for key, n in ((a, 1), (b, 2)):
            for _ in range(n):
                client(base, key=key).images.generate(prompt="x")
        mine = httpx.get(f"{base}/v1/costs", headers={"authorization": f"Bearer {b}"}).json()
        every = httpx.get(f"{base}/v1/costs?by=tag:gateway_key", headers={"authorization": f"Bearer {admin}"}).json()
    assert [g["key"] for g in mine["groups"]] == ["team-b"] and mine["total"]["calls"] == 2
    assert {g["key"]: g["calls"] for g in every["groups"]} == {"team-a": 1, "team-b": 2}
    assert Decimal(every["total"]["cost_usd"]) == Decimal("0.002831155") * 3


def test_metrics_count_calls_cost_and_latency_by_offering(tmp_path, monkeypatch):
    with gateway(tmp_path, monkeypatch, script=["ok", "ok", "refuse"]) as (base, _):
        c = client(base)
        c.images.generate(prompt="x", n=2)
        c.images.generate(prompt="y")
        with pytest.raises(openai.BadRequestError):
            c.images.generate(prompt="z")
        text = httpx.get(f"{base}/metrics").text
    label = f'offering="{SCHNELL}"'
    assert f'imagebroker_calls_total{{{label},status="ok"}} 2.0' in text
    assert f"imagebroker_images_total{{{label}}} 3.0" in text
    assert 'status="400"' in text and 'imagebroker_breaker_open{provider="together"} 0.0' in text
    assert f'imagebroker_call_latency_seconds_count{{{label},status="ok"}} 2.0' in text


# -- links, idempotency, access log ---------------------------------------------------------------------------
def test_response_format_url_is_a_signed_expiring_link_to_the_stored_image(tmp_path, monkeypatch):
    import hashlib

    import imagebroker.gateway.links as links

    with gateway(tmp_path, monkeypatch) as (base, _):
        result = client(base).images.generate(prompt="x", response_format="url", size="512x512")
        url = result.data[0].url
        got = httpx.get(url)
        tampered = httpx.get(url.replace("sig=", "sig=0"))
        monkeypatch.setattr(links, "LINK_TTL_S", -1)
        expired = httpx.get(base + links.signed_path(hashlib.sha256(got.content).hexdigest(), "png"))
    assert url.startswith(f"{base}/v1/images/files/") and result.data[0].b64_json is None
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (512, 512)
    assert (tampered.status_code, expired.status_code) == (403, 403)
    assert "expired" in expired.json()["error"]["message"]


def test_an_idempotency_key_header_answers_a_repeat_without_paying_again(tmp_path, monkeypatch):
    with gateway(tmp_path, monkeypatch) as (base, fake):
        c = client(base)
        first = c.images.with_raw_response.generate(prompt="x", extra_headers={"Idempotency-Key": "order-17"})
        again = c.images.with_raw_response.generate(prompt="x", extra_headers={"Idempotency-Key": "order-17"})
        with pytest.raises(openai.BadRequestError):   # the same key for another request is refused
            c.images.generate(prompt="something else", extra_headers={"Idempotency-Key": "order-17"})
    assert fake.generations == 1
    assert again.headers["x-request-id"] == first.headers["x-request-id"]
    assert again.parse().data[0].b64_json == first.parse().data[0].b64_json


def test_each_call_is_logged_with_its_key_name_offering_and_cost_never_the_key(tmp_path, monkeypatch, caplog):
    key = make_key(tmp_path, "team-log")
    caplog.set_level("INFO", logger="imagebroker.gateway.access")
    with gateway(tmp_path, monkeypatch) as (base, _):
        client(base, key=key).images.generate(prompt="x")
    lines = [r.getMessage() for r in caplog.records if r.name == "imagebroker.gateway.access"]
    assert len(lines) == 1 and "key=team-log" in lines[0] and f"offering={SCHNELL}" in lines[0]
    assert "status=200" in lines[0] and "cost=0.002831155 priced" in lines[0] and key not in lines[0]


def test_a_streaming_client_gets_openais_completed_events_whatever_the_policy_picks(tmp_path, monkeypatch):
    with gateway(tmp_path, monkeypatch) as (base, _):
        c = client(base)
        events = list(c.images.generate(prompt="x", stream=True, partial_images=2, size="512x512"))
        edits = list(c.images.edit(model="together/black-forest-labs/FLUX.1-kontext-pro", prompt="bluer",
                                   image=("init.png", png((512, 512)), "image/png"), stream=True))
    assert [e.type for e in events] == ["image_generation.completed"]   # FLUX on Together: no partial images
    assert Image.open(io.BytesIO(base64.b64decode(events[0].b64_json))).size == (512, 512)
    assert events[0].size == "512x512" and events[0].model_extra["imagebroker"]["offering"] == SCHNELL
    assert [e.type for e in edits] == ["image_edit.completed"]


def test_partial_images_from_gpt_image_stream_through_as_they_come(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKES["openai"].key)
    with FAKES["openai"](["ok", "ok", "cut"]) as upstream, \
            gateway(tmp_path, monkeypatch, also={"openai": upstream}) as (base, _):
        c = client(base)
        events = list(c.images.generate(model="openai/gpt-image-2", prompt="a lighthouse", stream=True,
                                        partial_images=2, quality="low"))
        edits = list(c.images.edit(model="openai/gpt-image-2", prompt="bluer", stream=True, partial_images=1,
                                   image=("init.png", png((512, 512)), "image/png")))
        sent = json.loads(upstream.requests[0]["body"])
        with pytest.raises(openai.APIError, match="completed event"):   # previews sent, then the stream broke
            list(c.images.generate(model="openai/gpt-image-2", prompt="cut", stream=True, partial_images=2))
    assert sent["stream"] is True and sent["partial_images"] == 2
    assert [(e.type, getattr(e, "partial_image_index", None)) for e in events] == [
        ("image_generation.partial_image", 0), ("image_generation.partial_image", 1),
        ("image_generation.completed", None)]
    previews = [Image.open(io.BytesIO(base64.b64decode(e.b64_json))) for e in events]
    assert all(p.size == (1024, 1024) for p in previews) and events[0].b64_json != events[-1].b64_json
    done = events[-1]
    assert done.usage.output_tokens == 196 + 2 * 100   # the previews are billed as output tokens
    assert done.model_extra["imagebroker"]["offering"] == "openai/gpt-image-2"
    assert [e.type for e in edits] == ["image_edit.partial_image", "image_edit.completed"]


def test_the_library_progress_callback_gets_the_previews(tmp_path, monkeypatch):
    from imagebroker import Broker

    monkeypatch.setenv("OPENAI_API_KEY", FAKES["openai"].key)
    with FAKES["openai"](["ok"]) as upstream:
        policy = {"name": "p", "providers": {"openai": {"base_url": upstream.base_url}}}
        seen, steps_only = [], []
        broker = Broker(Policy.model_validate(policy), f"sqlite:///{tmp_path / 'p.db'}")
        result = broker.generate("a cat", model="openai/gpt-image-2", partial_images=3, quality="low",
                                 progress=lambda step, total, partial: seen.append((step, total, partial)))
        broker.generate("a cat", model="openai/gpt-image-2", partial_images=1,
                        progress=lambda step, total: steps_only.append(step))   # two arguments: no previews
        broker.close()
    assert [(s, t) for s, t, _ in seen] == [(1, 3), (2, 3), (3, 3)] and steps_only == []
    assert all(p.offering == "openai/gpt-image-2" and p.data[:8] == b"\x89PNG\r\n\x1a\n" for _, _, p in seen)
    assert result.applied["partial_images"] == 3
    assert result.cost.units["output_image_tokens"] == 196 + 300   # settled from the usage, previews included
    assert result.plan.candidates[0].bound_usd >= result.cost.usd


# -- async jobs ----------------------------------------------------------------------------------------------
def wait_job(base: str, job: str, key: str = "x", timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(f"{base}/v1/images/jobs/{job}", headers={"authorization": f"Bearer {key}"}).json()
        if body.get("status") in ("done", "failed") or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_prefer_respond_async_answers_202_and_the_job_the_sync_body(tmp_path, monkeypatch):
    key, other = make_key(tmp_path, "team-jobs"), make_key(tmp_path, "team-other")
    with gateway(tmp_path, monkeypatch) as (base, fake):
        auth = {"authorization": f"Bearer {key}", "prefer": "respond-async"}
        accepted = httpx.post(f"{base}/v1/images/generations", headers=auth, json={"prompt": "x", "size": "512x512"})
        job = accepted.json()["id"]
        done = wait_job(base, job, key)
        hidden = httpx.get(f"{base}/v1/images/jobs/{job}", headers={"authorization": f"Bearer {other}"})
        bad = httpx.post(f"{base}/v1/images/generations", headers=auth, json={"prompt": "x", "n": 0})
    assert accepted.status_code == 202 and accepted.headers["location"] == f"/v1/images/jobs/{job}"
    assert done["status"] == "done" and done["imagebroker"]["offering"] == SCHNELL
    assert Image.open(io.BytesIO(base64.b64decode(done["data"][0]["b64_json"]))).size == (512, 512)
    assert hidden.status_code == 404   # another team's job is not there for it
    assert bad.status_code == 400 and fake.generations == 1   # a bad request is refused at once, never queued


def test_an_edit_can_be_a_job_too_its_inputs_kept_in_the_store_by_hash(tmp_path, monkeypatch):
    init = png((640, 480))
    with gateway(tmp_path, monkeypatch) as (base, fake):
        accepted = httpx.post(f"{base}/v1/images/edits", headers={"prefer": "respond-async"},
                              data={"model": "together/black-forest-labs/FLUX.1-kontext-pro", "prompt": "make it blue"},
                              files={"image": ("init.png", init, "image/png")})
        done = wait_job(base, accepted.json()["id"])
    assert accepted.status_code == 202 and done["status"] == "done", done
    assert fake.state["edits"][0]["input"].width == 640   # the provider got the uploaded image back from the store
    with sqlite3.connect(tmp_path / "l.db") as conn:
        (stored,) = conn.execute("SELECT request_json FROM gateway_jobs").fetchone()
    assert len(stored) < 2000 and hashlib.sha256(init).hexdigest() in stored   # named by hash, no bytes


def test_jobs_survive_their_worker_a_queued_one_and_one_whose_worker_died_both_run(tmp_path, monkeypatch):
    from sqlalchemy import update

    from imagebroker.broker.ledger.schema import gateway_jobs
    from imagebroker.broker.ledger.store import HOST, Ledger
    from imagebroker.gateway.jobs import JobQueue

    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    queue = JobQueue(ledger)
    for job in ("job_left_queued", "job_worker_died"):
        queue.submit(job, {"prompt": job, "idempotency_key": job}, None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()   # a pid that no longer runs
    with ledger.engine.begin() as conn:
        conn.execute(update(gateway_jobs).where(gateway_jobs.c.id == "job_worker_died")
                     .values(status="running", worker=f"{HOST}:{dead.pid}"))
    with gateway(tmp_path, monkeypatch) as (base, fake):
        results = [wait_job(base, job) for job in ("job_left_queued", "job_worker_died")]
    assert [r["status"] for r in results] == ["done", "done"] and fake.generations == 2


def test_a_finished_job_is_announced_to_the_keys_webhook_signed(tmp_path, monkeypatch):
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from typer.testing import CliRunner

    from imagebroker.cli import app
    from imagebroker.gateway.webhooks import SIGNATURE_HEADER, verify

    received: list[tuple[dict, bytes]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204 if len(received) > 1 else 503)   # the first delivery fails: tried again
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/hooks/images"
    made = CliRunner().invoke(app, ["keys", "create", "team-hook", "--webhook", hook, "--json", "--ledger",
                                    f"sqlite:///{tmp_path / 'l.db'}"])
    created = json.loads(made.stdout)
    try:
        with gateway(tmp_path, monkeypatch) as (base, _):
            accepted = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x"},
                                  headers={"authorization": f"Bearer {created['key']}", "prefer": "respond-async"})
            job = accepted.json()["id"]
            assert wait_job(base, job, created["key"])["status"] == "done"
            deadline = time.monotonic() + 10
            while len(received) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        receiver.shutdown()
    headers, body = received[-1]
    assert json.loads(body) == {"id": job, "object": "image.job", "status": "done", "http_status": 200}
    assert verify(created["webhook_secret"], headers[SIGNATURE_HEADER.lower()], body)
    assert not verify("another-secret", headers[SIGNATURE_HEADER.lower()], body)
    assert created["webhook_secret"] not in body.decode() and created["key"] not in body.decode()


def test_the_dashboard_is_the_report_page_live_for_an_admin_key(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    with gateway(tmp_path, monkeypatch) as (base, _):
        admin, team = make_key(tmp_path, "ops", "--admin"), make_key(tmp_path, "team-a")
        for i in range(3):
            client(base, team).images.generate(prompt=f"call {i}")
        refused = httpx.get(f"{base}/dashboard", headers={"authorization": f"Bearer {team}"})
        page = httpx.get(f"{base}/dashboard", headers={"authorization": f"Bearer {admin}"}, timeout=60)
        nobody = httpx.get(f"{base}/dashboard")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_only"
    assert nobody.status_code == 401
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    figures = dict(re.findall(r'data-figure="([\w-]+)">([^<]*)<', page.text))
    assert figures["total-calls"] == "3" and figures["total-images"] == "3"
    assert figures["total-cost"] == "$0.008493" and figures["offering-0-0"] == SCHNELL
    assert page.text.count("<svg") >= 2 and "<script" not in page.text   # the charts, inline; nothing fetched
    # 3 x $0.002831155 = $0.008493465, shown to the micro-dollar as the report shows it


def test_a_key_the_ledger_does_not_know_is_asked_about_once_per_ttl(tmp_path, monkeypatch):
    """An open gateway's clients all send some key: the ledger is asked about it once, not on every request;
    a key made afterwards is still found at once, and then the unknown one is refused within the TTL."""
    import asyncio
    from types import SimpleNamespace

    from imagebroker.broker.ledger.store import Ledger
    from imagebroker.gateway import keys as gateway_keys
    from imagebroker.gateway.keys import Callers, KeyStore

    monkeypatch.setattr(gateway_keys, "KEY_TTL_S", 0.2)
    asked: list[str] = []
    find = KeyStore.find
    monkeypatch.setattr(KeyStore, "find", lambda self, key: asked.append(key) or find(self, key))
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    callers = Callers(lambda: SimpleNamespace(ledger=ledger, add_budgets=lambda budgets: None))

    async def go() -> None:
        assert [await callers.of("Bearer sk-anything") for _ in range(5)] == [None] * 5   # open
        assert asked == ["sk-anything"]
        made, _ = KeyStore(ledger).create("team")
        assert (await callers.of(f"Bearer {made}")).name == "team"   # never asked before: found at once
        await asyncio.sleep(0.25)
        assert await callers.of("Bearer sk-anything") is False   # a key exists now: the gateway is closed

    asyncio.run(go())
    ledger.close()


def test_control_and_image_prompts_go_through_the_gateway_as_base64_never_as_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("BFL_API_KEY", FAKES["bfl"].key)
    edges = png((512, 384))
    with FAKES["bfl"](["ok"]) as bfl, gateway(tmp_path, monkeypatch, also={"bfl": bfl}) as (base, _):
        c = client(base)
        made = c.images.generate(model="bfl/flux-pro-1.0-canny", prompt="a house", extra_body={"control": [
            {"kind": "canny", "image": "data:image/png;base64," + base64.b64encode(edges).decode()}]})
        sent = bfl.state["edits"][0]
        assert (sent["inputs"]["preprocessed_image"].width, sent["inputs"]["preprocessed_image"].height) == (512, 384)
        assert made.model_extra["imagebroker"]["offering"] == "bfl/flux-pro-1.0-canny"
        with pytest.raises(openai.BadRequestError, match=r"control\[0\]\.image: not base64"):
            c.images.generate(model="bfl/flux-pro-1.0-canny", prompt="a house",
                              extra_body={"control": [{"kind": "canny", "image": "/etc/hostname"}]})
        with pytest.raises(openai.BadRequestError, match="no image prompts"):
            c.images.generate(model=SCHNELL, prompt="a house",
                              extra_body={"image_prompts": [base64.b64encode(edges).decode()]})
