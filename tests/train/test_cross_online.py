"""Online and on-policy logit KD from a local teacher of another tokenizer (train/cross_online.py):
the teacher re-reads the student's text, and its top-k is mapped onto the student's tokens by the rule
cached KD across tokenizers uses."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from potstill.align import token_bytes
from potstill.cli import main
from potstill.hf import load_model_dir, prompt_ids
from potstill.ledger import Ledger
from potstill.prompts import load_prompts
from potstill.quickstart_cross import train_bpe
from potstill.train.cross_online import OnlineCross
from potstill.train.examples import CrossTokenizer, TrainExample, build_examples, collate

from helpers import QUICKSTART, TEACHER, tiny_overrides

RECIPE = str(QUICKSTART / "recipe.yaml")
CHAT = [{"role": "user", "content": "sort 78368"}]


@pytest.fixture(scope="module")
def teacher():
    model, _ = load_model_dir(TEACHER, "teacher")
    return model, AutoTokenizer.from_pretrained(TEACHER)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """The quickstart's 512-token byte-level BPE: it merges digit pairs the teacher spells one a token."""
    texts = [p.messages[0][1] for p in load_prompts(QUICKSTART / "prompts" / "train.jsonl")]
    return AutoTokenizer.from_pretrained(train_bpe(texts, TEACHER, tmp_path_factory.mktemp("bpe")))


def row(tok, text: str, eos: bool = True) -> tuple[TrainExample, SimpleNamespace]:
    """A training example of ``text`` after CHAT in ``tok``'s tokens, and the ledger row it stands for."""
    p = prompt_ids(tok, CHAT)
    ids = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    return TrainExample(p + ids, len(p), None, None), SimpleNamespace(messages=CHAT, text=text)


def test_where_the_student_reads_text_as_the_teacher_does_the_targets_are_its_top_k_and_stop(teacher):
    model, tok = teacher
    cross = OnlineCross.build(model, tok, tok, 20)
    ex, ledger_row = row(tok, "36788")
    cross.prepare([ex], [ledger_row], tok)
    [out] = cross.targets([ex], "cpu")
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ex.input_ids])).logits[0].float(), -1)
    dense = lp[ex.n_prompt - 1:len(ex.input_ids) - 1]  # the distribution each completion token is drawn from
    no_text = [i for i, b in enumerate(token_bytes(tok)) if b is None and i != tok.eos_token_id]
    for r in range(len(ex.input_ids) - ex.n_prompt - 1):  # the text's tokens: the teacher's top-20, exactly
        row_lp = dense[r].clone()
        row_lp[no_text] = -torch.inf  # special tokens other than its EOS stand for no text: never a target
        want_lp, want_ids = row_lp.topk(20)
        got = dict(zip(out.topk_ids[r].tolist(), out.topk_logprobs[r].tolist()))
        assert set(got) == set(want_ids.tolist())
        assert max(abs(got[i] - v) for i, v in zip(want_ids.tolist(), want_lp.tolist())) < 1e-5
    eos = len(ex.input_ids) - ex.n_prompt - 1  # the EOS: the teacher's probability of stopping there
    assert out.topk_ids[eos, 0] == tok.eos_token_id
    assert abs(out.topk_logprobs[eos, 0] - dense[eos, tok.eos_token_id].item()) < 1e-5
    assert cross.counts["exact"] == cross.counts["positions"] == eos


