"""Radioactivity and power: the served teacher's watermark through the official openai client,
a suspect that never saw the key not flagged, and the planner against simulation."""

import numpy as np
import pytest
from scipy import stats

from potstill.watermark import Watermark
from potstill.audit import binomial_test, score_pairs
from potstill.audit.power import critical_green, plan, power, tokens_needed
from potstill.audit.radioactivity import (endpoint_samples, local_samples, next_token_view, reading_pairs,
                                          sampling_pairs, score_keys)
from potstill.prompts import load_prompts

from helpers import QUICKSTART, TEACHER

KEY = b"radioactivity-test-key-0001"
OTHERS = [b"radioactivity-other-key-%03d" % i for i in range(4)]


def heldout(n):
    return [p.chat[-1]["content"] for p in load_prompts(QUICKSTART / "prompts" / "heldout.jsonl", n)]


@pytest.fixture(scope="module")
def teacher():
    from potstill.hf import load_model_dir

    return load_model_dir(TEACHER)


@pytest.mark.slow
def test_served_watermark_is_found_for_its_key_only(teacher):
    """`potstill serve` with a key, sampled through the official openai client: the answers carry
    key K (p < 1e-6; a strong delta keeps 100 requests enough) and none of four other keys (Holm-adjusted p > 0.01)."""
    from potstill.serve import build_app
    from helpers import running

    model, tok = teacher
    wm = Watermark(KEY, gamma=0.25, delta=8.0, context=3)
    serving = running(build_app(TEACHER, model_name="teacher", batch_wait_ms=20, watermark=wm))
    _, base = next(serving)
    try:
        prompts, answers = endpoint_samples(base, "teacher", tok, heldout(100), max_new_tokens=12)
    finally:
        next(serving, None)
    keys = [wm] + [Watermark(k, 0.25, 4.0, 3) for k in OTHERS]
    result = score_keys(sampling_pairs(prompts, answers, 3, skip={tok.eos_token_id}), keys, "sampling")
    first, *rest = result["keys"]
    assert first["key_id"] == wm.key_id and first["p_holm"] < 1e-6 and first["tokens"] > 150
    assert all(r["p_holm"] > 0.01 for r in rest)


def test_a_model_that_never_saw_the_key_is_not_flagged(teacher):
    """The bundled teacher, unwatermarked, in both modes: no key's p-value is small."""
    model, tok = teacher
    keys = [Watermark(k, 0.25, 4.0, 3) for k in [KEY, *OTHERS]]
    prompts, answers = local_samples(model, tok, heldout(100), max_new_tokens=12)
    sampled = score_keys(sampling_pairs(prompts, answers, 3, skip={tok.eos_token_id}), keys, "sampling")
    read = score_keys(reading_pairs(model, [p + a for p, a in zip(prompts, answers)], 3, skip={tok.eos_token_id},
                                    vocab=len(tok)), keys, "reading")
    for result in (sampled, read):
        assert all(k["p_value"] > 0.01 and k["tokens"] > 0 for k in result["keys"])


@pytest.mark.slow
def test_entropy_filter_scores_where_the_watermark_acts(teacher):
    """Text sampled with a weak watermark (delta 2), scored only where the model's own next-token
    entropy is at least 0.5 nats: fewer tokens, a higher green share and a smaller p-value for K
    (confident tokens are the same with or without the key), and still nothing for other keys."""
    from potstill.hf import generate_ids, prompt_ids

    model, tok = teacher
    wm = Watermark(KEY, gamma=0.25, delta=2.0, context=3)
    rows = [prompt_ids(tok, [{"role": "user", "content": p}]) for p in heldout(300)]
    params = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "top_logprobs": 0}
    answers = [c.token_ids for c in generate_ids(model, tok, rows, params, 0, [""] * len(rows), watermark=wm)]
    entropy = next_token_view(model, [p + a for p, a in zip(rows, answers)], vocab=len(tok))[1]
    keys = [wm] + [Watermark(k, 0.25, 2.0, 3) for k in OTHERS]
    skip = {tok.eos_token_id}
    every = score_keys(sampling_pairs(rows, answers, 3, skip), keys, "sampling")["keys"]
    hesitant = score_keys(sampling_pairs(rows, answers, 3, skip, entropy, 0.5), keys, "sampling")["keys"]
    assert 0 < hesitant[0]["tokens"] < every[0]["tokens"] / 2
    assert hesitant[0]["green"] / hesitant[0]["tokens"] > every[0]["green"] / every[0]["tokens"] + 0.05
    assert hesitant[0]["log10_p"] < every[0]["log10_p"]
    assert all(k["p_holm"] > 0.01 for k in hesitant[1:])


