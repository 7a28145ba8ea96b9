"""The local backend on tiny SD and FLUX pipelines built in code: no downloads, real Diffusers."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from imagebroker import AsyncBroker, Broker
from imagebroker.errors import AllAttemptsFailed, NoRouteError
from imagebroker.local_backend import schedulers
from imagebroker.policies.schema import Policy
from tests.conftest import builtin_providers
from tests.tiny_pipelines import build_tiny_flux, build_tiny_sd, make_lora

OTHERS = [*builtin_providers("local"), "mock", "fakehttp", "local/sdxl", "local/sd15", "local/flux-*",
          "local/tiny-shapes"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    sd = build_tiny_sd(root / "sd")
    return {"sd": sd, "flux": build_tiny_flux(root / "flux"), "lora_a": make_lora(sd, root / "lora_a", 1),
            "lora_b": make_lora(sd, root / "lora_b", 2)}


def policy(models: dict[str, Path], **local) -> Policy:
    rule = {"min_side": 64, "max_side": 256, "multiple_of": 16}
    return Policy.model_validate({
        "name": "local-test", "deny": OTHERS,
        "local": {"models": {"tsd": {"source": str(models["sd"]), "family": "sd", "steps": 4},
                             "tflux": {"source": str(models["flux"]), "family": "flux", "steps": 3}},
                  **local},
        "offerings": [{"id": "local/tsd", "capabilities": {"default_size": "64x64", "size_rule": rule}},
                      {"id": "local/tflux", "capabilities": {"default_size": "64x64", "size_rule": rule}}]})


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def broker(models, tmp_path_factory):
    b = Broker(policy(models), ledger=f"sqlite:///{tmp_path_factory.mktemp('l') / 'l.db'}")
    yield b
    b.close()


def test_same_seed_same_image_and_seeds_count_up(broker):
    a = broker.generate("a cat", model="local/tsd", n=2, seed=11)
    b = broker.generate("a cat", model="local/tsd", n=2, seed=11)
    assert [i.seed for i in a.images] == [11, 12]
    assert [i.data for i in a.images] == [i.data for i in b.images]
    assert np.abs(pixels(a.images[0]) - pixels(a.images[1])).max() > 0  # different seeds differ


def test_an_image_made_in_a_batch_matches_the_same_seed_alone(broker):
    batch = broker.generate("a cat", model="local/tsd", n=3, seed=7)
    alone = broker.generate("a cat", model="local/tsd", n=1, seed=8)
    # Exact up to float rounding of batched CPU kernels (measured ~1e-6), i.e. at most one 8-bit level.
    assert np.abs(pixels(batch.images[1]) - pixels(alone.images[0])).max() <= 1


@pytest.mark.parametrize("name", schedulers.all_names())
def test_every_scheduler_runs_or_is_rejected_before_running(broker, name):
    for model, family in (("local/tsd", "sd"), ("local/tflux", "flux")):
        if name == "lms":
            pytest.importorskip("scipy")
        if schedulers.problem(name, family) is None:
            r = broker.generate("a cat", model=model, scheduler=name, seed=1, steps=3)
            assert r.applied["scheduler"] == name and r.images
        else:
            with pytest.raises(NoRouteError, match=f"scheduler '{name}' does not fit a {family} model"):
                broker.generate("a cat", model=model, scheduler=name)


def test_lora_changes_the_output_and_the_base_comes_back(broker, models):
    base = broker.generate("a cat", model="local/tsd", seed=3)
    styled = broker.generate("a cat", model="local/tsd", seed=3, adapters=[{"ref": str(models["lora_a"])}])
    both = broker.generate("a cat", model="local/tsd", seed=3, adapters=[
        {"ref": str(models["lora_a"]), "scale": 0.7}, {"ref": str(models["lora_b"]), "scale": 0.3}])
    after = broker.generate("a cat", model="local/tsd", seed=3)
    assert np.abs(pixels(base.images[0]) - pixels(styled.images[0])).max() > 2
    assert np.abs(pixels(styled.images[0]) - pixels(both.images[0])).max() > 0
    assert after.images[0].data == base.images[0].data  # the base model is unchanged afterwards


def test_progress_counts_every_denoising_step(broker):
    seen: list[tuple[int, int]] = []
    broker.generate("a cat", model="local/tsd", steps=6, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 6) for i in range(1, 7)]
    heun: list[tuple[int, int]] = []  # second-order: the denoiser runs more often than `steps`
    broker.generate("a cat", model="local/tsd", steps=5, scheduler="heun",
                    progress=lambda i, n: heun.append((i, n)))
    assert heun[-1][0] == heun[-1][1] > 5


def test_a_timed_out_call_interrupts_the_pipeline(models, tmp_path):
    # 2 s: room for the first call's imports and load; 400 steps take several times that
    p = Policy.model_validate({**policy(models).model_dump(), "timeout_s": 2.0, "retry": {"max_attempts": 1}})
    p = Policy.model_validate(p.model_dump())
    seen: list[int] = []
    with Broker(p, ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        b.generate("warm", model="local/tsd", steps=2)
        t0 = time.perf_counter()
        with pytest.raises(AllAttemptsFailed, match=r"timed out after 2 s"):
            b.generate("a cat", model="local/tsd", steps=400, progress=lambda i, n: seen.append(i))
        time.sleep(1.0)  # let the worker notice and stop
        steps_run = len(seen)
        time.sleep(1.0)
        assert len(seen) == steps_run < 400  # stopped after the current step, not run to the end
        assert b.generate("again", model="local/tsd", steps=2).images  # the worker is free again
    assert time.perf_counter() - t0 < 30


def test_cost_is_measured_seconds_times_the_configured_rate(models, tmp_path):
    db = tmp_path / "l.db"
    with Broker(policy(models, cpu_usd_per_hour="3.6"), ledger=f"sqlite:///{db}") as b:
        r = b.generate("a cat", model="local/tsd", n=2, seed=1)
    units = r.cost.units
    assert r.cost.status == "priced" and units["device"] == "cpu" and units["gpu_seconds"] > 0
    assert r.cost.usd == (Decimal(str(units["gpu_seconds"])) * Decimal("3.6") / 3600).quantize(
        Decimal("1e-9")).normalize()
    assert units["load_seconds"] > 0 and units["load_charged"] is False  # load is recorded, not charged
    with sqlite3.connect(db) as conn:
        (nusd, status, usage), = conn.execute("select cost_nusd, cost_status, usage_json from calls")
    assert status == "priced" and nusd == int(r.cost.usd * 10**9) and '"gpu_seconds"' in usage


def test_concurrent_requests_are_coalesced_into_one_batch_and_stay_what_they_would_be(models, tmp_path):
    async def run():
        async with AsyncBroker(policy(models), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
            await b.generate("warm", model="local/tsd")
            together = await asyncio.gather(*[b.generate(f"cat {i}", model="local/tsd", seed=i)
                                              for i in range(4)])
            alone = await b.generate("cat 2", model="local/tsd", seed=2)
            return together, alone

    together, alone = asyncio.run(run())
    assert max(r.applied["batch_images"] for r in together) > 1
    assert np.abs(pixels(together[2].images[0]) - pixels(alone.images[0])).max() <= 1
    assert sum(r.cost.units["gpu_seconds"] for r in together) > 0


def test_flux_pipeline_runs_and_reports_its_seeds(broker):
    r = broker.generate("a cat", model="local/tflux", n=2, seed=5)
    assert [i.seed for i in r.images] == [5, 6] and r.images[0].width == 64


def test_a_model_that_is_not_installed_says_how_to_install_it(broker):
    with pytest.raises(NoRouteError, match=r"hf download stabilityai/stable-diffusion-xl-base-1\.0"):
        Broker(Policy(name="t", deny=builtin_providers("local"))).generate("x", model="local/sdxl")


def test_the_pipeline_stays_warm(broker):
    broker.generate("a cat", model="local/tsd")
    cand = broker.plan("a cat", model="local/tsd").candidates[0]
    assert cand.estimated_latency_s < 10  # no load time added once warm
    r = broker.generate("a cat", model="local/tsd")
    assert r.cost.units["load_seconds"] == 0.0


def test_memory_options_from_the_policy(models, tmp_path):
    """VAE slicing/tiling and the attention backend apply; CPU offload is ignored without a GPU."""
    opts = {"vae_slicing": True, "vae_tiling": True, "attention_backend": "native", "cpu_offload": True}
    with Broker(policy(models, **opts), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        r = b.generate("a cat", model="local/tsd", seed=1)
        pipe = b._async.provider("local").runner().pipelines.cache["local/tsd"].pipe
    assert r.images and pipe.vae.use_slicing and pipe.vae.use_tiling


def test_opt_in_compile_matches_eager(models, tmp_path):
    with Broker(policy(models), ledger=f"sqlite:///{tmp_path / 'e.db'}") as b:
        eager = b.generate("a cat", model="local/tsd", seed=4)
    with Broker(policy(models, compile=True), ledger=f"sqlite:///{tmp_path / 'c.db'}") as b:
        compiled = b.generate("a cat", model="local/tsd", seed=4)
    assert compiled.cost.units["load_seconds"] > eager.cost.units["load_seconds"]  # compile counted as load
    assert np.abs(pixels(compiled.images[0]) - pixels(eager.images[0])).max() <= 1
