"""The team gateway's cost in time and memory, as ratios measured side by side in one run:

- per-call overhead: the openai SDK calling the fake OpenAI server directly, against the same SDK calling
  `imagebroker serve` (1 worker, SQLite ledger) in front of that fake, sequential calls, medians; and the
  floor any proxy pays here: a bare pass-through (uvicorn + Starlette + httpx2 forwarding the body, nothing
  else) in front of the same fake;
- throughput at concurrency 100 (AsyncOpenAI) directly, through 1 worker and through 2 workers;
- RSS per worker after the run, and the time from `serve` starting to `/readyz` answering 200.

    .venv/bin/python benchmarks/gateway.py [--calls 200] [--burst 600]

Results go to benchmarks/results/gateway.json; docs/benchmarks.md has the table. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).parents[1]))
from benchmarks._util import save
from imagebroker.testing.fakes import fakes

MODEL = "openai/gpt-image-2"
SIZE = "256x256"   # small images: the fake's own cost is the same on both paths, and kept low


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(fake_base: str, workers: int, tmp: Path) -> tuple[subprocess.Popen, str, float]:
    policy = tmp / f"p{workers}.json"
    policy.write_text(json.dumps({"name": "bench", "prefer": [MODEL], "objective": "ordered",
                                  "providers": {"openai": {"base_url": fake_base}}}))
    port = free_port()
    env = {**os.environ, "OPENAI_API_KEY": fakes()["openai"].key,
           "IMAGEBROKER_LEDGER_URL": f"sqlite:///{tmp / f'l{workers}.db'}"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "imagebroker.cli", "serve", "--policy", str(policy), "--port",
                             str(port), "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base, time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(0.02)


def bare_proxy(upstream: str, port: int) -> None:
    """`--bare-proxy`: forward POST /v1/images/generations to the fake and its answer back, nothing else."""
    import httpx2
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    client = httpx2.AsyncClient()

    async def forward(request):   # type: ignore[no-untyped-def]
        sent = await client.post(f"{upstream}/images/generations", content=await request.body(),
                                 headers={"authorization": request.headers["authorization"],
                                          "content-type": "application/json"})
        return Response(sent.content, status_code=sent.status_code, media_type="application/json")

    app = Starlette(routes=[Route("/v1/images/generations", forward, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="uvloop", http="httptools",
                access_log=False)


def floor_ms(upstream: str, calls: int) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--bare-proxy", upstream, str(port)], start_new_session=True)
    try:
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        return sequential(f"http://127.0.0.1:{port}/v1", "gpt-image-2", calls)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def rss_mib(proc: subprocess.Popen) -> list[float]:
    """RSS of the serving processes: the workers (children) when there are several, else the process."""
    kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    workers = [int(p) for p in kids if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    pids = workers or [proc.pid]
    out = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out.append(round(int(line.split()[1]) / 1024, 1))
    return out


def sequential(base_url: str, model: str, calls: int) -> float:
    client = openai.OpenAI(base_url=base_url, api_key=fakes()["openai"].key, max_retries=0)
    for _ in range(10):   # warm up connections and caches
        client.images.generate(model=model, prompt="warm", size=SIZE)
    samples = []
    for i in range(calls):
        t0 = time.perf_counter()
        client.images.generate(model=model, prompt=f"call {i}", size=SIZE)
        samples.append(time.perf_counter() - t0)
    client.close()
    return statistics.median(samples) * 1000


async def burst(base_url: str, model: str, calls: int, concurrency: int = 100) -> float:
    gate = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=base_url, api_key=fakes()["openai"].key, max_retries=0,
                                  timeout=120) as client:
        async def one(i: int) -> None:
            async with gate:
                await client.images.generate(model=model, prompt=f"burst {i}", size=SIZE)

        await asyncio.gather(*(one(i) for i in range(20)))   # warm up
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(calls)))
        return calls / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--burst", type=int, default=600)
    ap.add_argument("--bare-proxy", nargs=2, metavar=("UPSTREAM", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_proxy:
        bare_proxy(args.bare_proxy[0], int(args.bare_proxy[1]))
        return
    tmp = Path(tempfile.mkdtemp(prefix="imagebroker-gateway-bench-"))
    with fakes()["openai"](["ok"]) as fake:
        direct_url = fake.base_url
        direct_ms = sequential(direct_url, "gpt-image-2", args.calls)
        direct_tput = asyncio.run(burst(direct_url, "gpt-image-2", args.burst))
        bare_ms = floor_ms(direct_url, args.calls)
        out: dict[str, object] = {"calls": args.calls, "burst": args.burst, "size": SIZE,
                                  "direct_median_ms": round(direct_ms, 2), "direct_calls_per_s": round(direct_tput, 1)}
        for workers in (1, 2):
            proc, base, ready_s = start(fake.base_url, workers, tmp)
            try:
                gw = f"{base}/v1"
                if workers == 1:
                    gw_ms = sequential(gw, MODEL, args.calls)
                    out |= {"gateway_median_ms": round(gw_ms, 2), "overhead_ms": round(gw_ms - direct_ms, 2),
                            "bare_proxy_median_ms": round(bare_ms, 2),
                            "bare_proxy_overhead_ms": round(bare_ms - direct_ms, 2)}
                tput = asyncio.run(burst(gw, MODEL, args.burst))
                out |= {f"workers{workers}_calls_per_s": round(tput, 1),
                        f"workers{workers}_rss_mib": rss_mib(proc), f"workers{workers}_ready_s": round(ready_s, 2)}
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
        out["ratio_1_worker_vs_direct"] = round(out["workers1_calls_per_s"] / direct_tput, 2)  # type: ignore[operator]
        out["ratio_2_workers_vs_1"] = round(out["workers2_calls_per_s"] / out["workers1_calls_per_s"], 2)  # type: ignore[operator]
    save("gateway", out)


if __name__ == "__main__":
    main()
