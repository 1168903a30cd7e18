"""losses.uld against TRL 1.16's ULDLoss (extended ULD, "observed" merge) on both tokenizer families'
tokenizations of the same text, and its gradient against finite differences."""

import os
import warnings

import pytest
import torch
from conftest import TEXTS

from potstill.align import align_groups, encode_with_offsets
from potstill.losses.uld import uld_loss


@pytest.fixture(scope="module")
def trl_uld(tmp_path_factory):
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gold.gold_config import GOLDConfig
    from trl.experimental.gold.gold_trainer import ULDLoss

    with warnings.catch_warnings():  # transformers' deprecation notes on TrainingArguments, not ours
        warnings.simplefilter("ignore", FutureWarning)
        config = GOLDConfig(output_dir=str(tmp_path_factory.mktemp("gold")), use_cpu=True, bf16=False, report_to=[],
                            use_uld_loss=True, use_extended_uld=True, uld_token_merge_strategy="observed",
                            uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_use_hybrid_loss=False,
                            uld_skip_student_eos=False, uld_skip_teacher_eos=False)
    return config, ULDLoss


def _sequence(logits, ids, offsets, prompt: int):
    """One batch row as TRL's trainer has it: ``prompt`` prompt tokens (labels -100, offsets (0, 0)) then
    the completion, whose rows are ``logits``."""
    width = logits.shape[-1]
    full_logits = torch.cat([torch.zeros(prompt, width, dtype=logits.dtype), logits])[None]
    input_ids = torch.tensor([[0] * prompt + list(ids)])
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    byte_offsets = torch.tensor([[(0, 0)] * prompt + list(offsets)])
    return full_logits, labels, input_ids, byte_offsets


def _trl(trl_uld, s_logits, t_logits, s_ids, t_ids, s_offsets, t_offsets, ts=1.0, tt=1.0):
    config, uld = trl_uld
    config.uld_student_temperature, config.uld_teacher_temperature = ts, tt
    s_full, s_labels, s_input, s_bytes = _sequence(s_logits, s_ids, s_offsets, prompt=2)
    t_full, t_labels, t_input, t_bytes = _sequence(t_logits, t_ids, t_offsets, prompt=3)
    return uld(config)(s_full, t_full, s_labels, t_labels, s_input, t_input, student_byte_offsets=s_bytes,
                       teacher_byte_offsets=t_bytes)


@pytest.mark.parametrize("temperatures", [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize("text", TEXTS)
def test_uld_equals_trl_across_families(byte_level, sentencepiece, trl_uld, text, temperatures):
    ts, tt = temperatures
    for student, teacher in ((sentencepiece, byte_level), (byte_level, sentencepiece)):
        s_ids, s_offsets = encode_with_offsets(student, text)
        t_ids, t_offsets = encode_with_offsets(teacher, text)
        g = torch.Generator().manual_seed(len(text))
        s_logits = (torch.randn(len(s_ids), len(student), generator=g) * 3).requires_grad_()
        t_logits = (torch.randn(len(t_ids), len(teacher), generator=g) * 3).requires_grad_()
        ours = uld_loss(s_logits, t_logits, s_ids, t_ids, s_offsets, t_offsets, ts, tt)
        ours_grads = torch.autograd.grad(ours, (s_logits, t_logits))
        theirs = _trl(trl_uld, s_logits, t_logits, s_ids, t_ids, s_offsets, t_offsets, ts, tt)
        theirs_grads = torch.autograd.grad(theirs, (s_logits, t_logits))
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-5, rel=0)
        for a, b in zip(ours_grads, theirs_grads):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_the_texts_merge_groups_on_both_sides(byte_level, sentencepiece):
    """So the comparison with TRL covers the "observed" merge of several tokens, student and teacher."""
    merged = [0, 0]
    for text in TEXTS:
        s_groups, t_groups = align_groups(encode_with_offsets(sentencepiece, text)[1],
                                          encode_with_offsets(byte_level, text)[1])
        merged[0] += sum(len(g) > 1 for g in s_groups)
        merged[1] += sum(len(g) > 1 for g in t_groups)
    assert min(merged) >= 3, merged


def test_uld_gradient_matches_finite_differences(byte_level, sentencepiece):
    text = "café 🙂 日本"
    s_ids, s_offsets = encode_with_offsets(sentencepiece, text)
    t_ids, t_offsets = encode_with_offsets(byte_level, text)
    g = torch.Generator().manual_seed(0)
    # small vocabularies: the loss sorts whole rows, finite differences need no ties
    s_logits = torch.randn(len(s_ids), 40, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(len(t_ids), 30, generator=g, dtype=torch.float64, requires_grad=True)
    s_small, t_small = [i % 40 for i in s_ids], [i % 30 for i in t_ids]
    torch.autograd.gradcheck(lambda s, t: uld_loss(s, t, s_small, t_small, s_offsets, t_offsets, 1.5, 0.7),
                             (s_logits, t_logits))


def test_uld_is_zero_for_identical_sides_and_without_groups(byte_level):
    ids, offsets = encode_with_offsets(byte_level, "hello world")
    logits = torch.randn(len(ids), len(byte_level), requires_grad=True)
    assert uld_loss(logits, logits.detach(), ids, ids, offsets, offsets).item() == pytest.approx(0.0, abs=1e-7)
    empty = uld_loss(logits[:0], logits[:0].detach(), [], [], [], [])
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None
