"""Write docs/benchmarks.md from benchmarks/results/*.json: `python benchmarks/report.py`."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def core(d: dict) -> list[str]:
    imp, out = d["import_ms"], []
    out += ["## Import and planning (issue 2) — `benchmarks/core.py`", "",
            f"Machine: {d['machine']}.", "",
            "| measure | median | p95 | target | |", "|---|---|---|---|---|",
            f"| cold `import imagebroker` | {imp['median']} ms | {imp['p95']} ms | <= 150 ms | "
            f"{verdict(imp['median'] <= 150)} |"]
    for name, p in d["plan_us"].items():
        out.append(f"| plan one request, {p['offerings']} offerings, {name} | {p['median']} us | {p['p95']} us "
                   f"| <= 300 us median | {verdict(p['median'] <= 300)} |")
    if "broker_plan_us" in d:
        b = d["broker_plan_us"]
        out.append(f"| `broker.plan(...)`, same traffic: request built, state gathered, plan memoised by its "
                   f"planning fields | {b['median']} us | {b['p95']} us | | |")
    out += ["", f"`import imagebroker` imports torch, openai, replicate, diffusers or pydantic: "
                f"**{d['imports_heavy_modules']}** (everything but the error classes loads on first use).", ""]
    return out


def overhead(d: dict) -> list[str]:
    lat, thr, mem, rep = d["latency"], d["throughput"], d["memory"], d["costs_report"]
    proc = d.get("server_process")

    def rows(lat: dict, thr: dict, where: str) -> list[str]:
        return [
            f"| {where}: per call, direct (same client) | median {lat['direct_ms']['median']} ms, "
            f"p95 {lat['direct_ms']['p95']} ms | | |",
            f"| {where}: per call, through the broker | median {lat['broker_ms']['median']} ms, "
            f"p95 {lat['broker_ms']['p95']} ms | | |",
            f"| {where}: **broker overhead** (median difference) | {lat['overhead_ms_median']} ms | <= 1 ms | "
            f"{verdict(lat['overhead_ms_median'] <= 1)} |",
            f"| {where}: **throughput** at concurrency {thr['concurrency']} ({thr['calls']} calls) | broker "
            f"{thr['broker_per_s']}/s vs direct {thr['direct_per_s']}/s = **{thr['ratio']}** | >= 0.8 | "
            f"{verdict(thr['ratio'] >= 0.8)} |"]

    out = [
        "## Broker overhead, throughput, memory, costs report (issue 3) — `benchmarks/overhead.py`", "",
        f"Machine: {d['machine']}. A fake image API on 127.0.0.1 (stdlib threaded HTTP server, 64x64 PNG); the "
        "broker path includes planning, the HTTP call, image decoding and validation, pricing and the SQLite "
        "ledger write (WAL), committed before `generate()` returns. The fake server runs on a thread of the "
        "benchmark's process (as in the tests: it shares the GIL with the broker) and then, as a real provider "
        "would, in a process of its own.", "",
        "| measure | result | target | |", "|---|---|---|---|",
        *rows(lat, thr, "server thread"),
        *(rows(proc["latency"], proc["throughput"], "server process") if proc else []),
        f"| memory after {mem['calls']} calls | Python heap peak {mem['python_heap_peak_mb']} MB "
        f"(after: {mem['python_heap_after_mb']} MB), process max RSS {mem['process_max_rss_mb']} MB | | |",
        f"| `imagebroker costs --by provider` over {rep['rows']:,} calls | median "
        f"{rep['costs_by_provider_s']['median']} s (whole CLI process) | <= 2 s | "
        f"{verdict(rep['costs_by_provider_s']['median'] <= 2)} |",
        f"| `imagebroker costs --by day` over {rep['rows']:,} calls | median {rep['costs_by_day_s']['median']} s | "
        f"<= 2 s | {verdict(rep['costs_by_day_s']['median'] <= 2)} |"]
    if "costs_by_tag_team_s" in rep:
        out += [f"| `imagebroker costs --by tag:team` over {rep['rows']:,} calls (read from the rows) | median "
                f"{rep['costs_by_tag_team_s']['median']} s | | |",
                f"| one-off migration adding the rollups to a ledger of {rep['rows']:,} calls | "
                f"{rep['rollup_migration_s']} s | | |"]
    if proc and proc["throughput"]["ratio"] < 0.8:
        t = proc["throughput"]
        direct_ms, broker_ms = 1000 / t["direct_per_s"], 1000 / t["broker_per_s"]
        out += ["", f"With the server in a process of its own, the benchmark's process is CPU-bound at concurrency "
                f"100: calling directly costs {direct_ms:.2f} ms of CPU per call (most of it in httpx's connection "
                f"pool, whose bookkeeping grows with the number of connections), the broker adds "
                f"{broker_ms - direct_ms:.2f} ms (decoding and checking the image, the ledger commit, planning, "
                "records of the call), hence the lower ratio; sharing a process with the server (the first rows) "
                "spreads the same additions over more CPU per call."]
    return [*out, ""]


def sdk(after: dict, before: dict | None, check: dict | None = None) -> list[str]:
    """Issue 10: imagebroker through the real `openai` provider against the raw `openai` SDK."""
    def row(name: str, key: str, target: str, ok: bool) -> str:
        a, b = after[key], (before or {}).get(key)
        was = f"{b['imagebroker_ms']['median']} ms vs {b['raw_ms']['median']} ms = x{b['ratio_median']}" if b else "-"
        return (f"| {name} | {was} | {a['imagebroker_ms']['median']} ms vs {a['raw_ms']['median']} ms = "
                f"**x{a['ratio_median']}** | {target} | {verdict(ok)} |")

    t, tb = after["throughput"], (before or {}).get("throughput")
    stages = after["stages_ms_per_call"]["async"]
    out = ["## Overhead against the raw `openai` SDK (issue 10) — `benchmarks/sdk_overhead.py`", "",
           f"Machine: {after['machine']}. One loopback fake OpenAI server in a process of its own, 1024x1024 PNG "
           "answers; side by side in one run, alternating per call. imagebroker goes through its real `openai` "
           "provider (the SDK, retries off), with planning, image checks, pricing and the SQLite ledger commit. "
           "*Before*: the same script on the code before this wave (commit 75de56b) on a busier machine, which "
           "decoded every image in full on the event loop (13-19 ms per call).", "",
           "| measure | before | now | target | |", "|---|---|---|---|---|",
           row("per call, sync (`Broker` vs `OpenAI`), median", "sync_latency", "<= x1.3",
               after["sync_latency"]["ratio_median"] <= 1.3),
           row("per call, async (`AsyncBroker` vs `AsyncOpenAI`), median", "async_latency", "<= x1.3",
               after["async_latency"]["ratio_median"] <= 1.3),
           f"| throughput at concurrency {t['concurrency']} | {tb['ratio'] if tb else '-'} | "
           f"{t['imagebroker_per_s']}/s vs {t['raw_per_s']}/s = **x{t['ratio']}** (client CPU "
           f"{t['client_cpu_ms_per_call']['imagebroker']} vs {t['client_cpu_ms_per_call']['raw']} ms/call) | "
           f">= x0.9 | {verdict(t['ratio'] >= 0.9)} |", "",
           "Where imagebroker's time goes, per async call (perf_counter around each stage, ms):", "",
           "| stage | ms |", "|---|---|"]
    out += [f"| {k.strip()} | {v} |" for k, v in stages.items() if k not in ("calls",) and not k.startswith("raw")]
    hop = after["stages_ms_per_call"]["sync"].get("sync_thread_hop (Broker.generate minus AsyncBroker.generate)")
    out += ["", "What remains: the ledger commit (rows built, one SQLite transaction of four statements, committed "
            "before `generate()` returns: the durability promise) is the largest piece; image checks (structure, "
            "PNG checksums, size), settlement, the provider's own work and the request and plan objects follow at "
            "about 0.1 ms each. The sync `Broker` runs its loop on the caller's thread while uncontended "
            f"({hop} ms more than `AsyncBroker`), but still uses the async HTTP stack that the raw sync SDK does not. "
            "Under concurrency every call adds the same CPU to a client process that the SDK already keeps busy, "
            "so the throughput ratio follows the extra CPU per call. Three runs of the final code on this 2-core "
            "machine: async x1.34-1.38, sync x1.61-1.64, throughput x0.73-0.74.", ""]
    if check:   # a rerun after later changes, on the day's machine
        raw_then = after["stages_ms_per_call"]["async"]["raw: sdk_call"]
        raw_now = check["stages_ms_per_call"]["async"]["raw: sdk_call"]
        out += [f"Rerun after the command-line and image-store changes (issues 12, 13; "
                f"`results/sdk_overhead_wave2_check.json`): async x{check['async_latency']['ratio_median']}, sync "
                f"x{check['sync_latency']['ratio_median']}, throughput x{check['throughput']['ratio']}. The raw SDK "
                f"call itself took {raw_now} ms against {raw_then} ms in the run above and every stage grew alike: "
                "a slower machine that day, no regression measurable.", ""]
    return out


def local(d: dict) -> list[str]:
    o, on, off = d["overhead"], d["coalescing_on"], d["coalescing_off"]
    return [
        "## Local backend (issue 5) — `benchmarks/local_overhead.py`", "",
        f"Machine: {d['machine']}, torch threads {d['torch_threads']}. Model: the bundled `{d['model']}` "
        f"(a real Diffusers pipeline), {d['steps']} steps, {d['size']}x{d['size']}, guidance 5.", "",
        "| measure | result | target | |", "|---|---|---|---|",
        f"| direct `pipe(...)` call, PNG encode included | median {o['direct_ms']['median']} ms | | |",
        f"| the same through the broker (plan, worker thread, ledger) | median {o['broker_ms']['median']} ms | | |",
        f"| broker overhead | {o['overhead_pct_median']}% | <= 3% | {verdict(o['overhead_pct_median'] <= 3)} |",
        f"| 8 concurrent requests, coalescing on | {on['images_per_s']} images/s ({on['seconds_for_8']} s; largest "
        f"batch {on['max_batch_seen']}) | | |",
        f"| 8 concurrent requests, coalescing off | {off['images_per_s']} images/s ({off['seconds_for_8']} s) | | |",
        f"| speed-up from coalescing | {round(on['images_per_s'] / off['images_per_s'], 2)}x | | |", ""]


def gpu(d: dict | None) -> list[str]:
    out = ["## GPU pipelines (issue 5) — `benchmarks/gpu_pipelines.py`", ""]
    if d is None:
        return out + ["Not run yet: no GPU was lent to the session that wrote this script. The script builds "
                      "SDXL- and FLUX.1-architecture pipelines from their published configs with random weights and "
                      "times 1024x1024 eager versus regional `torch.compile`; its code path was checked on CPU with "
                      "`--tiny`. Published anchors for comparison are in `shared/research/diffusers-local.md` 1.7.", ""]
    out += [f"Device: {d['device']}, {d['dtype']}, {d['size']}x{d['size']}, torch {d['torch']}.", "",
            "| pipeline | steps | eager s/image | eager images/s | compile s | compiled s/image | compiled images/s |",
            "|---|---|---|---|---|---|---|"]
    for kind in ("sdxl", "flux"):
        k = d[kind]
        out.append(f"| {kind} | {k['steps']} | {k['eager_s_per_image']} | {k['eager_images_per_s']} | "
                   f"{k['compile_s']} | {k['compiled_s_per_image']} | {k['compiled_images_per_s']} |")
    return out + [""]


def main() -> None:
    lines = ["# Benchmarks", "", "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; "
             "each script says how to rerun it. Timings are from the 2-core CI-class machine unless a section says "
             "otherwise; nothing here is a timed test.", ""]
    for name, fn in (("core", core), ("overhead", overhead), ("local_overhead", local)):
        data = load(name)
        lines += fn(data) if data else [f"## {name}", "", "Not run yet.", ""]
    after = load("sdk_overhead")
    missing = ["## sdk_overhead", "", "Not run yet.", ""]
    lines += sdk(after, load("sdk_overhead_before"), load("sdk_overhead_wave2_check")) if after else missing
    lines += gpu(load("gpu_pipelines"))
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
