"""Issue 3 benchmarks, against a loopback fake image API:

* broker overhead per call over calling the same fake server directly, SQLite ledger write included
  (target: median <= 1 ms);
* throughput at concurrency 100 as a ratio to calling the fake directly with the same HTTP client in
  the same run (target: >= 0.8);
* peak memory after 1,000 calls;
* `imagebroker costs` over a ledger of 1,000,000 calls (target: <= 2 s).

Latency and throughput are measured twice: with the fake server on a thread of this process (as the
tests run it; it shares the GIL with the broker) and in a process of its own (as a real provider is).

    python benchmarks/overhead.py
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from _util import save, summary

from imagebroker import AsyncBroker
from imagebroker.broker.ledger.store import Ledger
from imagebroker.broker.ledger.writer import CALL_COLUMNS, merged
from imagebroker.policies.schema import Policy
from imagebroker.providers.catalog import builtin_catalog
from imagebroker.testing.fake_http import FakeImageServer, free_port
from imagebroker.testing.mock import mock_offering

KEY = "bench-key"


def policy(url: str) -> Policy:
    o = mock_offering("bench", provider="fakehttp", capabilities={"default_size": "64x64"})
    o["id"] = "fakehttp/bench"
    deny = builtin_catalog().providers()
    return Policy.model_validate({"name": "bench", "deny": deny, "offerings": [o],
                                  "providers": {"fakehttp": {"base_url": url}}})


async def direct(client: httpx.AsyncClient, url: str) -> None:
    body = {"model": "bench", "prompt": "x", "n": 1, "width": 64, "height": 64}
    r = await client.post(f"{url}/v1/generate", json=body, headers={"Authorization": f"Bearer {KEY}"})
    data = r.json()
    [base64.b64decode(b) for b in data["images"]]


async def latency(url: str, db: str, n: int = 400) -> dict:
    broker = AsyncBroker(policy(url), ledger=f"sqlite:///{db}")
    client = broker.provider("fakehttp").client()  # the same client, for a fair comparison
    for _ in range(50):
        await direct(client, url)
        await broker.generate("x", size="64x64")
    d, b = [], []
    for _ in range(n):
        t = time.perf_counter()
        await direct(client, url)
        d.append(time.perf_counter() - t)
        t = time.perf_counter()
        await broker.generate("x", size="64x64")
        b.append(time.perf_counter() - t)
    await broker.aclose()
    direct_ms, broker_ms = summary(d, 1000), summary(b, 1000)
    return {"direct_ms": direct_ms, "broker_ms": broker_ms,
            "overhead_ms_median": round(broker_ms["median"] - direct_ms["median"], 3)}


async def throughput(url: str, db: str, calls: int = 2000, concurrency: int = 100) -> dict:
    broker = AsyncBroker(policy(url), ledger=f"sqlite:///{db}")
    client = broker.provider("fakehttp").client()
    sem = asyncio.Semaphore(concurrency)

    async def bounded(fn):
        async with sem:
            await fn()

    async def run(fn) -> float:
        t = time.perf_counter()
        await asyncio.gather(*[bounded(fn) for _ in range(calls)])
        return calls / (time.perf_counter() - t)

    await run(lambda: direct(client, url))  # warm
    direct_rps = await run(lambda: direct(client, url))
    broker_rps = await run(lambda: broker.generate("x", size="64x64"))
    await broker.aclose()
    return {"concurrency": concurrency, "calls": calls, "direct_per_s": round(direct_rps, 1),
            "broker_per_s": round(broker_rps, 1), "ratio": round(broker_rps / direct_rps, 3)}


async def memory(url: str, db: str, calls: int = 1000) -> dict:
    broker = AsyncBroker(policy(url), ledger=f"sqlite:///{db}")
    tracemalloc.start()
    for _ in range(calls):
        await broker.generate("x", size="64x64")
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    await broker.aclose()
    import resource

    return {"calls": calls, "python_heap_peak_mb": round(peak / 2**20, 2),
            "python_heap_after_mb": round(current / 2**20, 2),
            "process_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def big_ledger(db: str, rows: int = 1_000_000) -> dict:
    """A month of calls, written as `generate()` writes them (call row, rollups, a tag), in batches."""
    ledger = Ledger(f"sqlite:///{db}")
    sql = ledger.writer.sql
    rng = random.Random(7)
    offerings = [("bfl", "bfl/flux-2-pro"), ("fal", "fal/fal-ai/flux/dev"), ("openai", "openai/gpt-image-2"),
                 ("local", "local/sdxl"), ("replicate", "replicate/black-forest-labs/flux-schnell")]
    now = time.time()
    t = time.perf_counter()
    batch = []
    for i in range(rows):
        prov, off = offerings[i % 5]
        created = now - rng.random() * 30 * 86400
        ok = rng.random() > 0.03
        row = dict.fromkeys(CALL_COLUMNS) | {
            "request_id": f"r{i:09d}", "created_at": created, "day": time.strftime("%Y-%m-%d", time.gmtime(created)),
            "status": "ok" if ok else "error", "offering": off, "provider": prov, "n": 1, "images": 1 if ok else 0,
            "width": 1024, "height": 1024, "policy": "bench", "attempts": 1, "latency_s": rng.uniform(0.5, 20),
            "estimated_nusd": 30_000_000, "cost_nusd": 30_000_000 if ok else None, "cost_status": "priced",
            "prompt_sha256": "x" * 64, "adapter_errors": 0,
            "over_bound": 0}
        batch.append(sql.finished(row, [], [], {"team": f"team-{i % 4}"}, pending=False))
        if len(batch) == 10_000:
            ledger.writer.write(merged(batch))
            batch = []
    fill_s = time.perf_counter() - t
    env = {**os.environ, "IMAGEBROKER_LEDGER_URL": f"sqlite:///{db}"}
    timings = {}
    for by in ("provider", "day", "tag:team"):
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "imagebroker.cli", "costs", "--by", by, "--format",
                                  "json"], env=env, capture_output=True, text=True, check=True)
            runs.append(time.perf_counter() - t)
        timings[f"costs_by_{by.replace(':', '_')}_s"] = summary(runs)
        total = json.loads(out.stdout)["total"]
        assert total["calls"] == rows, total
    with ledger.engine.begin() as conn:  # as a ledger from before the rollups: time the migration
        conn.exec_driver_sql("DROP TABLE call_rollups")
        conn.exec_driver_sql("DROP TABLE latency_rollups")
        conn.exec_driver_sql("DELETE FROM imagebroker_migrations WHERE name = 'm003_rollups'")
    ledger.close()
    t = time.perf_counter()
    Ledger(f"sqlite:///{db}").close()
    return {"rows": rows, "fill_s": round(fill_s, 1), **timings, "total_calls_reported": total["calls"],
            "rollup_migration_s": round(time.perf_counter() - t, 1)}


@contextmanager
def server_process() -> Iterator[str]:
    """`python -m imagebroker.testing serve fakehttp` in a process of its own."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "imagebroker.testing", "serve", "fakehttp", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


async def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    os.environ["FAKEHTTP_API_KEY"] = KEY
    with FakeImageServer(["ok"]) as server:
        results = {"latency": await latency(server.url, str(tmp / "a.db")),
                   "throughput": await throughput(server.url, str(tmp / "b.db")),
                   "memory": await memory(server.url, str(tmp / "c.db"))}
    with server_process() as url:
        results["server_process"] = {"latency": await latency(url, str(tmp / "d.db")),
                                     "throughput": await throughput(url, str(tmp / "e.db"))}
    results["costs_report"] = big_ledger(str(tmp / "big.db"))
    save("overhead", results)


if __name__ == "__main__":
    asyncio.run(main())
