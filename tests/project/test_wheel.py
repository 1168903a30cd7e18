"""`pip install potstill && potstill quickstart` works from a built wheel, outside any checkout:
the bundled teacher, prompts and recipe travel as package data (potstill/quickstart/), built
from examples/quickstart/ (their single copy). Offline: the wheel is built without isolation and
installed without dependencies into a fresh venv that borrows this venv's site-packages."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from helpers import QUICKSTART, ROOT


def _copy_source(dest: Path) -> Path:
    """The files a wheel is built from, so that the build leaves nothing in the checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "src", dest / "src", ignore=ignore)
    shutil.copytree(QUICKSTART, dest / "examples" / "quickstart", ignore=ignore)
    return dest


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _fresh_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # torch, transformers, ...: this venv's, after the venv's own (a plain path line: its .pth files,
    # the checkout's editable install among them, are not read; pip installs with --ignore-installed
    # so that it never tries to uninstall the potstill it sees there)
    Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_every_package_under_src_is_listed_for_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src").rglob("__init__.py")}
    assert found | {"potstill.quickstart"} == listed


@pytest.mark.skipif(sys.platform == "win32", reason="venv layout")
@pytest.mark.slow
def test_quickstart_runs_from_an_installed_wheel_outside_the_checkout(tmp_path):
    source = _copy_source(tmp_path / "source")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(source))
    (wheel,) = (tmp_path / "dist").glob("potstill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("recipe.yaml", "prompts/train.jsonl", "prompts/heldout.jsonl", "teacher/model.safetensors",
              "teacher/tokenizer.json", "teacher/config.json"):
        assert f"potstill/quickstart/{f}" in names, f

    python = _fresh_venv(tmp_path / "venv")
    _pip("--python", str(python), "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel))
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    tiny = ["prompts.limit=16", "eval.limit=8", "train.epochs=1", "train.batch_size=16", "train.warmup_steps=0",
            "baseline=null"]
    done = subprocess.run([str(python.parent / "potstill"), "quickstart", "--out", "qs", *tiny],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "generate: sent 16" in done.stdout and (work / "qs" / "report.html").is_file()
    recipe = (work / "qs" / "recipe.yaml").read_text()
    assert str(tmp_path / "venv") in recipe and str(ROOT) not in recipe  # the installed copy, not the checkout's


@pytest.mark.slow  # seconds of real retries, deadlines or processes: the full suite runs it
def test_editable_install_uses_the_checkout_quickstart(tmp_path):
    """The README's `pip install -e .`: the package maps to src/, the quickstart stays in examples/."""
    source = _copy_source(tmp_path / "source")
    python = _fresh_venv(tmp_path / "venv")
    _pip("--python", str(python), "install", "--no-deps", "--no-build-isolation", "--no-index", "--ignore-installed",
         "-e", str(source))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import potstill.cli as c; print(c.__file__); "
            "print([str(d) for d in c.QUICKSTART_DIRS if (d / 'recipe.yaml').is_file()])")
    done = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    module, found = done.stdout.splitlines()
    assert module == str(source / "src" / "potstill" / "cli.py")
    assert found == str([str(source / "examples" / "quickstart")])
