"""Issue 2 benchmarks: cold `import imagebroker` (target <= 150 ms, and it must not import torch,
openai or replicate) and planning one request over the full catalog (target <= 300 us median).

    python benchmarks/core.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import date

from _util import save, summary

IMPORT = ("import time, sys; t = time.perf_counter(); import imagebroker; "
          "print(time.perf_counter() - t, any(m in sys.modules for m in ('torch', 'openai', 'replicate', "
          "'diffusers', 'pydantic')))")


def cold_import(runs: int = 20) -> dict:
    times, heavy = [], False
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-X", "frozen_modules=on", "-c", IMPORT], capture_output=True,
                             text=True, check=True).stdout.split()
        times.append(float(out[0]))
        heavy |= out[1] == "True"
    return {"import_ms": summary(times, 1000), "imports_heavy_modules": heavy}


def planning(runs: int = 2000) -> dict:
    from imagebroker.policies.effective import effective_catalog
    from imagebroker.policies.loader import load_policy
    from imagebroker.policies.planner import PlannerState, plan
    from imagebroker.providers.catalog import builtin_catalog
    from imagebroker.types import ImageRequest

    out = {}
    for name, policy in (("default, every provider available", "default"), ("eu-only", "eu-only")):
        pol = load_policy(policy)
        catalog = effective_catalog(pol, builtin_catalog())
        state = PlannerState(today=date(2026, 11, 22))
        prompts = [f"a red circle on a blue background, take {i}" for i in range(runs)]
        sizes = ["1024x1024", "1536x1024", "512x512", "1024x1536"]
        samples = []
        for i, prompt in enumerate(prompts):  # varied prompts and sizes, as real traffic is
            req = ImageRequest(prompt=prompt, size=sizes[i % 4], n=1 + i % 2)
            t = time.perf_counter()
            plan(req, pol, catalog, state)
            samples.append(time.perf_counter() - t)
        out[name] = {"offerings": len(catalog), **summary(samples[100:], 1e6)}
    return {"plan_us": out, "broker_plan_us": broker_planning(runs)}


def broker_planning(runs: int) -> dict:
    """`Broker.plan` on the same traffic: state gathered, plans memoised by their planning fields."""
    import tempfile

    from imagebroker import AsyncBroker

    broker = AsyncBroker("default", ledger=f"sqlite:///{tempfile.mkdtemp()}/l.db")
    sizes = ["1024x1024", "1536x1024", "512x512", "1024x1536"]
    samples = []
    for i in range(runs):
        t = time.perf_counter()
        broker.plan(f"a red circle on a blue background, take {i}", size=sizes[i % 4], n=1 + i % 2)
        samples.append(time.perf_counter() - t)
    return {"offerings": len(broker.catalog), **summary(samples[100:], 1e6)}


if __name__ == "__main__":
    save("core", {**cold_import(), **planning()})