def test_entropy_filter_keeps_the_null_exact(teacher):
    """The filter reads the suspect alone, never a key: the unwatermarked teacher's filtered pairs
    (both modes) tested against 100 fresh keys give p-values whose rate below 0.01 stays within
    its binomial 99.9 % interval."""
    model, tok = teacher
    prompts, answers = local_samples(model, tok, heldout(100), max_new_tokens=12)
    texts = [p + a for p, a in zip(prompts, answers)]
    entropy = next_token_view(model, texts, vocab=len(tok))[1]
    skip = {tok.eos_token_id}
    _, hi = stats.binom.interval(0.999, 100, 0.01)
    for pairs in (sampling_pairs(prompts, answers, 3, skip, entropy, 0.5),
                  reading_pairs(model, texts, 3, skip=skip, vocab=len(tok), min_entropy=0.5)):
        assert len(set(pairs)) > 50
        p = [score_pairs(pairs, Watermark(b"entropy-null-key-%04d-xxxx" % i, 0.25, 0.0, 3).is_green, 0.25).p_value
             for i in range(100)]
        assert sum(v < 0.01 for v in p) <= hi and 0.35 < np.mean(p) < 0.65


def test_reading_mode_drops_the_texts_own_pairs(teacher):
    """A model that predicts exactly the text it reads scores nothing of that text."""
    model, tok = teacher
    prompts, answers = local_samples(model, tok, heldout(20), max_new_tokens=12, temperature=0.0)
    texts = [p + a for p, a in zip(prompts, answers)]
    pairs = reading_pairs(model, texts, 3, vocab=len(tok))
    own = {(tuple(t[i - 3:i]), t[i]) for t in texts for i in range(3, len(t))}
    assert pairs and not own & set(pairs)


def test_keys_of_different_context_widths_are_refused():
    with pytest.raises(ValueError):
        score_keys([((1, 2), 3)], [Watermark(KEY, context=2), Watermark(OTHERS[0], context=1)], "reading")


@pytest.mark.parametrize("gamma,rate", [(0.25, 0.40), (0.5, 0.65)])
def test_power_planner_matches_simulation(gamma, rate):
    """At the planned n, 200 simulated suspects (distinct pairs, each green with ``rate`` under a
    real key) are detected at p < 1e-5 as often as planned, within the binomial 99.9% interval;
    with rate = gamma (the null) they are detected at most as often as alpha allows."""
    alpha, target, runs = 1e-5, 0.9, 200
    n = tokens_needed(gamma, rate, alpha, target)
    predicted = power(n, gamma, rate, alpha)
    assert predicted >= target and power(n // 2, gamma, rate, alpha) < target
    rng = np.random.default_rng(0)
    w = Watermark(KEY, gamma=gamma, context=1)
    hits = 0
    for run in range(runs):
        contexts = rng.integers(0, 2**40, size=n)  # distinct with overwhelming probability
        masks = [w.green_mask((int(c),), 64) for c in contexts]
        want = rng.random(n) < rate
        # each suspect picks a green token with probability `rate`, else a red one
        pairs = [((int(c),), int(np.flatnonzero(m if g else ~m)[rng.integers((m if g else ~m).sum())]))
                 for c, m, g in zip(contexts, masks, want)]
        hits += score_pairs(pairs, w.is_green, gamma).p_value < alpha
    low, high = stats.binom.interval(0.999, runs, predicted)
    assert low <= hits <= high
    assert critical_green(n, gamma, alpha) == stats.binom.isf(alpha, n, gamma) + 1


def test_plan_needs_more_tokens_for_less_watermarked_data():
    rows = plan(0.25, 0.35, shares=(0.1, 0.25, 1.0), tokens_per_query=8)
    assert rows[0]["tokens"] > rows[1]["tokens"] > rows[2]["tokens"] > 0
    assert all(r["queries"] * 8 >= r["tokens"] for r in rows)
    assert plan(0.25, 0.25, shares=(1.0,))[0]["tokens"] is None  # no bias: no number of tokens is enough


def test_plan_verb_prints_the_planner_and_refuses_rates_outside_0_1(capsys):
    from potstill.cli import main

    assert main(["audit", "plan", "--green-rate", "0.35", "--share", "0.25", "--share", "1"]) == 0
    out = capsys.readouterr().out
    for row in plan(0.25, 0.35, shares=(0.25, 1.0)):
        assert f"{row['tokens']:,} pairs" in out
    assert main(["audit", "plan", "--green-rate", "1.5"]) == 2
    assert "--green-rate must be between 0 and 1" in capsys.readouterr().err
