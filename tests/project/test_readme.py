"""The README's two set-up commands are true (as litgpt's test_readme checks its README)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, tiny_overrides

README = (ROOT / "README.md").read_text()


def setup_commands() -> list[str]:
    first_block = re.search(r"```(\w*)\n(.*?)```", README, re.S)
    assert first_block.group(1) == "bash"
    return first_block.group(2).strip().splitlines()


def test_readme_starts_with_exactly_two_setup_commands():
    quickstart, tests = setup_commands()
    assert README.index("```bash") < README.index("\n## ")  # before any section
    for cmd in (quickstart, tests):
        assert cmd.startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && ")
    assert quickstart.endswith(".venv/bin/potstill quickstart")
    assert tests.endswith(".venv/bin/python -m pytest -q")
    for cmd in (quickstart, tests):
        assert " -c constraints.txt " in cmd  # the tested versions, not whatever is newest today
    ci = (ROOT / ".ci" / "run").read_text()
    assert "block[1]" in ci and 'bash -c "$cmd"' in ci  # CI runs exactly the second command


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_pyproject_lower_bounds_are_the_tested_pins():
    """Every dependency's lower bound in pyproject.toml is the version constraints.txt pins (the one
    the suite passed on), and every package the tests install is pinned there."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_norm(name)] = version
    wanted = project["dependencies"] + [d for extra, deps in project["optional-dependencies"].items()
                                        if extra != "bench-gpu" for d in deps]
    assert wanted
    for dep in wanted:
        name, lower = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9.]+)", dep).groups()
        assert pins.get(_norm(name)) == lower, f"{dep}: constraints.txt pins {pins.get(_norm(name))}"


@pytest.mark.slow
def test_the_quickstart_command_runs(tmp_path):
    """The README's quickstart verb, through the installed console script, on a tiny cut."""
    verb = setup_commands()[0].split("&&")[-1].split()
    script = Path(sys.executable).parent / "potstill"
    overrides = [o for o in tiny_overrides(tmp_path / "qs", 32, 24) if not o.startswith("output_dir")]
    done = subprocess.run([str(script), *verb[1:], "--out", str(tmp_path / "qs"), *overrides],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "teacher" in done.stdout and "student" in done.stdout and "baseline" in done.stdout
    assert (tmp_path / "qs" / "report.html").is_file()


@pytest.mark.slow
def test_every_verb_has_help(capsys):
    """The installed script once (a process start is most of a second), then every verb's --help
    through the same parser in this process."""
    from potstill.cli import main

    script = Path(sys.executable).parent / "potstill"
    done = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage: potstill train" in done.stdout
    for verb in ("quickstart", "run", "generate", "train", "eval", "report", "doctor", "serve", "merge", "import",
                 "terms", "verify"):
        with pytest.raises(SystemExit) as exited:
            main([verb, "--help"])
        assert exited.value.code == 0 and "usage: potstill " + verb in capsys.readouterr().out
