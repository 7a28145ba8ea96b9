import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_quickstart_has_exactly_two_commands():
    commands = quickstart_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert 'imagebroker generate "a red circle on a blue background" --out out/' in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    assert quickstart_commands()[1] in (ROOT / ".ci" / "run").read_text()


def test_the_offering_schema_example_is_a_valid_policy(tmp_path):
    from typer.testing import CliRunner

    from imagebroker.cli import app

    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.+?)\n```", text, flags=re.S) if "acme/house-model" in b)
    policy = tmp_path / "house.yaml"
    policy.write_text(block)
    checked = CliRunner().invoke(app, ["policy", "check", str(policy)])
    assert checked.exit_code == 0 and checked.stdout.startswith("ok: policy 'house'"), checked.output
    listed = CliRunner().invoke(app, ["providers", "--policy", str(policy), "--json"])
    house = next(o for o in json.loads(listed.stdout) if o["id"] == "acme/house-model")
    assert house["price"]["usd"] == "0.03" and house["regions"] == ["eu"]
