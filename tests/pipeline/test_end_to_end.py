"""The whole pipeline through the command line on a tiny cut of the quickstart, and its errors."""

import json

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from potstill.cli import main

from helpers import QUICKSTART, tiny_overrides

RECIPE = str(QUICKSTART / "recipe.yaml")


@pytest.mark.slow
def test_run_trains_evaluates_reports_and_then_skips_what_is_done(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", RECIPE, *tiny_overrides(out)]) == 0
    first = capsys.readouterr().out
    assert "generate: sent 64" in first
    for name in ("student", "baseline"):
        model = AutoModelForCausalLM.from_pretrained(out / name)
        AutoTokenizer.from_pretrained(out / name)
        assert 100_000 < model.num_parameters() < 200_000
        assert load_file(out / name / "model.safetensors")
        assert not list((out / name).glob("*.bin"))
        info = json.loads((out / name / "potstill.json").read_text())
        assert info["objective"] == {"student": "kd", "baseline": "sft"}[name]
        assert info["examples"] == 64
        assert info["teachers"][0]["id"] == "potstill/quickstart-teacher"
    logs = [json.loads(line) for line in (out / "logs" / "student.jsonl").open()]
    assert len(logs) == 4 and all(row["kd"] is not None for row in logs)
    report = json.loads((out / "eval.json").read_text())
    assert set(report["models"]) == {"teacher", "student", "baseline"}
    assert report["prompts"]["n"] == 48
    for m in report["models"].values():
        assert 0 <= m["accuracy"] <= 1 and m["tokens_per_second"] > 0 and m["kl_per_token"] >= 0
        assert set(m["accuracy_by_category"]) <= {"add", "mul", "rev", "sort", "count", "shuffle"}
    assert report["models"]["teacher"]["agreement"] == 1.0
    assert report["models"]["student"]["kl_per_token"] > 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "http://" not in html and "https://" not in html
    for png in ("accuracy", "training", "lengths", "acceptance"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 1000

    # everything is done: nothing is sent, no student is retrained
    assert main(["run", RECIPE, *tiny_overrides(out)]) == 0
    second = capsys.readouterr().out
    assert "generate: sent 0" in second and "student is up to date" in second and "eval: up to date" in second
    # training reads exactly the recipe's requests: more prompts than were generated is refused
    assert main(["train", RECIPE, *tiny_overrides(out, n_prompts=100)]) == 2
    assert "36 of the recipe's 100 requests have no completion" in capsys.readouterr().err
    # a changed training setting retrains that student only
    assert main(["run", RECIPE, *tiny_overrides(out), "baseline.objective=kd"]) == 0
    third = capsys.readouterr().out
    assert "student is up to date" in third and "baseline is up to date" not in third


@pytest.mark.parametrize("args, message", [
    (["train", "missing.yaml"], "recipe missing.yaml not found"),
    (["run", RECIPE, "teacher.path=/nonexistent/teacher"], "teacher directory /nonexistent/teacher not found"),
    (["run", RECIPE, "train.kd_ratio=2"], "train.kd_ratio: Input should be less than or equal to 1"),
    (["report", "/nonexistent/run"], "eval.json not found"),
])
def test_user_mistakes_get_one_line_and_exit_2(tmp_path, capsys, args, message):
    args = args + ([f"output_dir={tmp_path / 'r'}"] if args[0] == "run" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.slow
def test_train_before_generate_says_what_to_do(tmp_path, capsys):
    assert main(["train", RECIPE, f"output_dir={tmp_path}"]) == 2
    assert "run `potstill generate` first" in capsys.readouterr().err


def test_model_dir_without_safetensors_is_refused(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text("{}")
    (tmp_path / "t" / "pytorch_model.bin").write_bytes(b"pickle")
    assert main(["generate", RECIPE, f"teacher.path={tmp_path / 't'}", f"output_dir={tmp_path / 'r'}"]) == 2
    assert "no *.safetensors weights" in capsys.readouterr().err


@pytest.mark.slow
def test_model_card_names_the_teacher_and_parses(tmp_path, capsys):
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    assert main(["run", RECIPE, *tiny_overrides(out), "baseline=null"]) == 0
    card = ModelCard.load(out / "student" / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and "distillation" in data["tags"]
    block = data["distillation"]
    (teacher,) = block["teachers"]
    assert teacher["id"] == "potstill/quickstart-teacher" and teacher["terms_family"] == "apache-2.0"
    assert teacher["access"] == "local weights" and teacher["share_of_examples"] == 1.0
    assert block["loss"] == "forward_kl" and block["teacher_signal"] == "cached"
    assert block["ledger_sha256"] == json.loads((out / "student" / "potstill.json").read_text())["ledger_sha256"]
    assert "## Evaluation" in card.text and "potstill/quickstart-teacher" in card.text
    assert "base_model" not in data  # random init: no base model
    # eval appended its section to the card train wrote: the folder still verifies, section and all
    assert main(["verify", str(out)]) == 0
    assert f"its evaluation section is the one {out / 'eval.json'} gives" in capsys.readouterr().out
