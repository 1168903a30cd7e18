"""Every KD loss against a plain reference (F.kl_div / log_softmax), its limits, and NaN safety."""

import pytest
import torch
import torch.nn.functional as F

from potstill.losses import LOSSES, kd_loss


def kl(p_logp, q_logp):
    """KL(p || q) summed over the vocabulary, mean over rows, written with F.kl_div."""
    return F.kl_div(q_logp, p_logp, log_target=True, reduction="batchmean")


def reference(name, s, t, temp, beta=0.5, alpha=0.1):
    p, q = (t / temp).log_softmax(-1), (s / temp).log_softmax(-1)
    if name == "forward_kl":
        out = kl(p, q)
    elif name == "reverse_kl":
        out = kl(q, p)
    elif name == "jsd":
        m = (beta * p.exp() + (1 - beta) * q.exp()).log()
        out = beta * kl(p, m) + (1 - beta) * kl(q, m)
    elif name == "skew_kl":
        out = kl(p, (alpha * p.exp() + (1 - alpha) * q.exp()).log())
    elif name == "skew_reverse_kl":
        out = kl(q, (alpha * q.exp() + (1 - alpha) * p.exp()).log())
    else:
        out = 0.5 * (p.exp() - q.exp()).abs().sum(-1).mean()
    return out * temp**2


def inputs(seed, n=8, v=50):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * 2, torch.randn(n, v, generator=g, dtype=torch.float64) * 3


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_dense_and_full_sparse_equal_the_reference(name, temp):
    s, t = inputs(hash(name) % 1000)
    ref = reference(name, s, t, temp, beta=0.3, alpha=0.2).item()
    dense = kd_loss(name, s, teacher_logits=t, temperature=temp, beta=0.3, alpha=0.2).item()
    lp, ids = t.log_softmax(-1).topk(50, -1)  # k = V: the sparse form has nothing to approximate
    sparse = kd_loss(name, s, topk_ids=ids, topk_logprobs=lp, temperature=temp, beta=0.3, alpha=0.2).item()
    assert dense == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert sparse == pytest.approx(ref, rel=1e-5, abs=1e-7)


def test_beta_and_alpha_limits():
    s, t = inputs(7)
    loss = lambda name, **kw: kd_loss(name, s, teacher_logits=t, **kw).item()  # noqa: E731
    assert loss("jsd", beta=0.0) == pytest.approx(loss("forward_kl"), rel=1e-6)
    assert loss("jsd", beta=1.0) == pytest.approx(loss("reverse_kl"), rel=1e-6)
    # the scaled mixture tends to the same ends continuously
    assert loss("jsd", beta=1e-6) / 1e-6 == pytest.approx(loss("forward_kl"), rel=2e-3)
    assert loss("jsd", beta=1 - 1e-6) / 1e-6 == pytest.approx(loss("reverse_kl"), rel=2e-3)
    assert loss("skew_kl", alpha=0.0) == pytest.approx(loss("forward_kl"), rel=1e-6)
    assert loss("skew_reverse_kl", alpha=0.0) == pytest.approx(loss("reverse_kl"), rel=1e-6)
    assert loss("skew_kl", alpha=1 - 1e-6) == pytest.approx(0.0, abs=1e-5)
    # symmetric JSD at beta = 0.5 is bounded by log 2
    assert loss("jsd", beta=0.5) <= torch.log(torch.tensor(2.0)).item()


@pytest.mark.parametrize("name", LOSSES)
def test_zero_at_equality_and_gradients_match_dense(name):
    s, t = inputs(3)
    assert kd_loss(name, t, teacher_logits=t).item() == pytest.approx(0.0, abs=1e-7)
    lp, ids = t.log_softmax(-1).topk(50, -1)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    kd_loss(name, a, teacher_logits=t, temperature=2.0).backward()
    kd_loss(name, b, topk_ids=ids, topk_logprobs=lp, temperature=2.0).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-9)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sentinels_masked_rows_and_extreme_temperatures_stay_finite(name, dtype):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(6, 40, generator=g) * 5).to(dtype)
    t = torch.randn(6, 40, generator=g) * 5
    t[0, :20] = float("-inf")  # masked vocabulary rows in the teacher
    t[1, :] = -9999.0
    t[1, 3] = 0.0  # a one-hot teacher written with the vLLM sentinel
    lp, ids = t.log_softmax(-1).topk(5, -1)
    lp[2, 2:] = float("-inf")  # missing entries of an API teacher's top-k
    for temp in (0.05, 1.0, 4.0):
        for target in ({"teacher_logits": t.to(dtype)}, {"topk_ids": ids, "topk_logprobs": lp.to(dtype)}):
            x = s.clone().requires_grad_(True)
            loss = kd_loss(name, x, temperature=temp, **target)
            loss.backward()
            assert torch.isfinite(loss), (name, temp, target.keys())
            assert torch.isfinite(x.grad).all(), (name, temp, target.keys())
    empty = kd_loss(name, s[:0], topk_ids=ids[:0], topk_logprobs=lp[:0])
    assert empty.item() == 0.0


def test_unknown_loss_and_bad_weights_are_refused():
    s, t = inputs(1)
    with pytest.raises(ValueError, match="unknown loss 'kl'"):
        kd_loss("kl", s, teacher_logits=t)
    with pytest.raises(ValueError, match="beta must be in"):
        kd_loss("jsd", s, teacher_logits=t, beta=1.5)
    # alpha = 1 mixes the target into itself: the divergence is 0 whatever the student, so a
    # KD-only step would have no gradient at all (it crashed in backward); refused, as by the recipe
    for name in ("skew_kl", "skew_reverse_kl"):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
            kd_loss(name, s, teacher_logits=t, alpha=1.0)


def test_the_recipe_refuses_alpha_1_as_the_loss_does():
    from potstill.recipe import TrainSpec
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="less than 1"):
        TrainSpec(loss="skew_kl", alpha=1.0)
