"""Ledger -> tokenized training examples (labels -100 on the prompt) + sparse teacher targets.

A student of the teacher's tokenizer trains on the teacher's own ids and top-k. A student of
another tokenizer re-tokenizes the text; with ``cross`` (logit KD from the cache), each ledger row's
top-k, as bytes (an API teacher's) or as the teacher's ids read through its tokenizer, becomes a
top-k over the student's ids at every student token (``potstill.align``: the rule and what in it is
exact), once per row, before the first step."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from potstill.align import ByteTrie, encode_with_offsets, student_targets, token_bytes
from potstill.errors import PotstillError
from potstill.hf import prompt_ids
from potstill.ledger import Example


@dataclass
class TrainExample:
    input_ids: list[int]  # prompt + completion
    n_prompt: int  # the first n_prompt ids are the prompt (no loss)
    topk_ids: np.ndarray | None  # (n_completion, k): teacher's top-k for each completion token
    topk_logprobs: np.ndarray | None  # (n_completion, k)
    # online and on-policy KD from a teacher of another tokenizer (train/cross_online.py): the
    # teacher's ids for the prompt, the completion's bytes and each student token's span in them
    teacher_prompt: list[int] | None = None
    text: bytes | None = None
    offsets: list[tuple[int, int]] | None = None
    # completion positions with no loss: tokens standing for bytes the tokenizer could not spell (unknown)
    excluded: list[int] = field(default_factory=list)

    @property
    def n_completion(self) -> int:
        """Completion tokens the loss is over (the excluded ones aside)."""
        return len(self.input_ids) - self.n_prompt - len(self.excluded)


@dataclass
class CrossTokenizer:
    """What targets across tokenizers need, built once: the student's token bytes and their trie,
    the teacher's token bytes (to read a ledger of the teacher's ids), the width k of every
    target row; ``counts`` adds up ``align.student_targets``' counts over the rows."""

    pieces: list[bytes | None]
    trie: ByteTrie
    teacher_pieces: dict[str, list[bytes | None]]  # teacher key -> its tokens' bytes (its tokenizer is here)
    k: int
    student_eos: int | None = None
    teacher_eos: dict[str, int | None] = field(default_factory=dict)  # teacher key -> its EOS id
    counts: Counter = field(default_factory=Counter)

    @classmethod
    def build(cls, student_tok, teacher_toks: dict[str, object], k: int) -> CrossTokenizer:
        pieces = token_bytes(student_tok)
        return cls(pieces, ByteTrie(pieces), {key: token_bytes(tok) for key, tok in teacher_toks.items()}, k,
                   student_tok.eos_token_id, {key: tok.eos_token_id for key, tok in teacher_toks.items()})


def build_examples(examples: list[Example], tokenizer, *, same_tokenizer: bool | set[str],
                   cross: CrossTokenizer | None = None) -> list[TrainExample]:
    """With the teacher's tokenizer (``same_tokenizer``: for every row, or the set of teacher keys
    whose rows it is), the teacher's own token ids and top-k are used; otherwise the completion text
    is re-tokenized, with targets across tokenizers when ``cross`` is given (else sequence-level KD
    only: no logits). An id the tokenizer does not have (a teacher's padding row, an imported
    file's) is refused, naming the ledger row."""
    out = []
    for ex in examples:
        p_ids, excluded = prompt_ids(tokenizer, ex.messages), []
        same = ex.teacher_key in same_tokenizer if isinstance(same_tokenizer, set) else same_tokenizer
        if same and ex.token_ids is not None:
            check_ids(ex, len(tokenizer))
            c_ids = ex.token_ids.tolist()
            topk_ids, topk_lp = ex.topk_ids, ex.topk_logprobs
        elif cross is not None:
            c_ids, topk_ids, topk_lp, excluded = cross_example(ex, tokenizer, cross, teacher_tokens(ex, cross))
        else:
            c_ids = tokenizer(ex.text, add_special_tokens=False)["input_ids"]
            if ex.finish_reason == "stop" and tokenizer.eos_token_id is not None:
                c_ids.append(tokenizer.eos_token_id)
            topk_ids = topk_lp = None
        if c_ids:
            out.append(TrainExample(p_ids + c_ids, len(p_ids), topk_ids, topk_lp, excluded=excluded))
    return out


