"""Online and on-policy logit KD from a local teacher of another tokenizer.

The teacher re-reads the student's text in its own tokens: for each micro-batch, every example's
completion (the ledger's text as the student's tokenizer spells it, or a completion the student
sampled) is decoded to bytes, the teacher encodes those bytes after its own rendering of the prompt,
and one forward pass gives its distribution at each of its tokens. Its top-k there (k =
``generation.top_logprobs``, 20 when that is 0) among its tokens that are text, as bytes, its
probability of stopping (its EOS), and the logprob of each of its own tokens
are mapped onto the student's tokens by ``potstill.align.student_targets``, the rule cached KD across
tokenizers uses (the rule, and which part of it is exact, in align's docstring). The example then
trains exactly as a cached one does: sparse KD over the student's ids, every loss family and the
chunked loss unchanged.

What differs from the cache: the targets are the teacher's now, on the text the step trains on (on
a sampled completion too), and the alternatives come from its full distribution; the alignment runs
every step (about 0.3 ms per row, against the teacher's forward).

Where bytes cannot be read as text, they cannot be re-read: a sampled completion is cut before its
first token that has no bytes (a special token other than a final EOS), that ends past the last
whole UTF-8 character, or whose bytes the teacher's tokenizer cannot spell (counted:
``counts["cut_tokens"]``); what is cut is not trained on: neither reinforced nor guessed. A SentencePiece student's sample
starts with its dummy space ("▁5" for "5"): it is left out of the bytes, as the ledger's rows leave
it out (``align.encode_with_offsets``). A ledger row the student's tokenizer
cannot spell byte for byte, or whose bytes the teacher's tokenizer cannot spell, trains on its own
tokens with certain targets (counted, as in the cache)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from potstill.align import ByteTrie, encode_with_offsets, student_targets, token_bytes
from potstill.errors import PotstillError
from potstill.hf import prompt_ids
from potstill.train.examples import TrainExample, certain, unknown_positions

DEFAULT_K = 20  # alternatives per teacher token when the recipe asked the ledger for none
# what each process counts of its own steps (``prepare`` counts what every process sees alike)
STEP_COUNTS = ("positions", "exact", "unmappable", "empty", "cut_tokens", "rows_teacher_cannot_spell")


@dataclass
class OnlineCross:
    """The teacher, both tokenizers' bytes and the target width, built once per training."""

    teacher: torch.nn.Module
    teacher_tok: object
    teacher_pieces: list[bytes | None]
    student_pieces: list[bytes | None]
    trie: ByteTrie
    student_eos: int | None
    k: int
    no_text: torch.Tensor  # the teacher's ids with no bytes (special tokens; its EOS reaches the student apart)
    lockstep: bool = False  # the teacher is sharded: every process runs each forward, with rows to read or not
    # the student's tokenizer puts a space before a text that has none (SentencePiece's dummy prefix):
    # its first piece of a completion holds one space the text does not
    dummy_space: bool = False
    counts: Counter = field(default_factory=Counter)

    @classmethod
    def build(cls, teacher, teacher_tok, student_tok, k: int, lockstep: bool = False) -> OnlineCross:
        pieces, teacher_pieces = token_bytes(student_tok), token_bytes(teacher_tok)
        no_text = torch.tensor([i for i, b in enumerate(teacher_pieces) if not b], dtype=torch.long)
        return cls(teacher, teacher_tok, teacher_pieces, pieces, ByteTrie(pieces), student_tok.eos_token_id,
                   k or DEFAULT_K, no_text, lockstep, dummy_space=_adds_dummy_space(student_tok, pieces))

    def prepare(self, data: list[TrainExample], examples: list, student_tok) -> None:
        """Once, before training: each example's teacher prompt, and its completion's bytes and the
        student tokens' byte spans (None where the student's tokenizer cannot spell the text)."""
        for d, ex in zip(data, examples, strict=True):
            d.teacher_prompt = prompt_ids(self.teacher_tok, ex.messages)
            try:
                ids, offsets = encode_with_offsets(student_tok, ex.text, self.student_pieces)
            except PotstillError:  # trained on its own tokens, certain, the unknown ones excluded
                self.counts["rows_student_cannot_spell"] += 1
                d.excluded = unknown_positions(d.input_ids[d.n_prompt:], student_tok)
                self.counts["positions_excluded"] += len(d.excluded)
                continue
            if ids == d.input_ids[d.n_prompt:d.n_prompt + len(ids)]:
                d.text, d.offsets = ex.text.encode(), offsets

    def add_up(self, reduce) -> None:
        """Make the counts of every step the sum over all processes: ``reduce`` sums a tensor over
        them (a collective: every process calls this). What ``prepare`` counted is every process's
        count already: each prepared all the data."""
        summed = reduce(torch.tensor([self.counts[k] for k in STEP_COUNTS], dtype=torch.long)).tolist()
        for k, v in zip(STEP_COUNTS, summed, strict=True):
            self.counts[k] = v

    def summary(self) -> str:
        """What the mapping did over the training, for one printed line."""
        c = self.counts
        return (f"{c['positions']:,} student tokens mapped, {c['exact'] / max(c['positions'], 1):.0%} cut where the "
                f"teacher's tokens are cut; {c['unmappable']:,} teacher alternatives no student token starts (their "
                f"mass in the tail)"
                + (f"; {c['cut_tokens']:,} sampled tokens cut (no text to re-read)" if c["cut_tokens"] else "")
                + (f"; {c['rows_student_cannot_spell'] + c['rows_teacher_cannot_spell']:,} rows a tokenizer cannot "
                   f"spell byte for byte, trained on their own tokens"
                   if c["rows_student_cannot_spell"] + c["rows_teacher_cannot_spell"] else "")
                + (f" ({c['positions_excluded']:,} unknown tokens among them excluded)" if c["positions_excluded"] else ""))

    def from_samples(self, batch: list[TrainExample]) -> list[TrainExample]:
        """Sampled completions with their bytes and spans from the student's own tokens, cut where
        the bytes stop being text (the module docstring)."""
        return [self._sampled(ex) for ex in batch]

    def _sampled(self, ex: TrainExample) -> TrainExample:
        ids = ex.input_ids[ex.n_prompt:]
        eos = bool(ids) and ids[-1] == self.student_eos
        body = ids[:-1] if eos else ids
        spans, data, end = [], b"", 0
        for n, i in enumerate(body):
            piece = self.student_pieces[i] if i < len(self.student_pieces) else None
            if not piece:
                break
            if n == 0 and self.dummy_space and piece.startswith(b" "):
                piece = piece[1:]  # the dummy space, as the ledger's rows leave it out (align.encode_with_offsets)
            data += piece
            spans.append((end, end + len(piece)))
            end += len(piece)
        whole = _utf8_prefix(data)
        keep = self._readable(data, spans, sum(1 for _, e in spans if e <= whole))
        cut = len(body) - keep
        self.counts["cut_tokens"] += cut
        kept = body[:keep] + ([ids[-1]] if eos and not cut else [])
        return replace(ex, input_ids=ex.input_ids[:ex.n_prompt] + kept, text=data[:spans[keep - 1][1]] if keep else b"",
                       offsets=spans[:keep])

    def _readable(self, data: bytes, spans: list[tuple[int, int]], keep: int) -> int:
        """The most of the first ``keep`` student tokens whose bytes the teacher's tokenizer spells
        byte for byte (a character outside its vocabulary stops it), by bisection."""
        def spells(n: int) -> bool:
            try:  # a student token may end inside a character: such a prefix is no text
                encode_with_offsets(self.teacher_tok, data[:spans[n - 1][1]].decode() if n else "", self.teacher_pieces)
                return True
            except (PotstillError, UnicodeDecodeError):
                return False

        if spells(keep):
            return keep
        lo, hi = 0, keep  # spells(lo), not spells(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if spells(mid) else (lo, mid)
        return lo

    @torch.no_grad()
    def targets(self, batch: list[TrainExample], device) -> list[TrainExample]:
        """The batch with each example's top-k over the student's ids, from one teacher forward."""
        rows = []  # (example index, teacher completion ids)
        for j, ex in enumerate(batch):
            if ex.text is None or ex.teacher_prompt is None:
                continue
            try:
                t_ids, _ = encode_with_offsets(self.teacher_tok, ex.text.decode(), self.teacher_pieces)
            except PotstillError:
                self.counts["rows_teacher_cannot_spell"] += 1
                continue
            rows.append((j, t_ids))
        logprobs = self._teacher_logprobs([batch[j].teacher_prompt + t for j, t in rows], device)
        out = [self._certain(ex) for ex in batch]
        for (j, t_ids), lp in zip(rows, logprobs):
            out[j] = self._mapped(batch[j], t_ids, lp[len(batch[j].teacher_prompt) - 1:])
        return out

    def _teacher_logprobs(self, rows: list[list[int]], device) -> list[torch.Tensor]:
        """The teacher's log-softmax (L - 1, V) after each position of each row, over its tokenizer's rows.
        With no row, no forward, unless ``lockstep``: then a forward of one token, read by nobody,
        because the other processes' forwards gather this one's shards of the teacher."""
        if not rows:
            if self.lockstep:
                self.teacher(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
            return []
        width = max(map(len, rows))
        pad = self.teacher_tok.pad_token_id if self.teacher_tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        logits = self.teacher(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logits = logits[..., :min(logits.shape[-1], len(self.teacher_pieces))].float()  # padded rows: no token
        lps = torch.log_softmax(logits, -1).cpu()
        return [lps[i, :len(r)] for i, r in enumerate(rows)]

    def _mapped(self, ex: TrainExample, t_ids: list[int], lp: torch.Tensor) -> TrainExample:
        """Targets for one example; ``lp`` (len(t_ids) + 1, V): the teacher's logprobs for each of its
        completion tokens and for what follows the text (its EOS)."""
        n = len(t_ids)
        text_lp = lp[:n].clone()
        text_lp[:, self.no_text[self.no_text < lp.shape[-1]]] = -torch.inf  # its top-k among tokens that are text
        alt_lp, alt_ids = text_lp.topk(min(self.k, lp.shape[-1]), dim=-1)
        chosen_lp = lp[torch.arange(n), torch.tensor(t_ids, dtype=torch.long)] if n else torch.zeros(0)
        pieces = self.teacher_pieces
        s_ids = ex.input_ids[ex.n_prompt:ex.n_prompt + len(ex.offsets)]
        eos = self.teacher_tok.eos_token_id
        eos = eos if eos is not None and eos < lp.shape[-1] else None
        ids, lps, counts = student_targets([pieces[i] or b"" for i in t_ids], chosen_lp.tolist(),
                                           [[pieces[i] or b"" for i in row] for row in alt_ids.tolist()],
                                           alt_lp.tolist(), ex.offsets, s_ids, self.trie, self.k,
                                           None if eos is None else lp[:n, eos].tolist(), self.student_eos)
        self.counts.update(counts)
        if len(ex.input_ids) - ex.n_prompt > len(ex.offsets):  # the EOS a stopped answer ends with
            row_ids, row_lp = certain([ex.input_ids[-1]], self.k)
            row_lp[0, 0] = float(lp[n, eos]) if eos is not None else 0.0  # the teacher's stop probability
            ids, lps = np.concatenate([ids, row_ids]), np.concatenate([lps, row_lp])
        return replace(ex, topk_ids=ids, topk_logprobs=lps)

    def _certain(self, ex: TrainExample) -> TrainExample:
        """KD toward the example's own tokens (as CE): a row neither tokenizer could re-read."""
        ids, lps = certain(ex.input_ids[ex.n_prompt:], self.k)
        return replace(ex, topk_ids=ids, topk_logprobs=lps)


def _adds_dummy_space(tokenizer, pieces: list[bytes | None]) -> bool:
    """Whether ``tokenizer`` spells a text with a space before it (SentencePiece's dummy prefix),
    asked of the first probe it spells with known bytes."""
    for probe in ("a", "0", "5", "x", "."):
        got = [pieces[i] if i < len(pieces) else None for i in tokenizer(probe, add_special_tokens=False)["input_ids"]]
        if got and None not in got:
            return b"".join(got) == b" " + probe.encode()
    return False


def _utf8_prefix(data: bytes) -> int:
    """The length of the longest prefix of ``data`` that is whole UTF-8 characters."""
    try:
        data.decode()
        return len(data)
    except UnicodeDecodeError as e:
        return e.start
