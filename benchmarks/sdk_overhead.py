"""Per-call overhead of imagebroker over the raw `openai` SDK, against the loopback fake OpenAI server.

Side by side in one run, alternating per iteration (the order flipping each time) so that machine
noise falls on both sides alike:

* latency per call, sync: `openai.OpenAI(...).images.generate(...)` + base64 decode vs
  `Broker(policy, ledger=sqlite).generate(...)` through the real `openai` provider;
* latency per call, async: `AsyncOpenAI` vs `AsyncBroker`;
* throughput at concurrency 50 (async): calls/s raw `AsyncOpenAI` vs `AsyncBroker`, same total calls;
* where imagebroker's extra time goes, stage by stage (perf_counter wrappers monkeypatched onto the
  broker's own functions, installed only after the timed phases), and the client CPU per call.

Every figure is also given as a ratio imagebroker/raw. The image is the offering's default size,
1024x1024: the fake answers a solid-colour PNG of 5.3 KB (7.1 KB as base64), which PIL needs ~13 ms
to fully decode on this machine. The fake server runs in a process of its own (as a real provider
is; `--thread` puts it on a thread of this process instead). Its PNG encoding (~30 ms for
1024x1024 here) is memoised there, as it would otherwise dominate every call on both sides and
is not the broker's doing (`--fresh-images` turns that off).

    .venv/bin/python benchmarks/sdk_overhead.py [--iterations 200] [--calls 1000] [--cprofile FILE]

`--name` picks the results file (`sdk_overhead_before.json` was measured on the code before the
second wave's execution-core work, commit 75de56b, with this same script).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import inspect
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _util import save, summary

MODEL = "gpt-image-2"
OFFERING = f"openai/{MODEL}"
SIZE = "1024x1024"  # the offering's default_size
PROMPT = "a red circle on a blue background"
RAW_PARAMS = {"model": MODEL, "prompt": PROMPT, "n": 1, "size": SIZE, "output_format": "png"}  # as the provider sends


# -- the fake server ---------------------------------------------------------------------------
def _fake(port: int = 0, fresh: bool = False) -> Any:
    import imagebroker.testing.fakes.openai as fake_mod

    if not fresh:  # deterministic (solid colour from the seed): same bytes every time
        fake_mod.make_image = functools.lru_cache(maxsize=64)(fake_mod.make_image)
    return fake_mod.FakeOpenAI(["ok"], port)


def serve(port: int, fresh: bool) -> None:
    """`--serve`: the fake in this process until stdin closes."""
    with _fake(port, fresh) as server:
        print(server.base_url, flush=True)
        sys.stdin.read()


@contextmanager
def fake_server(thread: bool, fresh: bool) -> Iterator[tuple[str, str, int | None]]:
    """(base_url, key, server pid or None)."""
    from imagebroker.testing.fakes.openai import FakeOpenAI

    if thread:
        with _fake(0, fresh) as server:
            yield server.base_url, FakeOpenAI.key, None
        return
    cmd = [sys.executable, __file__, "--serve"] + (["--fresh-images"] if fresh else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip(), FakeOpenAI.key, proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


def _proc_cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the two sides -------------------------------------------------------------------------------
def policy(base_url: str) -> Any:
    from imagebroker.policies.schema import Policy
    from imagebroker.providers.catalog import builtin_catalog

    return Policy.model_validate({
        "name": "sdk-bench", "deny": [p for p in builtin_catalog().providers() if p != "openai"],
        "prefer": [OFFERING], "objective": "ordered", "providers": {"openai": {"base_url": base_url}}})


def _decode(resp: Any) -> list[bytes]:
    return [base64.b64decode(d.b64_json) for d in resp.data]


def alternate(pairs: dict[str, Callable[[], Any]], n: int, warm: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per call of each callable, interleaved, order flipping."""
    names = list(pairs)
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in names}
    for _ in range(warm):
        for k in names:
            pairs[k]()
    for i in range(n):
        for k in (names if i % 2 == 0 else names[::-1]):
            c, t = time.process_time(), time.perf_counter()
            pairs[k]()
            out[k]["wall"].append(time.perf_counter() - t)
            out[k]["cpu"].append(time.process_time() - c)
    return out