def teacher_tokens(ex: Example, cross: CrossTokenizer) -> tuple[list, list, list, list, list | None] | None:
    """A row's generated tokens and top-k as bytes: (chosen (T,), chosen logprobs (T,), alternatives
    (T, k), their logprobs (T, k), the teacher's stop logprob (T,): its EOS in the top-k where its
    ids are known, its alternatives of no bytes (special tokens) where they are bytes, else -inf);
    None when the row has no top-k to read."""
    stops = None
    if ex.topk_bytes is not None and ex.token_bytes is not None:
        chosen, alternatives = ex.token_bytes.tolist(), ex.topk_bytes.tolist()
        # an alternative of no bytes is a special token (potstill serve; an EOS or a turn marker): the
        # answer would end there; their mass together is the teacher's stop probability
        stops = [_log_sum(lp for a, lp in zip(row, lps) if not a)
                 for row, lps in zip(alternatives, np.asarray(ex.topk_logprobs, np.float64).tolist())]
    elif ex.topk_ids is not None and ex.token_ids is not None and ex.teacher_key in cross.teacher_pieces:
        pieces = cross.teacher_pieces[ex.teacher_key]
        chosen = [pieces[i] or b"" for i in ex.token_ids.tolist()]  # a special token (EOS) is no text
        alternatives = [[pieces[i] or b"" for i in row] for row in ex.topk_ids.tolist()]
        eos = cross.teacher_eos.get(ex.teacher_key)
        stops = [next((float(lp) for i, lp in zip(ids, lps) if i == eos), -math.inf)
                 for ids, lps in zip(ex.topk_ids.tolist(), np.asarray(ex.topk_logprobs, np.float64).tolist())]
    else:
        cross.counts["rows_without_topk"] += 1  # no top-k, or ids of a tokenizer that is not here
        return None
    if not b"".join(chosen).startswith(ex.text.encode("utf-8")):  # e.g. a decode that dropped or added spaces
        cross.counts["rows_text_differs"] += 1  # trained on its text alone
        return None
    alt_lp = np.asarray(ex.topk_logprobs, np.float64)
    if ex.token_logprobs is not None:
        chosen_lp = np.asarray(ex.token_logprobs, np.float64).tolist()
    else:  # the chosen token's logprob from the top-k; outside it, at most the tail's mass
        chosen_lp = []
        for t, c in enumerate(chosen):
            hit = [alt_lp[t, j] for j, a in enumerate(alternatives[t]) if a == c]
            tail = max(1.0 - float(np.exp(alt_lp[t]).sum()), 1e-6)
            chosen_lp.append(hit[0] if hit else math.log(tail))
    return chosen, chosen_lp, alternatives, alt_lp.tolist(), stops


def _log_sum(logprobs) -> float:
    """log(sum(exp)) of some logprobs; -inf for none."""
    p = sum(math.exp(lp) for lp in logprobs)
    return math.log(p) if p > 0 else -math.inf


