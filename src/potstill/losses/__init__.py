"""Distillation losses: pure functions, one file per family (formula and paper in each docstring).

Each family is a per-row divergence over two log-distributions on the same buckets. ``LOSSES`` is
the registry of the names recipes use (``train.loss``): the recipe validates against it, the
training step looks the divergence up in it, and ``potstill run`` reads from it which parameters a
loss uses. A new loss is one file here and one line in ``LOSSES`` (docs/extending.md).

``kd_loss`` gives every family in its dense form (full teacher logits, buckets = vocabulary) and
its sparse form (teacher top-k + one tail bucket).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from potstill.losses._buckets import dense_logprobs, reduce, sparse_logprobs
from potstill.losses.forward_kl import forward_kl
from potstill.losses.jsd import generalized_jsd
from potstill.losses.reverse_kl import reverse_kl
from potstill.losses.skew_kl import skew_kl, skew_reverse_kl
from potstill.losses.tvd import tvd


@dataclass(frozen=True)
class Loss:
    """A loss family as recipes name it. ``rows(teacher_logp, student_logp, **params)``: two (N, B)
    log-distributions over the same buckets -> (N,), the divergence of each row. ``params``: the
    ``train.*`` fields it reads, passed by these names (the others do not change what it trains)."""

    rows: Callable[..., Tensor]
    params: tuple[str, ...] = ()


LOSSES: dict[str, Loss] = {
    "forward_kl": Loss(forward_kl),
    "reverse_kl": Loss(reverse_kl),
    "jsd": Loss(generalized_jsd, ("beta",)),
    "skew_kl": Loss(skew_kl, ("alpha",)),
    "skew_reverse_kl": Loss(skew_reverse_kl, ("alpha",)),
    "tvd": Loss(tvd),
}


def divergence(name: str, teacher_logp: Tensor, student_logp: Tensor, *, beta: float = 0.5,
               alpha: float = 0.1) -> Tensor:
    """Per-row divergence ``name`` between two log-distributions over the same buckets; the loss
    gets the parameters it reads (``LOSSES[name].params``)."""
    loss = LOSSES.get(name)
    if loss is None:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    given = {"beta": beta, "alpha": alpha}
    return loss.rows(teacher_logp, student_logp, **{p: given[p] for p in loss.params})


def kd_loss(name: str, student_logits: Tensor, *, teacher_logits: Tensor | None = None,
            topk_ids: Tensor | None = None, topk_logprobs: Tensor | None = None, temperature: float = 1.0,
            beta: float = 0.5, alpha: float = 0.1, reduction: str = "mean") -> Tensor:
    """T^2 * divergence, dense when ``teacher_logits`` is given, else sparse from the top-k."""
    if teacher_logits is not None:
        p, q = dense_logprobs(student_logits, teacher_logits, temperature)
    else:
        p, q = sparse_logprobs(student_logits, topk_ids, topk_logprobs, temperature)
    return reduce(divergence(name, p, q, beta=beta, alpha=alpha) * temperature**2, reduction)


__all__ = ["LOSSES", "Loss", "divergence", "kd_loss"]
