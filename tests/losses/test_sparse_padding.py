"""Padded top-k rows (fewer ids than k: the row's first id repeated at logprob -inf, as cross-tokenizer
targets are) are no buckets: the loss equals the shorter row's; rows without padding give the same
bits as before padding was read."""

import math

import pytest
import torch

from potstill.losses import LOSSES, divergence, kd_loss
from potstill.losses._buckets import LOG_FLOOR, NEG, _student, _wide, sparse_logprobs
from potstill.losses.chunked import chunked_kd_loss


def sparse_logprobs_before_padding(student_logits, topk_ids, topk_logprobs, temperature):
    """``sparse_logprobs`` as it was before it read padding, for the bit-for-bit comparison."""
    t = temperature
    n_vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    ids = topk_ids.long()
    s = _wide(student_logits) / t
    log_z = s.logsumexp(-1, keepdim=True)
    s_top = s.gather(-1, ids) - log_z
    s_tail = s.scatter(-1, ids, NEG).logsumexp(-1, keepdim=True) - log_z
    student_logp = _student(torch.cat([s_top, s_tail], -1))
    lp = _wide(topk_logprobs).to(s.dtype).clamp_min(LOG_FLOOR)
    n_tail = n_vocab - k
    if n_tail > 0:
        tail_mass = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(0.0)
        tail_weight = math.log(n_tail) + (tail_mass.clamp_min(1e-30).log() - math.log(n_tail)) / t
    else:
        tail_weight = torch.full_like(lp[:, :1], LOG_FLOOR)
    teacher_logp = torch.cat([lp / t, tail_weight], -1).log_softmax(-1).clamp_min(LOG_FLOOR)
    return teacher_logp, student_logp


def _targets(n, v, k, seed, dtype=torch.float32, sentinels=True):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, v, generator=g) * 3).requires_grad_()
    lp, ids = (torch.randn(n, v, generator=g) * 3).log_softmax(-1).topk(k, -1)
    if sentinels and k > 2:  # what caches hold: -inf and OpenAI's -9999 at distinct ids (not padding)
        lp[0, -1], lp[1 % n, -2] = -math.inf, -9999.0
    return student, ids.to(torch.int32), lp.to(dtype)


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
@pytest.mark.parametrize(("v", "k"), [(50, 5), (50, 20), (12, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_without_padding_give_the_same_bits(t, v, k, dtype):
    student, ids, lp = _targets(9, v, k, seed=k, dtype=dtype)
    new = sparse_logprobs(student, ids, lp, t)
    old = sparse_logprobs_before_padding(student, ids, lp, t)
    assert all(torch.equal(a, b) for a, b in zip(new, old))
    for name in LOSSES:
        grads = []
        for function in (sparse_logprobs, sparse_logprobs_before_padding):
            p, q = function(student, ids, lp, t)
            loss = divergence(name, p, q, alpha=0.1).sum()
            grads.append((loss, torch.autograd.grad(loss, student)[0]))
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1]), name


def _pad(ids, lp, real: list[int]):
    """Row r keeps its first real[r] entries; the rest repeat its first id at -inf."""
    ids, lp = ids.clone(), lp.clone()
    for r, n in enumerate(real):
        ids[r, n:], lp[r, n:] = ids[r, 0], -math.inf
    return ids, lp


def by_hand_forward_kl(student_logits, ids, lp, t):
    """KL over the row's k' real buckets + the tail, the teacher's tail spread over V - k' ids."""
    v = student_logits.shape[-1]
    q = torch.softmax(student_logits.double() / t, -1).tolist()
    p1 = [math.exp(x) for x in lp]
    tail = max(1 - sum(p1), 0.0)
    w = [x ** (1 / t) for x in p1] + [(v - len(ids)) * (tail / (v - len(ids))) ** (1 / t)]
    p_b = [x / sum(w) for x in w]
    q_b = [q[i] for i in ids] + [1 - sum(q[i] for i in ids)]
    return t * t * sum(p * (math.log(p) - math.log(qq)) for p, qq in zip(p_b, q_b) if p > 0)


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_a_padded_row_is_the_shorter_row(t):
    v, k, real = 40, 8, [8, 5, 1, 3, 8, 2]
    student, ids, lp = _targets(len(real), v, k, seed=3, sentinels=False)
    padded_ids, padded_lp = _pad(ids, lp, real)
    per_row = kd_loss("forward_kl", student, topk_ids=padded_ids, topk_logprobs=padded_lp, temperature=t,
                      reduction="none")
    for r, n in enumerate(real):
        expected = by_hand_forward_kl(student[r].detach(), ids[r, :n].tolist(), lp[r, :n].tolist(), t)
        assert per_row[r].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        p, q = sparse_logprobs(student[r:r + 1], padded_ids[r:r + 1], padded_lp[r:r + 1], t)
        assert (p[0, n:k] == NEG).all() and (q[0, n:k] == NEG).all()  # no bucket on either side
        assert p.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    for name in LOSSES:
        for r, n in enumerate(real):
            rows = slice(r, r + 1)
            padded = kd_loss(name, student[rows], topk_ids=padded_ids[rows], topk_logprobs=padded_lp[rows],
                             temperature=t)
            short = kd_loss(name, student[rows], topk_ids=ids[rows, :n], topk_logprobs=lp[rows, :n], temperature=t)
            g_padded, g_short = (torch.autograd.grad(x, student)[0] for x in (padded, short))
            assert padded.item() == pytest.approx(short.item(), rel=1e-5, abs=1e-6), (name, n)
            assert torch.allclose(g_padded, g_short, atol=1e-6), (name, n)


def test_unpadded_rows_beside_padded_ones_keep_their_bits():
    student, ids, lp = _targets(6, 30, 6, seed=5)
    padded_ids, padded_lp = _pad(ids, lp, [6, 2, 6, 6, 1, 6])
    p, q = sparse_logprobs(student, padded_ids, padded_lp, 2.0)
    p_old, q_old = sparse_logprobs_before_padding(student, ids, lp, 2.0)
    keep = [0, 2, 3, 5]
    assert torch.equal(p[keep], p_old[keep]) and torch.equal(q[keep], q_old[keep])


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd"])
def test_chunked_reads_padding_as_the_unchunked_loss_does(name):
    g = torch.Generator().manual_seed(0)
    n, h, v, k = 13, 8, 45, 6
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    lp, ids = (torch.randn(n, v, generator=g) * 2).log_softmax(-1).topk(k, -1)
    ids, lp = _pad(ids, lp, [(r % k) + 1 for r in range(n)])
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logits = h1 @ w1.T
    kd = kd_loss(name, logits, topk_ids=ids, topk_logprobs=lp, temperature=2.0)
    ref = 0.6 * kd + 0.4 * torch.nn.functional.cross_entropy(logits, labels)
    ref.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    got, _, _ = chunked_kd_loss(h2, w2, labels, name=name, topk_ids=ids, topk_logprobs=lp, kd_ratio=0.6,
                                temperature=2.0, chunk_size=4)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5) and torch.allclose(w1.grad, w2.grad, atol=1e-5)
