"""Sequence-level KD across tokenizers: a student with its own tokenizer (trained here with the
`tokenizers` library) learns from the teacher's text and is evaluated on text; logit KD across
tokenizers is refused before the teacher is asked anything."""

import json
import sqlite3

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from potstill.cli import main

from conftest import QUICKSTART, TEACHER, tiny_overrides

RECIPE = str(QUICKSTART / "recipe.yaml")


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A byte-level BPE trained on the quickstart prompts: ids unlike the teacher's character vocabulary."""
    texts = [json.loads(line)["prompt"] for line in (QUICKSTART / "prompts" / "train.jsonl").open()][:2000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|end|>", "<pad>", "<|user|>", "<|assistant|>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<pad>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    tok.chat_template = (TEACHER / "chat_template.jinja").read_text()
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    assert tok.get_vocab() != PreTrainedTokenizerFast.from_pretrained(TEACHER).get_vocab()
    return out


def test_sft_student_with_another_tokenizer_is_evaluated_and_reported(tmp_path, other_tokenizer, capsys):
    out = tmp_path / "run"
    args = ["run", RECIPE, *tiny_overrides(out), f"student.tokenizer={other_tokenizer}", "train.objective=sft",
            "baseline=null"]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    info = json.loads((out / "student" / "potstill.json").read_text())
    assert info["tokenizers"] == "different"
    models = json.loads((out / "eval.json").read_text())["models"]
    student, teacher = models["student"], models["teacher"]
    for key in ("accuracy", "agreement", "rouge_l", "parameters", "size_bytes", "tokens_per_second", "latency_ms"):
        assert student[key] is not None, key
    assert len(student["completion_lengths"]) == 48  # in the student's own tokens
    for key in ("kl_per_token", "top1_agreement", "perplexity_teacher_text"):
        assert student[key] is None and "tokenizer differs" in student["not_applicable"][key]
        assert teacher[key] is not None and "not_applicable" not in teacher
    assert "n/a for student: the student's tokenizer differs" in printed
    html = (out / "report.html").read_text()
    assert html.count("<td>n/a</td>") == 3  # KL/tok and top-1 in the summary, perplexity below it


def test_run_refuses_logit_kd_across_tokenizers_before_generating(tmp_path, other_tokenizer, capsys):
    out = tmp_path / "run"
    for extra in ([], ["train.objective=sft", "baseline.objective=kd"]):  # the student's or the baseline's KD
        assert main(["run", RECIPE, *tiny_overrides(out), f"student.tokenizer={other_tokenizer}", *extra]) == 2
        err = capsys.readouterr().err
        assert "logit KD needs the student to share the teacher's tokenizer" in err and "train.objective=sft" in err
        assert not (out / "ledger.sqlite").exists()  # the teacher was asked nothing


def test_generated_ledger_is_kept_when_run_refuses(tmp_path, other_tokenizer, capsys):
    """A ledger from an earlier generate is neither touched nor extended by the refused run."""
    out = tmp_path / "run"
    assert main(["generate", RECIPE, *tiny_overrides(out, n_prompts=16)]) == 0
    assert main(["run", RECIPE, *tiny_overrides(out), f"student.tokenizer={other_tokenizer}"]) == 2
    with sqlite3.connect(out / "ledger.sqlite") as db:
        assert db.execute("select count(*) from requests").fetchone()[0] == 16
