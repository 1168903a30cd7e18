"""The watermark's statistics: exact binomial tails against scipy, the each-pair-once rule, the
p-values of transformers' WatermarkDetector corrected, and green lists that do not depend on the
device or on any global random state."""

import hashlib
import math

import numpy as np
import pytest
import torch
from scipy import stats

from potstill.watermark import Watermark, scored_pairs
from potstill.audit import binom_sf, binomial_test, holm, log_binom_sf, score_pairs
from potstill.errors import PotstillError

KEY = b"0123456789abcdef-test-key"


@pytest.mark.parametrize("n,p", [(1, 0.25), (10, 0.5), (50, 0.25), (100, 0.1), (400, 0.25), (3000, 0.5), (20000, 0.25)])
def test_binomial_tail_is_scipys(n, p):
    for k in sorted({0, 1, int(n * p), int(n * p) + 1, int(n * p + 3 * math.sqrt(n)), (n + int(n * p)) // 2, n}):
        assert binom_sf(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-300)
        expected = stats.binom.logsf(k - 1, n, p)
        if np.isfinite(expected):
            assert log_binom_sf(k, n, p) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_tail_far_below_double_range_keeps_its_exponent():
    # 9000 green of 20000 at gamma 0.25: p ~ 1e-818, which scipy and exp() give as 0
    assert stats.binom.sf(8999, 20000, 0.25) == 0.0
    lsf = log_binom_sf(9000, 20000, 0.25)
    # past the mode the terms fall at least geometrically, by r = pmf(k+1)/pmf(k) at most, so the
    # tail lies between pmf(k) and pmf(k)/(1-r): scipy's log pmf bounds it both ways
    r = (20000 - 9000) / 9001 * 0.25 / 0.75
    low = stats.binom.logpmf(9000, 20000, 0.25)
    assert low <= lsf <= low - math.log1p(-r)
    assert binomial_test(9000, 20000, 0.25).log10_p < -800


def _ids_with_green_count(detector, vocab: int, n: int, green: int, seed: int = 0) -> torch.Tensor:
    """n + 1 ids whose n (previous token, token) windows are distinct and exactly ``green`` of them
    green by the transformers detector's own green lists."""
    rng = np.random.default_rng(seed)
    ids, seen = [int(rng.integers(vocab - 1))], set()
    for i in range(n):
        greens = set(detector.processor._get_greenlist_ids(torch.tensor([ids[-1]])).tolist())
        want_green = i < green
        while True:
            t = int(rng.integers(vocab - 1))
            if (t in greens) == want_green and (ids[-1], t) not in seen:
                break
        seen.add((ids[-1], t))
        ids.append(t)
    return torch.tensor([ids])


@pytest.mark.parametrize("n,green,z", [(100, 51, 6.0), (100, 60, 8.08)])
def test_transformers_detector_p_values_are_corrected(n, green, z):
    """transformers' WatermarkDetector turns z into a normal tail (older versions into a formula
    without a square root, 18x off at z=6 and 0 at z=8): at 100 tokens its p-value is 20x to 400x
    smaller than the exact binomial tail, i.e. it claims evidence it does not have. Ours is the
    exact tail, on the same counts."""
    from transformers import LlamaConfig, WatermarkingConfig
    from transformers.generation.watermarking import WatermarkDetector

    vocab = 1000
    config = LlamaConfig(vocab_size=vocab, bos_token_id=vocab - 1)  # never among the ids drawn
    detector = WatermarkDetector(config, "cpu", WatermarkingConfig(greenlist_ratio=0.25, context_width=1,
                                                                   seeding_scheme="lefthash"),
                                 ignore_repeated_ngrams=True)
    out = detector(_ids_with_green_count(detector, vocab, n, green), return_dict=True)
    assert (out.num_tokens_scored[0], out.num_green_tokens[0]) == (n, green)
    assert out.z_score[0] == pytest.approx(z, abs=0.01)
    exact = stats.binom.sf(green - 1, n, 0.25)
    ours = binomial_test(green, n, 0.25)
    assert ours.p_value == pytest.approx(exact, rel=1e-9)
    assert ours.z == pytest.approx(out.z_score[0])
    assert out.p_value[0] < exact / 20  # theirs is anti-conservative by more than an order of magnitude


def test_each_pair_counts_once():
    w = Watermark(KEY, gamma=0.25)
    green = next(t for t in range(100) if w.is_green((7,), t))
    red = next(t for t in range(100) if not w.is_green((7,), t))
    text = [7, green] * 50 + [7, red]  # one green window repeated 50 times
    pairs = scored_pairs([text], context=1)
    dup = score_pairs(pairs, w.is_green, 0.25, dedup=False)
    once = score_pairs(pairs, w.is_green, 0.25)
    assert dup.p_value < 1e-6  # the repeat alone looks like overwhelming evidence
    assert (once.tokens, once.green) == (3, 1)  # (7, green), (green, 7), (7, red)
    assert once.p_value == pytest.approx(stats.binom.sf(0, 3, 0.25))
    assert once.repeats_dropped == len(pairs) - 3


def test_null_false_positive_rate_is_within_its_interval_only_with_the_tape():
    """Text written without the key, with the repetition real text has (looping answers): over 200
    keys, the each-pair-once test rejects at alpha = 0.01 within the binomial 99.9% interval; counting
    repeats rejects far more often."""
    rng = np.random.default_rng(0)
    text = []
    for _ in range(20):  # 20 short loops, each repeated 10 times: 200 windows, 40ish distinct
        loop = rng.integers(0, 500, size=3).tolist()
        text += loop * 10
    pairs = scored_pairs([text], context=1)
    runs, alpha = 200, 0.01
    p_once = [score_pairs(pairs, Watermark(KEY + bytes([i, j]), 0.25).is_green, 0.25).p_value
              for i in range(20) for j in range(10)]
    p_dup = [score_pairs(pairs, Watermark(KEY + bytes([i, j]), 0.25).is_green, 0.25, dedup=False).p_value
             for i in range(20) for j in range(10)]
    upper = stats.binom.ppf(0.9995, runs, alpha)
    assert sum(p < alpha for p in p_once) <= upper
    assert sum(p < alpha for p in p_dup) > 3 * upper


def test_null_p_values_are_uniform_on_fresh_text():
    """Distinct pairs and random keys: p-values are Uniform(0,1) up to the binomial's discreteness,
    so P(p <= a) <= a, and the KS test does not reject a continuity-corrected (randomized) version."""
    rng = np.random.default_rng(1)
    text = rng.integers(0, 30000, size=400).tolist()
    pairs = scored_pairs([text], context=1)
    scores = [score_pairs(pairs, Watermark(KEY + i.to_bytes(2, "little"), 0.25).is_green, 0.25) for i in range(300)]
    # randomized p-value: uniform exactly under the null
    u = rng.random(len(scores))
    randomized = [s.p_value - u[i] * (s.p_value - binom_sf(s.green + 1, s.tokens, 0.25)) for i, s in enumerate(scores)]
    assert stats.kstest(randomized, "uniform").pvalue > 0.001
    for a in (0.01, 0.05, 0.2):
        assert np.mean([s.p_value <= a for s in scores]) <= stats.binom.ppf(0.9995, 300, a) / 300


def test_holm_matches_its_definition():
    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    # sorted: 0.005*5=0.025, 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08 -> 0.09 (monotone), 0.5*1=0.5
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.5])
    assert holm([1e-8] * 3) == pytest.approx([3e-8] * 3)


