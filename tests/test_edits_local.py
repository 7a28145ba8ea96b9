"""Edits on the bundled tiny-shapes model, through the ordinary local backend: img2img takes the new
background and keeps the shape, inpainting changes the masked pixels and keeps the others, and both are
built from the pipeline already loaded. Scored by the geometric reader, not by a model."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from imagebroker import AsyncBroker
from imagebroker.policies.schema import Policy
from tests.conftest import builtin_providers
from training.tiny_shapes.data import PALETTE, Scene, render
from training.tiny_shapes.evaluate import caption, score

HOSTED = builtin_providers("local")
SEED = 2000
# (foreground, shape, background of the init image, background the prompt asks for)
CASES = [("red", "circle", "blue", "green"), ("yellow", "square", "green", "purple"),
         ("white", "triangle", "black", "orange"), ("blue", "circle", "yellow", "red"),
         ("purple", "square", "white", "blue"), ("orange", "triangle", "blue", "black"),
         ("green", "circle", "red", "white"), ("black", "square", "orange", "yellow")]
SEEDS_PER_CASE = 3


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def init_image(fg: str, shape: str, bg: str) -> bytes:
    return png(render(Scene(fg, bg, shape, 32.0, 32.0, 14.0)))


def broker() -> AsyncBroker:
    policy = Policy.model_validate({"name": "edits", "deny": HOSTED,
                                    "local": {"coalesce": {"max_batch": 24, "window_ms": 50}}})
    return AsyncBroker(policy, ledger="sqlite://", store=False)


def img2img_scores(strength: float = 0.8) -> dict[str, float]:
    async def go():
        async with broker() as b:
            return await asyncio.gather(*[
                b.generate(caption(fg, shape, new), model="local/tiny-shapes", images=[init_image(fg, shape, bg)],
                           strength=strength, seed=SEED + 10 * i + k)
                for i, (fg, shape, bg, new) in enumerate(CASES) for k in range(SEEDS_PER_CASE)])

    results = asyncio.run(go())
    triples = [(fg, shape, new) for fg, shape, _, new in CASES for _ in range(SEEDS_PER_CASE)]
    return score([pixels(r.images[0].data).astype(np.uint8) for r in results], triples)


def test_img2img_takes_the_new_background_and_keeps_the_shape():
    scores = img2img_scores()
    assert scores["background"] >= 0.75, scores   # a clear majority of the fixed seeds
    assert scores["foreground"] >= 0.75, scores
    assert scores["shape"] >= 0.6, scores


LEFT_HALF = np.zeros((64, 64), dtype=np.uint8)
LEFT_HALF[:, :32] = 255   # white: change


def test_inpainting_changes_the_masked_pixels_and_keeps_the_others():
    async def go():
        async with broker() as b:
            return await asyncio.gather(*[
                b.generate(caption(fg, shape, new), model="local/tiny-shapes", images=[init_image(fg, shape, bg)],
                           mask=png(LEFT_HALF), seed=SEED + i) for i, (fg, shape, bg, new) in enumerate(CASES)])

    results = asyncio.run(go())
    inside, outside, took_new = [], [], []
    for r, (fg, shape, bg, new) in zip(results, CASES, strict=True):
        out = pixels(r.images[0].data)
        diff = np.abs(out - pixels(init_image(fg, shape, bg))).mean(axis=2)
        inside.append(diff[:, :24].mean())
        outside.append(diff[:, 32:].mean())
        strip = out[:, :8].reshape(-1, 3).mean(axis=0)   # the masked edge: background, never the shape
        took_new.append(min(PALETTE, key=lambda c: np.abs(np.array(PALETTE[c]) - strip).sum()) == new)
        assert r.applied["task"] == "inpaint" and r.applied["mask"]["sha256"]
    assert max(outside) == 0, outside            # outside the mask: the init image's own pixels
    assert np.mean(inside) >= 30, inside         # out of 255: inside it, a new picture
    assert np.mean(took_new) >= 0.6, took_new    # ... that follows the prompt's background in most cases


def test_an_edit_reuses_the_loaded_pipeline_and_keeps_per_image_seeds():
    init = init_image("red", "circle", "blue")

    async def go():
        async with broker() as b:
            first = await b.generate("a red circle on a blue background", model="local/tiny-shapes", seed=1)
            runner = b.provider("local")._runner   # the in-process backend
            generation = runner.generation
            both = await b.generate("a red circle on a green background", model="local/tiny-shapes",
                                    images=[init], strength=0.6, n=2, seed=40)
            alone = await b.generate("a red circle on a green background", model="local/tiny-shapes",
                                     images=[init], strength=0.6, seed=41)
            return first, both, alone, generation, runner.generation

    first, both, alone, before, after = asyncio.run(go())
    assert first.cost.units["load_seconds"] > 0
    assert after == before and both.cost.units["load_seconds"] == 0   # no second load for img2img
    assert [i.seed for i in both.images] == [40, 41]
    # image i is seed + i, batched or not: exact up to the float rounding of batched CPU kernels
    assert np.abs(pixels(both.images[1].data) - pixels(alone.images[0].data)).max() <= 1
    assert both.images[0].data != both.images[1].data
    # img2img runs only the last `strength` of the steps, and is priced so
    assert both.cost.units["denoiser_steps"] == int(20 * 0.6)