def test_online_targets_equal_the_cached_ones_on_the_teachers_own_answers(tmp_path, teacher, bpe):
    """The same teacher, the same text: what it says at each step equals what it said into the ledger
    (kept as float16), mapped by one rule, also where the student's tokens span several of its own."""
    model, t_tok = teacher
    assert main(["generate", RECIPE, *tiny_overrides(tmp_path, n_prompts=16)]) == 0
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        examples = list(ledger.examples())
    cached_cross = CrossTokenizer.build(bpe, {examples[0].teacher_key: t_tok}, 20)
    cached = build_examples(examples, bpe, same_tokenizer=False, cross=cached_cross)
    cross = OnlineCross.build(model, t_tok, bpe, 20)
    plain = build_examples(examples, bpe, same_tokenizer=False)
    cross.prepare(plain, examples, bpe)
    online = cross.targets(plain, "cpu")
    worst = 0.0
    for c, o in zip(cached, online, strict=True):
        assert c.input_ids == o.input_ids
        for r in range(len(c.topk_ids)):
            dc = {i: v for i, v in zip(c.topk_ids[r].tolist(), c.topk_logprobs[r].tolist()) if v > -8}
            do = {i: v for i, v in zip(o.topk_ids[r].tolist(), o.topk_logprobs[r].tolist()) if v > -8}
            worst = max([worst] + [abs(dc.get(i, -8) - do.get(i, -8)) for i in {*dc, *do}])
    assert worst < 0.004  # one float16 step below 8 in magnitude
    assert cross.counts == cached_cross.counts and 0 < cross.counts["exact"] < cross.counts["positions"]


def test_sampled_completions_are_cut_where_their_bytes_stop_being_text_the_teacher_reads(teacher, bpe):
    model, t_tok = teacher
    cross = OnlineCross.build(model, t_tok, bpe, 20)
    pieces = token_bytes(bpe)
    byte_id = {p: i for i, p in enumerate(pieces) if p is not None}
    digits = bpe("36788", add_special_tokens=False)["input_ids"]
    p = prompt_ids(bpe, CHAT)
    sample = lambda ids: TrainExample(p + ids, len(p), None, None, teacher_prompt=[0])  # noqa: E731
    eos, pad = bpe.eos_token_id, bpe.pad_token_id
    cases = {  # completion -> what is kept
        "whole, stopped": (digits + [eos], digits + [eos]),
        "a special token inside": (digits[:1] + [pad] + digits[1:] + [eos], digits[:1]),
        "half a character": (digits + [byte_id[b"\xc3"]], digits),  # the first byte of "é", then the budget ran out
        "a character the teacher lacks": (digits + [byte_id[b"Q"]] + digits, digits),
    }
    for name, (ids, kept) in cases.items():
        [out] = cross.from_samples([sample(ids)])
        assert out.input_ids[len(p):] == kept, name
        assert out.text == b"".join(pieces[i] for i in kept if i != eos), name
        assert [e for _, e in out.offsets][-1:] == ([len(out.text)] if out.text else []), name
    assert cross.counts["cut_tokens"] == 2 * len(digits) + 2  # the tokens from each cut on, a dropped EOS aside
    assert "Q" not in t_tok.get_vocab()


