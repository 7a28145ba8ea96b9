"""The command line in a real terminal and in scripts: tables that fit 80 columns, piped output that is
never wrapped, and Ctrl-C (a real SIGINT to a real `imagebroker generate`) that stops the call, records it
`cancelled` and exits 130."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from imagebroker.providers.catalog import builtin_catalog
from imagebroker.testing.fakes import fakes
from imagebroker.testing.mock import mock_offering
from tests.conftest import builtin_providers
from tests.terminal import command_env, in_terminal, piped


def ledger_rows(tmp_path: Path) -> list[tuple[str, str | None]]:
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        return conn.execute("SELECT status, offering FROM calls").fetchall()


def mock_policy_file(tmp_path: Path) -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text(json.dumps({"name": "terminal", "deny": builtin_providers(),
                             "offerings": [mock_offering("a", price={"usd": "0.01"})]}))
    return p


def test_providers_at_80_columns_keeps_price_and_availability_and_says_what_it_hid():
    from imagebroker.cli.providers import price_summary

    screen = in_terminal(["providers"], cols=80)
    assert screen.code == 0, screen.text
    assert max(len(line) for line in screen.lines) <= 80, screen.text
    header = next(line for line in screen.lines if "offering" in line)
    assert "price" in header and "available" in header
    short = [price_summary(o) for o in builtin_catalog() if len(price_summary(o)) <= 16]
    assert short and all(p in screen.text for p in short)   # whole, never cut to `$0.0…`
    assert "…" not in screen.text
    assert "hidden to fit 80 columns: license, regions, kind, edits (--wide shows all)" in screen.text


def test_providers_wide_shows_every_column_and_each_reason():
    screen = in_terminal(["providers", "--wide"], cols=80)
    header = next(line for line in screen.lines if "offering" in line)
    assert all(col in header for col in ("license", "edits", "kind", "regions"))
    assert "no API key: set BFL_API_KEY" in screen.text


def test_providers_at_120_columns_puts_most_rows_on_one_line():
    screen = in_terminal(["providers"], cols=120)
    rows = [line for line in screen.lines if line.startswith("  ") and line.strip()]
    first_lines = [r for r in rows if not r.startswith("   ")]   # a wrapped row goes on indented
    assert max(len(line) for line in screen.lines) <= 120
    assert len(first_lines) == len(builtin_catalog()) + 1   # the header and one per offering
    assert len(rows) - len(first_lines) < len(builtin_catalog()) / 2   # most rows take one line


def test_costs_by_offering_at_80_columns_shows_whole_amounts(tmp_path):
    policy = mock_policy_file(tmp_path)
    assert piped(["generate", "x", "--policy", str(policy), "--out", str(tmp_path)]).returncode == 0
    screen = in_terminal(["costs", "--by", "offering"], cols=80)
    assert max(len(line) for line in screen.lines) <= 80
    assert "$0.010000" in screen.text and "…" not in screen.text
    assert "mock/a" in screen.text


def test_piped_output_is_never_wrapped(tmp_path):
    deep = tmp_path / ("a-folder-with-a-long-name-" * 4) / "images"
    ledger = deep.parent / "ledger.db"
    assert len(str(ledger)) > 80
    out = piped(["ledger", "path", "--ledger", str(ledger)])
    assert out.stdout == f"{ledger}\n"   # what `$(imagebroker ledger path)` needs
    made = piped(["generate", "x", "--policy", str(mock_policy_file(tmp_path)), "--out", str(deep)])
    assert made.returncode == 0, made.stderr
    wrote = next(line for line in made.stdout.splitlines() if line.startswith("wrote "))
    assert Path(wrote.split()[1]).is_file() and Path(wrote.split()[1]).parent == deep
    table = piped(["providers"]).stdout
    assert "no API key: set BFL_API_KEY" in table and "regions" in table   # every column, in full


def denoising(text: str) -> bool:
    """The pipeline has made a few steps (the display redraws ten times a second: not every step shows)."""
    return any(int(n) >= 3 for n in re.findall(r"step (\d+)/500", text))


def test_ctrl_c_during_local_generation_stops_the_pipeline_and_records_cancelled(tmp_path):
    out = tmp_path / "out"
    screen = in_terminal(["generate", "a red circle", "--steps", "500", "--out", str(out)],
                         interrupt_when=denoising, timeout=180)
    print(f"exited {screen.seconds_after_signal} s after SIGINT")
    assert screen.code == 130, screen.text
    assert "interrupted" in screen.text
    for junk in ("Traceback", "terminate called", "Task was destroyed", "Exception ignored"):
        assert junk not in screen.text
    assert ledger_rows(tmp_path) == [("cancelled", "local/tiny-shapes")]
    assert not list(out.glob("*.png"))   # stopped, not run to its 500th step


def test_ctrl_c_during_a_hosted_call_records_cancelled(tmp_path):
    fake = fakes()["openai"](["timeout"])   # answers after 30 s
    with fake:
        policy = tmp_path / "policy.yaml"
        policy.write_text(json.dumps({"providers": {"openai": {"base_url": fake.base_url}}}))
        env = command_env(OPENAI_API_KEY=fake.key)
        screen = in_terminal(["generate", "x", "--model", "openai/gpt-image-2", "--policy", str(policy)],
                             env=env, interrupt_when=lambda _: bool(fake.requests), timeout=25)
    print(f"exited {screen.seconds_after_signal} s after SIGINT")
    assert screen.code == 130, screen.text
    for junk in ("Traceback", "Task was destroyed", "Exception ignored"):
        assert junk not in screen.text
    assert ledger_rows(tmp_path) == [("cancelled", "openai/gpt-image-2")]


@pytest.mark.parametrize("cols", [80])
def test_progress_names_the_offering_being_tried(tmp_path, cols):
    fake = fakes()["openai"](["timeout"])
    with fake:
        policy = tmp_path / "policy.yaml"
        policy.write_text(json.dumps({"providers": {"openai": {"base_url": fake.base_url}}}))
        screen = in_terminal(["generate", "x", "--model", "openai/gpt-image-2", "--policy", str(policy),
                              "--timeout", "2"], cols=cols, env=command_env(OPENAI_API_KEY=fake.key), timeout=25)
    assert "openai/gpt-image-2" in screen.raw   # on the spinner while it waits, not `0/None`
    assert "None" not in screen.text
    assert screen.code == 124 and "ran past its timeout of 2 s" in screen.text
    assert ledger_rows(tmp_path) == [("cancelled", "openai/gpt-image-2")]
