r"""Skew KL and skew reverse KL with weight alpha, as in DistiLLM.

Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models"
(arXiv 2402.03898).

    SKL(a)  = T^2 * KL(p_T || a * p_T + (1 - a) * q_T)
    SRKL(a) = T^2 * KL(q_T || a * q_T + (1 - a) * p_T)

alpha = 0 gives forward KL (SKL) and reverse KL (SRKL); alpha -> 1 tends to 0. alpha = 1 itself is
refused: the divergence is then 0 whatever the student, a loss with nothing to learn from. Mixing a little of
the target distribution into the other keeps the divergence and its gradient bounded where one
side has almost no mass (DistiLLM uses alpha = 0.1). The mixture is formed in log space.
Shapes, temperature and reduction as in ``forward_kl``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from potstill.losses._buckets import kl_rows


def _check(alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), not {alpha}: at 1 the divergence is 0 whatever the student")


def _log_mix(a_logp: Tensor, b_logp: Tensor, alpha: float) -> Tensor:
    """log(alpha * a + (1 - alpha) * b)."""
    if alpha == 0.0:
        return b_logp
    return torch.logsumexp(torch.stack([a_logp + math.log(alpha), b_logp + math.log(1 - alpha)]), 0)


def skew_kl(teacher_logp: Tensor, student_logp: Tensor, alpha: float) -> Tensor:
    """Per-row KL(p || alpha p + (1 - alpha) q)."""
    _check(alpha)
    return kl_rows(teacher_logp, _log_mix(teacher_logp, student_logp, alpha))


def skew_reverse_kl(teacher_logp: Tensor, student_logp: Tensor, alpha: float) -> Tensor:
    """Per-row KL(q || alpha q + (1 - alpha) p)."""
    _check(alpha)
    return kl_rows(student_logp, _log_mix(student_logp, teacher_logp, alpha))

