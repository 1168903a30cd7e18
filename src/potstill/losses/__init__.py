"""Distillation losses: pure functions, one file per family (formula and paper in each docstring).

Each family is a per-row divergence over two log-distributions on the same buckets. ``kd_loss``
gives every family in its dense form (full teacher logits, buckets = vocabulary) and its sparse
form (teacher top-k + one tail bucket), by the name used in recipes.
"""

from __future__ import annotations

from torch import Tensor

from potstill.losses._buckets import dense_logprobs, reduce, sparse_logprobs
from potstill.losses.forward_kl import forward_kl
from potstill.losses.jsd import generalized_jsd
from potstill.losses.reverse_kl import reverse_kl
from potstill.losses.skew_kl import skew_kl, skew_reverse_kl
from potstill.losses.tvd import tvd

LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def divergence(name: str, teacher_logp: Tensor, student_logp: Tensor, *, beta: float = 0.5,
               alpha: float = 0.1) -> Tensor:
    """Per-row divergence ``name`` between two log-distributions over the same buckets."""
    if name == "forward_kl":
        return forward_kl(teacher_logp, student_logp)
    if name == "reverse_kl":
        return reverse_kl(teacher_logp, student_logp)
    if name == "jsd":
        return generalized_jsd(teacher_logp, student_logp, beta)
    if name == "skew_kl":
        return skew_kl(teacher_logp, student_logp, alpha)
    if name == "skew_reverse_kl":
        return skew_reverse_kl(teacher_logp, student_logp, alpha)
    if name == "tvd":
        return tvd(teacher_logp, student_logp)
    raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")


def kd_loss(name: str, student_logits: Tensor, *, teacher_logits: Tensor | None = None,
            topk_ids: Tensor | None = None, topk_logprobs: Tensor | None = None, temperature: float = 1.0,
            beta: float = 0.5, alpha: float = 0.1, reduction: str = "mean") -> Tensor:
    """T^2 * divergence, dense when ``teacher_logits`` is given, else sparse from the top-k."""
    if teacher_logits is not None:
        p, q = dense_logprobs(student_logits, teacher_logits, temperature)
    else:
        p, q = sparse_logprobs(student_logits, topk_ids, topk_logprobs, temperature)
    return reduce(divergence(name, p, q, beta=beta, alpha=alpha) * temperature**2, reduction)


__all__ = ["LOSSES", "divergence", "kd_loss"]
