"""Issue 20 benchmark: the Ray Serve engine against the in-process engine, on CPU with the bundled
tiny-shapes model (a real Diffusers pipeline), on the same requests in one run:

* images per second for rounds of 8 concurrent requests: in process (torch's threads), 1 CPU replica
  (as many threads), 2 CPU replicas (half the threads each);
* the per-request overhead Ray adds: one request at a time, warm, interleaved with the in-process engine.

    python benchmarks/local_ray.py
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import torch
from _util import save, summary

from imagebroker import AsyncBroker
from imagebroker.policies.schema import Policy
from imagebroker.providers.catalog import builtin_catalog

STEPS, SIZE = 20, 64
PROMPT = "a red circle on a blue background"
KW = {"model": "local/tiny-shapes", "size": f"{SIZE}x{SIZE}", "steps": STEPS}
THREADS = torch.get_num_threads()


def policy(engine: str, app: str = "bench", replicas: int = 1) -> Policy:
    hosted = [p for p in builtin_catalog().providers() if p != "local"]
    deployment = {"replicas": replicas, "num_cpus": max(1, THREADS // replicas)}
    return Policy.model_validate({"name": "bench", "deny": hosted, "local": {
        "engine": engine, "coalesce": {"max_batch": 8},
        "ray": {"app": app, "num_cpus": 2 * THREADS, "models": ["tiny-shapes"], "deployment": deployment}}})


def broker(p: Policy) -> AsyncBroker:
    return AsyncBroker(p, ledger=f"sqlite:///{Path(tempfile.mkdtemp()) / 'l.db'}")


async def throughput(b: AsyncBroker, requests: int = 8, rounds: int = 5) -> dict:
    await asyncio.gather(*[b.generate(PROMPT, seed=i, **KW) for i in range(requests)])   # every replica warm
    times, batches = [], []
    for r in range(rounds):
        t = time.perf_counter()
        results = await asyncio.gather(*[b.generate(PROMPT, seed=r * 100 + i, **KW) for i in range(requests)])
        times.append(time.perf_counter() - t)
        batches += [x.applied["batch_images"] for x in results]
    best = min(times)
    return {"images_per_s": round(requests / best, 2), "seconds_for_8_best": round(best, 3),
            "seconds_for_8_median": round(sorted(times)[len(times) // 2], 3), "max_batch_seen": max(batches)}


async def overhead(inproc: AsyncBroker, on_ray: AsyncBroker, runs: int = 40) -> dict:
    here, there, busy_here, busy_there = [], [], [], []
    for i in range(runs):   # interleaved, so drift affects both alike
        t = time.perf_counter()
        r = await inproc.generate(PROMPT, seed=i, **KW)
        here.append(time.perf_counter() - t)
        busy_here.append(r.cost.units["gpu_seconds"])
        t = time.perf_counter()
        r = await on_ray.generate(PROMPT, seed=i, **KW)
        there.append(time.perf_counter() - t)
        busy_there.append(r.cost.units["gpu_seconds"])
    h, t_ = summary(here, 1000), summary(there, 1000)
    pipeline_h, pipeline_t = summary(busy_here, 1000), summary(busy_there, 1000)
    return {"inprocess_ms": h, "ray_ms": t_, "inprocess_pipeline_ms": pipeline_h, "ray_pipeline_ms": pipeline_t,
            "added_ms_median": round(t_["median"] - h["median"], 2),
            "added_ms_outside_the_pipeline": round((t_["median"] - pipeline_t["median"])
                                                   - (h["median"] - pipeline_h["median"]), 2)}


async def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    inproc = broker(policy("inprocess"))
    one = broker(policy("ray", "one", 1))
    two = broker(policy("ray", "two", 2))
    t = time.perf_counter()
    await one.generate(PROMPT, seed=0, **KW)
    first_call_s = time.perf_counter() - t   # starts Ray here, deploys, loads the model in the replica
    await inproc.generate(PROMPT, seed=0, **KW)
    result = {"model": "local/tiny-shapes", "steps": STEPS, "size": SIZE, "torch_threads": THREADS,
              "ray_first_call_s": round(first_call_s, 1),
              "inprocess": await throughput(inproc), "ray_1_replica": await throughput(one),
              "ray_2_replicas": await throughput(two), "overhead": await overhead(inproc, one)}
    base = result["inprocess"]["images_per_s"]
    result["ratios"] = {k: round(result[k]["images_per_s"] / base, 2) for k in ("ray_1_replica", "ray_2_replicas")}
    await two.aclose()
    await inproc.aclose()
    await one.aclose()   # the broker that started Ray stops it
    save("local_ray", result)


if __name__ == "__main__":
    asyncio.run(main())
