r"""Chunked KD + CE from hidden states: the (N, V) logits never exist all at once.

    loss = kd_ratio * T^2 * D(p_T || q_T) + (1 - kd_ratio) * CE(labels),   mean over N rows

The student's logits are ``hidden @ weight.T``. Rows are processed ``chunk_size`` at a time:
each chunk's logits (chunk, V) are built, its loss and its gradients with respect to the chunk's
hidden states and to the head weight are computed at once (inside the forward pass), and the
chunk's logits are freed. Peak memory is O(chunk * V + V * H) instead of O(N * V) for logits,
their softmaxes and their gradients (the technique of Liger Kernel's fused linear losses and of
Cut Cross-Entropy, arXiv 2411.09009, written here in plain torch).

The teacher is either sparse (top-k ids + logprobs at T = 1, (N, k)) or dense from its own hidden
states and head (teacher_hidden (N, H_t), teacher_weight (V, H_t)), also chunked. Values and
gradients equal the unchunked ``kd_loss`` + cross-entropy (tests check 1e-5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.losses import divergence
from potstill.losses._buckets import dense_logprobs, sparse_logprobs


def _chunk_loss(student_logits, labels, teacher, spec):
    """Summed (not averaged) loss, CE and KD of one chunk."""
    ce = F.cross_entropy(student_logits.float(), labels, reduction="sum")
    if spec["kd_ratio"] == 0.0:
        return (1 - spec["kd_ratio"]) * ce, ce, torch.zeros_like(ce)
    t = spec["temperature"]
    if "topk_ids" in teacher:
        p, q = sparse_logprobs(student_logits, teacher["topk_ids"], teacher["topk_logprobs"], t)
    else:
        p, q = dense_logprobs(student_logits, teacher["teacher_logits"], t)
    kd = divergence(spec["name"], p, q, beta=spec["beta"], alpha=spec["alpha"]).sum() * t * t
    return spec["kd_ratio"] * kd + (1 - spec["kd_ratio"]) * ce, ce, kd


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, teacher_tensors, teacher_keys, spec, chunk_size, stats):
        teacher = dict(zip(teacher_keys, teacher_tensors))
        n = hidden.shape[0]
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight)
        total = hidden.new_zeros((), dtype=torch.float32)
        ce_sum, kd_sum = 0.0, 0.0
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            with torch.enable_grad():
                h = hidden[start:end].detach().requires_grad_(True)
                w = weight.detach().requires_grad_(True)
                part = {k: v[start:end] for k, v in teacher.items() if k != "teacher_head"}
                if "teacher_hidden" in teacher:  # dense teacher: its logits are chunked too, no grad
                    with torch.no_grad():
                        part = {"teacher_logits": part.pop("teacher_hidden") @ teacher["teacher_head"].T}
                logits = h @ w.T  # (chunk, V), freed at the end of this iteration
                loss, ce, kd = _chunk_loss(logits, labels[start:end], part, spec)
                gh, gw = torch.autograd.grad(loss, (h, w))
            grad_hidden[start:end] = gh
            grad_weight += gw
            total += loss.detach()
            ce_sum += ce.item()
            kd_sum += kd.item()
        scale = 1.0 / max(n, 1)
        ctx.save_for_backward(grad_hidden * scale, grad_weight * scale)
        stats["ce"], stats["kd"] = ce_sum * scale, kd_sum * scale  # for logging: plain floats
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, grad_weight * grad_out, None, None, None, None, None, None


def chunked_kd_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, name: str = "forward_kl",
                    topk_ids: Tensor | None = None, topk_logprobs: Tensor | None = None,
                    teacher_hidden: Tensor | None = None, teacher_weight: Tensor | None = None,
                    kd_ratio: float = 0.5, temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                    chunk_size: int = 1024) -> tuple[Tensor, float, float]:
    """hidden (N, H) of completion tokens, weight (V, H), labels (N,). Returns (loss, ce, kd):
    the loss (a mean over N, differentiable in hidden and weight) and the mean CE and KD terms."""
    if topk_ids is not None:
        teacher = {"topk_ids": topk_ids, "topk_logprobs": topk_logprobs}
    elif teacher_hidden is not None:
        teacher = {"teacher_hidden": teacher_hidden.detach(), "teacher_head": teacher_weight.detach()}
    else:
        teacher = {}
        if kd_ratio:
            raise ValueError("kd_ratio > 0 needs a teacher: topk_ids/topk_logprobs or teacher_hidden/teacher_weight")
    spec = {"name": name, "kd_ratio": kd_ratio, "temperature": temperature, "beta": beta, "alpha": alpha}
    keys = tuple(teacher)
    # autograd.Function cannot take a dict of tensors: pass them as a tuple plus their names
    stats: dict[str, float] = {}
    loss = _ChunkedLoss.apply(hidden, weight, labels, tuple(teacher.values()), keys, spec, chunk_size, stats)
    return loss, stats["ce"], stats["kd"]