async def aalternate(pairs: dict[str, Callable[[], Any]], n: int, warm: int) -> dict[str, dict[str, list[float]]]:
    names = list(pairs)
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in names}
    for _ in range(warm):
        for k in names:
            await pairs[k]()
    for i in range(n):
        for k in (names if i % 2 == 0 else names[::-1]):
            c, t = time.process_time(), time.perf_counter()
            await pairs[k]()
            out[k]["wall"].append(time.perf_counter() - t)
            out[k]["cpu"].append(time.process_time() - c)
    return out


def compare(samples: dict[str, dict[str, list[float]]], raw: str, ib: str) -> dict[str, Any]:
    r, b = summary(samples[raw]["wall"], 1000), summary(samples[ib]["wall"], 1000)
    rc, bc = (statistics.median(samples[k]["cpu"]) * 1000 for k in (raw, ib))
    return {"raw_ms": r, "imagebroker_ms": b,
            "ratio_median": round(b["median"] / r["median"], 3), "ratio_p95": round(b["p95"] / r["p95"], 3),
            "extra_ms_median": round(b["median"] - r["median"], 3),
            "client_cpu_ms_median": {"raw": round(rc, 3), "imagebroker": round(bc, 3)}}


def check(result: Any) -> None:
    assert result.offering == OFFERING and len(result.images) == 1, result
    assert (result.images[0].width, result.images[0].height) == (1024, 1024), result.images[0]
    assert result.cost.status == "priced", result.cost


def sync_latency(base: str, key: str, db: str, n: int, warm: int) -> dict[str, Any]:
    import openai

    from imagebroker import Broker

    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
    broker = Broker(policy(base), ledger=f"sqlite:///{db}")
    check(broker.generate(PROMPT, model=OFFERING, size=SIZE))
    samples = alternate({"raw": lambda: _decode(client.images.generate(**RAW_PARAMS)),
                         "imagebroker": lambda: broker.generate(PROMPT, model=OFFERING, size=SIZE)}, n, warm)
    broker.close()
    client.close()
    return compare(samples, "raw", "imagebroker")


async def async_latency(base: str, key: str, db: str, n: int, warm: int) -> dict[str, Any]:
    import openai

    from imagebroker import AsyncBroker

    client = openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0)
    broker = AsyncBroker(policy(base), ledger=f"sqlite:///{db}")
    check(await broker.generate(PROMPT, model=OFFERING, size=SIZE))

    async def raw() -> None:
        _decode(await client.images.generate(**RAW_PARAMS))

    samples = await aalternate({"raw": raw, "imagebroker": lambda: broker.generate(
        PROMPT, model=OFFERING, size=SIZE)}, n, warm)
    await broker.aclose()
    await client.close()
    return compare(samples, "raw", "imagebroker")


