"""Paired differences over documents with 95% intervals: two methods scored on the same documents.

* 0/1 scores (accuracy, exact match): the exact paired test. Only discordant documents carry
  information: with n10 documents right for A only and n01 for B only (m = n10 + n01 of N),
  the difference of accuracies is (n10 - n01) / N = (m / N)(2 pi - 1) with pi = n10 / m. The
  interval maps the Clopper-Pearson interval of pi (exact, conditional on m) through that line;
  the p-value is McNemar's exact two-sided binomial test.
* any other score (log-likelihoods): a paired percentile bootstrap of the mean difference
  (documents resampled with replacement, the same resample for both methods), seeded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _solve(f: Any, target: float) -> float:
    """p in [0, 1] with f(p) = target for f decreasing in p (bisection to 1e-12)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval for a binomial proportion with k successes in n trials."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"clopper_pearson: need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else _solve(lambda p: _binom_cdf(k - 1, n, p), 1.0 - a)  # P(X >= k) = a
    hi = 1.0 if k == n else _solve(lambda p: _binom_cdf(k, n, p), a)
    return lo, hi


def _as_array(x: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of finite scores")
    return arr


def exact_paired_binary(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Difference of accuracies mean(a) - mean(b) of paired 0/1 scores, exact interval and McNemar p."""
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must score the same documents, got {x.size} and {y.size}")
    if not (np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all()):
        raise ValueError("exact_paired_binary: scores must be 0 or 1")
    n = x.size
    n10, n01 = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    m = n10 + n01
    diff = (n10 - n01) / n
    if m == 0:
        lo = hi = 0.0
        p = 1.0
    else:
        plo, phi = clopper_pearson(n10, m, level)
        lo, hi = m / n * (2 * plo - 1), m / n * (2 * phi - 1)
        p = min(1.0, 2 * min(_binom_cdf(n10, m, 0.5), _binom_cdf(n01, m, 0.5)))
    return {"diff": diff, "lo": lo, "hi": hi, "n": n, "method": "exact", "p_value": p,
            "a_only": n10, "b_only": n01}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, iters: int = 10000,
                     seed: int = 0) -> dict[str, Any]:
    """Mean paired difference mean(a - b) with a percentile bootstrap interval over documents."""
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must score the same documents, got {x.size} and {y.size}")
    d = x - y
    rng = np.random.default_rng(seed)
    means = np.empty(iters)
    for i in range(0, iters, 1000):  # chunks bound the index matrix's memory
        k = min(1000, iters - i)
        means[i : i + k] = d[rng.integers(0, d.size, size=(k, d.size))].mean(1)
    q = (1 - level) / 2
    lo, hi = np.quantile(means, [q, 1 - q])
    # share of resampled means on the other side of zero, two-sided (a bootstrap p-value)
    p = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(d.size), "method": "bootstrap",
            "p_value": p}


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """The exact paired test when every score is 0 or 1, else the paired bootstrap."""
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all():
        return exact_paired_binary(x, y, level)
    return paired_bootstrap(x, y, level=level, seed=seed)
