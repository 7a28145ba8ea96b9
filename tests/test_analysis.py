"""Build versus buy from the ledger: the what-if replay checked against the estimator on the same requests,
the break-even arithmetic on worked examples, and the HTML report opened in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imagebroker import Broker
from imagebroker.broker.economics import BreakEven
from imagebroker.broker.ledger.store import Ledger
from imagebroker.broker.whatif import whatif
from imagebroker.cli import app
from imagebroker.policies.effective import effective_catalog
from imagebroker.policies.pricing import estimate
from imagebroker.policies.schema import Policy
from imagebroker.providers.catalog import builtin_catalog
from imagebroker.testing.mock import mock_offering
from imagebroker.types import ImageRequest
from tests.conftest import builtin_providers

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
REQUESTS = [{"prompt": "a cat", "n": 2}, {"prompt": "a dog", "size": "512x512"},
            {"prompt": "a long prompt " * 20, "n": 3, "size": "1024x768", "steps": 12},
            {"prompt": "tagged", "tags": {"team": "growth"}}]


def team_policy(**extra) -> Policy:
    per_mp = {**mock_offering("mp"), "price": {"unit": "per_megapixel", "usd_per_mp": "0.03", "source": "t",
                                              "checked": "2026-11-22", "confidence": "high"}}
    return Policy.model_validate({
        "name": "today", "deny": builtin_providers(),
        "offerings": [mock_offering("a", price={"usd": "0.04"}), per_mp], "prefer": ["mock/a"], **extra})


MONTHLY = {"name": "monthly", "period": "month", "limit_usd": "5"}


def build_ledger() -> None:
    with Broker(team_policy(objective="ordered", budgets=[MONTHLY])) as b:
        for fields in REQUESTS:
            b.generate(**fields)


def test_whatif_figures_are_the_estimator_on_the_same_requests():
    build_ledger()
    cheaper = team_policy(name="per-mp", prefer=[], objective="cheapest", deny=[*builtin_providers(), "mock/a"])
    catalog = effective_catalog(cheaper, builtin_catalog())
    result = whatif(Ledger(read_only=True), cheaper, catalog, by="provider")
    expected = sum(estimate(ImageRequest(**r), catalog.offerings["mock/mp"]).usd for r in REQUESTS)
    actual = Decimal("0.04") * sum(r.get("n", 1) for r in REQUESTS)
    d = result.as_dict()
    assert d["actual"] == {"calls": 4, "cost_usd": actual}
    assert d["whatif"]["cost_usd"] == expected and d["whatif"]["calls_routed"] == 4
    assert d["moves"] == [{"from": "mock/a", "to": "mock/mp", "calls": 4}] and d["calls_partial"] == 0
    eu = json.loads(CliRunner().invoke(app, ["whatif", "--policy", "eu-only", "--json"]).stdout)
    from imagebroker.policies.loader import load_policy

    regions = {o.id: set(o.regions) for o in effective_catalog(load_policy("eu-only"), builtin_catalog())}
    assert eu["whatif"]["calls_routed"] == 4 and eu["actual"]["cost_usd"] == str(actual)
    assert all(regions[m["to"]] <= {"eu", "on_prem"} for m in eu["moves"])   # (keys are not needed to replay)
    Path("strict.yaml").write_text("extends: eu-only\ndeny: [local, comfyui]\n"
                                   "constraints: {max_cost_per_image_usd: 0.001}\n")
    strict = json.loads(CliRunner().invoke(app, ["whatif", "--policy", "strict.yaml", "--json"]).stdout)
    assert strict["whatif"]["calls_unroutable"] == 4 and strict["whatif"]["cost_usd"] == "0"
    assert "est $#/image > max $#" in strict["unroutable_reasons"]   # figures folded: one kind, counted once


def test_whatif_groups_by_tag_and_replays_old_rows_as_partial():
    build_ledger()
    with Ledger().engine.begin() as conn:   # a row from before the ledger kept planning fields
        conn.exec_driver_sql("UPDATE calls SET request_json = NULL WHERE rowid = (SELECT min(rowid) FROM calls)")
    policy = team_policy()
    result = whatif(Ledger(read_only=True), policy, effective_catalog(policy, builtin_catalog()), by="tag:team")
    groups = {g["key"]: g["calls"] for g in result.as_dict()["groups"]}
    assert groups == {"(untagged)": 3, "growth": 1} and result.partial == 1


def test_whatif_prices_as_of_a_day_replays_with_the_price_then(tmp_path):
    build_ledger()
    history = [{"unit": "per_megapixel", "usd_per_mp": "0.05", "since": "2026-03-01", "source": "t",
                "checked": "2026-03-01", "confidence": "high"},
               {"unit": "per_megapixel", "usd_per_mp": "0.08", "since": "2025-06-01", "source": "t",
                "checked": "2025-06-01", "confidence": "high"}]
    cheaper = team_policy(name="per-mp", prefer=[], objective="cheapest", deny=[*builtin_providers(), "mock/a"])
    dumped = json.loads(cheaper.model_dump_json(exclude={"providers", "local"}))
    mp = next(o for o in dumped["offerings"] if o["model"] == "mp")
    mp["price_history"] = history
    policy = tmp_path / "history.yaml"
    policy.write_text(json.dumps(dumped))

    def replay(day: str) -> dict:
        out = CliRunner().invoke(app, ["whatif", "--policy", str(policy), "--prices-as-of", day, "--json"])
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)["whatif"]

    catalog = effective_catalog(cheaper, builtin_catalog())
    today = sum(estimate(ImageRequest(**r), catalog.offerings["mock/mp"]).usd for r in REQUESTS)
    # each price is the per-MP rate times the same megapixels: the what-if scales with the rate of that day
    assert Decimal(replay("2026-12-01")["cost_usd"]) == today                       # the current price (0.03)
    assert Decimal(replay("2026-05-10")["cost_usd"]) == today * 5 / 3               # since 2026-03-01
    assert Decimal(replay("2025-12-31")["cost_usd"]) == today * 8 / 3               # since 2025-06-01
    before = replay("2024-01-01")   # older than anything recorded: today's price stands in, and it says so
    assert Decimal(before["cost_usd"]) == today and before["prices_not_recorded"] == {"mock/mp": 4}
    assert replay("2026-05-10")["prices_not_recorded"] == {}
    bad = CliRunner().invoke(app, ["whatif", "--policy", str(policy), "--prices-as-of", "last spring"])
    assert bad.exit_code == 2 and "--prices-as-of 'last spring' is not a date" in bad.output
    mp["price_history"] = [{**history[0], "since": "2026-12-01"}]   # not before the current price's day
    policy.write_text(json.dumps(dumped))
    wrong = CliRunner().invoke(app, ["whatif", "--policy", str(policy)])
    assert wrong.exit_code == 2 and "price_history" in wrong.output and "Traceback" not in wrong.output


def test_breakeven_worked_examples():
    b = BreakEven(hosted_usd_per_image=Decimal("0.04"), gpu_usd_per_hour=Decimal("2.69"),
                  seconds_per_image=Decimal("3.5"), utilisation=Decimal("0.6"), fixed_usd_per_month=Decimal(0))
    d = b.as_dict()
    # 2.69 x 3.5 / 3600 / 0.6 = 0.0043587...; 2.69 x 730 = 1963.70; 730 x 3600 / 3.5 x 0.6 = 450514.3
    assert d["self_hosted_usd_per_image"] == Decimal("0.004359")
    assert d["dedicated_gpu_usd_per_month"] == Decimal("1963.700000")
    assert d["capacity_images_per_gpu_month"] == 450_514
    assert d["breakeven_images_per_month"] == 49_093 and d["gpus_needed_at_breakeven"] == 1   # 1963.70 / 0.04
    slow = BreakEven(hosted_usd_per_image=Decimal("0.005"), gpu_usd_per_hour=Decimal("2.69"),
                     seconds_per_image=Decimal("60"), utilisation=Decimal("0.6"), fixed_usd_per_month=Decimal("300"))
    # (1963.70 + 300) / 0.005 = 452740 images, one GPU makes 730 x 3600 / 60 x 0.6 = 26280: 18 GPUs
    assert (slow.breakeven_images_per_month, slow.capacity_images_per_gpu_month,
            slow.gpus_needed_at_breakeven) == (452_740, 26_280, 18)
    assert "18 GPUs" in "\n".join(slow.arithmetic())


def test_breakeven_from_the_cli_with_a_catalog_price_and_the_ledgers_volume():
    build_ledger()
    out = CliRunner().invoke(app, ["breakeven", "--gpu-usd-per-hour", "2.69", "--offering", "fal/fal-ai/flux/dev",
                                   "--size", "1024x1024", "--seconds-per-image", "3.5", "--json"])
    assert out.exit_code == 0, out.output
    d = json.loads(out.stdout)
    hosted = estimate(ImageRequest(prompt="x", size="1024x1024"), builtin_catalog().offerings["fal/fal-ai/flux/dev"])
    assert Decimal(d["hosted_usd_per_image"]) == hosted.usd and d["monthly_images"] == 7
    assert d["breakeven_images_per_month"] == -(-Decimal("1963.7") // hosted.usd)
    assert "the hosted API is cheaper" in d["verdict"]
    named = CliRunner().invoke(app, ["breakeven", "--gpu", "h100-runpod", "--price-per-image", "0.025",
                                     "--seconds-per-image", "7.1", "--utilisation", "1", "--json"])
    # the research's own figure: one H100 at $2.69/h against $0.025/image breaks even near 78.5k a month
    assert json.loads(named.stdout)["breakeven_images_per_month"] == 78_548
    unknown = CliRunner().invoke(app, ["breakeven", "--gpu", "tpu-v9", "--price-per-image", "0.02",
                                       "--seconds-per-image", "3"])
    assert unknown.exit_code == 2 and "known: a100-modal" in unknown.output
    bad = CliRunner().invoke(app, ["breakeven", "--gpu-usd-per-hour", "2.69", "--price-per-image", "abc",
                                   "--seconds-per-image", "3"])
    assert bad.exit_code == 2 and "--price-per-image 'abc' is not a number" in bad.output


def test_breakeven_takes_the_seconds_from_the_gpu_benchmarks_results(tmp_path):
    results = tmp_path / "gpu_pipelines.json"   # as benchmarks/gpu_pipelines.py writes it
    shape = {"machine": "x86_64, 16 cores", "device": "NVIDIA H200", "tiny": False, "size": 1024,
             "dtype": "torch.bfloat16", "torch": "2.13.0",
             "sdxl": {"steps": 30, "eager_s_per_image": 2.4, "eager_images_per_s": 0.417, "compile_s": 61.0,
                      "compiled_s_per_image": 1.9, "compiled_images_per_s": 0.526},
             "flux": {"steps": 28, "eager_s_per_image": 6.1, "eager_images_per_s": 0.164, "compile_s": 90.0,
                      "compiled_s_per_image": 4.8, "compiled_images_per_s": 0.208}}
    results.write_text(json.dumps(shape))

    def breakeven(*extra: str):
        return CliRunner().invoke(app, ["breakeven", "--gpu-usd-per-hour", "3.6", "--price-per-image", "0.03",
                                        "--benchmark-file", str(results), *extra])

    compiled, eager = breakeven("--benchmark", "flux", "--json"), breakeven("--benchmark", "sdxl:eager", "--json")
    assert compiled.exit_code == 0, compiled.output
    d = json.loads(compiled.stdout)
    assert Decimal(d["seconds_per_image"]) == Decimal("4.8")
    # 3.6 x 4.8 / 3600 / 0.6 = 0.008; capacity 730 x 3600 / 4.8 x 0.6 = 328500
    assert Decimal(d["self_hosted_usd_per_image"]) == Decimal("0.008")
    assert d["capacity_images_per_gpu_month"] == 328_500
    assert d["seconds_from"] == "flux compiled on NVIDIA H200 (1024px, 28 steps; gpu_pipelines.json)"
    assert Decimal(json.loads(eager.stdout)["seconds_per_image"]) == Decimal("2.4")
    shown = breakeven("--benchmark", "flux")
    assert "seconds per image = 4.8 s, flux compiled on NVIDIA H200" in shown.output
    results.write_text(json.dumps({**shape, "tiny": True}))   # a code-path check on a CPU: refused
    tiny = breakeven("--benchmark", "flux")
    assert tiny.exit_code == 2 and "--tiny run" in tiny.output
    missing = breakeven("--benchmark", "flux", "--benchmark-file", str(tmp_path / "none.json"))
    assert missing.exit_code == 2 and "run benchmarks/gpu_pipelines.py" in missing.output
    wrong = breakeven("--benchmark", "sd3")
    assert wrong.exit_code == 2 and "one of sdxl, flux" in wrong.output


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (CI installs it)")
def test_the_report_in_a_real_browser_shows_the_ledgers_figures(tmp_path):
    build_ledger()
    policy = tmp_path / "team.yaml"
    policy.write_text(team_policy(budgets=[MONTHLY]).model_dump_json(exclude={"providers", "local"}))
    page = tmp_path / "report.html"
    made = CliRunner().invoke(app, ["report", "--out", str(page), "--policy", str(policy), "--whatif", "eu-only",
                                    "--prices-as-of", "2024-01-01",
                                    "--gpu-usd-per-hour", "2.69", "--price-per-image", "0.04",
                                    "--seconds-per-image", "3.5"])
    assert made.exit_code == 0, made.output
    text = page.read_text()   # offline: nothing is fetched (the SVGs' RDF metadata names URIs, loads none)
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', text) and "<script" not in text and "<link" not in text
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    chrome = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    subprocess.run([*chrome, "--window-size=1280,2600", f"--screenshot={shot}", page.as_uri()], check=True,
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 50_000   # a page of charts, not a blank one
    dom = subprocess.run([*chrome, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout

    def figure(name: str) -> str:
        found = re.search(rf'data-figure="{name}">([^<]*)<', dom)
        assert found, name
        return found.group(1)

    assert figure("total-cost") == "$0.280000" and figure("total-calls") == "4" and figure("total-images") == "7"
    assert figure("offering-0-0") == "mock/a" and figure("budget-0-1") == "$0.280000"
    assert figure("whatif-actual") == "$0.280000"
    assert figure("whatif-prices-as-of") == "2024-01-01" and "no price recorded that day for" in dom
    assert dom.count("<svg") >= 5   # cost per day, by offering, budgets, what-if, break-even


def test_planning_fields_keep_adapters_by_reference_and_hash_never_the_prompt(tmp_path):
    import hashlib

    lora = tmp_path / "brand.safetensors"
    lora.write_bytes(b"lora weights")
    caps = {"adapters": True, "max_adapters": 2}
    policy = Policy.model_validate({"name": "p", "deny": builtin_providers(),
                                    "offerings": [mock_offering("lora", capabilities=caps)]})
    with Broker(policy) as b:
        b.generate("a secret prompt", adapters=[{"ref": str(lora), "scale": 0.7}], steps=9)
    with Ledger().engine.connect() as conn:
        saved = json.loads(conn.exec_driver_sql("SELECT request_json FROM calls").scalar())
    digest = hashlib.sha256(b"lora weights").hexdigest()
    assert saved["adapters"] == [{"ref": str(lora), "scale": 0.7, "sha256": digest}]
    assert saved["steps"] == 9 and saved["prompt_chars"] == len("a secret prompt")
    assert "secret" not in json.dumps(saved)