async def throughput(base: str, key: str, db: str, calls: int, concurrency: int, rounds: int,
                     chunk: int, server_pid: int | None) -> dict[str, Any]:
    import openai

    from imagebroker import AsyncBroker

    client = openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0)
    broker = AsyncBroker(policy(base), ledger=f"sqlite:///{db}")
    sem = asyncio.Semaphore(concurrency)

    async def raw() -> None:
        async with sem:
            _decode(await client.images.generate(**RAW_PARAMS))

    async def ib() -> None:
        async with sem:
            await broker.generate(PROMPT, model=OFFERING, size=SIZE)

    async def run(fn: Callable[[], Any], k: int) -> tuple[float, float, float | None]:
        s0, c, t = _proc_cpu_s(server_pid), time.process_time(), time.perf_counter()
        await asyncio.gather(*[fn() for _ in range(k)])
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        server = None if s0 is None else (_proc_cpu_s(server_pid) - s0) / k * 1000
        return k / wall, cpu / k * 1000, server

    await run(raw, concurrency * 4)  # warm: connections opened, imports done
    await run(ib, concurrency * 4)
    # each round: `calls` per side, in chunks alternating between the sides (order flipping), so that
    # the other load on this machine falls on both alike; calls/s = calls / summed chunk time
    per: dict[str, list[list[tuple[float, float, float | None]]]] = {"raw": [], "imagebroker": []}
    flip = False
    for _ in range(rounds):
        for name in per:
            per[name].append([])
        for _ in range(max(1, calls // chunk)):
            for name in (["imagebroker", "raw"] if flip else ["raw", "imagebroker"]):
                per[name][-1].append(await run(raw if name == "raw" else ib, min(chunk, calls)))
            flip = not flip
    await broker.aclose()
    await client.close()

    def rate(chunks: list[tuple[float, float, float | None]]) -> float:
        k = min(chunk, calls)
        return len(chunks) * k / sum(k / c[0] for c in chunks)

    def mean(name: str, j: int) -> float | None:
        vals = [c[j] for r in per[name] for c in r if c[j] is not None]
        return round(statistics.fmean(vals), 3) if vals else None

    rounds_rps = {k: [rate(r) for r in v] for k, v in per.items()}
    raw_rps = rounds / sum(1 / x for x in rounds_rps["raw"])
    ib_rps = rounds / sum(1 / x for x in rounds_rps["imagebroker"])
    return {"concurrency": concurrency, "calls_per_side_per_round": calls, "chunk": min(chunk, calls),
            "rounds": rounds, "raw_per_s": round(raw_rps, 1), "imagebroker_per_s": round(ib_rps, 1),
            "ratio": round(ib_rps / raw_rps, 3),
            "per_round_per_s": {k: [round(x, 1) for x in v] for k, v in rounds_rps.items()},
            "per_round_ratio": [round(b / a, 3) for a, b in zip(rounds_rps["raw"], rounds_rps["imagebroker"],
                                                                  strict=True)],
            "client_cpu_ms_per_call": {"raw": mean("raw", 1), "imagebroker": mean("imagebroker", 1)},
            "server_cpu_ms_per_call": {"raw": mean("raw", 2), "imagebroker": mean("imagebroker", 2)}}


# -- where the time goes -------------------------------------------------------------------------
class Stages:
    """perf_counter wrappers around the broker's own functions; per-stage lists of seconds."""

    def __init__(self) -> None:
        self.t: dict[str, list[float]] = defaultdict(list)
        self.undo: list[tuple[Any, str, Any]] = []
        self.missing: list[str] = []  # stages whose function this version of the code lacks
        self.on = False

    def wrap(self, owner: Any, attr: str, stage: str) -> None:
        own = isinstance(owner, type) and attr in owner.__dict__
        orig = owner.__dict__[attr] if own else getattr(owner, attr)
        t = self.t

        starts_late = inspect.iscoroutinefunction(orig)  # time it from its first step, not its creation

        async def timed(aw: Any, s: float) -> Any:
            if starts_late:
                s = time.perf_counter()
            try:
                return await aw
            finally:
                if self.on:
                    t[stage].append(time.perf_counter() - s)

        @functools.wraps(orig)
        def wrapper(*a: Any, **kw: Any) -> Any:  # async functions too: it times their coroutine
            s = time.perf_counter()
            done = True
            try:
                out = orig(*a, **kw)
                if inspect.isawaitable(out):
                    done = False
                    return timed(out, s)
                return out
            finally:
                if done and self.on:
                    t[stage].append(time.perf_counter() - s)

        setattr(owner, attr, wrapper)
        self.undo.append((owner, attr, orig if not isinstance(owner, type) or own else None))

    def restore(self) -> None:
        for owner, attr, orig in reversed(self.undo):
            if orig is None:
                delattr(owner, attr)  # it was inherited
            else:
                setattr(owner, attr, orig)

    def ms(self, stage: str, per: int) -> float:
        return round(sum(self.t.get(stage, [])) / per * 1000, 3)


def install(st: Stages) -> None:
    """Wrap each stage's function; the first of its candidates that exists (the code is refactored
    under this script: CallRun methods became CallLog methods and module functions)."""
    import importlib

    def target(path: str) -> tuple[Any, str] | None:
        mod, _, rest = path.partition(":")
        try:
            obj: Any = importlib.import_module(mod)
        except ImportError:
            return None
        *owners, attr = rest.split(".")
        for name in owners:
            obj = getattr(obj, name, None)
            if obj is None:
                return None
        return (obj, attr) if hasattr(obj, attr) else None

    ex, core, rec = "imagebroker.broker.execution", "imagebroker.broker.core", "imagebroker.broker.record"
    stages = {
        "sync_total": ["imagebroker.broker.sync:Broker.generate"],
        "async_total": [f"{core}:AsyncBroker.generate"],
        "request_build": [f"{core}:_request"],  # ImageRequest(**fields), pydantic
        "plan": [f"{core}:AsyncBroker._plan"],  # state() + memoised plan
        "callrun_init": [f"{ex}:CallRun.__init__", f"{rec}:CallLog.__init__"],
        "provider_total": ["imagebroker.providers.openai:OpenAIProvider.generate"],
        # the provider's HTTP round trip and JSON parse (the SDK's call, as raw, before the provider spoke
        # HTTP itself)
        "sdk_call": ["imagebroker.providers.openai:OpenAIProvider.post",
                     "openai.resources.images:AsyncImages.generate"],
        "sdk_call_sync": ["openai.resources.images:Images.generate"],
        "validate": [f"{ex}:validate_images"],
        "validate_pil_load": ["PIL.ImageFile:ImageFile.load"],  # the full decode inside validate
        "settle": [f"{ex}:settle", f"{ex}:settle_checked"],
        "attempt_record": [f"{ex}:CallRun._attempt", f"{rec}:CallLog.attempt"],
        "finish_ok": [f"{ex}:CallRun._finish_ok", f"{ex}:_finish"],
        "ledger_record": [f"{ex}:CallRun.record", f"{rec}:CallLog.record"],
        "ledger_rows_build": [f"{ex}:CallRun._rows", f"{rec}:CallLog.rows"],
        "ledger_sqlite_write": ["imagebroker.broker.ledger.writer:CallWriter.write"],
        "generated_image_model": ["imagebroker.types:GeneratedImage.__init__"],
        "image_result_model": ["imagebroker.types:ImageResult.__init__"],
    }
    for stage, candidates in stages.items():
        found = next((t for t in map(target, candidates) if t is not None), None)
        if found is None:
            st.missing.append(stage)
        else:
            st.wrap(*found, stage)


def breakdown(st: Stages, per: int, sync: bool) -> dict[str, Any]:
    m = functools.partial(st.ms, per=per)
    total = m("async_total")
    sdk = m("sdk_call")
    out = {
        "calls": per,
        "total_async_generate": total,
        "request_build": m("request_build"),
        "plan": m("plan"),
        "callrun_init": m("callrun_init"),
        "provider_http (the provider's HTTP round trip + JSON parse; raw: the SDK's)": sdk,
        "provider_own (provider.generate minus provider_http)": round(m("provider_total") - sdk, 3),
        "validate_images": m("validate"),
        "  of which PIL full decode (ImageFile.load)": m("validate_pil_load"),
        "  of which GeneratedImage model": m("generated_image_model"),
        "settle": m("settle"),
        "attempt_record": m("attempt_record"),
        "image_result_model": m("image_result_model"),
        "ledger_record (rows + SQLite commit)": m("ledger_record"),
        "  of which row building": m("ledger_rows_build"),
        "  of which SQLite write+commit": m("ledger_sqlite_write"),
    }
    accounted = (m("request_build") + m("plan") + m("callrun_init") + m("provider_total") + m("validate")
                 + m("settle") + m("attempt_record") + m("finish_ok"))
    out["unaccounted (asyncio.timeout, breaker, CallContext, api_key, loop scheduling)"] = round(
        total - accounted, 3)
    if st.missing:
        out["stages_not_found (counted as unaccounted)"] = st.missing
    if sync:
        out["total_sync_generate"] = m("sync_total")
        out["sync_thread_hop (Broker.generate minus AsyncBroker.generate)"] = round(
            m("sync_total") - total, 3)
    return out


async def stages_async(base: str, key: str, db: str, n: int) -> dict[str, Any]:
    import openai

    from imagebroker import AsyncBroker

    client = openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0)
    broker = AsyncBroker(policy(base), ledger=f"sqlite:///{db}")
    for _ in range(20):
        await broker.generate(PROMPT, model=OFFERING, size=SIZE)
        await client.images.generate(**RAW_PARAMS)
    st = Stages()
    install(st)
    raw_sdk: list[float] = []
    raw_dec: list[float] = []
    try:
        for _ in range(n):
            st.on = True
            await broker.generate(PROMPT, model=OFFERING, size=SIZE)
            st.on = False
            t = time.perf_counter()
            resp = await client.images.generate(**RAW_PARAMS)
            t2 = time.perf_counter()
            _decode(resp)
            raw_sdk.append(t2 - t)
            raw_dec.append(time.perf_counter() - t2)
    finally:
        st.restore()
        await broker.aclose()
        await client.close()
    out = breakdown(st, n, sync=False)
    out["raw: sdk_call"] = round(sum(raw_sdk) / n * 1000, 3)
    out["raw: base64 decode"] = round(sum(raw_dec) / n * 1000, 3)
    return out


def stages_sync(base: str, key: str, db: str, n: int) -> dict[str, Any]:
    import openai

    from imagebroker import Broker

    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
    broker = Broker(policy(base), ledger=f"sqlite:///{db}")
    for _ in range(20):
        broker.generate(PROMPT, model=OFFERING, size=SIZE)
        client.images.generate(**RAW_PARAMS)
    st = Stages()
    install(st)
    try:
        for _ in range(n):
            st.on = True
            broker.generate(PROMPT, model=OFFERING, size=SIZE)
            client.images.generate(**RAW_PARAMS)  # the raw sync SDK (sdk_call_sync), for comparison
            st.on = False
    finally:
        st.on = False
        st.restore()
        broker.close()
        client.close()
    out = breakdown(st, n, sync=True)
    out["raw sync: sdk_call (sync SDK stack: httpx2 sync, no event loop)"] = st.ms("sdk_call_sync", n)
    return out


def cprofile(base: str, key: str, db: str, n: int, path: str) -> None:
    import cProfile
    import pstats

    from imagebroker import AsyncBroker

    async def go() -> None:
        broker = AsyncBroker(policy(base), ledger=f"sqlite:///{db}")
        for _ in range(20):
            await broker.generate(PROMPT, model=OFFERING, size=SIZE)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            await broker.generate(PROMPT, model=OFFERING, size=SIZE)
        prof.disable()
        await broker.aclose()
        prof.dump_stats(path)
        pstats.Stats(path, stream=sys.stderr).sort_stats("tottime").print_stats(25)

    asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--iterations", type=int, default=200, help="timed calls per side, per latency test")
    ap.add_argument("--warm", type=int, default=30)
    ap.add_argument("--calls", type=int, default=1000, help="calls per throughput round")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2, help="throughput rounds (each: --calls per side)")
    ap.add_argument("--chunk", type=int, default=250, help="throughput calls per alternating chunk")
    ap.add_argument("--stage-calls", type=int, default=150)
    ap.add_argument("--thread", action="store_true", help="the fake server on a thread of this process")
    ap.add_argument("--fresh-images", action="store_true", help="the fake encodes its PNG on every call")
    ap.add_argument("--cprofile", metavar="FILE", help="also cProfile AsyncBroker calls into FILE")
    ap.add_argument("--name", default="sdk_overhead", help="results/NAME.json")
    args = ap.parse_args()
    if args.serve:
        serve(args.port, args.fresh_images)
        return
    random.seed(7)
    tmp = Path(tempfile.mkdtemp(prefix="sdk_overhead-"))
    t0 = time.perf_counter()
    with fake_server(args.thread, args.fresh_images) as (base, key, pid):
        from imagebroker.testing.fakes.openai import FakeOpenAI

        os.environ[FakeOpenAI.name.upper() + "_API_KEY"] = key  # OPENAI_API_KEY, read by the provider
        results: dict[str, Any] = {
            "setup": {"server": "thread of this process" if args.thread else "process of its own",
                      "image": f"{SIZE} PNG from the fake (solid colour, 5.3 KB; 7.1 KB base64)",
                      "server_png_encode": "per call" if args.fresh_images else "memoised",
                      "offering": OFFERING, "ledger": "SQLite file in a temp dir"}}
        results["sync_latency"] = sync_latency(base, key, str(tmp / "s.db"), args.iterations, args.warm)
        results["async_latency"] = asyncio.run(async_latency(base, key, str(tmp / "a.db"), args.iterations,
                                                             args.warm))
        results["throughput"] = asyncio.run(throughput(base, key, str(tmp / "t.db"), args.calls,
                                                       args.concurrency, args.rounds, args.chunk, pid))
        results["stages_ms_per_call"] = {
            "async": asyncio.run(stages_async(base, key, str(tmp / "sa.db"), args.stage_calls)),
            "sync": stages_sync(base, key, str(tmp / "ss.db"), args.stage_calls)}
        if args.cprofile:
            cprofile(base, key, str(tmp / "p.db"), args.stage_calls, args.cprofile)
    results["targets"] = {
        "per_call_ratio_max": 1.3, "throughput_ratio_min": 0.9,
        "sync_ok": results["sync_latency"]["ratio_median"] <= 1.3,
        "async_ok": results["async_latency"]["ratio_median"] <= 1.3,
        "throughput_ok": results["throughput"]["ratio"] >= 0.9}
    results["run_s"] = round(time.perf_counter() - t0, 1)
    save(args.name, results)


if __name__ == "__main__":
    main()