def cross_example(ex: Example, tokenizer, cross: CrossTokenizer, teacher
                  ) -> tuple[list[int], np.ndarray, np.ndarray, list[int]]:
    """The student's completion ids for the row's text, a target row for each (``align``'s rule) and
    the completion positions without loss; the EOS a stopped answer ends with gets the teacher's stop
    probability when the teacher's last token is a special one (its EOS), else certainty. A row
    without a top-k (``teacher`` None), or whose text the student's tokenizer cannot spell byte for
    byte, gets its own tokens, certain: KD toward the text, as CE (counted); its unknown tokens
    (bytes the student cannot spell) are excluded from the loss (counted)."""
    stop_lp, excluded = 0.0, []
    try:
        ids, offsets = encode_with_offsets(tokenizer, ex.text, cross.pieces)
    except PotstillError:
        cross.counts["rows_student_cannot_spell"] += 1
        ids, teacher = tokenizer(ex.text, add_special_tokens=False)["input_ids"], None
        excluded = unknown_positions(ids, tokenizer)
        cross.counts["positions_excluded"] += len(excluded)
    if teacher is None:
        topk_ids, topk_lp = certain(ids, cross.k)
    else:
        chosen, chosen_lp, alternatives, alt_lp, stops = teacher
        end = len(chosen)
        while end and not chosen[end - 1]:  # trailing special tokens (EOS): not text
            end -= 1
        topk_ids, topk_lp, counts = student_targets(chosen[:end], chosen_lp[:end], alternatives[:end], alt_lp[:end],
                                                    offsets, ids, cross.trie, cross.k, stops and stops[:end],
                                                    cross.student_eos)
        cross.counts.update(counts)
        stop_lp = float(chosen_lp[end]) if end < len(chosen) else 0.0
    if ex.finish_reason == "stop" and tokenizer.eos_token_id is not None:
        row_ids, row_lp = certain([tokenizer.eos_token_id], cross.k)
        row_lp[0, 0] = stop_lp
        ids = [*ids, tokenizer.eos_token_id]
        topk_ids, topk_lp = np.concatenate([topk_ids, row_ids]), np.concatenate([topk_lp, row_lp])
    return list(ids), topk_ids, topk_lp, excluded


def unknown_positions(ids: list[int], tokenizer) -> list[int]:
    """The positions of ``ids`` that are the tokenizer's unknown token: bytes it could not spell."""
    unk = getattr(tokenizer, "unk_token_id", None)
    return [j for j, i in enumerate(ids) if unk is not None and i == unk]


def certain(ids: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Target rows that put all the mass on ``ids`` (one a row), padded as ``align`` pads."""
    topk_ids = np.repeat(np.asarray(ids, np.int32).reshape(-1, 1), k, axis=1)
    topk_lp = np.full((len(ids), k), -np.inf, np.float32)
    topk_lp[:, 0] = 0.0
    return topk_ids, topk_lp


def check_ids(ex: Example, n_tokens: int) -> None:
    for name, ids in (("token_ids", ex.token_ids), ("topk_ids", ex.topk_ids)):
        if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= n_tokens):
            bad = int(ids.max()) if ids.max() >= n_tokens else int(ids.min())
            raise PotstillError(f"ledger request {ex.request_hash}: {name} holds id {bad}, outside the tokenizer's "
                                f"{n_tokens} ids (0..{n_tokens - 1}): a teacher that sampled its vocabulary's padding rows "
                                f"(regenerate with this potstill) or an imported file of another tokenizer's ids")


def collate(batch: list[TrainExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Teacher targets sit at the position of the token they predict, the same
    as ``labels``, so both shift together in the loss.

    Returns input_ids, attention_mask, labels (B, L) and, when every example has them,
    topk_ids, topk_logprobs (B, L, k).
    """
    width = max(len(ex.input_ids) for ex in batch)
    n = len(batch)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    has_topk = all(ex.topk_ids is not None for ex in batch)
    if has_topk:
        k = batch[0].topk_ids.shape[1]
        topk_ids = torch.zeros((n, width, k), dtype=torch.long)
        topk_logprobs = torch.zeros((n, width, k), dtype=torch.float32)
    for i, ex in enumerate(batch):
        length = len(ex.input_ids)
        input_ids[i, :length] = torch.tensor(ex.input_ids)
        attention_mask[i, :length] = 1
        labels[i, ex.n_prompt:length] = torch.tensor(ex.input_ids[ex.n_prompt:])
        for j in ex.excluded:
            labels[i, ex.n_prompt + j] = -100
        if has_topk:
            topk_ids[i, ex.n_prompt:length] = torch.from_numpy(np.asarray(ex.topk_ids, np.int64))
            topk_logprobs[i, ex.n_prompt:length] = torch.from_numpy(np.asarray(ex.topk_logprobs, np.float32))
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if has_topk:
        out["topk_ids"], out["topk_logprobs"] = topk_ids, topk_logprobs
    return out
