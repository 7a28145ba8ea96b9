"""The team gateway's cost in time and memory, as ratios measured side by side in one run:

- per-call overhead: the openai SDK calling the fake OpenAI server directly, against the same SDK calling
  `imagebroker serve` (1 worker, SQLite ledger) in front of that fake, sequential calls, medians; and the
  floor any proxy pays here: a bare pass-through (uvicorn + Starlette + the providers' HTTP client, httpx2 on
  aiohttp, forwarding the body, nothing else) in front of the same fake;
- throughput at concurrency 100 (AsyncOpenAI) directly, through 1 worker and through 2 workers;
- RSS per worker after the run, and the time from `serve` starting to `/readyz` answering 200;
- where `wrk` is installed (Debian's `wrk`): throughput with 1 and 2 workers when the gateway is what limits
  it. With the SDK as the client, the client and the threaded fake take most of the two cores, so a second
  worker has nothing to run on; `wrk` (C, one thread) and a fake that answers one recorded reply from raw
  asyncio cost a few percent of a core, so the workers get the machine.

    .venv/bin/python benchmarks/gateway.py [--calls 200] [--burst 600] [--wrk-seconds 10]

Results go to benchmarks/results/gateway.json; docs/benchmarks.md has the table. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
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
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from imagebroker.providers.http import new_client

    client = new_client()   # the providers' own HTTP stack

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


def canned_fake(reply_file: str, port: int) -> None:
    """`--canned-fake`: answer every request with the recorded reply, parsing no more than framing needs."""
    import uvloop

    reply = Path(reply_file).read_bytes()

    class Canned(asyncio.Protocol):
        def connection_made(self, transport):   # type: ignore[no-untyped-def]
            self.transport, self.buf = transport, b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while (end := self.buf.find(b"\r\n\r\n")) >= 0:
                head = self.buf[:end].lower()
                at = head.find(b"content-length:")
                length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
                if len(self.buf) < end + 4 + length:
                    return
                self.buf = self.buf[end + 4 + length:]
                self.transport.write(reply)

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Canned, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(serve())


def wrk_rate(url: str, seconds: int, tmp: Path, connections: int = 100) -> float:
    """Requests per second `wrk` gets at `connections` open connections; every answer must be a 200."""
    script = tmp / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f'wrk.headers["Authorization"] = "Bearer {fakes()["openai"].key}"\n'
                      f'wrk.body = \'{json.dumps({"model": MODEL, "prompt": "a red fox", "size": SIZE})}\'\n')
    subprocess.run(["wrk", "-t1", f"-c{connections}", "-d2s", "-s", str(script), url], capture_output=True, check=True)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
                         capture_output=True, check=True, text=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw failures:\n{out}")
    return float(out.split("Requests/sec:")[1].split()[0])


def gateway_bound(fake_base: str, seconds: int, tmp: Path) -> dict[str, object]:
    """Throughput with 1 and 2 workers under `wrk`, against a canned fake replaying the real fake's answer."""
    reply = httpx.post(f"{fake_base}/images/generations", json={"model": "gpt-image-2", "prompt": "a red fox",
                                                                 "size": SIZE},
                       headers={"authorization": f"Bearer {fakes()['openai'].key}"})
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(reply.content)}\r\n\r\n"
    (tmp / "reply").write_bytes(head.encode() + reply.content)
    port = free_port()
    canned = subprocess.Popen([sys.executable, __file__, "--canned-fake", str(tmp / "reply"), str(port)],
                              start_new_session=True)
    out: dict[str, object] = {}
    try:
        canned_base = f"http://127.0.0.1:{port}/v1"
        while True:
            try:
                httpx.post(f"{canned_base}/images/generations", content=b"{}", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        out["wrk_canned_fake_calls_per_s"] = round(wrk_rate(f"{canned_base}/images/generations", seconds, tmp), 1)
        for workers in (1, 2):
            proc, base, _ = start(canned_base, workers, tmp)
            try:
                rate = wrk_rate(f"{base}/v1/images/generations", seconds, tmp)
                out[f"wrk_workers{workers}_calls_per_s"] = round(rate, 1)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
    finally:
        os.killpg(canned.pid, signal.SIGTERM)
        canned.wait(10)
    out["wrk_ratio_2_workers_vs_1"] = round(out["wrk_workers2_calls_per_s"] / out["wrk_workers1_calls_per_s"], 2)  # type: ignore[operator]
    return out


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
    ap.add_argument("--wrk-seconds", type=int, default=10)
    ap.add_argument("--bare-proxy", nargs=2, metavar=("UPSTREAM", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--canned-fake", nargs=2, metavar=("REPLY", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_proxy:
        bare_proxy(args.bare_proxy[0], int(args.bare_proxy[1]))
        return
    if args.canned_fake:
        canned_fake(args.canned_fake[0], int(args.canned_fake[1]))
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
        if shutil.which("wrk"):
            out |= gateway_bound(fake.base_url, args.wrk_seconds, tmp)
        else:
            print("wrk is not installed (apt-get install wrk): the gateway-bound throughput is not measured")
    save("gateway", out)


if __name__ == "__main__":
    main()