def test_green_lists_depend_on_the_key_only():
    """Same ids every time, whatever torch's or numpy's global random state; about gamma of the
    vocabulary is green; a pinned digest catches any change of the scheme (which must bump SCHEME)."""
    w = Watermark(KEY, gamma=0.25, context=2)
    torch.manual_seed(0), np.random.seed(0)
    first = w.green_mask((11, 12), 50000)
    torch.manual_seed(123), np.random.seed(123)
    w2 = Watermark(KEY, gamma=0.25, context=2)
    assert np.array_equal(first, w2.green_mask((11, 12), 50000))
    assert np.array_equal(first, w2.green_mask((99, 11, 12), 50000))  # only the last `context` ids count
    assert not np.array_equal(first, Watermark(KEY + b"x", 0.25, context=2).green_mask((11, 12), 50000))
    assert abs(first.mean() - 0.25) < 0.01
    assert all(w.is_green((11, 12), t) == first[t] for t in range(200))
    assert hashlib.sha256(np.packbits(first).tobytes()).hexdigest()[:16] == PINNED


PINNED = "afc9a39c568a6704"


def test_counting_green_pairs_at_once_agrees_with_each_pair():
    """``count_green`` (one hash per distinct context, what audits use) counts exactly the pairs
    ``is_green`` and the green masks call green, repeats and longer contexts included."""
    rng = np.random.default_rng(0)
    w = Watermark(KEY, gamma=0.25, context=2)
    pairs = [(tuple(rng.integers(0, 30, size=int(rng.integers(2, 4))).tolist()), int(rng.integers(0, 41)))
             for _ in range(3000)]
    pairs += pairs[:500]
    assert w.count_green(pairs) == sum(w.is_green(c, t) for c, t in pairs)
    assert w.count_green(pairs) == sum(bool(w.green_mask(c, 41)[t]) for c, t in pairs)
    assert w.count_green([]) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (run on a GPU when one is lent)")
