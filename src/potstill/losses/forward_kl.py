r"""Forward KL, KL(p_teacher || q_student): the classic distillation loss.

Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531).

    FKL = T^2 * sum_v p_T(v) * (log p_T(v) - log q_T(v))

p_T and q_T are teacher and student softened by the temperature T (softmax(logits / T)). The
T^2 factor keeps the gradient's scale independent of T (Hinton et al.), so ``kd_ratio`` means
the same at every temperature. Mass-covering: the student is pushed to put probability
wherever the teacher does.

Shapes (for every family, through ``losses.kd_loss``): student logits (N, V), rows already
restricted to completion tokens by the caller; dense form: teacher logits (N, V); sparse form:
the teacher's top-k ids and logprobs at T = 1, (N, k), plus one tail bucket for the rest (see
``_buckets.sparse_logprobs``). The per-row function below takes the two log-distributions over
the buckets, (N, B). Reduction over the N rows: "mean" (0 when N = 0), "sum" or "none".
"""

from __future__ import annotations

from torch import Tensor

from potstill.losses._buckets import kl_rows


def forward_kl(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """Per-row KL(p || q) over the last dim."""
    return kl_rows(teacher_logp, student_logp)