def test_a_sentencepiece_students_sample_is_read_without_its_dummy_space(teacher, bpe):
    """A SentencePiece student spells a completion "5 3" as "▁5 ▁3": its first space is the dummy
    prefix, which the ledger's rows leave out (align.encode_with_offsets). A sample is read the
    same way, so the teacher re-reads "5 3", not " 5 3"."""
    from tokenizers import decoders

    from potstill.align import encode_with_offsets

    model, t_tok = teacher
    vocab = {"<unk>": 0, "</s>": 1, "▁": 2, "5": 3, "3": 4, "▁5": 5, "▁3": 6}
    sp = Tokenizer(models.BPE(vocab, [("▁", "5"), ("▁", "3")], unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    sp = PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="</s>", unk_token="<unk>")
    cross = OnlineCross.build(model, t_tok, sp, 20)
    ids = sp("5 3", add_special_tokens=False)["input_ids"]
    assert ids == [5, 6] and cross.dummy_space and not OnlineCross.build(model, t_tok, bpe, 20).dummy_space
    [out] = cross.from_samples([TrainExample([0, *ids, sp.eos_token_id], 1, None, None, teacher_prompt=[0])])
    assert out.text == b"5 3" and out.offsets == encode_with_offsets(sp, "5 3")[1] == [(0, 1), (1, 3)]
    assert out.input_ids == [0, 5, 6, sp.eos_token_id]  # nothing cut


def test_a_sharded_teacher_runs_its_forward_when_no_row_of_the_batch_needs_it(teacher, bpe):
    """Sharded (FSDP2), each teacher forward gathers every process's shards: a process whose
    micro-batch has no row to re-read (here: a row the student's tokenizer cannot spell, text None)
    still runs one, read by nobody, else the others would wait for it."""
    model, t_tok = teacher
    shapes = []

    def counted(**inputs):
        shapes.append(tuple(inputs["input_ids"].shape))
        return model(**inputs)

    ex, _ = row(bpe, "42")
    for lockstep, forwards in ((False, []), (True, [(1, 1)])):
        shapes.clear()
        cross = OnlineCross.build(counted, t_tok, bpe, 20, lockstep=lockstep)
        [out] = cross.targets([ex], "cpu")
        assert shapes == forwards
        assert np.array_equal(out.topk_ids, cross._certain(ex).topk_ids)  # the row trains on its own tokens


def test_tokens_the_student_cannot_spell_are_excluded_from_the_loss_and_counted(tmp_path, teacher):
    """A student tokenizer with an unknown token (no byte fallback) and a teacher answer with a
    character it never saw: that position has no loss; the rest of the row trains on its text."""
    _, t_tok = teacher
    wl = Tokenizer(models.WordLevel({"<unk>": 0, "<|end|>": 1, "<pad>": 2, "3": 3, "6": 4, "7": 5, "8": 6},
                                    unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    student = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="<unk>", eos_token="<|end|>", pad_token="<pad>")
    student.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    text = "36é88"
    example = SimpleNamespace(request_hash="r", messages=CHAT, meta={}, teacher_key="t", text=text,
                              token_ids=np.asarray(t_tok(text, add_special_tokens=False)["input_ids"]),
                              topk_ids=None, topk_logprobs=None, finish_reason="stop", token_bytes=None,
                              topk_bytes=None, token_logprobs=None)
    cross = CrossTokenizer.build(student, {"t": t_tok}, 4)
    [d] = build_examples([example], student, same_tokenizer=False, cross=cross)
    completion = d.input_ids[d.n_prompt:]
    assert completion == [3, 4, 0, 6, 6, 1] and d.excluded == [2] and d.n_completion == 5
    assert cross.counts["rows_student_cannot_spell"] == 1 and cross.counts["positions_excluded"] == 1
    labels = collate([d], student.pad_token_id)["labels"][0, d.n_prompt:].tolist()
    assert labels == [3, 4, -100, 6, 6, 1]


def test_a_cached_rows_special_alternatives_are_the_teachers_stop(bpe):
    """As potstill serve answers: a special token is an alternative of no bytes. Its mass is the
    teacher's probability of ending the answer there, and goes to the student's EOS."""
    digit = [i for i, b in enumerate(token_bytes(bpe)) if b == b"4"][0]
    row = SimpleNamespace(request_hash="r", messages=CHAT, meta={}, teacher_key="t", text="4", token_ids=None,
                          topk_ids=None, topk_logprobs=np.log(np.asarray([[0.7, 0.2, 0.1], [0.9, 0.05, 0.05]])),
                          finish_reason="stop", token_bytes=np.asarray([b"4", b""], dtype=object),
                          topk_bytes=np.asarray([[b"4", b"", b"5"], [b"", b"6", b"7"]], dtype=object),
                          token_logprobs=np.log(np.asarray([0.7, 0.9])))
    cross = CrossTokenizer.build(bpe, {}, 4)
    [d] = build_examples([row], bpe, same_tokenizer=False, cross=cross)
    assert d.input_ids[d.n_prompt:] == [digit, bpe.eos_token_id]
    got = {i: float(np.exp(lp)) for i, lp in zip(d.topk_ids[0].tolist(), d.topk_logprobs[0].tolist()) if lp > -np.inf}
    assert got[digit] == pytest.approx(0.7) and got[bpe.eos_token_id] == pytest.approx(0.2)
    assert d.topk_ids[1, 0] == bpe.eos_token_id and np.exp(d.topk_logprobs[1, 0]) == pytest.approx(0.9)
