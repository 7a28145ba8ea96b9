"""The CLI as a user types it (Typer's runner, in process), exit codes included."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from imagebroker.cli import app
from tests.conftest import builtin_providers

runner = CliRunner()


def run(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result


def mock_policy_file(tmp_path: Path, **settings) -> Path:
    from imagebroker.testing.mock import mock_offering

    p = tmp_path / "policy.yaml"
    policy = {"name": "cli", "extends": "default",
              "deny": builtin_providers(),
              "offerings": [mock_offering("a", price={"usd": "0.01"}, **settings),
                            mock_offering("b", price={"usd": "0.03"})]}
    p.write_text(json.dumps(policy, default=str))  # JSON is YAML
    return p


def test_route_json_shape_and_no_network(tmp_path):
    out = run("route", "a cat", "--size", "512x512", "--policy", str(mock_policy_file(tmp_path)), "--json")
    data = json.loads(out.stdout)
    assert [c["offering"] for c in data["candidates"]] == ["mock/a", "mock/b"]
    assert data["candidates"][0]["estimated_cost_usd"] == "0.01"  # decimal string, not float
    assert all(r["reasons"] for r in data["rejected"])


def test_route_on_eu_only_lists_only_eu_or_on_prem(monkeypatch):
    from tests.conftest import KEY_VARS

    for var in KEY_VARS:   # route calls nobody: keys make every provider plannable
        monkeypatch.setenv(var, "sk-test-0123456789")
    data = json.loads(run("route", "x", "--size", "1024x1024", "--policy", "eu-only", "--json").stdout)
    assert data["candidates"]
    regions = {o["id"]: o["regions"] for o in json.loads(
        run("providers", "--policy", "eu-only", "--json").stdout)}
    assert regions["bfl/flux-2-pro"] == ["eu"]  # the preset pins BFL to its EU host
    for c in data["candidates"]:
        assert set(regions[c["offering"]]) <= {"eu", "on_prem"}


def test_route_table_for_people(tmp_path):
    out = run("route", "a cat", "--policy", str(mock_policy_file(tmp_path)))
    assert "candidates, in the order they will be tried" in out.stdout and "mock/a" in out.stdout


def test_providers_json_lists_the_catalog(tmp_path):
    data = json.loads(run("providers", "--json").stdout)
    by_id = {o["id"]: o for o in data}
    flux = by_id["fal/fal-ai/flux/dev"]
    assert flux["price"]["unit"] == "per_megapixel" and flux["license"]["commercial_use"] == "yes"
    assert (flux["available"] is False and "not installed" in flux["unavailable_reason"]) or \
        "FAL_KEY" in flux["unavailable_reason"]
    assert by_id["openai/gpt-image-2"]["stale_price"] is True


def test_policy_check_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("extends: cheapest\nconstraints: {max_cost_per_image_usd: 0.05}\n")
    assert "ok: policy 'good'" in run("policy", "check", str(good)).stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: cheapest\nconstraints:\n  max_cost_per_imag_usd: 0.05\n")
    result = run("policy", "check", str(bad), code=2)
    assert "bad.yaml:3: constraints.max_cost_per_imag_usd: unknown key" in result.output
    assert "Traceback" not in result.output


def test_generate_writes_images_with_provenance_and_records_cost(tmp_path):
    policy = mock_policy_file(tmp_path)
    out = run("generate", "a cat", "-n", "2", "--seed", "5", "--size", "128x96", "--policy", str(policy),
              "--out", str(tmp_path / "imgs"), "--tag", "team=red", "--json")
    data = json.loads(out.stdout)
    assert data["offering"] == "mock/a" and data["cost"] == {"usd": "0.02", "status": "priced",
                                                             "unit": "per_image", "detail": "2 x $0.01/image"}
    assert [i["seed"] for i in data["images"]] == [5, 6]
    first = data["images"][0]
    assert Image.open(first["path"]).size == (128, 96)
    assert first["sha256"] == first["image_sha256"]   # the bytes as the provider sent them
    meta = json.loads(Path(first["sidecar"]).read_text())
    assert Path(first["sidecar"]) == Path(first["path"]).with_suffix(".json")
    assert meta["request_id"] == data["request_id"] and meta["seed"] == 5 and meta["sha256"] == first["sha256"]
    assert meta["prompt"] is None and meta["prompt_sha256"]   # prompts are kept only when the policy says so
    costs = json.loads(run("costs", "--by", "tag:team", "--format", "json").stdout)
    assert costs["groups"][0]["key"] == "red" and costs["total"]["cost_usd"] == "0.02"
    csv_out = run("costs", "--format", "csv").stdout.splitlines()
    assert csv_out[0].startswith("key,calls,images") and csv_out[-1].startswith("total,1,2")


def test_embedded_provenance_is_an_added_chunk_and_the_pixels_are_untouched(tmp_path):
    out = run("generate", "a cat", "--policy", str(mock_policy_file(tmp_path)), "--out", str(tmp_path),
              "--embed-provenance", "--json")
    image = json.loads(out.stdout)["images"][0]
    assert image["embedded"] and image["sha256"] != image["image_sha256"]
    data = Path(image["path"]).read_bytes()
    assert json.loads(Image.open(io.BytesIO(data)).text["imagebroker"])["sha256"] == image["image_sha256"]
    pos, kept = 8, [data[:8]]   # take the added chunk out again: what is left is the provider's file
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunk = data[pos:pos + 12 + length]
        if not (chunk[4:8] == b"iTXt" and chunk[8:20] == b"imagebroker\0"):
            kept.append(chunk)
        pos += 12 + length
    assert hashlib.sha256(b"".join(kept)).hexdigest() == image["image_sha256"]


def test_generate_failure_exits_nonzero_without_traceback(tmp_path):
    policy = mock_policy_file(tmp_path, settings={"script": ["error:AuthError"]})
    result = run("generate", "x", "--policy", str(policy), "--model", "mock/a", code=1)
    assert "AllAttemptsFailed" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--size", "1000x7"], 'size "1000x7" is not WIDTHxHEIGHT'),
    (["route", "x", "--tag", "novalue"], "--tag 'novalue' is not key=value"),
    (["route", "x", "--model", "nope/nope"], "unknown model 'nope/nope'"),
    (["costs", "--since", "yesterday-ish"], "is not a duration"),
    (["costs", "--by", "colour"], "--by 'colour'"),
    (["route", "x", "--policy", "missing.yaml"], "missing.yaml does not exist"),
])
def test_user_mistakes_exit_2_with_a_message(args, message):
    result = run(*args, code=2)
    assert message in result.output and "Traceback" not in result.output


def test_ledger_path_and_export(tmp_path):
    policy = mock_policy_file(tmp_path)
    run("generate", "x", "--policy", str(policy), "--out", str(tmp_path))
    assert run("ledger", "path").stdout.strip().endswith("ledger.db")
    rows = json.loads(run("ledger", "export", "--format", "json").stdout)
    assert rows[0]["cost_usd"] == "0.01" and rows[0]["offering"] == "mock/a"
    assert "cost_usd" in run("ledger", "export").stdout.splitlines()[0]


def test_rows_deleted_by_hand_leave_the_report_until_the_rollups_are_rebuilt(tmp_path):
    import sqlite3

    policy = mock_policy_file(tmp_path)
    for _ in range(3):
        run("generate", "x", "--policy", str(policy), "--out", str(tmp_path))
    db = run("ledger", "path").stdout.strip()

    def total_calls() -> int:
        return json.loads(run("costs", "--format", "json").stdout)["total"]["calls"]

    assert total_calls() == 3
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM calls WHERE rowid = (SELECT min(rowid) FROM calls)")
    assert total_calls() == 3  # the per-day sums do not know
    assert "rebuilt" in run("ledger", "rebuild-rollups").stdout
    assert total_calls() == 2


def test_generate_writes_paid_images_even_when_the_ledger_cannot_record_them(tmp_path):
    import sqlite3

    policy = mock_policy_file(tmp_path)
    run("generate", "x", "--policy", str(policy), "--out", str(tmp_path / "first"))
    with sqlite3.connect(run("ledger", "path").stdout.strip()) as conn:
        conn.execute("DROP TABLE attempts")
    result = run("generate", "x", "--policy", str(policy), "--out", str(tmp_path / "second"), code=1)
    assert len(list((tmp_path / "second").glob("*.png"))) == 1
    assert "could not record call" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("flags, level", [(["-v"], "INFO"), (["-vv"], "DEBUG"), (["-v", "-v"], "DEBUG")])
def test_verbose_flags_after_any_command_log_the_call_to_stderr(tmp_path, flags, level):
    import logging

    from imagebroker.cli import hoist_verbosity
    from imagebroker.logs import logger

    policy = mock_policy_file(tmp_path, settings={"script": ["error:RateLimited:0.01", "ok"]})
    argv = hoist_verbosity(["generate", "a cat", "--policy", str(policy), "--json", *flags])
    assert argv[0] in ("-v", "-vv") and not set(flags) & set(argv[1:])
    try:
        result = CliRunner().invoke(app, argv)
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.setLevel(logging.NOTSET)
    assert result.exit_code == 0, result.output
    assert "retries mock/a in 0.01 s after RateLimited" in result.stderr
    assert ("attempt 1 on mock/a: RateLimited" in result.stderr) == (level == "DEBUG")
    json.loads(result.stdout)  # the log stays out of the machine output


def test_route_resolves_an_aspect_ratio_per_offering_with_every_key_set(monkeypatch):
    import json as _json

    from typer.testing import CliRunner as _Runner

    from imagebroker.cli import app as _app
    from tests.conftest import KEY_VARS

    for var in KEY_VARS:
        monkeypatch.setenv(var, "k")
    res = _Runner().invoke(_app, ["route", "x", "--aspect-ratio", "16:9", "--json"])
    assert res.exit_code == 0, res.output
    candidates = _json.loads(res.stdout)["candidates"]
    assert len(candidates) >= 10 and all(c["size"] for c in candidates)
    sizes = {c["offering"]: c["size"] for c in candidates}
    assert sizes["google/gemini-3-pro-image"] == "1344x768" and sizes["openai/gpt-image-2"] == "1024x576"
    # the new providers' native fields resolve it too: xAI's 1k table, Luma's ratio sizes, Runway's pixel ratios
    assert (sizes["xai/grok-imagine-image"], sizes["luma/photon-1"], sizes["runway/gen4_image"]) == (
        "1408x768", "2048x1152", "1280x720")
    table = _Runner().invoke(_app, ["route", "x", "--aspect-ratio", "16:9", "--wide"])
    assert table.exit_code == 0 and "size" in table.stdout
    row = next(line for line in table.stdout.splitlines() if "luma/photon-1 " in line)
    assert "2048x1152" in row   # the table shows each candidate's size as the JSON does
