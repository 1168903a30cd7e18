"""The student as a speculative-decoding draft: acceptance against plain reference formulas, the
expected tokens per step against a simulation of the i.i.d. process, and a real assisted-generation
run with the bundled teacher whose output is checked equal to the teacher's (a forced difference
is an error)."""

import json

import numpy as np
import pytest
import torch

from potstill.errors import PotstillError
from potstill.evaluate.draft import (Acceptance, acceptance, check_identical, expected_tokens_per_step,
                                     measure_assisted, position_bucket)
from potstill.losses.tvd import tvd

from helpers import QUICKSTART, TEACHER


def softmax(x, t):
    z = np.exp((x - x.max(-1, keepdims=True)) / t)
    return z / z.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_alpha_is_one_minus_total_variation(temperature):
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(64, 50, generator=g) * 3, torch.randn(64, 50, generator=g) * 3
    greedy, alpha = acceptance(p, q, temperature)
    pn, qn = softmax(p.double().numpy(), temperature), softmax(q.double().numpy(), temperature)
    np.testing.assert_allclose(alpha.numpy(), 1 - 0.5 * np.abs(pn - qn).sum(-1), atol=1e-6)
    np.testing.assert_allclose(alpha.numpy(), np.minimum(pn, qn).sum(-1), atol=1e-6)
    # the loss train.loss=tvd minimises is exactly 1 - alpha at T = 1
    if temperature == 1.0:
        np.testing.assert_allclose(alpha.numpy(), (1 - tvd(p.log_softmax(-1), q.log_softmax(-1))).numpy(), atol=1e-6)
    assert greedy.tolist() == (pn.argmax(-1) == qn.argmax(-1)).astype(float).tolist()
    assert 0.0 < greedy.mean() < 1.0  # both outcomes occur: the comparison can fail


def test_greedy_acceptance_is_the_low_temperature_limit():
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(200, 30, generator=g), torch.randn(200, 30, generator=g)
    q[:100] = p[:100] + 0.3 * torch.randn(100, 30, generator=g)  # half of them close: argmaxes often agree
    greedy, cold = acceptance(p, q, 1e-4)
    assert torch.allclose(cold, greedy, atol=1e-3) and 0.2 < greedy.mean() < 0.9
    assert acceptance(p, q, None)[1] is None and acceptance(p, q, 0.0)[1] is None  # greedy sampling: no alpha_T


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 0.9])
def test_expected_tokens_per_step_matches_a_simulation_of_the_iid_process(alpha):
    """Leviathan et al.'s estimate: each of gamma draft tokens accepted independently with
    probability alpha until the first rejection; a step yields the accepted ones plus one of the teacher's."""
    rng = np.random.default_rng(0)
    for gamma in range(1, 9):
        accepted = rng.random((200_000, gamma)) < alpha
        run = np.cumprod(accepted, axis=1).sum(axis=1)  # accepted before the first rejection
        assert expected_tokens_per_step(alpha, gamma) == pytest.approx((run + 1).mean(), abs=0.02)
    assert expected_tokens_per_step(1.0, 4) == 5.0


def test_acceptance_by_category_and_position_are_the_plain_means():
    g = torch.Generator().manual_seed(2)
    p, q = torch.randn(40, 20, generator=g), torch.randn(40, 20, generator=g)
    cats = ["a" if i % 3 else "b" for i in range(40)]
    positions = [i % 20 for i in range(40)]
    acc = Acceptance(1.0)
    acc.add(p[:25], q[:25], cats[:25], positions[:25])  # two batches sum as one
    acc.add(p[25:], q[25:], cats[25:], positions[25:])
    s = acc.summary()
    greedy, alpha = (x.numpy() for x in acceptance(p, q, 1.0))
    assert s["alpha"]["greedy"] == pytest.approx(greedy.mean()) and s["alpha"]["sampled"] == pytest.approx(alpha.mean())
    mask = np.array(cats) == "b"
    assert s["by_category"]["b"] == {"greedy": pytest.approx(greedy[mask].mean()),
                                     "sampled": pytest.approx(alpha[mask].mean()), "tokens": int(mask.sum())}
    first = s["by_position"][0]
    assert first["positions"] == [0, 0] and first["tokens"] == 2
    assert first["sampled"] == pytest.approx(alpha[[0, 20]].mean())
    assert s["expected_tokens_per_step"]["greedy"]["4"] == pytest.approx(expected_tokens_per_step(greedy.mean(), 4))
    assert [position_bucket(i) for i in (0, 15, 16, 31, 32, 100)] == [(0, 0), (15, 15), (16, 31), (16, 31),
                                                                       (32, 63), (64, 127)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The bundled teacher, a copy of it (a perfect draft) and a tiny random student of its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from potstill.prompts import load_prompts
    from potstill.hf import LocalModel

    out = tmp_path_factory.mktemp("tiny-student")
    config = AutoConfig.from_pretrained(TEACHER)
    config.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "num_key_value_heads": 2, "head_dim": 16})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(TEACHER).save_pretrained(out)
    prompts = load_prompts(str(QUICKSTART / "prompts" / "heldout.jsonl"), 4, need_user=True)
    return LocalModel(TEACHER), LocalModel(TEACHER), LocalModel(out), prompts


