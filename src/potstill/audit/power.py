"""How many scored tokens a watermark or radioactivity test needs.

A suspect's distinct (context, token) pairs are green at some rate ``rate`` > ``gamma`` (the
residual bias: measure it once on a student trained on 100 % watermarked data, ``full_rate``).
With a share ``rho`` of watermarked training data the planner assumes the bias scales linearly:
``rate = gamma + rho (full_rate - gamma)`` (an assumption: check it on your setting, as
bench/audit_bench.py does for the quickstart). For n distinct pairs the exact test rejects at
level ``alpha`` when the green count reaches ``k*(n)``, the smallest k with P(Bin(n, gamma) >= k) <
alpha; its power is P(Bin(n, rate) >= k*(n)). Both are exact binomial tails, no approximation.
"""

from __future__ import annotations

import math

from potstill.audit.stats import log_binom_sf


def critical_green(n: int, gamma: float, alpha: float) -> int:
    """The smallest green count among n pairs whose exact p-value is below ``alpha`` (n + 1 if none)."""
    log_alpha = math.log(alpha)
    lo, hi = int(gamma * n), n + 1  # log_binom_sf is decreasing in k
    while lo < hi:
        mid = (lo + hi) // 2
        if log_binom_sf(mid, n, gamma) < log_alpha:
            hi = mid
        else:
            lo = mid + 1
    return lo


def power(n: int, gamma: float, rate: float, alpha: float) -> float:
    """P(the exact test rejects at ``alpha``) when each of n distinct pairs is green with ``rate``."""
    return math.exp(log_binom_sf(critical_green(n, gamma, alpha), n, rate))


def green_rate(gamma: float, full_rate: float, share: float) -> float:
    """The assumed green rate of a suspect trained on a ``share`` of watermarked data."""
    return gamma + share * (full_rate - gamma)


def tokens_needed(gamma: float, rate: float, alpha: float = 1e-5, target: float = 0.9,
                  max_tokens: int = 10**9) -> int | None:
    """The smallest n (found by doubling then bisection, power being increasing in n up to the
    binomial's small saw-teeth) with power >= ``target``; None if even ``max_tokens`` are not enough."""
    if rate <= gamma:
        return None
    hi = 16
    while power(hi, gamma, rate, alpha) < target:
        if hi >= max_tokens:
            return None
        hi = min(hi * 2, max_tokens)
    lo = hi // 2 if hi > 16 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if power(mid, gamma, rate, alpha) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def plan(gamma: float, full_rate: float, shares=(0.05, 0.1, 0.25, 1.0), alpha: float = 1e-5, target: float = 0.9,
         tokens_per_query: float | None = None) -> list[dict]:
    """Distinct tokens (and queries, given how many distinct pairs one answer adds) per share."""
    rows = []
    for share in shares:
        rate = green_rate(gamma, full_rate, share)
        n = tokens_needed(gamma, rate, alpha, target)
        rows.append({"share": share, "green_rate": rate, "tokens": n,
                     "queries": None if n is None or not tokens_per_query else math.ceil(n / tokens_per_query),
                     "power": None if n is None else power(n, gamma, rate, alpha)})
    return rows
