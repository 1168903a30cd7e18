"""Chunked loss from hidden states equals the unchunked loss, in value and in gradients."""

import pytest
import torch
import torch.nn.functional as F

from potstill.losses import LOSSES, kd_loss
from potstill.losses.chunked import chunked_kd_loss


def unchunked(hidden, weight, labels, kd_ratio, name, temp, **teacher):
    logits = hidden @ weight.T
    ce = F.cross_entropy(logits, labels)
    kd = kd_loss(name, logits, temperature=temp, **teacher)
    return kd_ratio * kd + (1 - kd_ratio) * ce, ce, kd


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("teacher_kind", ["sparse", "dense"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_equals_unchunked(name, teacher_kind, chunk):
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 101
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    t_hidden, t_weight = torch.randn(n, 24, generator=g), torch.randn(v, 24, generator=g) * 0.5
    if teacher_kind == "sparse":
        lp, ids = (t_hidden @ t_weight.T).log_softmax(-1).topk(10, -1)
        ref_teacher = chunk_teacher = {"topk_ids": ids, "topk_logprobs": lp}
    else:
        ref_teacher = {"teacher_logits": t_hidden @ t_weight.T}
        chunk_teacher = {"teacher_hidden": t_hidden, "teacher_head": t_weight}
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref, ref_ce, ref_kd = unchunked(h1, w1, labels, 0.7, name, 2.0, **ref_teacher)
    ref.backward()
    got, ce, kd = chunked_kd_loss(h2, w2, labels, name=name, kd_ratio=0.7, temperature=2.0, chunk_size=chunk, **chunk_teacher)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-5) and kd.item() == pytest.approx(ref_kd.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(h2.grad, h1.grad, atol=1e-5) and torch.allclose(w2.grad, w1.grad, atol=1e-5)


def test_no_rows_and_cross_entropy_only():
    w = torch.randn(11, 4, requires_grad=True)
    loss, ce, kd = chunked_kd_loss(torch.zeros(0, 4), w, torch.zeros(0, dtype=torch.long), kd_ratio=0.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(w.grad).all()
    with pytest.raises(ValueError, match="needs a teacher"):
        chunked_kd_loss(torch.zeros(2, 4), w, torch.zeros(2, dtype=torch.long), kd_ratio=0.5)


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_reverse_kl"])
@pytest.mark.parametrize("teacher_kind", ["sparse", "dense"])
def test_the_compiled_step_traces_whole_and_gives_the_same_loss(name, teacher_kind):
    """torch.compile's tracer (the eager backend: no code generation, so seconds, not minutes) takes
    each chunk's step as one graph (fullgraph: a graph break would raise) and changes nothing."""
    from potstill.losses.chunked import Head

    g = torch.Generator().manual_seed(1)
    n, h, v = 29, 8, 53
    hidden, labels = torch.randn(n, h, generator=g), torch.randint(0, v, (n,), generator=g)
    head = Head(torch.randn(v, h, generator=g) * 0.3, torch.randn(v, generator=g), scale=0.5, softcap=5.0)
    t_hidden = torch.randn(n, 12, generator=g)
    t_head = Head(torch.randn(v, 12, generator=g) * 0.5, None, 1.0, 3.0)
    teacher = ({"teacher_hidden": t_hidden, "teacher_head": t_head} if teacher_kind == "dense" else
               dict(zip(("topk_logprobs", "topk_ids"), t_head.logits(t_hidden).log_softmax(-1).topk(6, -1))))
    torch._dynamo.reset()  # each parametrization is a new spec: start from an empty compile cache
    results = []
    for compile in (False, "eager"):
        x, w, b = (t.clone().requires_grad_(True) for t in (hidden, head.weight, head.bias))
        loss, ce, kd = chunked_kd_loss(x, Head(w, b, head.scale, head.softcap), labels, name=name, chunk_size=8,
                                       temperature=2.0, compile=compile, **teacher)
        loss.backward()
        results.append([loss, ce, kd, x.grad, w.grad, b.grad])
    for plain, compiled in zip(*results):
        assert torch.allclose(plain, compiled, atol=1e-6)
    # micro-batches of other sizes reuse the graph: the row count becomes dynamic after one recompile
    for rows in (5, 11, 17, 23):
        chunked_kd_loss(hidden[:rows].clone().requires_grad_(True), head, labels[:rows], name=name, chunk_size=8,
                        compile="eager", **{k: v[:rows] if k != "teacher_head" else v for k, v in teacher.items()})


@pytest.mark.parametrize("teacher_kind", ["sparse", "dense"])
def test_a_half_precision_chunk_is_widened_to_float32_once(teacher_kind):
    """CE and KD read the same float32 copy of a bf16 chunk's (chunk, V) student logits: each extra
    copy is chunk x V x 4 bytes more at the peak, and one more pass over memory."""
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(2)
    n, h, v, chunk = 12, 8, 97, 4
    hidden = torch.randn(n, h, generator=g).bfloat16().requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) * 0.3).bfloat16().requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    t_hidden, t_weight = torch.randn(n, 8, generator=g).bfloat16(), torch.randn(v, 8, generator=g).bfloat16()
    teacher = ({"teacher_hidden": t_hidden, "teacher_head": t_weight} if teacher_kind == "dense" else
               dict(zip(("topk_logprobs", "topk_ids"), (t_hidden.float() @ t_weight.float().T).log_softmax(-1).topk(5, -1))))

    class Widenings(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (func is torch.ops.aten._to_copy.default and args[0].dtype == torch.bfloat16
                    and out.dtype == torch.float32 and tuple(out.shape) == (chunk, v) and args[0].requires_grad):
                Widenings.count += 1
            return out

    with Widenings():
        loss, _, _ = chunked_kd_loss(hidden, weight, labels, kd_ratio=0.5, chunk_size=chunk, **teacher)
    assert Widenings.count == n // chunk  # the student's logits, once a chunk (the teacher's have no grad)
    loss.backward()
    assert torch.isfinite(hidden.grad.float()).all()


def test_under_autocast_the_head_is_cast_once_whatever_the_number_of_chunks():
    """autocast caches the bf16 cast of a leaf that requires grad until its context exits: were the
    head a new leaf each chunk, one (V, H) cast per chunk would stay alive to the backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(3)
    n, h, v, chunk = 12, 8, 97, 2
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 0.3).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)

    class HeadCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32
                    and out.dtype == torch.bfloat16 and tuple(out.shape) == (v, h)):
                HeadCasts.count += 1
            return out

    with HeadCasts(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = chunked_kd_loss(hidden, weight, labels, kd_ratio=0.0, chunk_size=chunk)
    assert HeadCasts.count == 1  # n / chunk = 6 before
    loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _, _ = chunked_kd_loss(hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True), labels,
                                    kd_ratio=0.0, chunk_size=n)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_the_same_one(bias):
    """LoRA freezes the head: the chunked loss then computes no (V, H) gradient for it (autograd
    would drop one, but only after each chunk had paid for it: counted here as (V, H) products)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HeadGradients(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.mm.default and tuple(out.shape) == (v, h):
                HeadGradients.count += 1
            return out

    g = torch.Generator().manual_seed(4)
    n, h, v = 9, 6, 31
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    b = torch.randn(v, generator=g) * 0.1 if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    lp, ids = torch.randn(n, v, generator=g).log_softmax(-1).topk(5, -1)
    from potstill.losses.chunked import Head

    grads = []
    for trained in (True, False):
        x = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(trained)
        bb = None if b is None else b.clone().requires_grad_(trained)
        HeadGradients.count = 0
        with HeadGradients():
            loss, _, _ = chunked_kd_loss(x, Head(w, bb), labels, topk_ids=ids, topk_logprobs=lp, chunk_size=4)
        assert HeadGradients.count == (3 if trained else 0)  # one a chunk
        loss.backward()
        assert (w.grad is not None) == trained and (bb is None or (bb.grad is not None) == trained)
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
