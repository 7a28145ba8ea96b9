"""Keys stay home: credentials go only to a provider's configured origins, and result URLs are fetched
by rules a provider's answer cannot bend. End to end through the broker against the BFL, fal and
Replicate fakes, whose hostile steps answer with URLs elsewhere; `fake.elsewhere` is a second listener
on 127.0.0.1 (another port, so another origin) that records every request reaching it. The network
guard (conftest) fails any test that tried to connect beyond loopback: `metadata_url` passing means
no connection to 169.254.169.254 was even attempted."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imagebroker import AsyncBroker, Broker
from imagebroker.errors import AllAttemptsFailed, BadProviderResponse
from imagebroker.policies.schema import Policy
from imagebroker.providers.catalog import builtin_catalog
from imagebroker.providers.http import MAX_REDIRECTS, HttpProvider, check_result_url, data_url
from imagebroker.providers.registry import provider_class
from imagebroker.providers.settings import ProviderSettings
from imagebroker.testing.fakes import fakes

FAKES = fakes()
OFFERING = {"bfl": "bfl/flux-2-pro", "fal": "fal/fal-ai/flux/dev",
            "replicate": "replicate/black-forest-labs/flux-dev"}
WHERE = {"provider": "test"}


def policy_for(provider: str, fake, **extra) -> Policy:
    return Policy.model_validate({
        "name": "origins", "deny": [p for p in builtin_catalog().providers() if p != provider],
        "prefer": [OFFERING[provider]], "objective": "ordered",
        "providers": {provider: {"base_url": fake.base_url, "poll_interval_s": 0.05}},
        "retry": {"max_attempts": 3, "initial_delay_s": 0.01}, "fallback": {"max_offerings": 1}, **extra})


def run(provider: str, step: str, tmp_path, monkeypatch, **policy_extra):
    """The call's result (or its AllAttemptsFailed) and the fake, stopped, with what it recorded."""
    monkeypatch.setenv(provider_class(provider).api_key_env, FAKES[provider].key)
    with FAKES[provider]([step]) as fake, \
            Broker(policy_for(provider, fake, **policy_extra), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        try:
            return b.generate("a red circle", seed=9), fake
        except AllAttemptsFailed as exc:
            return exc, fake


def carrying_the_key(requests: list[dict]) -> list[dict]:
    key = FAKES["bfl"].key  # every fake's key is the same string
    return [r for r in requests if any(key in v for v in r["headers"].values())]


def hops(fake) -> int:
    return sum(r["path"] == "/hop" for r in fake.requests)


@pytest.mark.parametrize("provider, step", [
    ("bfl", "foreign_poll"), ("fal", "foreign_poll"), ("fal", "foreign_result"),
    ("bfl", "poll_redirect"), ("fal", "poll_redirect")])
def test_a_keyed_url_elsewhere_is_refused_once_and_never_sent_anything(provider, step, tmp_path,
                                                                        monkeypatch):
    result, fake = run(provider, step, tmp_path, monkeypatch)
    assert isinstance(result, AllAttemptsFailed), result
    assert [a.error_type for a in result.attempts] == ["BadProviderResponse"]  # paid once, not retried
    assert fake.generations == 1
    assert fake.elsewhere.requests == []
    assert fake.elsewhere.url in result.attempts[0].error  # names the origin it would not call
    assert fake.key not in str(result) and fake.key not in result.attempts[0].error


async def test_the_async_broker_refuses_a_polling_url_elsewhere_too(tmp_path, monkeypatch):
    monkeypatch.setenv("BFL_API_KEY", FAKES["bfl"].key)
    with FAKES["bfl"](["foreign_poll", "ok"]) as fake:
        async with AsyncBroker(policy_for("bfl", fake), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            with pytest.raises(AllAttemptsFailed) as failed:
                await b.generate("a red circle")
            assert [a.error_type for a in failed.value.attempts] == ["BadProviderResponse"]
            assert len((await b.generate("a red circle")).images) == 1  # the next call is unaffected
    assert fake.generations == 2 and fake.elsewhere.requests == []


def test_replicate_polls_by_id_on_its_own_origin_whatever_urls_get_says(tmp_path, monkeypatch):
    result, fake = run("replicate", "foreign_poll", tmp_path, monkeypatch)
    assert not isinstance(result, Exception), result
    assert fake.elsewhere.requests == []
    assert any(r["path"].startswith("/v1/predictions/") for r in carrying_the_key(fake.requests))


def test_fal_sends_no_cancel_elsewhere(tmp_path, monkeypatch):
    result, fake = run("fal", "foreign_cancel", tmp_path, monkeypatch, timeout_s=0.5,
                       retry={"max_attempts": 1})
    assert isinstance(result, AllAttemptsFailed), result
    assert [a.error_type for a in result.attempts] == ["OutcomeUnknown"]  # the timeout of an accepted job
    assert fake.elsewhere.requests == []


@pytest.mark.parametrize("provider", sorted(OFFERING))
@pytest.mark.parametrize("step, says", [
    ("file_url", "file:// refused: https only"),
    ("metadata_url", "http://169.254.169.254:80 refused: a link-local, multicast or unspecified address"),
    ("too_many_redirects", f"redirected more than {MAX_REDIRECTS} times")])
def test_a_hostile_result_url_is_refused_once(provider, step, says, tmp_path, monkeypatch):
    result, fake = run(provider, step, tmp_path, monkeypatch)
    assert isinstance(result, AllAttemptsFailed), result
    assert [a.error_type for a in result.attempts] == ["BadProviderResponse"]  # paid once, not retried
    assert says in result.attempts[0].error
    assert fake.generations == 1
    assert hops(fake) == (MAX_REDIRECTS + 1 if step == "too_many_redirects" else 0)
    assert fake.elsewhere.requests == []


@pytest.mark.parametrize("provider", sorted(OFFERING))
def test_redirects_up_to_the_bound_are_followed(provider, tmp_path, monkeypatch):
    result, fake = run(provider, "redirects", tmp_path, monkeypatch)
    assert not isinstance(result, Exception), result
    image = result.images[0]
    assert Image.open(io.BytesIO(image.data)).size == (image.width, image.height)
    assert hops(fake) == MAX_REDIRECTS


@pytest.mark.parametrize("provider", sorted(OFFERING))
def test_a_redirect_to_another_origin_is_followed_without_credentials(provider, tmp_path, monkeypatch):
    result, fake = run(provider, "redirect_away", tmp_path, monkeypatch)
    assert not isinstance(result, Exception), result
    assert [r["path"] for r in fake.elsewhere.requests] == ["/hop"]  # it went there, and came back
    assert carrying_the_key(fake.elsewhere.requests) == []
    assert not any({"x-key", "authorization"} & set(r["headers"]) for r in fake.elsewhere.requests)
    # downloads carry no key even at home: only the submit and the polls do
    keyed = carrying_the_key(fake.requests)
    assert keyed and not any(r["path"] in ("/hop",) or "/files/" in r["path"] or "/delivery/" in r["path"]
                             for r in keyed)


# -- the rules themselves, on IP literals (nothing is looked up or connected) -----------------------

PUBLIC, LOOPBACK, PRIVATE = "https://1.1.1.1", "http://127.0.0.1:8000", "http://10.0.0.2:8000"


@pytest.mark.parametrize("url, base", [
    ("https://8.8.8.8/out.png", PUBLIC),
    ("https://10.0.0.1/out.png", PRIVATE), ("http://10.0.0.1/out.png", PRIVATE),
    ("http://127.0.0.1:9/out.png", LOOPBACK), ("http://[::1]:9/out.png", LOOPBACK),
    ("http://localhost:9/out.png", LOOPBACK),  # a name: every address it resolves to is loopback
    ("https://8.8.8.8/out.png", LOOPBACK),
])
async def test_result_urls_the_rules_allow(url, base):
    assert str(await check_result_url(url, base, WHERE)) == url


@pytest.mark.parametrize("url, base, says", [
    ("file:///etc/passwd", LOOPBACK, "https only"),
    ("http://127.0.0.1:9/out.png", None, "https only"),  # no base URL: the strictest rules
    ("ftp://8.8.8.8/out.png", PUBLIC, "https only"),
    ("http://8.8.8.8/out.png", PUBLIC, "https only"),  # http only where the base URL is local http
    ("http://8.8.8.8/out.png", "https://127.0.0.1:8000", "https only"),
    ("https://10.0.0.1/out.png", PUBLIC, "a private address"),
    ("https://127.0.0.1/out.png", PUBLIC, "a private address"),
    ("https://[::1]/out.png", PUBLIC, "a private address"),
    ("https://100.64.0.1/out.png", PUBLIC, "a private address"),
    ("https://169.254.169.254/latest/meta-data/", LOOPBACK, "link-local"),
    ("https://[::ffff:169.254.169.254]/", PRIVATE, "link-local"),
    ("https://[fe80::1]/", PRIVATE, "link-local"),
    ("https://0.0.0.0:8000/", LOOPBACK, "link-local, multicast or unspecified"),
    ("https://224.0.0.1/", LOOPBACK, "link-local, multicast or unspecified"),
    ("https:///no-host", PUBLIC, "no host"),
])
async def test_result_urls_the_rules_refuse(url, base, says):
    with pytest.raises(BadProviderResponse, match=says) as refused:
        await check_result_url(url, base, WHERE)
    assert "/out.png" not in str(refused.value) and "meta-data" not in str(refused.value)  # origin only


@pytest.mark.parametrize("provider, url, base, ok", [
    ("bfl", "https://api.bfl.ai/v1/get_result?id=1", "https://api.bfl.ai", True),
    ("bfl", "https://api.eu1.bfl.ai/v1/get_result?id=1", "https://api.bfl.ai", True),  # its cluster
    ("bfl", "https://api.us.bfl.ai:443/v1/get_result?id=1", "https://api.eu.bfl.ai", True),
    ("bfl", "https://api.bfl.ai.example.com/v1/get_result", "https://api.bfl.ai", False),
    ("bfl", "https://example.com/api.bfl.ai", "https://api.bfl.ai", False),
    ("bfl", "https://api.bfl.ai@example.com/v1/get_result", "https://api.bfl.ai", False),
    ("bfl", "http://api.us.bfl.ai/v1/get_result", "https://api.bfl.ai", False),
    ("bfl", "https://api.us.bfl.ai:8443/v1/get_result", "https://api.bfl.ai", False),
    ("bfl", "https://api.bfl.ai/v1/get_result", "https://bfl-proxy.example.com", False),  # custom base
    ("bfl", "http://127.0.0.1:8001/v1/get_result", "http://127.0.0.1:8000", False),  # another port
    ("bfl", "http://127.0.0.1:8000/v1/get_result", "http://127.0.0.1:8000", True),
    ("fal", "https://queue.fal.run/fal-ai/flux/requests/1/status", "https://queue.fal.run", True),
    ("fal", "https://fal.run/fal-ai/flux/requests/1/status", "https://queue.fal.run", False),
    ("fal", "file:///etc/passwd", "https://queue.fal.run", False),
    ("fal", None, "https://queue.fal.run", False),
])
def test_which_urls_get_the_key(provider, url, base, ok):
    p = provider_class(provider)(ProviderSettings())
    if ok:
        assert p.keyed_url(url, base, WHERE) == url
    else:
        with pytest.raises(BadProviderResponse, match=r"not sent there|not a URL"):
            p.keyed_url(url, base, WHERE)


def test_data_urls_are_decoded_and_bounded(monkeypatch):
    assert data_url("data:image/png;base64,aGVsbG8=", WHERE) == b"hello"
    with pytest.raises(BadProviderResponse, match="not base64"):
        data_url("data:image/png,hello", WHERE)
    with pytest.raises(BadProviderResponse, match="not valid base64"):
        data_url("data:image/png;base64,a", WHERE)
    monkeypatch.setattr("imagebroker.providers.http.MAX_RESULT_BYTES", 3)
    with pytest.raises(BadProviderResponse, match="larger than"):
        data_url("data:image/png;base64," + "A" * 100, WHERE)


async def test_a_data_url_result_is_read_without_a_connection():
    p = provider_class("together")(ProviderSettings())
    assert isinstance(p, HttpProvider)
    assert await p.download("data:image/png;base64,aGVsbG8=", WHERE, base_url=PUBLIC) == b"hello"
    assert p._client is None  # no client was even made: nothing was fetched


# -- an accepted job is polled and downloaded again, never submitted again ------------------------------
def bfl_broker(fake, tmp_path, **extra):
    from imagebroker.policies.schema import Policy
    from tests.conftest import builtin_providers

    return Broker(Policy.model_validate({
        "name": "t", "deny": builtin_providers("bfl"), "prefer": ["bfl/flux-2-pro"], "objective": "ordered",
        "providers": {"bfl": {"base_url": fake.base_url, "poll_interval_s": 0.01}},
        "fallback": {"max_offerings": 1}, "retry": {"initial_delay_s": 0.01}, **extra}),
        ledger=f"sqlite:///{tmp_path / 'l.db'}")


@pytest.mark.parametrize("step", ["poll_flaky", "download_flaky"])
def test_transient_failures_after_the_submit_are_retried_in_place(step, tmp_path, monkeypatch):
    monkeypatch.setenv("BFL_API_KEY", FAKES["bfl"].key)
    with FAKES["bfl"]([step]) as fake, bfl_broker(fake, tmp_path) as b:
        result = b.generate("a red circle")
    assert len(result.attempts) == 1 and result.cost.status in ("priced", "estimated")
    assert fake.generations == 1  # one paid submit


def test_a_job_whose_polling_keeps_failing_is_an_unknown_outcome_charged_to_the_budget(tmp_path, monkeypatch):
    from decimal import Decimal

    from imagebroker.errors import AllAttemptsFailed

    monkeypatch.setenv("BFL_API_KEY", FAKES["bfl"].key)
    budgets = [{"name": "all", "period": "total", "limit_usd": "1"}]
    with FAKES["bfl"](["poll_down"]) as fake, bfl_broker(fake, tmp_path, budgets=budgets) as b:
        with pytest.raises(AllAttemptsFailed) as exc:
            b.generate("a red circle")
        spent, reserved = b.ledger.counters([("all", "total")])[("all", "total")]
    (attempt,) = exc.value.attempts
    assert attempt.error_type == "OutcomeUnknown" and "polling kept failing" in attempt.error
    assert fake.generations == 1  # not submitted again
    assert attempt.cost.status == "estimated" and attempt.cost.usd > 0
    assert (spent, reserved) == (attempt.cost.usd, Decimal(0))  # counted, at the estimate
    import sqlite3

    with sqlite3.connect(tmp_path / "l.db") as conn:
        (cost, status), = conn.execute("select cost_nusd, cost_status from calls").fetchall()
    assert (cost, status) == (int(attempt.cost.usd * 10**9), "estimated")  # the call row keeps it too


def test_an_answer_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from imagebroker.errors import AllAttemptsFailed
    from imagebroker.policies.schema import Policy
    from tests.conftest import builtin_providers

    monkeypatch.setenv("TOGETHER_API_KEY", FAKES["together"].key)
    with FAKES["together"](["ok"]) as fake:
        policy = Policy.model_validate({
            "name": "t", "deny": builtin_providers("together"), "fallback": {"max_offerings": 1},
            "providers": {"together": {"base_url": fake.base_url, "max_response_bytes": 1000}}})
        with Broker(policy, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b, pytest.raises(AllAttemptsFailed) as exc:
            b.generate("a red circle", model="together/black-forest-labs/FLUX.1-schnell")
    (attempt,) = exc.value.attempts  # not retried: the same provider would send the same
    assert attempt.error_type == "BadProviderResponse" and "above 1000 bytes" in attempt.error
