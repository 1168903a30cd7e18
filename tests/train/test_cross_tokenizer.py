"""KD across tokenizers: a student with its own tokenizer (trained here with the `tokenizers`
library) learns from the teacher's text (SFT) or its cached top-k mapped onto the student's tokens
(potstill.align), or from an online teacher re-reading its text every step (train/cross_online.py),
and is evaluated on text."""

import filecmp
import json
import shutil
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from potstill.cli import main

from helpers import QUICKSTART, TEACHER, tiny_overrides

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


@pytest.mark.slow
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
    # the per-byte gap reads the teacher's answers in each model's own tokens: every model has it
    assert teacher["kl_per_byte"] == 0 and student["kl_per_byte"] > 0
    html = (out / "report.html").read_text()
    assert "tokenizer differs" in student["not_applicable"]["acceptance"]  # a draft's alpha needs one vocabulary
    # KL/tok, top-1 and the draft's acceptance in the summary, perplexity below it
    assert html.count("<td>n/a</td>") == 4


@pytest.mark.slow
def test_online_and_on_policy_logit_kd_across_tokenizers_train(tmp_path, other_tokenizer, capsys):
    """The teacher re-reads the student's text in its own tokens every step; its targets, mapped onto
    the student's tokens, train as cached ones do (the chunked loss too)."""
    for extra in (["train.teacher_signal=online"],
                  ["train.teacher_signal=on_policy", "train.lmbda=0.5", "train.chunk_size=16", "train.loss=jsd"]):
        out = tmp_path / extra[0].split("=")[1]
        assert main(["run", RECIPE, *tiny_overrides(out), f"student.tokenizer={other_tokenizer}", "baseline=null",
                     *extra]) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        mapped = int(printed.split("the teacher re-reading each step's text: ")[1].split(" student tokens")[0]
                     .replace(",", ""))
        assert mapped > 0, printed
        info = json.loads((out / "student" / "potstill.json").read_text())
        assert info["tokenizers"] == "different" and info["objective"] == "kd"
        rows = [json.loads(line) for line in (out / "logs" / "student.jsonl").open()]
        trained = [r for r in rows if "skipped" not in r]
        assert trained and all(r["kd"] > 0 for r in trained), rows