def test_processor_on_cuda_gives_the_cpu_lists():
    w = Watermark(KEY, gamma=0.25, delta=2.0)
    ids = torch.randint(0, 32000, (8, 5), generator=torch.Generator().manual_seed(0))
    scores = torch.zeros(8, 32000)
    assert torch.equal(w(ids.cuda(), scores.cuda()).cpu(), w(ids, scores))


def test_processor_adds_delta_on_green_ids_only():
    w = Watermark(KEY, gamma=0.5, delta=3.0)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    scores = torch.randn(2, 100)
    out = w(ids, scores)
    for b, ctx in enumerate([(3,), (6,)]):
        mask = torch.from_numpy(w.green_mask(ctx, 100))
        assert torch.allclose(out[b][mask], scores[b][mask] + 3.0) and torch.equal(out[b][~mask], scores[b][~mask])


def test_the_key_never_shows():
    w = Watermark(KEY, gamma=0.25, delta=2.0, context=1)
    assert KEY.decode() not in repr(w) + str(w.describe())
    assert set(w.describe()) == {"scheme", "key_id", "gamma", "delta", "context"}


@pytest.mark.parametrize("bad", [dict(key=b"short"), dict(gamma=1.0), dict(gamma=0.0), dict(delta=-1.0),
                                 dict(context=0)])
def test_bad_parameters_are_one_clear_error(bad):
    args = dict(key=KEY, gamma=0.25, delta=2.0, context=1) | bad
    with pytest.raises(PotstillError):
        Watermark(**args)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2-padded", "llama"])
def test_watermarked_generation_on_several_architectures(arch):
    """With a huge delta every sampled token is green and inside the tokenizer (a padded
    vocabulary's extra rows stay suppressed), and the cached logprobs are the watermarked
    distribution's (their top-1 is green too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, Qwen2Config

    from helpers import TEACHER
    from potstill.hf import generate_ids

    tok = AutoTokenizer.from_pretrained(TEACHER)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=64)
    config = {"gpt2": lambda: GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64),
              "qwen2-padded": lambda: Qwen2Config(vocab_size=len(tok) + 23, **small),
              "llama": lambda: LlamaConfig(vocab_size=len(tok), **small)}[arch]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    w = Watermark(KEY, gamma=0.5, delta=50.0, context=1)
    rows = [tok("sort 123")["input_ids"], tok("rev abc")["input_ids"]]
    params = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "top_logprobs": 3}
    out = generate_ids(model, tok, rows, params, 0, ["a", "b"], watermark=w)
    for prompt, c in zip(rows, out):
        seq = prompt + c.token_ids
        assert all(t < len(tok) for t in c.token_ids)
        assert all(w.is_green((seq[i - 1],), seq[i]) for i in range(len(prompt), len(seq)))
        assert all(w.is_green((seq[len(prompt) + j - 1],), int(c.topk_ids[j, 0])) for j in range(len(c.token_ids)))
