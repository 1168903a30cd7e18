r"""Chunked KD + CE from hidden states: the (N, V) logits never exist all at once.

    loss = kd_ratio * T^2 * D(p_T || q_T) + (1 - kd_ratio) * CE(labels),   mean over N rows

The student's logits are its output head applied to its hidden states, exactly as the model
computes them (``Head``: weight, optional bias, scale, soft-cap; ``potstill.train.heads.output_head``
reads them off a model and checks them against its own logits). Rows are processed
``chunk_size`` at a time: each chunk's logits (chunk, V) are built, its loss and its gradients
with respect to the chunk's hidden states and to the head's weight and bias are computed at once
(inside the forward pass), and the chunk's logits are freed. Peak memory is O(chunk * V + V * H) instead of O(N * V) for logits,
their softmaxes and their gradients (the technique of Liger Kernel's fused linear losses and of
Cut Cross-Entropy, arXiv 2411.09009, written here in plain torch).

The teacher is either sparse (top-k ids + logprobs at T = 1, (N, k)) or dense from its own hidden
states and head (teacher_hidden (N, H_t), teacher_head a ``Head`` with weight (V, H_t)), also chunked. Values and
gradients equal the unchunked ``kd_loss`` + cross-entropy (tests check 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.losses import divergence
from potstill.losses._buckets import _wide, dense_logprobs, sparse_logprobs


@dataclass(frozen=True)
class Head:
    """An output head: logits = softcap(scale * (h @ weight.T + bias)), softcap(x) = c * tanh(x / c).

    weight (V, H); bias (V,) or None; scale a float (1 = none); softcap c or None.
    """

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
        """(..., H) -> (..., V). ``weight``/``bias`` stand in for the head's own (a leaf to take grads of)."""
        w = self.weight if weight is None else weight
        b = self.bias if bias is None else bias
        if dtype is not None:
            hidden, w, b = hidden.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        logits = F.linear(hidden, w, b)  # what nn.Linear computes, so the model's logits bit for bit
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def rows(self, n: int | None) -> Head:
        """The head of the first ``n`` ids only (all when None): the rows teacher and student share."""
        if n is None:
            return self
        return Head(self.weight[:n], None if self.bias is None else self.bias[:n], self.scale, self.softcap)


def _chunk_loss(student_logits, labels, teacher, spec):
    """Summed (not averaged) loss, CE and KD of one chunk."""
    # one float32 copy of the (chunk, V) logits, shared by CE and KD (half precision loses the tail)
    student_logits = _wide(student_logits)
    ce = F.cross_entropy(student_logits, labels, reduction="sum")
    if spec["kd_ratio"] == 0.0:
        return (1 - spec["kd_ratio"]) * ce, ce, torch.zeros_like(ce)
    t = spec["temperature"]
    if "topk_ids" in teacher:
        p, q = sparse_logprobs(student_logits, teacher["topk_ids"], teacher["topk_logprobs"], t)
    else:
        p, q = dense_logprobs(student_logits, teacher["teacher_logits"], t)
    kd = divergence(spec["name"], p, q, beta=spec["beta"], alpha=spec["alpha"]).sum() * t * t
    return spec["kd_ratio"] * kd + (1 - spec["kd_ratio"]) * ce, ce, kd


def _chunk_step(head, h, w, b, labels, part, spec):
    """One chunk: the student's logits from its head, the dense teacher's from its own (inputs
    detached, so no graph), then the summed loss, CE and KD. The unit ``torch.compile`` fuses."""
    if "teacher_hidden" in part:
        part = {"teacher_logits": spec["teacher_head"].logits(part["teacher_hidden"])}
    return _chunk_loss(head.logits(h, w, b), labels, part, spec)


_COMPILED: dict[str, object] = {}