@pytest.fixture(scope="module")
def split_apart(tmp_path_factory):
    """Byte-identical tokenizer files (a byte-level BPE with GPT-2's split: digit runs stay whole) in
    a Qwen2 teacher's folder and a Llama student's. By its config.json the teacher's loads as
    Qwen2Tokenizer, which builds its own pre-tokenizer (one digit a token, NFC) and ignores
    tokenizer.json's; the student's loads as the file says. Same vocabulary, same special tokens."""
    texts = [json.loads(line)["prompt"] for line in (QUICKSTART / "prompts" / "train.jsonl").open()][:2000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    root = tmp_path_factory.mktemp("split")
    teacher, student = root / "teacher", root / "student"
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(student)
    config = json.loads((student / "tokenizer_config.json").read_text())
    del config["tokenizer_class"]  # the class comes from config.json's model_type
    (student / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copytree(student, teacher)
    tiny = dict(vocab_size=400, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    Qwen2Config(**tiny, num_key_value_heads=2).save_pretrained(teacher)
    LlamaConfig(**tiny).save_pretrained(student)
    assert not filecmp.dircmp(teacher, student, ignore=["config.json"]).diff_files
    t, s = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    assert type(t).__name__ == "Qwen2Tokenizer" and type(s).__name__ != "Qwen2Tokenizer"
    assert t.get_vocab() == s.get_vocab() and t.all_special_tokens == s.all_special_tokens  # what was compared
    assert t("sort 78368")["input_ids"] != s("sort 78368")["input_ids"]
    return str(teacher), str(student)


def test_doctor_compares_what_the_tokenizers_do(split_apart, capsys):
    teacher, student = split_apart
    assert main(["doctor", teacher, student, "--prompts", str(QUICKSTART / "prompts" / "heldout.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "tokenizers: different" in out and "logit KD: across tokenizers (potstill.align" in out, out
    share = out.split("% of the student's tokens (")[0].rsplit("- ", 1)[1]
    assert 0 < int(share) < 100, out  # the same vocabulary, split otherwise: some tokens align, not all
    assert "the tokenizers split text differently" in out and "loads as Qwen2Tokenizer" in out
    differ = int(out.split("sample texts: 408 encoded by both tokenizers, ")[1].split(" ")[0])  # 8 probes, 200 x 2
    assert 100 < differ < 408
    assert main(["doctor", teacher, teacher]) == 0
    out = capsys.readouterr().out
    assert "tokenizers: identical" in out and "sample texts: 8 encoded by both tokenizers, 0 to other ids" in out


def test_online_logit_kd_maps_targets_when_the_tokenizers_split_text_differently(tmp_path, split_apart, capsys):
    """One vocabulary, two ways of splitting text: the ids do not line up, so the teacher's targets
    are mapped (not read as the student's ids)."""
    from potstill.train.cross_online import OnlineCross
    from potstill.train.examples import TrainExample

    teacher, student = split_apart
    t_tok, s_tok = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    config = AutoConfig.from_pretrained(teacher)
    config.vocab_size = 464  # padded rows past the tokenizer's 400 ids, as Qwen pads: never a target
    model = AutoModelForCausalLM.from_config(config)  # random weights: the shapes matter
    cross = OnlineCross.build(model, t_tok, s_tok, 20)
    text = "78368 sorted"
    ids = s_tok(text, add_special_tokens=False)["input_ids"]
    ex = TrainExample([1, *ids], 1, None, None)
    cross.prepare([ex], [SimpleNamespace(messages=[{"role": "user", "content": "sort 78368"}], text=text)], s_tok)
    [out] = cross.targets([ex], "cpu")
    assert out.topk_ids.shape == (len(ids), 20) and out.topk_ids.max() < len(s_tok)
    assert 0 < cross.counts["exact"] < cross.counts["positions"] == len(ids)  # some cuts differ


def test_doctor_names_the_special_tokens_that_differ(tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(TEACHER, student)
    config = json.loads((student / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|assistant|>"  # the same vocabulary; another end of sequence
    (student / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["doctor", str(TEACHER), str(student)]) == 0
    out = capsys.readouterr().out
    assert "tokenizers: different" in out
    assert "special tokens differ (teacher vs student): eos_token '<|end|>' vs '<|assistant|>'" in out, out


@pytest.mark.slow
def test_cached_logit_kd_across_tokenizers_trains_on_the_top_k_mapped_to_the_students_tokens(tmp_path, other_tokenizer,
                                                                                             capsys):
    """The local teacher's ledger (its ids and top-k) read through its tokenizer as bytes, mapped onto
    the student's byte-level BPE tokens: every student token gets a target, and KD trains."""
    import numpy as np

    from potstill.ledger import Ledger
    from potstill.train.examples import CrossTokenizer, build_examples

    out = tmp_path / "run"
    args = ["run", RECIPE, *tiny_overrides(out), f"student.tokenizer={other_tokenizer}", "baseline=null"]
    assert main(args) == 0, capsys.readouterr().err
    assert "logit KD across tokenizers (potstill.align)" in capsys.readouterr().out
    info = json.loads((out / "student" / "potstill.json").read_text())
    assert info["tokenizers"] == "different" and info["objective"] == "kd"
    rows = [json.loads(line) for line in (out / "logs" / "student.jsonl").open()]
    assert rows and all(r["kd"] > 0 for r in rows)

    student_tok = AutoTokenizer.from_pretrained(other_tokenizer)
    with Ledger(out / "ledger.sqlite") as ledger:
        examples = list(ledger.examples())[:16]
    cross = CrossTokenizer.build(student_tok, {examples[0].teacher_key: AutoTokenizer.from_pretrained(TEACHER)}, 20)
    data = build_examples(examples, student_tok, same_tokenizer=False, cross=cross)
    for ex, d in zip(examples, data):
        completion = d.input_ids[d.n_prompt:]
        assert student_tok.decode(completion, skip_special_tokens=True) == ex.text
        assert d.topk_ids.shape == d.topk_logprobs.shape == (len(completion), 20)
        mass = np.exp(d.topk_logprobs.astype(np.float64)).sum(-1)
        assert (mass <= 1 + 1e-5).all() and (mass > 0).all()
        # the text's own student token always holds the chosen path's mass
        assert all(tok in ids for tok, ids in zip(completion, d.topk_ids.tolist()))
    assert cross.counts["positions"] > 0 and cross.counts["rows_text_differs"] == 0


@pytest.mark.slow
def test_a_merged_ledger_of_two_tokenizers_trains_one_student(tmp_path, other_tokenizer, capsys):
    """A second local teacher's rows (the student's byte-level BPE: its ids and top-k as they are)
    and the quickstart teacher's (another tokenizer: its ids read as bytes through its folder's
    tokenizer, mapped onto the student's tokens), merged into one ledger, train one student by
    cached logit KD; the card's teachers list both shares."""
    import numpy as np
    from safetensors.torch import save_model
    from transformers import LlamaForCausalLM

    from potstill.ledger import Ledger, merge_ledgers
    from potstill.train.examples import CrossTokenizer, build_examples

    other = tmp_path / "other-teacher"  # a tiny random Llama reading text with the byte-level BPE
    shutil.copytree(other_tokenizer, other)
    tok = AutoTokenizer.from_pretrained(other)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, eos_token_id=tok.eos_token_id))
    model.config.save_pretrained(other)
    save_model(model, str(other / "model.safetensors"))
    (other / "LICENSE").write_text((TEACHER / "LICENSE").read_text()) if (TEACHER / "LICENSE").exists() else None
    base = [*tiny_overrides(tmp_path / "a", n_prompts=12), "generation.max_new_tokens=12"]
    assert main(["generate", RECIPE, *base]) == 0
    assert main(["generate", RECIPE, *tiny_overrides(tmp_path / "b", n_prompts=12), "generation.max_new_tokens=12",
                 f"teacher.path={other}", "teacher.id=other-teacher", "teacher.terms_family=apache-2.0"]) == 0
    out = tmp_path / "run"
    merge_ledgers(out / "ledger.sqlite", [tmp_path / "a" / "ledger.sqlite", tmp_path / "b" / "ledger.sqlite"])
    capsys.readouterr()
    assert main(["train", RECIPE, *tiny_overrides(out, n_prompts=12), "generation.max_new_tokens=12", "baseline=null",
                 "train.data=ledger", f"student.tokenizer={other_tokenizer}"]) == 0, capsys.readouterr().err
    assert "logit KD across tokenizers (potstill.align)" in capsys.readouterr().out
    info = json.loads((out / "student" / "potstill.json").read_text())
    assert sorted(t["id"] for t in info["teachers"]) == ["other-teacher", "potstill/quickstart-teacher"]
    assert all(t["share_of_examples"] == 0.5 for t in info["teachers"])

    student_tok = tok
    with Ledger(out / "ledger.sqlite") as ledger:
        examples = list(ledger.examples())
        keys = {d["id"]: k for k, d in ledger.teachers().items()}
    mine, theirs = keys["potstill/quickstart-teacher"], keys["other-teacher"]
    cross = CrossTokenizer.build(student_tok, {mine: AutoTokenizer.from_pretrained(TEACHER)}, 20)
    data = build_examples(examples, student_tok, same_tokenizer={theirs}, cross=cross)
    for ex, d in zip(examples, data):
        if ex.teacher_key == theirs:  # the teacher's own ids and top-k, untouched
            assert d.input_ids[d.n_prompt:] == ex.token_ids.tolist() and np.array_equal(d.topk_ids, ex.topk_ids)
        else:  # re-tokenized in the student's tokens, targets on its ids
            assert student_tok.decode(d.input_ids[d.n_prompt:], skip_special_tokens=True) == ex.text
            assert d.topk_ids.max() < len(student_tok)
    assert cross.counts["rows_without_topk"] == 0 and cross.counts["positions"] > 0
