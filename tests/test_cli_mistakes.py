"""The command line as a new user meets it: every mistake said in one line with exit code 2 before anything
is paid, typos in a policy caught, numbers that mean what they say, and what scripts need (exit codes,
JSON errors, headers, a ledger never created by a command that only looks)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imagebroker.cli import app
from imagebroker.testing.mock import mock_offering
from tests.conftest import builtin_providers

runner = CliRunner()


def run(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result


def policy_file(tmp_path: Path, name: str = "policy.yaml", **policy) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps({"name": "cli", **policy}, default=str))
    return p


def mock_policy(tmp_path: Path, *offerings, **policy) -> Path:
    return policy_file(tmp_path, deny=builtin_providers(), offerings=list(offerings) or [
        mock_offering("a", price={"usd": "0.01"})], **policy)


def calls(tmp_path: Path) -> list[dict]:
    if not (tmp_path / "ledger.db").exists():
        return []
    return json.loads(run("ledger", "export", "--format", "json").stdout)


# -- 2: the demo model is a last resort in every policy ----------------------------------------------
def test_a_policy_without_extends_plans_the_demo_model_last(tmp_path):
    policy = policy_file(tmp_path, objective="cheapest", constraints={"max_cost_per_image_usd": 0.05},
                         deny=builtin_providers("local"), offerings=[mock_offering("a", price={"usd": "0.01"})])
    data = json.loads(run("route", "a photo of a cat", "--policy", str(policy), "--json").stdout)
    assert [c["offering"] for c in data["candidates"]] == ["mock/a"]   # not the $0 64x64 demo first
    tiny = next(r for r in data["rejected"] if r["offering"] == "local/tiny-shapes")
    assert tiny["reasons"] == ["last resort: used only when no other offering is eligible"]


def test_a_policy_that_prefers_the_demo_model_by_id_gets_it(tmp_path):
    policy = policy_file(tmp_path, objective="ordered", prefer=["local/tiny-shapes"],
                         deny=builtin_providers("local"), offerings=[mock_offering("a", price={"usd": "0.01"})])
    data = json.loads(run("route", "x", "--policy", str(policy), "--json").stdout)
    assert [c["offering"] for c in data["candidates"]] == ["local/tiny-shapes", "mock/a"]


# -- 3: --out is checked before anything is paid -----------------------------------------------------
def test_out_that_is_a_file_fails_before_the_call(tmp_path):
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"mine")
    result = run("generate", "x", "--policy", str(mock_policy(tmp_path)), "--out", str(existing), code=2)
    assert f"--out {existing}: is a file, not a folder" in result.output
    assert existing.read_bytes() == b"mine" and calls(tmp_path) == []


def test_out_that_cannot_be_created_fails_before_the_call(tmp_path):
    result = run("generate", "x", "--policy", str(mock_policy(tmp_path)), "--out", "/proc/no-such/dir", code=2)
    assert "--out /proc/no-such/dir: cannot write there" in result.output and calls(tmp_path) == []


def test_images_that_cannot_be_written_after_paying_go_to_the_data_dir(tmp_path, monkeypatch):
    from imagebroker.broker.sync import Broker
    from imagebroker.cli.generate import save_paid, unsaved_dir
    from imagebroker.types import ImageRequest

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    request = ImageRequest(prompt="x")
    with Broker(str(mock_policy(tmp_path))) as broker:
        result = broker.generate(request)
    gone = tmp_path / "was-a-folder"
    gone.write_text("the folder was replaced by a file after the check")
    images = save_paid(result, request, gone)
    assert Path(images[0]["path"]).parent == unsaved_dir() and Path(images[0]["path"]).is_file()


# -- 5: text is printed as it is, brackets included ----------------------------------------------------
def test_square_brackets_survive_in_tables(tmp_path):
    dev = mock_offering("dev", license={"commercial_use": "no", "name": "FLUX.1 [dev] Non-Commercial License"})
    policy = mock_policy(tmp_path, dev, mock_offering("a"), constraints={"licenses": "commercial"})
    out = run("route", "x", "--policy", str(policy)).stdout
    assert "license FLUX.1 [dev] Non-Commercial License" in out


def test_install_hint_keeps_its_extra():
    from imagebroker.cli.output import Col, console, print_table

    with console.capture() as captured:
        print_table("t", [Col("why")], [["needs the [local] extra: pip install 'imagebroker[local]'"]])
    assert "pip install 'imagebroker[local]'" in captured.get()


# -- 6: user mistakes are one line and exit 2 -----------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["costs", "--by", "tag:"], "--by tag: needs the tag's key"),
    (["route", "x", "--adapter", ""], "--adapter '': give a LoRA file"),
    (["costs", "--since", "99999999d"], "'99999999d' reaches back before the year 1"),
    (["route", "x", "--n", "abc"], "Invalid value for '-n'"),
    (["generate", "x", "--timeout", "-1"], "--timeout -1: must be a positive number"),
    (["generate", "x", "--adapter", "./no-such-lora.safetensors"], "--adapter ./no-such-lora.safetensors: file "
                                                                     "not found"),
])
def test_mistakes_are_one_line_with_exit_2(args, message, tmp_path):
    result = run(*args, code=2)
    assert message in result.output
    assert calls(tmp_path) == []


def test_usage_errors_from_the_real_command_are_one_message_with_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "imagebroker", "route", "x", "--n", "abc"], capture_output=True,
                         text=True)
    assert out.returncode == 2 and "Invalid value for '-n'" in out.stderr and "Traceback" not in out.stderr
    as_json = subprocess.run([sys.executable, "-m", "imagebroker", "route", "x", "--n", "abc", "--json"],
                             capture_output=True, text=True)
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["error"]["type"] == "UsageError"


def test_until_far_in_the_future_is_just_the_whole_ledger(tmp_path):
    run("generate", "x", "--policy", str(mock_policy(tmp_path)), "--out", str(tmp_path))
    total = json.loads(run("costs", "--until", "9999-12-31", "--format", "json").stdout)["total"]
    assert total["calls"] == 1


@pytest.mark.parametrize("command", [["route", "x"], ["costs"], ["providers"], ["generate", "x", "--out", "."]])
def test_a_ledger_with_no_server_behind_it_is_one_line(command, tmp_path):
    url = "postgresql+psycopg://imagebroker:hunter2-secret@127.0.0.1:9/nothing"
    result = run(*command, "--ledger", url, code=2)
    assert "cannot open the ledger postgresql+psycopg://imagebroker:***@127.0.0.1:9/nothing" in result.output
    assert "hunter2" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("content, message", [
    (b"objective: cheapest\nname: caf\xe9\n", "not UTF-8 text (byte 0xe9)"),
    (b"a: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nesting depth"),
])
def test_a_broken_policy_file_is_one_line(content, message, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    result = run("route", "x", "--policy", str(bad), code=2)
    assert message in result.output and len(result.output.strip().splitlines()) == 1


# -- 7: policy check catches typos ---------------------------------------------------------------------
def test_policy_check_lists_every_name_that_names_nothing(tmp_path):
    p = tmp_path / "typos.yaml"
    p.write_text("deny: [gogle]\n"
                 "prefer: [openai/gpt-image-9]\n"
                 "constraints:\n  regions: [eu-wset]\n"
                 "rules:\n  - name: r\n    when: {tags: {team: x}}\n    set: {prefer: [nope/x]}\n"
                 "budgets:\n  - {name: b, period: day, limit_usd: 1, scope: {provider: opnai}}\n"
                 "providers:\n  opnai: {region: eu}\n")
    out = run("policy", "check", "typos.yaml", code=2).output   # (the test runs in tmp_path)
    lines = out.strip().splitlines()
    assert lines[0].startswith("error: ConfigError: typos.yaml:1: deny.0: 'gogle' matches no offering")
    assert "(did you mean 'google'?)" in lines[0]
    for expected in ("typos.yaml:2: prefer.0: 'openai/gpt-image-9'", "typos.yaml:4: constraints.regions.0: "
                     "no offering processes in region 'eu-wset'",
                     "typos.yaml:8: rules.0.set.prefer.0: 'nope/x'",
                     "typos.yaml:10: budgets.0.scope.provider: no provider named 'opnai'",
                     "typos.yaml:12: providers.opnai: no provider named 'opnai' is installed"):
        assert any(line.startswith(expected) for line in lines), (expected, lines)


def test_a_typo_in_deny_stops_generate_before_anything_is_paid(tmp_path):
    policy = policy_file(tmp_path, deny=[*builtin_providers(), "gogle"], offerings=[mock_offering("a")])
    result = run("generate", "x", "--policy", str(policy), "--out", str(tmp_path), code=2)
    at = len(builtin_providers())   # the typo's index in the list
    assert f"deny.{at}: 'gogle' matches no offering" in result.output and calls(tmp_path) == []


def test_policy_check_refuses_a_key_given_twice(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("objective: cheapest\nprefer: [openai]\nobjective: fastest\n")
    assert "dup.yaml:3: key 'objective' is given twice (first on line 1)" in run(
        "policy", "check", "dup.yaml", code=2).output


def test_a_new_offering_missing_fields_names_the_file_and_every_field(tmp_path):
    p = tmp_path / "new.yaml"
    p.write_text("offerings:\n  - id: acme/x\n    provider: acme\n    model: x\n    kind: closed\n")
    out = run("policy", "check", "new.yaml", code=2).output
    assert "<policy>" not in out and "more problem" not in out
    for field in ("capabilities", "license", "regions", "latency", "source", "checked"):
        assert f"new.yaml:2: offerings.0.{field}: Field required" in out


# -- 9: scripting ----------------------------------------------------------------------------------------
def test_route_exits_2_when_nothing_can_serve(tmp_path):
    policy = mock_policy(tmp_path, mock_offering("a", regions=["us"]), constraints={"regions": ["eu"]})
    table = run("route", "x", "--policy", str(policy), "--size", "1024x1024", code=2)
    assert "no offering can serve this request" in table.output
    data = json.loads(run("route", "x", "--policy", str(policy), "--size", "1024x1024", "--json", code=2).stdout)
    assert data["candidates"] == []


def test_errors_under_json_are_json(tmp_path):
    policy = mock_policy(tmp_path, mock_offering("a", settings={"script": ["error:AuthError"]}))
    result = run("generate", "x", "--policy", str(policy), "--out", str(tmp_path), "--json", code=1)
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "AllAttemptsFailed" and "mock/a" in error["message"]
    bad = json.loads(run("costs", "--by", "colour", "--format", "json", code=2).stdout)["error"]
    assert bad["type"] == "RequestError" and "--by 'colour'" in bad["message"]


def test_an_empty_export_has_its_header(tmp_path):
    out = run("ledger", "export").stdout
    header = next(csv.reader(io.StringIO(out)))
    assert {"request_id", "status", "offering", "cost_usd"} <= set(header) and len(out.splitlines()) == 1


@pytest.mark.parametrize("command", [["ledger", "path"], ["route", "x"], ["providers"], ["costs"],
                                     ["ledger", "export"]])
def test_commands_that_only_look_create_no_ledger(command, tmp_path):
    run(*command)
    assert not (tmp_path / "ledger.db").exists()


def test_route_on_an_empty_postgres_database_creates_no_tables(pg_url):
    from sqlalchemy import create_engine, inspect

    result = runner.invoke(app, ["route", "x", "--ledger", pg_url])
    assert result.exit_code in (0, 2) and "Traceback" not in result.output
    assert inspect(create_engine(pg_url)).get_table_names() == []


# -- 10: numbers that mean what they say -------------------------------------------------------------------
def test_zero_costs_are_plain_numbers_in_csv_and_json(tmp_path):
    policy = mock_policy(tmp_path, mock_offering("free", price={"usd": "0"}))
    run("generate", "x", "--policy", str(policy), "--out", str(tmp_path))
    for out in (run("costs", "--format", "csv").stdout, run("costs", "--format", "json").stdout,
                run("ledger", "export").stdout, run("ledger", "export", "--format", "json").stdout):
        assert "E-" not in out
    assert json.loads(run("costs", "--format", "json").stdout)["total"]["cost_usd"] == "0"


def test_a_failed_call_counts_under_the_provider_it_tried(tmp_path):
    policy = mock_policy(tmp_path, mock_offering("a", settings={"script": ["error:AuthError"]}))
    run("generate", "x", "--policy", str(policy), "--out", str(tmp_path), code=1)
    groups = json.loads(run("costs", "--format", "json").stdout)["groups"]
    assert [(g["key"], g["failures"]) for g in groups] == [("mock", 1)]


def test_bfl_cost_detail_names_the_first_megapixel_charge():
    from imagebroker.policies.pricing import estimate
    from imagebroker.providers.catalog import builtin_catalog
    from imagebroker.types import ImageRequest

    offering = builtin_catalog().offerings["bfl/flux-2-pro"]
    cost = estimate(ImageRequest(prompt="x", size="1024x1024"), offering)
    assert f"${offering.price.first_mp_usd} first MP + ${offering.price.usd_per_mp}/MP" in cost.detail


def test_local_latency_estimate_grows_with_size_and_steps(tmp_path):
    def estimate(*args: str) -> float:
        data = json.loads(run("route", "x", "--model", "local/tiny-shapes", "--json", *args).stdout)
        return data["candidates"][0]["estimated_latency_s"]

    small, big, longer = estimate("--size", "64x64"), estimate("--size", "256x256"), estimate("--size", "64x64")
    assert small >= 13   # a fresh process loads the pipeline first: measured 14.5 s cold on 2 cores
    assert big > small + 25   # measured 31 s warm at 256x256
    assert longer == small


def test_until_a_date_is_exclusive(tmp_path):
    run("generate", "x", "--policy", str(mock_policy(tmp_path)), "--out", str(tmp_path))
    today = datetime.now(UTC).date()
    tomorrow = today + timedelta(days=1)

    def calls_until(day) -> int:
        return json.loads(run("costs", "--until", day.isoformat(), "--format", "json").stdout)["total"]["calls"]

    assert calls_until(today) == 0 and calls_until(tomorrow) == 1


# -- 11: the demo model's limits are said ------------------------------------------------------------------
def test_an_offering_used_outside_its_trained_size_warns(tmp_path):
    policy = mock_policy(tmp_path, mock_offering("shapes", trained_size="64x64"))
    warned = run("generate", "x", "--size", "128x128", "--policy", str(policy), "--out", str(tmp_path))
    assert "warning: mock/shapes was trained at 64x64 only: at 128x128 its images are noise" in warned.output
    quiet = run("generate", "x", "--size", "64x64", "--policy", str(policy), "--out", str(tmp_path))
    assert "warning" not in quiet.output


# -- 12: conveniences ----------------------------------------------------------------------------------------
def test_version_and_python_dash_m():
    from imagebroker import __version__

    assert run("--version").stdout == f"imagebroker {__version__}\n"
    out = subprocess.run([sys.executable, "-m", "imagebroker", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == f"imagebroker {__version__}\n"


def test_ledger_option_takes_a_plain_file_path(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGEBROKER_LEDGER_URL")
    mine = tmp_path / "team" / "spend.db"
    run("generate", "x", "--policy", str(mock_policy(tmp_path)), "--out", str(tmp_path), "--ledger", str(mine))
    assert mine.is_file()
    total = json.loads(run("costs", "--ledger", str(mine), "--format", "json").stdout)["total"]
    assert total["calls"] == 1 and run("ledger", "path", "--ledger", str(mine)).stdout.strip() == str(mine)
