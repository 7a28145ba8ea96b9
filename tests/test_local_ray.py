"""The Ray Serve engine (`local.engine: ray`) on a real Ray instance on this machine's CPU, with the tiny SD
pipeline built in code and the bundled tiny-shapes model: the same guarantees as the in-process engine,
faults, and `imagebroker local`.

One Ray instance serves the whole module (it takes ~5 s to start, each replica ~5 s more), started by the
broker itself as `local.ray.address` unset does. Marked `ray` and `slow`: `-m "not ray"` leaves it out.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("ray.serve")

from imagebroker import Broker
from imagebroker.errors import CallTimedOut
from imagebroker.policies.schema import Policy
from tests.conftest import builtin_providers
from tests.tiny_pipelines import build_tiny_sd, make_lora

pytestmark = [pytest.mark.ray, pytest.mark.slow]
OTHERS = [*builtin_providers("local"), "mock", "fakehttp", "local/sdxl", "local/sd15", "local/flux-*"]
RULE = {"min_side": 64, "max_side": 256, "multiple_of": 16}
THREADS = 2   # each replica's torch threads: the in-process engine's here, so the bytes can match


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    sd = build_tiny_sd(root / "sd")
    broken = root / "broken"   # a folder that claims a pipeline and holds none: its replicas cannot start
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    return {"sd": sd, "broken": broken, "lora": make_lora(sd, root / "lora", 1)}


def policy(paths: dict[str, Path], engine: str, **ray) -> Policy:
    one = {"replicas": 1, "num_cpus": THREADS}
    return Policy.model_validate({
        "name": "ray-test", "deny": OTHERS,
        "local": {"engine": engine, "cpu_usd_per_hour": "3.6", "coalesce": {"window_ms": 100},
                  "ray": {"num_cpus": 10, "models": ["tsd", "tsd1", "broken", "tiny-shapes"],
                          "deployment": {"replicas": 2, "num_cpus": THREADS}} | ray,
                  "models": {"tsd": {"source": str(paths["sd"]), "family": "sd", "steps": 4},
                             "tsd1": {"source": str(paths["sd"]), "family": "sd", "steps": 4, "ray": one},
                             "broken": {"source": str(paths["broken"]), "family": "sd",
                                        "ray": one | {"start_retries": 1}},
                             "tiny-shapes": {"source": "builtin:tiny-shapes", "ray": one}}},
        "retry": {"max_attempts": 3, "initial_delay_s": 0.5},
        "offerings": [{"id": f"local/{m}", "capabilities": {"default_size": "64x64", "size_rule": RULE}}
                      for m in ("tsd", "tsd1", "broken")]})


@pytest.fixture(scope="module")
def ledger(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray") / "l.db"


@pytest.fixture(scope="module")
def broker(models, ledger):
    b = Broker(policy(models, "ray"), ledger=f"sqlite:///{ledger}")
    b.generate("warm up", model="local/tsd", seed=1)   # starts Ray here and deploys the three models
    yield b
    b.close()


@pytest.fixture(scope="module")
def inprocess(models, tmp_path_factory):
    b = Broker(policy(models, "inprocess"), ledger=f"sqlite:///{tmp_path_factory.mktemp('in') / 'l.db'}")
    yield b
    b.close()


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB")).astype(int)


def stats(deployment: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(deployment, "imagebroker").stats.remote().result(timeout_s=30)


def test_the_same_seed_gives_the_same_bytes_as_the_in_process_engine(broker, inprocess):
    import torch

    assert torch.get_num_threads() == THREADS   # what makes CPU float sums add up in the same order
    on_ray = broker.generate("a cat", model="local/tsd", n=2, seed=11)
    here = inprocess.generate("a cat", model="local/tsd", n=2, seed=11)
    assert [i.seed for i in on_ray.images] == [11, 12]
    assert [i.data for i in on_ray.images] == [i.data for i in here.images]
    assert on_ray.applied["engine"] == "ray" and on_ray.applied["replica"]
    assert "engine" not in here.applied
    on_ray = broker.generate("a cat", model="local/tsd", seed=4, scheduler="dpmpp_2m_karras", steps=5)
    here = inprocess.generate("a cat", model="local/tsd", seed=4, scheduler="dpmpp_2m_karras", steps=5)
    assert on_ray.images[0].data == here.images[0].data and on_ray.applied["scheduler"] == "dpmpp_2m_karras"
    shapes = {"model": "local/tiny-shapes", "seed": 6, "steps": 8}   # the bundled model, too
    assert broker.generate("a red circle", **shapes).images[0].data == \
        inprocess.generate("a red circle", **shapes).images[0].data


def test_a_batch_image_equals_the_same_seed_alone_and_requests_coalesce_in_the_replica(broker):
    batch = broker.generate("a cat", model="local/tsd", n=3, seed=7)
    alone = broker.generate("a cat", model="local/tsd", n=1, seed=8)
    assert batch.applied["batch_images"] == 3
    assert np.abs(pixels(batch.images[1]) - pixels(alone.images[0])).max() <= 1

    with ThreadPoolExecutor(6) as pool:   # 6 at once over 2 replicas: @serve.batch groups them
        together = list(pool.map(lambda i: broker.generate(f"cat {i}", model="local/tsd", seed=i), range(6)))
    assert max(r.applied["batch_images"] for r in together) > 1
    again = broker.generate("cat 2", model="local/tsd", seed=2)
    assert np.abs(pixels(together[2].images[0]) - pixels(again.images[0])).max() <= 1


def test_cost_is_the_seconds_the_replica_measured_at_the_cpu_rate(broker, ledger):
    r = broker.generate("a cat", model="local/tsd", seed=3)
    units = r.cost.units
    assert units["device"] == "cpu" and r.cost.status == "priced"
    assert 0 < units["gpu_seconds"] < r.latency_s   # the pipeline call alone, not Ray's round trip
    assert r.cost.usd == Decimal(str(units["gpu_seconds"])) * Decimal("3.6") / 3600
    with sqlite3.connect(ledger) as conn:
        (nusd, usage), = conn.execute("select cost_nusd, usage_json from calls where request_id = ?",
                                      (r.request_id,)).fetchall()
        (replica,), = conn.execute("select provider_request_id from attempts where request_id = ? and "
                                   "status = 'ok'", (r.request_id,)).fetchall()
    assert nusd == int(r.cost.usd * 10**9) and json.loads(usage)["gpu_seconds"] == units["gpu_seconds"]
    assert replica.startswith(r.applied["replica"] + ":")


def test_progress_and_lora_adapters_cross_the_cluster(broker, models):
    steps: list[tuple[int, int]] = []
    base = broker.generate("a cat", model="local/tsd1", seed=5, progress=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    styled = broker.generate("a cat", model="local/tsd1", seed=5, adapters=[{"ref": str(models["lora"])}])
    assert np.abs(pixels(styled.images[0]) - pixels(base.images[0])).max() > 0
    assert styled.applied["adapters"][0]["ref"] == str(models["lora"])
    after = broker.generate("a cat", model="local/tsd1", seed=5)   # the adapter is off again, kept loaded
    assert after.images[0].data == base.images[0].data


def test_a_cancelled_call_stops_its_replicas_run(broker):
    before = stats("model-tsd1")
    with pytest.raises(CallTimedOut):
        broker.generate("a long one", model="local/tsd1", seed=1, steps=500, size="256x256", timeout=2)
    deadline = time.monotonic() + 30
    while (now := stats("model-tsd1"))["interrupted"] == before["interrupted"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert now["interrupted"] == before["interrupted"] + 1 and now["images"] == before["images"]
    assert broker.generate("next", model="local/tsd1", seed=1).images   # the replica is free again


def test_a_replica_killed_mid_request_is_retried_on_another_and_each_attempt_is_recorded(broker, ledger):
    killed: list[int] = []

    class Kill(logging.Handler):   # the log names the replica a request went to: kill that one, mid-run
        def emit(self, record: logging.LogRecord) -> None:
            if not killed and "on Ray Serve replica" in record.msg:
                killed.append(pid := record.args[2])   # type: ignore[index]
                threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()

    log = logging.getLogger("imagebroker.local.ray")
    handler, level = Kill(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        r = broker.generate("a long one", model="local/tsd", seed=9, steps=60, size="128x128")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert killed and r.images and len(r.images[0].data) > 0
    failed = [a for a in r.attempts if a.status != "ok"]
    assert failed and failed[0].error_type == "ProviderUnavailable"
    assert f"pid {killed[0]}" in failed[0].error and "failed mid-request" in failed[0].error
    assert r.attempts[-1].status == "ok" and r.applied["replica"] not in failed[0].error
    with sqlite3.connect(ledger) as conn:
        recorded = conn.execute("select status, error_type from attempts where request_id = ? order by number",
                                (r.request_id,)).fetchall()
    assert recorded == [(a.status, a.error_type) for a in r.attempts] and len(recorded) >= 2


def test_a_deployment_that_cannot_start_is_unavailable_with_serves_reason(broker):
    plan = broker.plan("a cat", model="local/broken")
    assert not plan.candidates
    reasons = " ".join(" ".join(r.reasons) for r in plan.rejected)
    assert "model-broken is DEPLOY_FAILED" in reasons and "config.json" in reasons
    assert "Traceback" not in reasons   # the reason, not Serve's whole traceback
    assert broker.plan("a cat", model="local/tsd").candidates[0].offering == "local/tsd"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imagebroker", *args], capture_output=True, text=True,
                          timeout=300)


def test_local_deploy_and_status_on_a_running_cluster(broker, models, tmp_path):
    """A second application on the same cluster, deployed by the CLI from another process and reached by
    address, as a team's brokers would reach the cluster their operators deployed."""
    import ray
    import yaml

    address = ray.get_runtime_context().gcs_address
    team = policy(models, "ray", address=address, app="team", models=["tsd1"]).model_dump(
        mode="json", exclude_defaults=True)
    path = tmp_path / "team.yaml"
    path.write_text(yaml.safe_dump(team))

    deployed = _cli("local", "deploy", "--policy", str(path))
    assert deployed.returncode == 0, deployed.stderr
    assert "running: model-tsd1 (HEALTHY)" in deployed.stdout

    with Broker(path, ledger=f"sqlite:///{tmp_path / 'team.db'}") as b:
        r = b.generate("a cat", model="local/tsd1", seed=5)
    assert r.applied["engine"] == "ray" and r.cost.units["device"] == "cpu"

    shown = _cli("local", "status", "--policy", str(path), "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["app"] == "team" and status["deployments"]["model-tsd1"]["status"] == "HEALTHY"
    replica, = status["replicas"]
    assert replica["device"] == "cpu" and replica["requests"] >= 1 and replica["images"] >= 1

    missing = _cli("local", "status", "--policy", str(path), "--address", "127.0.0.1:1")
    assert missing.returncode == 2 and "no Ray cluster at 127.0.0.1:1" in missing.stderr
