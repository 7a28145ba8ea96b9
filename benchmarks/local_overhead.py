"""Issue 5 benchmarks, on CPU with the bundled tiny-shapes model (a real Diffusers pipeline):

* broker overhead over calling the same pipeline directly with the same settings (target <= 3%);
* throughput of 8 concurrent requests with coalescing on versus off.

    python benchmarks/local_overhead.py
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import torch
from _util import save, summary
from diffusers import StableDiffusionPipeline

from imagebroker import AsyncBroker
from imagebroker.local_backend import MODELS_DIR
from imagebroker.policies.schema import Policy
from imagebroker.providers.catalog import builtin_catalog

MODEL = MODELS_DIR / "tiny-shapes"
STEPS, SIZE, GUIDANCE = 20, 64, 5.0
PROMPT = "a red circle on a blue background"


def policy(coalesce: bool) -> Policy:
    hosted = [p for p in builtin_catalog().providers() if p != "local"]
    return Policy.model_validate({"name": "bench", "deny": hosted,
                                  "local": {"coalesce": {"enabled": coalesce, "max_batch": 8}}})


def direct_call(pipe, seed: int) -> None:
    with torch.inference_mode():  # as the broker runs it: the difference is then the broker alone
        _direct(pipe, seed)


def _direct(pipe, seed: int) -> None:
    pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
         generator=[torch.Generator("cpu").manual_seed(seed)], output_type="pil").images[0].save(
        os.devnull, format="PNG")


async def overhead(runs: int = 60) -> dict:
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    broker = AsyncBroker(policy(True), ledger=f"sqlite:///{Path(tempfile.mkdtemp()) / 'l.db'}")
    kw = {"model": "local/tiny-shapes", "size": f"{SIZE}x{SIZE}", "steps": STEPS, "guidance_scale": GUIDANCE}
    for i in range(5):
        direct_call(pipe, i)
        await broker.generate(PROMPT, seed=i, **kw)
    d, b = [], []
    for i in range(runs):  # interleaved, so drift affects both alike
        t = time.perf_counter()
        direct_call(pipe, i)
        d.append(time.perf_counter() - t)
        t = time.perf_counter()
        await broker.generate(PROMPT, seed=i, **kw)
        b.append(time.perf_counter() - t)
    await broker.aclose()
    ds, bs = summary(d, 1000), summary(b, 1000)
    return {"direct_ms": ds, "broker_ms": bs,
            "overhead_pct_median": round((bs["median"] / ds["median"] - 1) * 100, 2)}


async def concurrency(coalesce: bool, requests: int = 8, rounds: int = 5) -> dict:
    broker = AsyncBroker(policy(coalesce), ledger=f"sqlite:///{Path(tempfile.mkdtemp()) / 'l.db'}")
    kw = {"model": "local/tiny-shapes", "size": f"{SIZE}x{SIZE}", "steps": STEPS}
    await broker.generate(PROMPT, **kw)
    times, batches = [], []
    for r in range(rounds):
        t = time.perf_counter()
        results = await asyncio.gather(*[broker.generate(PROMPT, seed=r * 100 + i, **kw)
                                         for i in range(requests)])
        times.append(time.perf_counter() - t)
        batches += [x.applied["batch_images"] for x in results]
    await broker.aclose()
    best = min(times)
    return {"images_per_s": round(requests / best, 2), "seconds_for_8": round(best, 3),
            "max_batch_seen": max(batches)}


async def main() -> None:
    save("local_overhead", {"model": "local/tiny-shapes", "steps": STEPS, "size": SIZE,
                            "torch_threads": torch.get_num_threads(), "overhead": await overhead(),
                            "coalescing_on": await concurrency(True),
                            "coalescing_off": await concurrency(False)})


if __name__ == "__main__":
    asyncio.run(main())