def _step_function(compile: bool | str):
    """``_chunk_step``, or its ``torch.compile``d form (compile: True = inductor, or a backend name).
    Compiled once per process and backend; a chunk of another size (the last one) compiles once more,
    with the row count dynamic from then on, so micro-batches of any size reuse that graph."""
    if not compile:
        return _chunk_step
    backend = "inductor" if compile is True else compile
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(_chunk_step, backend=backend, fullgraph=True)
    return _COMPILED[backend]


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, head, labels, teacher_tensors, teacher_keys, spec, chunk_size, stats):
        teacher = dict(zip(teacher_keys, teacher_tensors))
        n = hidden.shape[0]
        # The head's weight and bias are one leaf each for every chunk: autocast caches the bf16
        # cast of a leaf that requires grad until its context exits (after the backward), so a new
        # leaf per chunk kept one (V, H) cast per chunk. A frozen head (LoRA) takes no gradient.
        w = weight.detach().requires_grad_(weight.requires_grad)
        b = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
        wrt = [t for t in (w, b) if t is not None and t.requires_grad]
        grad_hidden = torch.zeros_like(hidden)
        grad_head = [torch.zeros_like(t) for t in wrt]
        # (3,) running sums of loss, CE and KD, kept on the device: no host sync inside the loop
        sums = hidden.new_zeros(3, dtype=torch.float32)
        step = _step_function(spec["compile"])
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            with torch.enable_grad():
                h = hidden[start:end].detach().requires_grad_(True)
                part = {k: v[start:end] for k, v in teacher.items()}
                # the chunk's (chunk, V) logits live only inside this call and its backward
                loss, ce, kd = step(head, h, w, b, labels[start:end], part, spec)
                grads = torch.autograd.grad(loss, (h, *wrt))
            grad_hidden[start:end] = grads[0]
            for total, g in zip(grad_head, grads[1:], strict=True):
                total += g
            sums += torch.stack([loss.detach(), ce.detach(), kd.detach()]).float()
        scale = 1.0 / max(n, 1)
        ctx.head_grads = tuple(t is not None and t.requires_grad for t in (w, b))  # which of weight, bias get one
        ctx.save_for_backward(grad_hidden * scale, *(g * scale for g in grad_head))
        stats["ce"], stats["kd"] = sums[1] * scale, sums[2] * scale  # for logging: 0-dim tensors, no grad
        return sums[0] * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, *grad_head = ctx.saved_tensors
        grad_head = iter(grad_head)
        grad_weight, grad_bias = (next(grad_head) * grad_out if wanted else None for wanted in ctx.head_grads)
        return grad_hidden * grad_out, grad_weight, grad_bias, *([None] * 7)


def chunked_kd_loss(hidden: Tensor, head: Head | Tensor, labels: Tensor, *, name: str = "forward_kl",
                    topk_ids: Tensor | None = None, topk_logprobs: Tensor | None = None,
                    teacher_hidden: Tensor | None = None, teacher_head: Head | Tensor | None = None,
                    kd_ratio: float = 0.5, temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                    chunk_size: int = 1024, compile: bool | str = False) -> tuple[Tensor, Tensor, Tensor]:
    """hidden (N, H) of completion tokens, the student's head (a ``Head``, or a plain weight (V, H)),
    labels (N,). Returns (loss, ce, kd): the loss (a mean over N, differentiable in hidden and the
    head's weight and bias) and the mean CE and KD terms (0-dim tensors without grad: reading them
    is the caller's one host sync). ``compile`` runs each chunk's step through ``torch.compile``
    (True: inductor; or a backend name), which fuses the (chunk, V) softmaxes and divergences."""
    head = head if isinstance(head, Head) else Head(head)
    spec = {"name": name, "kd_ratio": kd_ratio, "temperature": temperature, "beta": beta, "alpha": alpha,
            "compile": compile}
    if topk_ids is not None:
        teacher = {"topk_ids": topk_ids, "topk_logprobs": topk_logprobs}
    elif teacher_hidden is not None:
        teacher = {"teacher_hidden": teacher_hidden.detach()}
        t_head = teacher_head if isinstance(teacher_head, Head) else Head(teacher_head)
        spec["teacher_head"] = Head(t_head.weight.detach(), None if t_head.bias is None else t_head.bias.detach(),
                                    t_head.scale, t_head.softcap)
    else:
        teacher = {}
        if kd_ratio:
            raise ValueError("kd_ratio > 0 needs a teacher: topk_ids/topk_logprobs or teacher_hidden/teacher_head")
    keys = tuple(teacher)
    # autograd.Function cannot take a dict of tensors: pass them as a tuple plus their names; the
    # head's weight and bias go in as inputs of their own, so autograd routes their gradients
    stats: dict[str, float] = {}
    loss = _ChunkedLoss.apply(hidden, head.weight, head.bias, head, labels, tuple(teacher.values()), keys, spec,
                              chunk_size, stats)
    return loss, stats["ce"], stats["kd"]
