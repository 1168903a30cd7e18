"""User mistakes and failures of the disk, through the CLI: each is one line on stderr naming the
file, line or key, exit code 2, and nothing written."""

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from potstill.receipts.card import card_text
from potstill.cli import main
from potstill.recipe import load_recipe

from helpers import QUICKSTART, TEACHER, tiny_overrides

RECIPE = str(QUICKSTART / "recipe.yaml")


def one_line_error(capsys, args: list[str], *expected: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("potstill: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    return err


@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` unwritable for real: chmod for a user; root ignores modes, so the immutable flag."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode:
            pytest.skip("cannot make a file read-only for root here (no chattr +i)")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)


def test_output_dir_that_is_a_file_or_unwritable(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    one_line_error(capsys, ["generate", RECIPE, *tiny_overrides(afile)], f"output_dir: {afile} is a file")
    one_line_error(capsys, ["generate", RECIPE, *tiny_overrides(afile / "run")], f"output_dir: {afile} is a file")
    assert afile.read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        one_line_error(capsys, ["generate", RECIPE, *tiny_overrides(locked / "run")],
                       f"output_dir: {locked} is not writable")
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("override, expected", [
    ("student.config.hidden_size=abc", "student.config: hidden_size must be a positive integer (got 'abc')"),
    ("student.config.hidden_size=-8", "student.config: hidden_size must be a positive integer (got -8)"),
    ("student.config.n_layer=2.5", "student.config: n_layer must be a positive integer (got 2.5)"),
    ("train.seed=1000000000000000000000000000000", "train.seed: Input should be less than or equal to 4294967295"),
    ("train.seed=-1", "train.seed: Input should be greater than or equal to 0"),
])
def test_student_sizes_and_seed_out_of_range(tmp_path, capsys, override, expected):
    one_line_error(capsys, ["train", RECIPE, *tiny_overrides(tmp_path / "run"), override], expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, expected", [
    ("student.path=no/such/student", "student.path: student directory {} not found"),
    ("teacher.path=no/such/teacher", "teacher.path: teacher directory {} not found"),
    ("prompts.path=no/such.jsonl", "prompts.path: prompt file {} not found"),
    ("eval.prompts=no/such.jsonl", "eval.prompts: held-out prompt file {} not found"),
    ("student.tokenizer=no/such/tok", "student.tokenizer: student tokenizer directory {} not found"),
])
def test_input_paths_that_do_not_exist_name_the_key(tmp_path, capsys, override, expected):
    key, value = override.split("=")
    extra = ["student.config=null"] if key == "student.path" else []
    path = (QUICKSTART / value).resolve()  # relative to the recipe's folder
    err = one_line_error(capsys, ["train", RECIPE, *tiny_overrides(tmp_path / "run"), *extra, override],
                         expected.format(path))
    assert "Repo id" not in err and not (tmp_path / "run").exists()


def prompt_file(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_a_lone_surrogate_in_a_prompt_is_refused_naming_file_and_line(tmp_path, capsys):
    prompts = prompt_file(tmp_path / "p.jsonl", ['{"prompt": "fine"}', '{"prompt": "bad \\ud800 text"}'])
    run = tmp_path / "run"
    one_line_error(capsys, ["generate", RECIPE, *tiny_overrides(run), f"prompts.path={prompts}"],
                   f"{prompts}:2: the text holds a lone surrogate")
    assert not run.exists()
    # a surrogate pair is one character, and fine
    prompt_file(prompts, ['{"prompt": "fine \\ud83d\\ude00"}'])
    assert main(["generate", RECIPE, *tiny_overrides(run), f"prompts.path={prompts}"]) == 0


def test_eval_prompts_without_a_user_turn(tmp_path, capsys):
    heldout = prompt_file(tmp_path / "h.jsonl", ['{"prompt": "q", "answer": "a"}',
                                                  '{"messages": [{"role": "system", "content": "only"}], "answer": "a"}'])
    run = tmp_path / "run"
    one_line_error(capsys, ["eval", RECIPE, *tiny_overrides(run), f"eval.prompts={heldout}"],
                   f"{heldout}:2: no user message")
    assert not run.exists()


def test_a_full_disk_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").symlink_to("/dev/full")  # every write to it fails with ENOSPC, from the kernel
    one_line_error(capsys, ["generate", RECIPE, *tiny_overrides(run)], f"writing under {run}: No space left on device",
                   "free some space")


@pytest.fixture(scope="module")
def small_ledger(tmp_path_factory):
    run = tmp_path_factory.mktemp("ledger") / "run"
    assert main(["generate", RECIPE, *tiny_overrides(run, n_prompts=64)]) == 0
    return run / "ledger.sqlite"


@pytest.mark.slow
def test_a_corrupted_ledger_page(tmp_path, capsys, small_ledger):
    run = tmp_path / "run"
    run.mkdir()
    ledger = run / "ledger.sqlite"
    shutil.copy(small_ledger, ledger)
    data = bytearray(ledger.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[3 * page:] = bytes([0xA5]) * (len(data) - 3 * page)  # pages 4 onwards: the tables' rows and indexes
    ledger.write_bytes(bytes(data))
    with pytest.raises(sqlite3.DatabaseError):  # the damage is real, and found only when rows are read
        with sqlite3.connect(ledger) as db:
            db.execute("SELECT * FROM completions").fetchall()
    before = ledger.read_bytes()
    # found when the ledger is opened (its schema is checked) or when rows are read: either way one line
    one_line_error(capsys, ["train", RECIPE, *tiny_overrides(run)], f"{ledger}: ", "database disk image is malformed")
    assert ledger.read_bytes() == before and not (run / "student").exists()


def test_a_read_only_ledger(tmp_path, capsys, small_ledger):
    run = tmp_path / "run"
    run.mkdir()
    ledger = run / "ledger.sqlite"
    shutil.copy(small_ledger, ledger)
    before = ledger.read_bytes()
    with read_only(ledger):  # more prompts than the ledger holds: generate must write
        one_line_error(capsys, ["generate", RECIPE, *tiny_overrides(run, n_prompts=72)], f"{ledger}")
    assert ledger.read_bytes() == before


def test_a_chat_template_the_sandbox_blocks(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(TEACHER, teacher)
    (teacher / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    config = json.loads((teacher / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (teacher / "tokenizer_config.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    one_line_error(capsys, ["generate", RECIPE, *tiny_overrides(run), f"teacher.path={teacher}"],
                   f"{teacher}: its chat template failed (SecurityError")


def test_student_base_model_is_accepted_and_named_in_the_card():
    recipe = load_recipe(RECIPE, ["student.config=null", f"student.path={TEACHER}", "student.base_model=org/tiny-base"])
    assert recipe.student.base_model == "org/tiny-base"
    info = {"train": recipe.train.model_dump(), "student": recipe.student.model_dump(), "teachers": [],
            "ledger_sha256": "0" * 64, "examples": 1, "recipe_sha256": recipe.sha256(), "steps": 1}
    assert "base_model: org/tiny-base" in card_text(info)


GPT2_STUDENT = "student.config={model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2, n_positions: 64}"


def test_a_student_config_typo_is_one_line_before_any_work(tmp_path, capsys):
    """GPT-2 reads n_embd; n_embed would be kept unread and the student built 768 wide: 14.3M
    parameters instead of 28,832."""
    run = tmp_path / "run"
    one_line_error(capsys, ["train", RECIPE, *tiny_overrides(run), GPT2_STUDENT.replace("n_embd", "n_embed")],
                   f"{RECIPE}: student.config.n_embed: not a setting of GPT2Config (gpt2)", "did you mean n_embd?")
    assert not run.exists()


@pytest.mark.slow
def test_train_prints_the_students_size_before_it_trains(tmp_path, capsys, small_ledger):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(small_ledger, run / "ledger.sqlite")
    assert main(["train", RECIPE, *tiny_overrides(run), "baseline=null", GPT2_STUDENT]) == 0
    out = capsys.readouterr().out
    n = json.loads((run / "student" / "potstill.json").read_text())["parameters"]
    assert out.count(f"train student: a gpt2 student of {n:,} parameters\n") == 1 and n < 40_000
    assert out.index("parameters") < out.index("train: wrote")
