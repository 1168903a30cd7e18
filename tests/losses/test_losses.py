"""The top-k KD loss against plain reference formulas, its limits and its gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from potstill.losses import kd_loss


def sparse_forward_kl(s, ids, lp, temperature=1.0):
    return kd_loss("forward_kl", s, topk_ids=ids, topk_logprobs=lp, temperature=temperature)


def dense_forward_kl(s, teacher, temperature=1.0):
    return kd_loss("forward_kl", s, teacher_logits=teacher, temperature=temperature)


def reference_buckets(student_logits, topk_ids, topk_logprobs, t):
    """KL over k+1 buckets written out row by row with plain Python floats."""
    n, v = student_logits.shape
    k = topk_ids.shape[1]
    total = 0.0
    for r in range(n):
        q = torch.softmax(student_logits[r].double() / t, -1)
        ids = topk_ids[r].tolist()
        q_b = [q[i].item() for i in ids] + [1 - sum(q[i].item() for i in ids)]
        p1 = [math.exp(x) for x in topk_logprobs[r].tolist()]
        tail = max(1 - sum(p1), 0.0)
        w = [x ** (1 / t) for x in p1] + [(v - k) * (tail / (v - k)) ** (1 / t)]
        p_b = [x / sum(w) for x in w]
        total += sum(p * (math.log(p) - math.log(q)) for p, q in zip(p_b, q_b) if p > 0)
    return total / n * t * t


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_sparse_matches_reference_formula(t, k):
    g = torch.Generator().manual_seed(k)
    s = torch.randn(7, 45, generator=g) * 3
    teacher = (torch.randn(7, 45, generator=g) * 3).log_softmax(-1)
    lp, ids = teacher.topk(k, -1)
    got = sparse_forward_kl(s, ids, lp, temperature=t)
    assert got.item() == pytest.approx(reference_buckets(s, ids, lp, t), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_full_top_k_equals_dense_kl_div(t):
    g = torch.Generator().manual_seed(0)
    s, teacher = torch.randn(9, 32, generator=g), torch.randn(9, 32, generator=g) * 2
    lp, ids = teacher.log_softmax(-1).topk(32, -1)
    reference = F.kl_div((s / t).log_softmax(-1), (teacher / t).log_softmax(-1), log_target=True, reduction="batchmean") * t * t
    assert sparse_forward_kl(s, ids, lp, temperature=t).item() == pytest.approx(reference.item(), rel=1e-5)
    assert dense_forward_kl(s, teacher, temperature=t).item() == pytest.approx(reference.item(), rel=1e-5)


def test_uniform_tail_is_exact_at_any_temperature():
    """When the teacher's tail really is flat, the bucket form equals dense KL over the buckets."""
    v, k, t = 40, 6, 2.5
    g = torch.Generator().manual_seed(1)
    teacher = torch.zeros(5, v)
    head = torch.randn(5, k, generator=g) * 2 + 4
    teacher[:, :k] = head
    lp, ids = teacher.log_softmax(-1).topk(k, -1)
    s = torch.randn(5, v, generator=g)
    # dense KL between bucketed distributions: teacher softened over all v ids, student summed over the tail
    p = (teacher / t).softmax(-1)
    q = (s / t).softmax(-1)
    p_b = torch.cat([p.gather(-1, ids), 1 - p.gather(-1, ids).sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q.gather(-1, ids), 1 - q.gather(-1, ids).sum(-1, keepdim=True)], -1)
    reference = (p_b * (p_b.log() - q_b.log())).sum(-1).mean() * t * t
    assert sparse_forward_kl(s, ids, lp, temperature=t).item() == pytest.approx(reference.item(), rel=1e-4)


def test_zero_when_student_equals_teacher_and_positive_otherwise():
    teacher = torch.randn(4, 30).log_softmax(-1)
    lp, ids = teacher.topk(30, -1)
    assert sparse_forward_kl(teacher, ids, lp).item() == pytest.approx(0.0, abs=1e-6)
    assert sparse_forward_kl(torch.randn(4, 30), ids, lp).item() > 0


def test_gradient_matches_dense_and_is_finite_at_extremes():
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(6, 25, generator=g) * 4
    lp, ids = teacher.log_softmax(-1).topk(25, -1)
    s1 = torch.randn(6, 25, generator=g, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    sparse_forward_kl(s1, ids, lp, temperature=2.0).backward()
    dense_forward_kl(s2, teacher, temperature=2.0).backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)
    # near-certain teacher (zero tail), low and high temperatures, no rows at all
    lp1, ids1 = (teacher * 1000).log_softmax(-1).topk(3, -1)
    for t in (0.05, 1.0, 4.0):
        s = torch.randn(6, 25, requires_grad=True)
        loss = sparse_forward_kl(s, ids1, lp1, temperature=t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    empty = sparse_forward_kl(torch.zeros(0, 25), ids1[:0], lp1[:0])
    assert empty.item() == 0.0


@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_a_very_sure_student_keeps_its_loss_and_gradient(form):
    """log q = -150 where the teacher says 0.5: no floor may cut the value or the gradient."""
    student = torch.tensor([[0.0, -150.0]], dtype=torch.float64)
    teacher = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    ref_s = student.clone().requires_grad_(True)
    p, log_q = teacher.softmax(-1), ref_s.log_softmax(-1)
    (p * (p.log() - log_q)).sum().backward()  # float64, no clamps: 74.31, gradient q - p = [0.5, -0.5]

    x = student.float().requires_grad_(True)
    target = ({"teacher_logits": teacher.float()} if form == "dense" else
              {"topk_ids": torch.tensor([[0, 1]]), "topk_logprobs": teacher.float().log_softmax(-1)})
    loss = kd_loss("forward_kl", x, **target)
    loss.backward()
    assert loss.item() == pytest.approx(74.3069, rel=1e-5)
    assert torch.allclose(x.grad.double(), ref_s.grad, atol=1e-6)
