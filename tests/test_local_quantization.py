"""Quantized local models (`local.models.NAME.quantization`), on the tiny SD and FLUX pipelines built in code:
torchao's int8 weight-only denoiser, and a GGUF transformer file written in the test with the `gguf`
package, each load, generate, are their own offerings, and take less weight memory."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("torchao")

from imagebroker import Broker
from imagebroker.errors import NoRouteError
from imagebroker.policies.schema import Policy
from tests.conftest import builtin_providers
from tests.tiny_pipelines import build_tiny_flux, build_tiny_sd, write_gguf_transformer

OTHERS = [*builtin_providers("local"), "mock", "fakehttp", "local/sdxl", "local/sd15", "local/flux-*",
          "local/tiny-shapes"]
RULE = {"min_side": 64, "max_side": 256, "multiple_of": 16}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("models")
    flux = build_tiny_flux(root / "flux")
    return {"sd": build_tiny_sd(root / "sd"), "flux": flux,
            "gguf": write_gguf_transformer(flux, root / "tflux-Q8_0.gguf")}


def policy(models: dict[str, Path]) -> dict:
    sd, flux = {"source": str(models["sd"]), "family": "sd", "steps": 4}, \
        {"source": str(models["flux"]), "family": "flux", "steps": 3}
    declared = {"tsd": sd, "tsd8": sd | {"quantization": "int8"}, "tsd4": sd | {"quantization": "int4"},
                "tflux": flux, "tflux8": flux | {"quantization": "int8"},
                "tfluxq8": {"source": str(models["gguf"]), "base": str(models["flux"]), "family": "flux",
                            "quantization": "gguf", "steps": 3}}
    return {"name": "quantized", "deny": OTHERS, "local": {"device": "cpu", "models": declared},
            "offerings": [{"id": f"local/{m}", "capabilities": {"default_size": "64x64", "size_rule": RULE}}
                          for m in declared]}


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB")).astype(int)


@pytest.mark.parametrize(("plain", "quantized", "denoiser"), [("tsd", "tsd8", "unet"),
                                                             ("tflux", "tflux8", "transformer")])
def test_an_int8_model_is_its_own_offering_and_takes_less_weight_memory(models, tmp_path, plain, quantized,
                                                                        denoiser):
    with Broker(Policy.model_validate(policy(models)), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        base = b.generate("a cat", model=f"local/{plain}", seed=3)
        small = b.generate("a cat", model=f"local/{quantized}", seed=3)
        cache = b._async.provider("local").runner().pipelines.cache
        full, int8 = cache[f"local/{plain}"], cache[f"local/{quantized}"]
        kinds = {type(p).__name__ for p in getattr(int8.pipe, denoiser).parameters()}
    assert small.offering == f"local/{quantized}" and small.applied["quantization"] == "int8"
    assert "quantization" not in base.applied
    assert "Int8Tensor" in kinds                  # the denoiser's linear weights are int8 now
    assert int8.bytes < full.bytes                # and are counted by their int8 data, not as floats
    assert pixels(small.images[0]).shape == pixels(base.images[0]).shape
    assert small.cost.units["gpu_seconds"] > 0


def test_a_gguf_transformer_runs_in_its_base_pipeline_quantized(models, tmp_path):
    with Broker(Policy.model_validate(policy(models)), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        base = b.generate("a cat", model="local/tflux", seed=2)
        q8 = b.generate("a cat", model="local/tfluxq8", seed=2)
        cache = b._async.provider("local").runner().pipelines.cache
        full, gguf = cache["local/tflux"], cache["local/tfluxq8"]
        kinds = {type(p).__name__ for p in gguf.pipe.transformer.parameters()}
    assert q8.offering == "local/tfluxq8" and q8.applied["quantization"] == "gguf"
    assert "GGUFParameter" in kinds and gguf.bytes < full.bytes
    # Q8_0 keeps the model: the same seed makes nearly the same image (a wrong or garbled file would not)
    assert np.abs(pixels(q8.images[0]) - pixels(base.images[0])).max() <= 8


def test_int4_on_a_cpu_is_unavailable_with_the_reason(models, tmp_path):
    with (Broker(Policy.model_validate(policy(models)), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b,
          pytest.raises(NoRouteError, match=r"int4 needs CUDA .* on cpu use int8")):
        b.generate("a cat", model="local/tsd4")


def test_bitsandbytes_is_cuda_only_and_says_so_in_the_plan(models, tmp_path):
    data = policy(models)
    data["local"]["models"]["tsdnf4"] = {"source": str(models["sd"]), "family": "sd", "quantization": "int4",
                                         "quantization_backend": "bitsandbytes"}
    data["offerings"].append({"id": "local/tsdnf4", "capabilities": {"default_size": "64x64", "size_rule": RULE}})
    with Broker(Policy.model_validate(data), ledger=f"sqlite:///{tmp_path / 'l.db'}") as b:
        plan = b.plan("a cat", model="local/tsdnf4")
    reason, = next(r for r in plan.rejected if r.offering == "local/tsdnf4").reasons
    assert "int4 with bitsandbytes needs CUDA; on cpu use the torchao backend (int8)" in reason
    with pytest.raises(ValueError, match="quantization_backend bitsandbytes is for quantization: int8 or int4"):
        Policy.model_validate({"name": "x", "local": {"models": {"m": {
            "source": str(models["sd"]), "quantization_backend": "bitsandbytes"}}}})


def test_local_status_measures_each_models_weights(models, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(policy(models)))
    out = subprocess.run([sys.executable, "-m", "imagebroker", "local", "status", "--policy", str(path),
                          "--measure", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {m["model"]: m for m in json.loads(out.stdout)["models"]}
    assert rows["tsd8"]["quantization"] == "int8" and rows["tsd"]["quantization"] == "none"
    assert 0 < rows["tsd8"]["weights_mib"] < rows["tsd"]["weights_mib"]
    assert 0 < rows["tflux8"]["weights_mib"] < rows["tflux"]["weights_mib"]
    assert 0 < rows["tfluxq8"]["weights_mib"] < rows["tflux"]["weights_mib"]
    assert "weights_mib" not in rows["tsd4"] and "needs CUDA" in rows["tsd4"]["unavailable"]
