"""Bad YAML fails fast: every policy and catalog file goes through imagebroker/_yaml.py, and what no sane
file contains (alias bombs, deep nesting, huge files, bad bytes, absurd numbers) is a ConfigError naming
the file and line, exit 2 from the CLI, never a traceback, a long wait or gigabytes of memory."""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from imagebroker import _yaml
from imagebroker._yaml import MAX_ALIAS_NODES, MAX_BYTES, MAX_DEPTH, load_file, load_text
from imagebroker.cli import app
from imagebroker.errors import ConfigError
from imagebroker.policies.loader import load_policy


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs": `width`**`levels` strings from a few hundred bytes."""
    lines = ["objective: cheapest", 'x-l0: &l0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"x-l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def config_error(text: str, name: str = "p.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        load_text(text, name)
    return exc.value


def test_an_alias_bomb_is_refused_at_once_without_expanding_it(tmp_path: Path):
    p = tmp_path / "bomb.yaml"
    p.write_text(alias_bomb())           # 9**9 = 387 million strings; it never finished before
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError) as exc:
            load_policy(p)
        took = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{p}:7: aliases expand to more than {MAX_ALIAS_NODES} nodes" in str(exc.value)
    assert exc.value.line == 7   # the alias that crossed the budget
    assert took < 2.0 and peak < 20 * 2**20


def test_anchors_and_merge_keys_within_the_budget_still_work():
    located = load_text(
        "base: &b {seed: true, max_n: 4}\n"
        "small: &s [a, b]\n"
        "one: {<<: *b, max_n: 1}\n"
        "two: *b\n"
        "list: [*s, *s]\n", "c.yaml")
    assert located.data["one"] == {"seed": True, "max_n": 1}
    assert located.data["two"] == {"seed": True, "max_n": 4}
    assert located.data["list"] == [["a", "b"], ["a", "b"]]
    assert located.line(("one", "max_n")) == 3 and located.line(("one", "seed")) == 1
    assert located.line(("list", 1)) == 2   # an aliased value is where its anchor wrote it


def test_the_alias_budget_counts_every_node_an_alias_brings_in():
    width = 100   # a 100-item list aliased: 101 nodes each time
    head = "l: &l [" + ", ".join(["x"] * width) + "]\nuse:\n"
    fits = MAX_ALIAS_NODES // (width + 1)
    load_text(head + "  - *l\n" * fits, "ok.yaml")
    err = config_error(head + "  - *l\n" * (fits + 1))
    assert err.line == fits + 3 and "aliases expand" in str(err)


def test_an_alias_inside_its_own_anchor_is_refused():
    err = config_error("objective: cheapest\nx: &a [1, *a]\n")
    assert err.line == 2 and "recursive" in str(err)


@pytest.mark.parametrize("style", ["flow", "block"])
def test_nesting_deeper_than_the_limit_names_the_line(style: str):
    def nested(depth: int) -> str:
        if style == "flow":
            return "x: " + "[" * depth + "]" * depth + "\n"
        return "x:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(depth - 1)) + " " * depth + "k: v\n"

    load_text(nested(MAX_DEPTH - 1), "ok.yaml")   # plus the top-level mapping: exactly the limit
    err = config_error(nested(MAX_DEPTH) if style == "flow" else nested(MAX_DEPTH + 5))
    assert f"nested more than {MAX_DEPTH} levels deep" in str(err) and err.line is not None
    config_error(nested(5000))   # a RecursionError traceback before


def test_nesting_through_an_alias_counts_too():
    deep = "[" * 40 + "]" * 40
    err = config_error(f"a: &d {deep}\nb: {'[' * 30}*d{']' * 30}\n")
    assert err.line == 2 and "through alias *d" in str(err)


