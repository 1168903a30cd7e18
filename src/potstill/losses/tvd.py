r"""Total variation distance between teacher and student.

Used as a distillation objective in DistiLLM's comparisons (Ko et al. 2024, arXiv 2402.03898)
and Wen et al. 2023, "f-Divergence Minimization for Sequence-Level Knowledge Distillation"
(arXiv 2307.15190).

    TVD = T^2 * 0.5 * sum_v |p_T(v) - q_T(v)|

Bounded in [0, T^2]; symmetric. The T^2 factor is kept for every loss in this package so that
switching loss does not silently rescale ``kd_ratio`` at T != 1. Shapes and reduction as in
``forward_kl``.
"""

from __future__ import annotations

from torch import Tensor


def tvd(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """Per-row 0.5 * sum |p - q| over the last dim."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)

