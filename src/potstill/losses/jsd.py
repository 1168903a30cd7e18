r"""Generalized Jensen-Shannon divergence with weight beta, as in GKD.

Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes" (GKD, arXiv 2306.13649); the same definition as TRL's ``generalized_jsd_loss``.

    M       = beta * p_T + (1 - beta) * q_T
    JSD(b)  = T^2 * [ beta * KL(p_T || M) + (1 - beta) * KL(q_T || M) ]      0 < beta < 1
    JSD(0)  = forward KL(p_T || q_T),   JSD(1) = reverse KL(q_T || p_T)       (by definition)

For 0 < beta < 1 the value is bounded (by log 2 at beta = 0.5); as beta -> 0, JSD(beta) / beta
tends to the forward KL, and as beta -> 1, JSD(beta) / (1 - beta) to the reverse KL. log M is
computed in log space (logsumexp), never as the log of a sum of probabilities. Shapes,
temperature and reduction as in ``forward_kl``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from potstill.losses._buckets import kl_rows


def generalized_jsd(teacher_logp: Tensor, student_logp: Tensor, beta: float) -> Tensor:
    """Per-row JSD(beta) over the last dim."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], not {beta}")
    if beta == 0.0:
        return kl_rows(teacher_logp, student_logp)
    if beta == 1.0:
        return kl_rows(student_logp, teacher_logp)
    mix = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), 0)
    return beta * kl_rows(teacher_logp, mix) + (1 - beta) * kl_rows(student_logp, mix)