@pytest.mark.slow
def test_a_perfect_draft_is_accepted_whole_and_steps_are_counted(models):
    """A copy of the teacher as its draft: every step yields gamma + 1 tokens until the answer ends,
    so the teacher's forward passes are ceil(length / (gamma + 1)) per prompt."""
    teacher, copy, _, prompts = models
    m = measure_assisted(teacher, copy, prompts, 12, gamma=2, repeats=1)
    lengths = [len(c.token_ids) for c in teacher.complete(
        [__import__("potstill.teachers.base", fromlist=["Request"]).Request(p.sha256, p.chat, 0, 0) for p in prompts],
        {"max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0, "top_logprobs": 0})]
    assert m["identical"] and m["new_tokens"] == sum(lengths)
    assert m["verification_steps"] == sum(-(-n // 3) for n in lengths)


def test_a_weak_draft_keeps_the_teachers_output_and_accepts_less(models):
    teacher, _, student, prompts = models
    m = measure_assisted(teacher, student, prompts[:3], 12, gamma=2, repeats=2)
    assert m["identical"] and m["prompts"] == 3 and m["repeats"] == 2
    assert 1.0 <= m["tokens_per_step"] < 2.0 and m["accepted_per_step"] == pytest.approx(m["tokens_per_step"] - 1)
    assert m["speedup"] > 0 and m["speedup_range"][0] <= m["speedup"] <= m["speedup_range"][1]


def test_an_output_that_differs_from_the_teachers_is_an_error_not_a_number(models):
    teacher, _, student, prompts = models
    reference = {}
    measure_assisted(teacher, student, prompts[:2], 12, repeats=1, reference=reference)
    seconds, outputs, calls = reference["alone"][0]
    outputs[1] = outputs[1][:1] + [outputs[1][1] + 1] + outputs[1][2:]  # the teacher "said" another token
    with pytest.raises(PotstillError, match="held-out prompt 1, token 1"):
        measure_assisted(teacher, student, prompts[:2], 12, repeats=1, reference=reference)
    with pytest.raises(PotstillError, match="prompt 0, token 2"):
        check_identical([[5, 6, 7]], [[5, 6]], teacher.tokenizer)  # a shorter output differs too


def test_the_card_and_report_show_the_draft_figures_against_their_teacher(tmp_path):
    from potstill.cli import print_summary  # noqa: F401  (the table's column: test_report covers its layout)
    from potstill.receipts.card import evaluation_text
    from potstill.report.page import draft_rows, summary_rows

    acc = Acceptance(1.0)
    g = torch.Generator().manual_seed(3)
    acc.add(torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g), ["add"] * 8, list(range(8)))
    draft = {**acc.summary(), "teacher": {"id": "org/teacher", "weights_sha256": "ab" * 32},
             "measured": {"prompts": 16, "gamma": 4, "universal": False, "tokens_per_step": 1.75, "speedup": 0.62,
                          "speedup_range": [0.5, 0.7], "teacher_tokens_per_second": 100.0,
                          "assisted_tokens_per_second": 62.0}}
    report = {"prompts": {"n": 8}, "provenance": {"device": "cpu"},
              "models": {"teacher": {"accuracy": 1.0}, "student": {"accuracy": 0.5, "acceptance": 0.4, "draft": draft}}}
    card = evaluation_text(report, "student")
    assert "org/teacher" in card and "ab" * 32 in card
    assert f"| acceptance α, greedy (the draft's argmax is the teacher's) | {draft['alpha']['greedy']:.3f} |" in card
    assert "| measured tokens per verification step, γ = 4 (16 prompts, batch 1) | 1.75 |" in card
    assert "0.62x" in card
    from potstill.report import COLUMNS

    column = 1 + [key for key, _, _ in COLUMNS].index("acceptance")
    assert summary_rows(report)[1][column] == "40.0%"  # the table's accept column
    row = draft_rows([{"name": "run", "eval": report}], several=False)[0]
    assert row[0] == "student" and row[1].startswith("org/teacher") and "1.75 (γ=4, 16 prompts)" in row
    json.dumps(report)  # eval.json can hold it


@pytest.mark.slow
def test_a_student_with_another_tokenizer_is_measured_with_universal_assisted_decoding(models, tmp_path):
    """transformers' universal assisted decoding (tokenizer=, assistant_tokenizer=): the teacher's output
    stays its own; a tokenizer of the same vocabulary size is n/a with the reason (transformers would
    read the draft's ids as the teacher's)."""
    from tokenizers import Tokenizer, decoders, models as bpe_models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from potstill.evaluate.draft import universal_gap
    from potstill.hf import LocalModel

    teacher, _, student, prompts = models
    texts = [json.loads(line)["prompt"] for line in (QUICKSTART / "prompts" / "train.jsonl").open()][:500]
    bpe = Tokenizer(bpe_models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<pad>")
    tok.chat_template = (TEACHER / "chat_template.jinja").read_text()
    tok.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(TEACHER)
    config.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "num_key_value_heads": 2, "head_dim": 16, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id, "bos_token_id": None})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    other = LocalModel(tmp_path)
    assert other.describe()["tokenizer_sha256"] != teacher.describe()["tokenizer_sha256"]
    assert universal_gap(teacher, other) is None
    m = measure_assisted(teacher, other, prompts[:2], 12, repeats=1, same_tokenizer=False)
    assert m["universal"] and m["identical"] and m["tokens_per_step"] >= 1.0
    assert "same size" in universal_gap(teacher, teacher)  # vocabularies of one size: not told apart
