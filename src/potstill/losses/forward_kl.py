r"""Forward KL, KL(p_teacher || q_student): the classic distillation loss.

Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531).

    KD(x) = T^2 * sum_v p_T(v | x) * (log p_T(v | x) - log q_T(v | x))

p_T and q_T are teacher and student distributions softened by the temperature T
(softmax(logits / T)). The T^2 factor keeps the gradient's scale independent of T, as in Hinton
et al., so ``kd_ratio`` means the same at every temperature. Forward KL is mass-covering: the
student is pushed to put probability wherever the teacher does.

Dense form: the teacher's full-vocabulary logits are known (a local teacher).

Sparse form: only the teacher's top-k log-probabilities at T = 1 are known (an API teacher or a
cached ledger). The vocabulary is then split into k + 1 buckets: the k ids, and one *tail*
bucket holding the rest. The teacher's tail mass is t = 1 - sum_i exp(l_i); to soften it, the
tail is taken as spread evenly over its V - k ids, so at temperature T its total weight is
(V - k) * (t / (V - k))^(1/T). The student's buckets are its own probabilities of the k ids and
the exact sum over all other ids. With k = V, or with a truly uniform tail, the sparse form
equals the dense one; at T = 1 it is exact whatever the tail looks like.

Shapes: N rows (completion tokens, already selected by the caller's mask), V vocabulary, k
top-k entries. Reduction: "mean" over the N rows (0 when N = 0), "sum", or "none" (N,).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_NEG = -1e30  # a finite "minus infinity": -inf would turn 0 * inf into NaN in backward


def _reduce(per_token: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / max(per_token.shape[0], 1)
    raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")


def _kl_rows(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """sum_b p_b (log p_b - log q_b) over the last dim, with 0 * log 0 = 0."""
    p = teacher_logp.exp()
    return torch.where(p > 0, p * (teacher_logp - student_logp), torch.zeros_like(p)).sum(-1)


def dense_forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                     reduction: str = "mean") -> Tensor:
    """student_logits, teacher_logits: (N, V). Returns T^2 * KL(p_T || q_T), reduced over N."""
    t = temperature
    q = (student_logits.float() / t).log_softmax(-1)  # (N, V)
    p = (teacher_logits.float() / t).log_softmax(-1)  # (N, V)
    return _reduce(_kl_rows(p, q) * t * t, reduction)


def sparse_forward_kl(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, *,
                      temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """student_logits: (N, V); topk_ids: (N, k) int; topk_logprobs: (N, k) teacher log-probs at T = 1.

    Returns T^2 * KL over the k + 1 buckets (top-k ids and the tail), reduced over N.
    """
    t = temperature
    n_vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    ids = topk_ids.long()

    s = student_logits.float() / t  # (N, V)
    log_z = s.logsumexp(-1, keepdim=True)  # (N, 1)
    s_top = s.gather(-1, ids) - log_z  # (N, k) student log q_T of the teacher's top-k ids
    s_tail = s.scatter(-1, ids, _NEG).logsumexp(-1, keepdim=True) - log_z  # (N, 1) everything else
    student_logp = torch.cat([s_top, s_tail], -1)  # (N, k + 1)

    lp = topk_logprobs.float()  # (N, k)
    n_tail = n_vocab - k
    if n_tail > 0:
        tail_mass = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(0.0)  # (N, 1), probability at T = 1
        # (V - k) ids sharing tail_mass evenly, each softened by 1/T: log of their total weight
        tail_weight = math.log(n_tail) + (tail_mass.log() - math.log(n_tail)) / t
    else:
        tail_weight = torch.full_like(lp[:, :1], float("-inf"))
    teacher_logp = torch.cat([lp / t, tail_weight], -1).log_softmax(-1)  # (N, k + 1)

    return _reduce(_kl_rows(teacher_logp, student_logp) * t * t, reduction)
