"""Cross-tokenizer targets (potstill.align): token bytes and byte offsets for both tokenizer families,
the byte alignment against TRL 1.16, and the target rule worked by hand."""

import math
import random

import numpy as np
import pytest
import torch
from conftest import TEXTS
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from potstill.align import ByteTrie, align_groups, byte_trie, encode_with_offsets, student_targets, token_bytes
from potstill.errors import PotstillError
from potstill.losses import kd_loss


@pytest.fixture(scope="module")
def trl_utils():
    pytest.importorskip("trl")
    import os
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gold.gold_trainer import ULDLoss
    from trl.experimental.utils import encode_with_byte_offsets
    return encode_with_byte_offsets, ULDLoss._align_by_byte_offsets


@pytest.fixture(params=["byte_level", "sentencepiece"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------------------------------
# token bytes and offsets


def test_token_bytes_read_each_style_from_the_backend(byte_level, sentencepiece):
    bl = token_bytes(byte_level)
    assert bl[byte_level.convert_tokens_to_ids("Ġ")] == b" "
    assert bl[byte_level.eos_token_id] is None  # special: not text
    # every byte is a byte-level token of its own (the initial alphabet), and a piece is its bytes
    assert {bytes([b]) for b in range(256)} <= set(bl)
    for i, piece in enumerate(bl):
        if piece and i != byte_level.eos_token_id:
            assert byte_level.decode([i]).encode() == piece or not _utf8(piece)

    sp = token_bytes(sentencepiece)
    assert sp[sentencepiece.convert_tokens_to_ids("▁")] == b" "
    assert sp[sentencepiece.convert_tokens_to_ids("<0xF0>")] == b"\xf0"  # byte fallback
    assert sp[sentencepiece.convert_tokens_to_ids("<0x41>")] == b"A"
    assert sp[sentencepiece.eos_token_id] is None and sp[sentencepiece.unk_token_id] is None
    he = next(p for p in sentencepiece.get_vocab() if p.startswith("▁") and len(p) > 1)
    assert sp[sentencepiece.convert_tokens_to_ids(he)] == b" " + he[1:].encode()


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("text", TEXTS + ["x</s>y", "hi<|end|> there"])
def test_offsets_tile_the_text_and_spell_it(tokenizer, text):
    pieces = token_bytes(tokenizer)
    ids, offsets = encode_with_offsets(tokenizer, text)
    data = text.encode()
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [b for b, _ in offsets] == [0] + [e for _, e in offsets[:-1]]  # contiguous
    assert offsets[-1][1] == len(data)
    assert b"".join(data[b:e] for b, e in offsets) == data
    for i, (b, e) in zip(ids, offsets):
        own = pieces[i] if pieces[i] is not None else tokenizer.convert_ids_to_tokens(i).encode()
        # the token's own bytes, or with the dummy space a SentencePiece segment starts with
        assert data[b:e] in (own, own[1:]) and (data[b:e] == own or own[:1] == b" ")


def test_sentencepiece_dummy_space_is_left_out(sentencepiece):
    ids, offsets = encode_with_offsets(sentencepiece, "hello")
    assert sentencepiece.convert_ids_to_tokens(ids)[0].startswith("▁")
    assert offsets[0][0] == 0 and offsets[-1][1] == 5
    # a dummy after an added token too, and a lone "▁" piece spans no byte
    ids, offsets = encode_with_offsets(sentencepiece, "x</s>y")
    pieces = sentencepiece.convert_ids_to_tokens(ids)
    assert pieces[pieces.index("</s>") + 1] == "▁" and offsets[pieces.index("</s>") + 1] == (5, 5)
    # a text that starts with a space keeps it: no dummy there
    ids, offsets = encode_with_offsets(sentencepiece, " leading")
    assert offsets[0][0] == 0 and offsets[0][1] >= 1


def test_a_normalizer_that_changes_the_text_is_refused_naming_the_tokenizer():
    bpe = Tokenizer(models.BPE({c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, []))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, name_or_path="lowercasing")
    assert encode_with_offsets(tok, "hello")[1] == [(i, i + 1) for i in range(5)]
    with pytest.raises(PotstillError, match="lowercasing"):
        encode_with_offsets(tok, "Hello")


def test_an_unknown_token_is_refused():
    bpe = Tokenizer(models.BPE({"a": 0, "<unk>": 1}, [], unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", name_or_path="tiny")
    assert encode_with_offsets(tok, "aa")[1] == [(0, 1), (1, 2)]
    with pytest.raises(PotstillError, match="'tiny' encodes part of the text as id 1"):
        encode_with_offsets(tok, "ab")


@pytest.mark.parametrize("text", [*TEXTS, "hi<|end|> there", "a<|end|><|end|>b 🙂"])
def test_byte_level_offsets_equal_trl(byte_level, trl_utils, text):
    encode_with_byte_offsets, _ = trl_utils
    [(trl_ids, trl_offsets)] = encode_with_byte_offsets(byte_level.backend_tokenizer, [text])
    ids, offsets = encode_with_offsets(byte_level, text)
    assert ids == list(trl_ids)
    assert offsets == [tuple(o) for o in trl_offsets]


# ---------------------------------------------------------------------------------------------------
# byte alignment


def test_align_groups_equal_trl_on_both_families(byte_level, sentencepiece, trl_utils):
    _, trl_align = trl_utils
    for text in TEXTS:
        a = encode_with_offsets(byte_level, text)[1]
        b = encode_with_offsets(sentencepiece, text)[1]
        for s, t in ((a, b), (b, a), (a, a)):
            assert align_groups(s, t) == trl_align(s, t)
        groups = align_groups(a, b)[0]
        assert sorted(i for g in groups for i in g) == list(range(len(a)))


def _random_tiling(rng: random.Random, n_bytes: int) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(1, n_bytes), rng.randint(0, n_bytes - 1))) if n_bytes > 1 else []
    ends = [*cuts, n_bytes]
    spans = list(zip([0, *ends[:-1]], ends))
    for _ in range(rng.randint(0, 2)):  # zero-width tokens (a dummy "▁", a trailing EOS)
        at = rng.randint(0, len(spans))
        edge = spans[at - 1][1] if at else 0
        spans.insert(at, (edge, edge))
    return spans


def test_align_groups_equal_trl_on_random_offsets(trl_utils):
    _, trl_align = trl_utils
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(0, 12)
        s = _random_tiling(rng, n) if n else []
        t = _random_tiling(rng, n if rng.random() < 0.8 else rng.randint(1, 12))  # sometimes other lengths
        assert align_groups(s, t) == trl_align(s, t)


# ---------------------------------------------------------------------------------------------------
# the rule


def _hand_trie(pieces: list[bytes]) -> ByteTrie:
    return ByteTrie(pieces)


def _probs(ids, lps) -> dict[int, float]:
    return {int(i): math.exp(float(lp)) for i, lp in zip(ids, lps) if lp > -math.inf}


def test_longest_prefix_and_byte_fallback_giving_way(sentencepiece):
    trie = _hand_trie([b"h", b"he", b"hel", b"lo", b"\xc3", b"\xc3\xa9"])
    assert trie.longest_prefix(b"help") == 2 and trie.longest_prefix(b"h") == 0
    assert trie.longest_prefix(b"\xc3\xa9!") == 5 and trie.longest_prefix(b"\xc3\xa8") == 4
    assert trie.longest_prefix(b"x") is None and trie.longest_prefix(b"") is None
    sp = byte_trie(sentencepiece)
    space = sentencepiece.convert_tokens_to_ids("▁")
    assert sp.longest_prefix(b" ") == space  # not <0x20>, which has the same byte
    assert sp.longest_prefix(b"\xf0\x9f") == sentencepiece.convert_tokens_to_ids("<0xF0>")


def test_hand_case_one_teacher_token_over_two_student_tokens():
    """Teacher "hello" (p .5), alternatives "help" (.3), "he" (.1); student "hel" + "lo"."""
    trie = _hand_trie([b"h", b"e", b"l", b"o", b"p", b"he", b"hel", b"lo"])
    ids, lps, counts = student_targets(
        [b"hello"], [math.log(0.5)], [[b"hello", b"help", b"he"]], [[math.log(0.5), math.log(0.3), math.log(0.1)]],
        [(0, 3), (3, 5)], [6, 7], trie, k=4)
    assert ids.dtype == np.int32 and lps.dtype == np.float32 and ids.shape == lps.shape == (2, 4)
    # "hel": the path .5 and "help" .3 (its longest student prefix); "he" .1. Z = 1 (no prefix seen)
    assert ids[0].tolist() == [6, 5, 6, 6]
    assert np.allclose(np.exp(lps[0, :2]), [0.8, 0.1]) and np.isneginf(lps[0, 2:]).all()
    # "lo" after "hel": of "hello" .5 and "help" .3 (both start "hel"; "he" does not), Z = .8
    assert ids[1].tolist() == [7, 4, 7, 7]
    assert np.allclose(np.exp(lps[1, :2]), [0.5 / 0.8, 0.3 / 0.8]) and np.isneginf(lps[1, 2:]).all()
    assert counts == {"positions": 2, "exact": 0, "unmappable": 0, "empty": 0}


def test_a_teacher_token_shorter_than_the_student_token_expands_the_path():
    """Teacher "he" (.6) + "llo" (.5); student "hello" in one token."""
    trie = _hand_trie([b"h", b"e", b"l", b"o", b"p", b"he", b"hel", b"lo", b"hello"])
    ids, lps, counts = student_targets(
        [b"he", b"llo"], [math.log(0.6), math.log(0.5)],
        [[b"he", b"h", b"x"], [b"llo", b"lp"]],
        [[math.log(0.6), math.log(0.2), math.log(0.1)], [math.log(0.5), math.log(0.3)]],
        [(0, 5)], [8], trie, k=5)
    # the path "he"+"llo" .6 * .5 -> "hello"; "h" .2 -> "h"; "he"+"lp" .6 * .3 -> "hel"; "x": no student token
    assert _probs(ids[0], lps[0]) == pytest.approx({8: 0.3, 0: 0.2, 6: 0.18})
    assert ids[0].tolist()[:3] == [8, 0, 6]
    assert counts == {"positions": 1, "exact": 0, "unmappable": 1, "empty": 0}


def test_bytes_that_cut_a_character_are_kept_exact():
    """"é" is b"\\xc3\\xa9": the teacher has it as two byte tokens, alternatives cut it elsewhere."""
    trie = _hand_trie([b"\xc3", b"\xa9", b"\xc3\xa9", b"\xc3\xa8", b"\xa8", b"!"])
    chosen, chosen_lp = [b"\xc3", b"\xa9", b"!"], [math.log(0.9), math.log(0.7), 0.0]
    alts = [[b"\xc3", b"e"], [b"\xa9", b"\xa8", b"\xa0"], [b"!"]]
    alt_lps = [[math.log(0.9), math.log(0.05)], [math.log(0.7), math.log(0.2), math.log(0.1)], [0.0]]
    ids, lps, counts = student_targets(chosen, chosen_lp, alts, alt_lps, [(0, 2), (2, 3)], [2, 5], trie, k=4)
    # "é" = the path .9 * .7; "\xc3"+"\xa8" = "è" .9 * .2; "\xc3"+"\xa0" -> its prefix "\xc3" .9 * .1
    assert _probs(ids[0], lps[0]) == pytest.approx({2: 0.63, 3: 0.18, 0: 0.09})
    assert counts["unmappable"] == 1  # "e"
    assert counts["exact"] == 1  # "!" is one teacher token and one student token

    # a student token that starts inside a teacher token: the teacher's "é" (.6) or "è" (.2), student "\xc3" + "\xa9"
    ids, lps, _ = student_targets([b"\xc3\xa9"], [math.log(0.6)], [[b"\xc3\xa8", b"\xc3\xa9"]],
                                  [[math.log(0.2), math.log(0.6)]], [(0, 1), (1, 2)], [0, 1], trie, k=2)
    assert _probs(ids[0], lps[0]) == pytest.approx({0: 0.6, 3: 0.2})  # the path to the student's "\xc3"; "è" whole
    assert _probs(ids[1], lps[1]) == pytest.approx({1: 0.75, 4: 0.25})  # d = 1: Z = .6 + .2


def test_unmappable_bytes_are_counted_and_their_mass_is_tail():
    trie = _hand_trie([b"a", b"b", b" "])
    ids, lps, counts = student_targets([b"a", b" b"], [math.log(0.5), math.log(0.9)],
                                       [[b"\xf0\x9f\x99\x82", b"\xe6\x97", b"a"], [b" b"]],
                                       [[math.log(0.3), math.log(0.1), math.log(0.5)], [math.log(0.9)]],
                                       [(0, 1), (1, 2), (2, 3)], [0, 2, 1], trie, k=3)
    assert counts["unmappable"] == 2
    assert _probs(ids[0], lps[0]) == pytest.approx({0: 0.5})  # the tail holds .5
    assert counts["exact"] == 1  # "a"; " b" is two student tokens


def test_the_teachers_stop_reaches_the_students_eos_where_the_cuts_coincide():
    """Teacher "a" (.5; stop .2) + "bc" (.7; stop .1); student "a" + "b" + "c", EOS id 9: the stop
    is an event at a student token that starts where a teacher token starts, never inside one."""
    trie = _hand_trie([b"a", b"b", b"c"])
    stops = [math.log(0.2), math.log(0.1)]
    ids, lps, _ = student_targets([b"a", b"bc"], [math.log(0.5), math.log(0.7)], [[b"a"], [b"bc"]],
                                  [[math.log(0.5)], [math.log(0.7)]], [(0, 1), (1, 2), (2, 3)], [0, 1, 2], trie, k=3,
                                  stops=stops, stop_id=9)
    assert _probs(ids[0], lps[0]) == pytest.approx({0: 0.5, 9: 0.2})
    assert _probs(ids[1], lps[1]) == pytest.approx({1: 0.7, 9: 0.1})
    assert _probs(ids[2], lps[2]) == pytest.approx({2: 1.0})  # inside "bc": Z = p("bc"), no stop
    plain, _, _ = student_targets([b"a", b"bc"], [math.log(0.5), math.log(0.7)], [[b"a"], [b"bc"]],
                                  [[math.log(0.5)], [math.log(0.7)]], [(0, 1), (1, 2), (2, 3)], [0, 1, 2], trie, k=3,
                                  stops=[-math.inf, -math.inf], stop_id=9)
    assert 9 not in plain.tolist()[0] + plain.tolist()[1]  # an unknown stop adds nothing


def test_rows_with_fewer_ids_than_k_are_padded_and_train_as_the_shorter_row():
    trie = _hand_trie([b"a", b"b", b"c"])
    ids, lps, _ = student_targets([b"a"], [math.log(0.7)], [[b"b"]], [[math.log(0.2)]], [(0, 1)], [0], trie, k=4)
    assert ids.tolist() == [[0, 1, 0, 0]] and np.isneginf(lps[0, 2:]).all()
    logits = torch.randn(1, 3)
    padded = kd_loss("forward_kl", logits, topk_ids=torch.from_numpy(ids), topk_logprobs=torch.from_numpy(lps))
    short = kd_loss("forward_kl", logits, topk_ids=torch.from_numpy(ids[:, :2]),
                    topk_logprobs=torch.from_numpy(lps[:, :2]))
    assert padded.item() == pytest.approx(short.item(), abs=1e-6)


def test_zero_byte_student_token_is_certain():
    trie = _hand_trie([b" ", b"a"])
    ids, lps, counts = student_targets([b"a"], [math.log(0.5)], [[b"a"]], [[math.log(0.5)]],
                                       [(0, 0), (0, 1)], [0, 1], trie, k=2)
    assert ids[0].tolist() == [0, 0] and lps[0, 0] == 0.0 and counts["empty"] == 1


def _topk_teacher(tok, text: str, k: int, seed: int):
    """An API-like teacher with ``tok``'s tokenization of ``text``: random distributions over the ids
    that are text (and that the trie gives back), the chosen token the most likely."""
    pieces, trie = token_bytes(tok), byte_trie(tok)
    valid = torch.tensor([p is not None and trie.longest_prefix(p) == i for i, p in enumerate(pieces)])
    ids, offsets = encode_with_offsets(tok, text)
    data = text.encode()
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(len(ids), len(pieces), generator=g) * 3).masked_fill(~valid, -math.inf)
    logits[torch.arange(len(ids)), torch.tensor(ids)] = logits.max(-1).values + 0.5
    top_lp, top_ids = logits.log_softmax(-1).topk(k, -1)
    chosen = [data[b:e] for b, e in offsets]  # the text's bytes: no dummy space
    alts = [[chosen[s] if i == ids[s] else pieces[i] for i in row] for s, row in enumerate(top_ids.tolist())]
    return ids, offsets, chosen, top_ids, top_lp, alts


@pytest.mark.parametrize("text", TEXTS)
def test_identical_tokenizers_give_the_teachers_top_k_exactly(tokenizer, text):
    k = 6
    ids, offsets, chosen, top_ids, top_lp, alts = _topk_teacher(tokenizer, text, k, seed=len(text))
    got_ids, got_lps, counts = student_targets(chosen, top_lp[:, 0].tolist(), alts, top_lp.tolist(), offsets, ids,
                                               byte_trie(tokenizer), k)
    full = [s for s, (b, e) in enumerate(offsets) if e > b]
    assert np.array_equal(got_ids[full], top_ids[full].numpy().astype(np.int32))
    assert np.allclose(got_lps[full], top_lp[full].numpy(), atol=2e-6, rtol=0)
    assert counts["exact"] == len(full) and counts["empty"] == len(ids) - len(full) and counts["unmappable"] == 0


@pytest.mark.parametrize("text", TEXTS)
def test_across_families_rows_are_distributions_with_the_students_own_token(byte_level, sentencepiece, text):
    _, t_offsets, chosen, _, top_lp, alts = _topk_teacher(byte_level, text, 20, seed=1)
    s_ids, s_offsets = encode_with_offsets(sentencepiece, text)
    trie = byte_trie(sentencepiece)
    args = (chosen, top_lp[:, 0].tolist(), alts, top_lp.tolist(), s_offsets, s_ids, trie)
    ids, lps, counts = student_targets(*args, k=8)
    all_ids, all_lps, _ = student_targets(*args, k=len(sentencepiece))  # nothing cut off
    assert np.array_equal(ids, all_ids[:, :8]) and np.array_equal(lps, all_lps[:, :8])  # k only cuts
    assert ids.shape == (len(s_ids), 8) and counts["positions"] == len(s_ids)
    assert np.array_equal(lps, -np.sort(-lps, axis=1))  # descending, padding last
    assert (np.exp(all_lps.astype(np.float64)).sum(1) <= 1 + 1e-6).all()
    for s, x in enumerate(s_ids):
        real = all_ids[s][np.isfinite(all_lps[s])]
        assert len(set(real.tolist())) == len(real)  # each id once
        assert x in real  # the text's own token holds the path's mass
    shared = set(map(tuple, t_offsets)) & {tuple(o) for o in s_offsets if o[1] > o[0]}
    assert counts["exact"] == len(shared)
