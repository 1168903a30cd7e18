r"""Reverse KL, KL(q_student || p_teacher): mode-seeking distillation.

Used by MiniLLM (Gu et al. 2024, arXiv 2306.08543) and as the beta = 1 end of GKD's generalized
JSD (Agarwal et al. 2024, arXiv 2306.13649).

    RKL = T^2 * sum_v q_T(v) * (log q_T(v) - log p_T(v))

The student is pushed to put its mass where the teacher is confident and may ignore some of the
teacher's modes: useful when the student cannot cover them all. Where the teacher gives a bucket
zero probability and the student does not, the loss is large but finite (the teacher's log p is
floored at ``_buckets.LOG_FLOOR``). Shapes, temperature and reduction as in ``forward_kl``.
"""

from __future__ import annotations

from torch import Tensor

from potstill.losses._buckets import kl_rows


def reverse_kl(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """Per-row KL(q || p) over the last dim."""
    return kl_rows(student_logp, teacher_logp)