def test_a_file_over_the_size_limit_is_refused_before_parsing(tmp_path: Path):
    p = tmp_path / "huge.yaml"
    p.write_text("objective: cheapest\n" + "# padding\n" * (MAX_BYTES // 10))
    with pytest.raises(ConfigError, match=r"huge\.yaml: larger than 256 KiB"):
        load_file(p)
    with pytest.raises(ConfigError, match="larger than"):
        load_text("#" * (MAX_BYTES + 1), "t.yaml")


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("objective: cheapest\ndescription: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml:2: not UTF-8 text \(byte 0xe9\)"):
        load_policy(p)
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_bytes("objective: cheapest\n".encode("utf-16"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_policy(utf16)


def test_a_byte_order_mark_is_fine(tmp_path: Path):
    p = tmp_path / "bom.yaml"
    p.write_bytes("\ufeffobjective: fastest\n".encode())
    assert load_policy(p).objective == "fastest"


def test_a_control_character_names_its_line():
    err = config_error("a: 1\nb: café\nc: x\x00y\n")
    assert err.line == 3 and "not valid YAML" in str(err)


@pytest.mark.parametrize("value, problem", [
    ("1e999", "out of range"),                  # a string to YAML 1.1, a float to pydantic
    ("1.0e+999", "out of range"),               # YAML's inf
    ('"1e999"', "out of range"),                # prices are written as quoted strings
    ("1" + "0" * 5000, "more than 100 characters"),   # int() refused it with a ValueError traceback
    ('"' + "9" * 200 + '"', "more than 100 characters"),
    ("0x" + "f" * 200, "more than 100 characters"),
    (".inf", "not a finite number"),
    ("-.Inf", "not a finite number"),
    (".nan", "not a finite number"),
    ("nan", "not a finite number"),             # pydantic reads the string as a float NaN
    ("Infinity", "not a finite number"),
])
def test_absurd_numbers_name_the_line(value: str, problem: str):
    err = config_error(f"objective: cheapest\ntimeout_s: {value}\n")
    assert err.line == 2 and problem in str(err), str(err)


@pytest.mark.parametrize("value, parsed", [
    ("1e100", "1e100"), ('"0.000002"', "0.000002"), ("-0.5", -0.5), ("1_000", 1000),
    ("'nan'", "nan"), ('"inf"', "inf"), ("2.5e-7", 2.5e-7), ("190:20:30", 685230),
])
def test_ordinary_numbers_and_quoted_words_are_kept(value: str, parsed):
    assert load_text(f"v: {value}\n", "ok.yaml").data["v"] == parsed


def test_a_date_that_does_not_exist_names_its_line():
    err = config_error("objective: cheapest\noffering:\n  checked: 2026-02-30\n")
    assert err.line == 3 and "2026-02-30" in str(err) and "day is out of range" in str(err)


@pytest.mark.parametrize("value, problem", [
    ("!!int", "cannot read '' as int"),                 # an IndexError inside PyYAML before
    ("!!timestamp soon", "cannot read 'soon' as timestamp"),   # an AttributeError
    ('!!float "nan"', "not a finite number"),
    ('!!int "' + "9" * 200 + '"', "more than 100 characters"),
])
def test_explicit_tags_are_checked_like_the_rest(value: str, problem: str):
    err = config_error(f"objective: cheapest\ntimeout_s: {value}\n")
    assert err.line == 2 and problem in str(err), str(err)


def test_python_tags_are_refused():
    err = config_error("a: !!python/object/apply:os.system [echo hi]\n")
    assert err.line == 1 and "could not determine a constructor" in str(err)


def test_libyaml_parses_when_pyyaml_has_it():
    assert (_yaml._Parser is not None) == yaml.__with_libyaml__


BAD_FILES = {
    "bomb": alias_bomb().encode(),
    "deep": b"objective: cheapest\nx: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "recursive": b"objective: cheapest\nx: &a [*a]\n",
    "latin1": "objective: cheapest\ndescription: café\n".encode("latin-1"),
    "bigint": b"objective: cheapest\ntimeout_s: " + b"9" * 5000 + b"\n",
    "inf": b"objective: cheapest\ntimeout_s: 1.0e+999\n",
    "nan": b"objective: cheapest\ntimeout_s: .nan\n",
    "baddate": b"objective: cheapest\nofferings:\n  - id: openai/gpt-image-1\n    checked: 2026-02-30\n",
    "huge": b"objective: cheapest\n" + b"# padding\n" * (MAX_BYTES // 10),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_policy_check_exits_2_naming_the_file_without_a_traceback(tmp_path: Path, name: str):
    p = tmp_path / f"{name}.yaml"
    p.write_bytes(BAD_FILES[name])
    result = CliRunner().invoke(app, ["policy", "check", str(p)])
    assert result.exit_code == 2, result.output
    assert "ConfigError" in result.output and f"{name}.yaml" in result.output.replace("\n", "")
    assert "Traceback" not in result.output and not isinstance(result.exception, RecursionError)


def test_policy_check_on_an_alias_bomb_in_a_fresh_process(tmp_path: Path):
    p = tmp_path / "bomb.yaml"
    p.write_text(alias_bomb())
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "imagebroker.cli", "policy", "check", str(p)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "bomb.yaml:7: aliases expand" in proc.stderr.replace("\n", "")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert time.perf_counter() - start < 30   # mostly interpreter start and imports


YAMLISH = st.sampled_from([*"ab1.e-+:,[]{}&*!|>'\"#?%@`\n \t\\0x_<=", "&a ", "*a", "<<: *a", "!!binary ",
                           "!!int ", "!!float ", "!!timestamp ", "!!set ", "!!omap ", "1e999", ".inf", "2026-02-30",
                           "\x00", "\ufeff", "---", "? ", ": ", "- ", "\n  "])


@settings(max_examples=300, deadline=None)
@given(st.lists(YAMLISH, max_size=40).map("".join))
def test_any_text_loads_or_is_a_config_error(text: str):
    """PyYAML's own constructors fail with IndexError or AttributeError on `!!int` or `!!timestamp`
    without a value: those too are the file's problem, with its line."""
    try:
        load_text(text, "f.yaml")
    except ConfigError as exc:
        assert exc.file == "f.yaml"
