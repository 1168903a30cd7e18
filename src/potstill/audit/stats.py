"""Exact statistics for watermark and lineage tests.

Detection counts green tokens among scored (context, token) pairs. Under the null hypothesis (the
text was written without the key) each *distinct* pair is green with probability ``gamma``,
independently, so the number of green pairs among ``n`` distinct pairs is Binomial(n, gamma) and
the p-value is its exact upper tail ``P(X >= k)``. Two rules keep that true:

- **each pair is scored once** (Sander et al. 2024's "tape"): a repeated (context, token) window is
  green or red every time it recurs, so counting repeats would add dependent trials and inflate
  the statistic (a text repeating one green pair a hundred times is not a hundred pieces of
  evidence);
- **the exact tail, not the normal approximation** ``norm.sf(z)``: with few tokens or small p the
  normal tail is off by orders of magnitude (see ``tests/audit/test_audit_stats.py``).

The tail is summed in log space from the binomial pmf, so p-values far below 1e-308 keep their
exponent (``log10_p``) instead of underflowing to 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

LN10 = math.log(10.0)


def _log_sum_run(n: int, p: float, start: int, step: int) -> float:
    """log of sum of pmf(j) for j = start, start+step, ... until the terms stop mattering (they fall
    geometrically once past the mode, which ``start`` always is in the direction of ``step``).

    The first term comes from lgamma; the others from the ratio pmf(j+1)/pmf(j) = (n-j)/(j+1) * p/q,
    accumulated in numpy blocks, so a tail of 10**5 terms costs milliseconds."""
    first = (math.lgamma(n + 1) - math.lgamma(start + 1) - math.lgamma(n - start + 1)
             + start * math.log(p) + (n - start) * math.log1p(-p))
    odds = math.log(p) - math.log1p(-p)
    total, j, log_term, block = first, start, first, 256
    while True:
        nxt = j + step * np.arange(1, block + 1)  # the next block of j values
        nxt = nxt[(nxt >= 0) & (nxt <= n)]
        if not len(nxt):
            return total
        prev = nxt - step
        if step > 0:  # pmf(j)/pmf(j-1) = (n-j+1)/j * p/q
            ratio = np.log(n - prev) - np.log(prev + 1) + odds
        else:  # pmf(j)/pmf(j+1) = (j+1)/(n-j) * q/p
            ratio = np.log(prev) - np.log(n - prev + 1) - odds
        logs = log_term + np.cumsum(ratio)
        top = max(total, float(logs.max()))
        total = top + math.log(math.exp(total - top) + float(np.exp(logs - top).sum()))
        log_term, j = float(logs[-1]), int(nxt[-1])
        if log_term < total - 40.0:  # below 1e-17 of the sum: every further term is smaller still
            return total
        block = min(block * 2, 1 << 16)


def log_binom_sf(k: int, n: int, p: float) -> float:
    """Natural log of P(X >= k) for X ~ Binomial(n, p), exact (no normal approximation)."""
    if k <= 0:
        return 0.0
    if k > n:
        return -math.inf
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return 0.0
    if k > n * p:  # the upper tail starts past the mode: sum it directly
        return _log_sum_run(n, p, k, +1)
    lower = _log_sum_run(n, p, k - 1, -1)  # P(X <= k-1), from its top (at or below the mode) downwards
    return math.log1p(-min(1.0, math.exp(lower)))


def binom_sf(k: int, n: int, p: float) -> float:
    return math.exp(log_binom_sf(k, n, p))


def z_score(k: int, n: int, gamma: float) -> float:
    """Kirchenbauer's z = (k - gamma n) / sqrt(n gamma (1 - gamma)): reported for comparison only."""
    return (k - gamma * n) / math.sqrt(n * gamma * (1 - gamma)) if n else 0.0


@dataclass
class Score:
    """One binomial test: ``green`` of ``tokens`` distinct (context, token) pairs were green."""

    tokens: int
    green: int
    gamma: float
    p_value: float
    log10_p: float
    z: float
    repeats_dropped: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def binomial_test(green: int, tokens: int, gamma: float, repeats_dropped: int = 0) -> Score:
    lsf = log_binom_sf(green, tokens, gamma)
    return Score(tokens=tokens, green=green, gamma=gamma, p_value=math.exp(lsf), log10_p=lsf / LN10,
                 z=z_score(green, tokens, gamma), repeats_dropped=repeats_dropped)


def score_pairs(pairs, is_green, gamma: float, dedup: bool = True) -> Score:
    """Test ``pairs`` of (context tuple, token) with ``is_green(context, token)``, each distinct pair once.

    ``dedup=False`` counts repeats; it exists to show the inflation the tape prevents (tests, bench)."""
    pairs = list(pairs)
    scored = list(dict.fromkeys(pairs)) if dedup else pairs
    green = sum(bool(is_green(c, t)) for c, t in scored)
    return binomial_test(green, len(scored), gamma, repeats_dropped=len(pairs) - len(scored))


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1), in the input's order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def sign_test(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(X >= wins) for X ~ Binomial(wins + losses, 1/2); ties are dropped."""
    return binom_sf(wins, wins + losses, 0.5) if wins + losses else 1.0
