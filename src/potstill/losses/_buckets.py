"""Teacher and student log-probabilities over the same buckets, dense or sparse.

Every divergence in this package is a function of two log-distributions over the same support.
Dense: the support is the vocabulary (teacher logits known). Sparse: the teacher's top-k ids
plus one tail bucket for all other ids (see ``sparse_logprobs``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

NEG = -1e30  # a finite "minus infinity" for masking: -inf would turn 0 * inf into NaN in backward
# The teacher's log-probabilities are floored here: e^-100 is nothing, but a finite floor keeps every
# divergence finite when the teacher has an exact zero (a -inf or -9999 sentinel, no tail mass).
# The student's are not: a floor is a clamp, and a clamp has no gradient below it, so a student
# sure it is right (log q = -150 where the teacher says 0.5) would get neither the loss nor the
# push back. Its log-probabilities are only kept finite (NEG for a -inf logit).
LOG_FLOOR = -100.0


def _student(logp: Tensor) -> Tensor:
    """The student's log-probabilities, finite (a -inf logit becomes NEG) with their gradient intact."""
    return logp.clamp_min(NEG)


def _wide(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 (softmax in half precision loses the tail); wider kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def dense_logprobs(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(N, V), (N, V) logits -> teacher log p_T, student log q_T, both (N, V), at least float32."""
    t = temperature
    soft = (lambda x: _wide(x)) if t == 1.0 else (lambda x: _wide(x) / t)  # T = 1: no (N, V) copy
    teacher = soft(teacher_logits).log_softmax(-1).clamp_min_(LOG_FLOOR)  # in place: no extra (N, V) copy
    return teacher, _student(soft(student_logits).log_softmax(-1))


def sparse_logprobs(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor,
                    temperature: float) -> tuple[Tensor, Tensor]:
    """Teacher top-k (N, k) at T = 1 and student logits (N, V) -> log p_T, log q_T over k + 1 buckets.

    The student's buckets are its exact probabilities of the k ids and of everything else. The
    teacher's tail mass t = 1 - sum_i exp(l_i) is taken as spread evenly over the V - k other ids,
    so softened by T its total weight is (V - k) * (t / (V - k))^(1/T). At T = 1, or with k = V,
    or with a truly flat tail, this is exact.

    Padding: a row with fewer than k ids (cross-tokenizer targets, ``potstill.align``) repeats its
    first id at logprob -inf in the entries j > 0 it does not use. Such an entry is no bucket: both
    sides hold NEG there (no mass, no gradient), the teacher's tail is spread over the V - k' ids
    outside the row's k' real ones, and the loss equals that of the row with its k' buckets alone.
    Rows without padding give the same bits as without this rule.
    """
    t = temperature
    n_vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    ids = topk_ids.long()
    pad = _padding(ids, topk_logprobs)  # (N, k) bool
    no_bucket = torch.cat([pad, torch.zeros_like(pad[:, :1])], -1)  # (N, k + 1): the tail is always one

    s = _wide(student_logits) / t  # (N, V)
    log_z = s.logsumexp(-1, keepdim=True)  # (N, 1)
    s_top = s.gather(-1, ids) - log_z  # (N, k)
    s_tail = s.scatter(-1, ids, NEG).logsumexp(-1, keepdim=True) - log_z  # (N, 1); a padded id is the first one
    student_logp = _student(torch.cat([s_top, s_tail], -1)).masked_fill(no_bucket, NEG)  # (N, k + 1)

    lp = _wide(topk_logprobs).to(s.dtype).clamp_min(LOG_FLOOR)  # (N, k); -inf / -9999 sentinels become finite
    tail_mass = (1.0 - lp.masked_fill(pad, -math.inf).exp().sum(-1, keepdim=True)).clamp_min(0.0)  # (N, 1) at T = 1
    n_tail = n_vocab - k
    if n_tail > 0:
        tail_weight = math.log(n_tail) + (tail_mass.clamp_min(1e-30).log() - math.log(n_tail)) / t
    else:
        tail_weight = torch.full_like(lp[:, :1], LOG_FLOOR)
    # a padded row's tail is spread over the V - k' ids outside its k' real ones
    log_n = (n_tail + pad.sum(-1, keepdim=True)).clamp_min(1).to(lp.dtype).log()  # (N, 1); read only where pad is
    padded_weight = log_n + (tail_mass.clamp_min(1e-30).log() - log_n) / t
    tail_weight = torch.where(pad.any(-1, keepdim=True), padded_weight, tail_weight)
    buckets = torch.cat([(lp / t).masked_fill(pad, -math.inf), tail_weight], -1)  # (N, k + 1)
    teacher_logp = buckets.log_softmax(-1).clamp_min(LOG_FLOOR).masked_fill(no_bucket, NEG)
    return teacher_logp, student_logp


def _padding(ids: Tensor, logprobs: Tensor) -> Tensor:
    """(N, k) bool: the entries j > 0 that repeat their row's first id at logprob -inf."""
    later = torch.arange(ids.shape[-1], device=ids.device) > 0
    return (ids == ids[:, :1]) & (logprobs == -math.inf) & later


def reduce(per_row: Tensor, reduction: str) -> Tensor:
    """"mean" over rows (0 for no rows), "sum", or "none"."""
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / max(per_row.shape[0], 1)
    raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")


def kl_rows(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(p || q) = sum_b p_b (log p_b - log q_b) per row. One fused elementwise op (F.kl_div);
    both log-probabilities are finite (teacher floored, student at least NEG), so no 0 * inf occurs."""
    return F.kl_div(q_logp, p_logp, log_target=True, reduction="none").sum(-1)
