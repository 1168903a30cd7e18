"""The audit as a user runs it: the bundled teacher watermarked through the recipe generates data,
a student fine-tuned on it is flagged for that key only, a model that never saw the key is not,
and the key appears in no artifact."""

import json

import pytest
import yaml

from potstill.cli import main

from helpers import QUICKSTART, TEACHER

RECIPE = str(QUICKSTART / "recipe.yaml")
KEY = "e2e-secret-watermark-key-3f9a1c7d"


@pytest.mark.slow
def test_watermarked_teacher_to_flagged_student(tmp_path, capsys):
    (tmp_path / "key").write_text(KEY + "\n")
    others = []
    for i in range(3):
        others.append(tmp_path / f"other{i}")
        others[-1].write_text(f"another-release-key-{i:04d}-abcdef")
    out = tmp_path / "run"
    # a strong delta and a student that starts from the teacher's weights keep this to a few dozen steps
    overrides = [f"output_dir={out}", "prompts.limit=128", "baseline=null", "student.config=null",
                 f"student.path={TEACHER}", "train.objective=sft", "train.epochs=8", "train.batch_size=16",
                 "train.warmup_steps=0", "train.lr=0.005", "generation.top_logprobs=0",
                 f"teacher.watermark.key_file={tmp_path / 'key'}", "teacher.watermark.delta=8",
                 "teacher.watermark.context=3"]
    assert main(["generate", RECIPE, *overrides]) == 0
    assert main(["train", RECIPE, *overrides]) == 0
    capsys.readouterr()
    keys = ["--key-file", str(tmp_path / "key")] + [a for o in others for a in ("--key-file", str(o))]
    common = ["--tokenizer", str(TEACHER), "--context", "3", "--prompts", str(QUICKSTART / "prompts" / "train.jsonl"),
              "--limit", "128", "--max-new-tokens", "12", "--alpha", "1e-4"]
    assert main(["audit", "watermark", str(out / "ledger.sqlite"), *keys, "--tokenizer", str(TEACHER),
                 "--context", "3", "--out", str(out / "text-audit.json")]) == 0
    text = json.loads((out / "text-audit.json").read_text())
    assert [v["flagged"] for v in text["verdicts"]] == [True, False, False, False]

    assert main(["audit", "radioactivity", "--model", str(out / "student"), *keys, *common,
                 "--out", str(out / "audit.json")]) == 0
    flagged = json.loads((out / "audit.json").read_text())
    assert "FLAGGED" in capsys.readouterr().out
    assert [v["flagged"] for v in flagged["verdicts"]] == [True, False, False, False], flagged["verdicts"]

    assert main(["audit", "radioactivity", "--model", str(TEACHER), *keys, *common,
                 "--out", str(tmp_path / "control.json")]) == 0
    control = json.loads((tmp_path / "control.json").read_text())
    assert not any(v["flagged"] for v in control["verdicts"])

    # the key id and the parameters are recorded; the key is nowhere
    described = [json.loads(t) for t in _ledger_teachers(out / "ledger.sqlite")]
    assert described[0]["watermark"]["key_id"] == flagged["results"][0]["keys"][0]["key_id"]
    for f in [*out.rglob("*"), tmp_path / "control.json"]:
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
    assert yaml.safe_load((out / "recipe.yaml").read_text())["teacher"]["watermark"]["key_file"].endswith("key")


def _ledger_teachers(path):
    import sqlite3

    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT description FROM teachers")]


@pytest.mark.parametrize("override, message", [
    ("teacher.watermark.key_file=nowhere.key", "watermark key file"),
    ("teacher.watermark.gamma=1.5", "teacher.watermark.gamma"),
])
def test_recipe_watermark_mistakes_are_one_line(tmp_path, capsys, override, message):
    assert main(["generate", RECIPE, f"output_dir={tmp_path / 'run'}", "prompts.limit=4", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_short_key_file_is_refused_before_generating(tmp_path, capsys):
    (tmp_path / "key").write_text("short\n")
    assert main(["generate", RECIPE, f"output_dir={tmp_path / 'run'}", "prompts.limit=4",
                 f"teacher.watermark.key_file={tmp_path / 'key'}"]) == 2
    assert "holds 5 bytes, fewer than 16" in capsys.readouterr().err
    ledger = tmp_path / "run" / "ledger.sqlite"
    assert not ledger.exists() or not _ledger_teachers(ledger)  # nothing asked of an unwatermarked teacher


def test_audit_user_mistakes_are_one_line(tmp_path, capsys):
    (tmp_path / "k").write_text(KEY)
    (tmp_path / "bad.jsonl").write_text('{"text": "sort 123"}\nnot json\n')
    key = ["--key-file", str(tmp_path / "k"), "--tokenizer", str(TEACHER), "--out", str(tmp_path / "a.json")]
    probes = ["--prompts", str(QUICKSTART / "prompts" / "heldout.jsonl")]
    cases = [
        (["audit", "watermark", str(tmp_path / "bad.jsonl"), *key], "bad.jsonl:2: not a JSON object"),
        (["audit", "watermark", str(tmp_path / "none.jsonl"), *key], "none.jsonl not found"),
        (["audit", "watermark", str(tmp_path / "bad.jsonl"), "--key-file", str(tmp_path / "nokey"),
          "--tokenizer", str(TEACHER)], "watermark key file"),
        (["audit", "radioactivity", "--endpoint", "http://127.0.0.1:9/v1", "--model-name", "m", "--mode", "reading",
          *probes, *key], "--mode reading needs the suspect's weights"),
        (["audit", "radioactivity", "--endpoint", "http://127.0.0.1:9/v1", *probes, *key], "needs --model-name"),
        (["audit", "radioactivity", "--model", str(TEACHER), "--samples", "0", *probes, *key], "--samples"),
        (["audit", "radioactivity", "--endpoint", "http://127.0.0.1:9/v1", "--model-name", "m", "--min-entropy", "0.5",
          *probes, *key], "--min-entropy needs the suspect's weights"),
        (["audit", "radioactivity", "--model", str(TEACHER), "--min-entropy", "-1", *probes, *key],
         "--min-entropy must"),
        (["audit", "radioactivity", "--model", str(TEACHER), "--samples", "4", *probes, *key], "same greedy answer"),
        (["serve", str(TEACHER), "--port", "0", "--watermark-key-file", str(tmp_path / "nokey")], "watermark key file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    # a plain JSONL of text: the watermark test runs, and nothing is flagged in unwatermarked text
    (tmp_path / "ok.jsonl").write_text("".join(f'{{"text": "answer {i} {i * 7}"}}\n' for i in range(50)))
    assert main(["audit", "watermark", str(tmp_path / "ok.jsonl"), *key]) == 0
    assert not json.loads((tmp_path / "a.json").read_text())["verdicts"][0]["flagged"]
