"""The README's two set-up commands are true (as litgpt's test_readme checks its README)."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, tiny_overrides

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
    ci = (ROOT / ".ci" / "run").read_text()
    assert "block[1]" in ci and 'bash -c "$cmd"' in ci  # CI runs exactly the second command


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


def test_every_verb_has_help():
    script = Path(sys.executable).parent / "potstill"
    for verb in ("quickstart", "run", "generate", "train", "eval", "report", "doctor", "serve", "merge", "import",
                "terms", "verify"):
        done = subprocess.run([str(script), verb, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "usage: potstill " + verb in done.stdout
