"""Paired comparisons for evaluate: how much a policy changed a per-prompt score against a baseline,
with a seeded percentile-bootstrap confidence interval. Pure functions (no I/O).

"Paired" means both arms were scored on the same prompts, entry i of each on prompt i: the bootstrap
resamples prompts (indices, with replacement) and uses the same indices for both arms, so the
variation between prompts, which both arms share, cancels out of the difference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Bootstrap means are computed a block of resamples at a time, so memory stays near this many indices
# whatever the number of prompts (2000 resamples of 10,000 prompts would be 160 MB at once).
_INDICES_PER_BLOCK = 1_000_000


@dataclass(frozen=True)
class Interval:
    """The mean paired difference treated - baseline and its bootstrap confidence interval [lo, hi]."""
    n: int                # pairs used (after dropping the ones with a missing score)
    mean_baseline: float
    mean_treated: float
    diff: float           # mean_treated - mean_baseline (= the mean of the per-prompt differences)
    lo: float
    hi: float
    resamples: int
    confidence: float
    seed: int
    dropped: int = 0      # pairs left out because either score was None or NaN

    def contains(self, value: float) -> bool:
        """Whether `value` lies in [lo, hi]; `not contains(0.0)` reads "the change is significant"."""
        return self.lo <= value <= self.hi


def _score(value: float | None, arm: str, index: int) -> float:
    """A finite float, or NaN for a missing score (None or NaN)."""
    if value is None:
        return math.nan
    try:
        if isinstance(value, (str, bytes)):  # float("0.5") would pass, but a score read as text is a caller's bug
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"paired_bootstrap: {arm}[{index}] is not a number: {value!r}") from None
    if math.isinf(number):
        raise ValueError(f"paired_bootstrap: {arm}[{index}] is {number} (a score must be finite)")
    return number


def paired_bootstrap(baseline: Sequence[float | None], treated: Sequence[float | None], *, resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> Interval:
    """Mean of treated[i] - baseline[i] over prompts i, with a percentile-bootstrap interval.

    Each of `resamples` resamples draws n prompt indices with replacement (numpy's
    `default_rng(seed)`) and takes the mean difference over them, the same indices for both arms;
    lo and hi are the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of those means.
    The same inputs and seed give the same interval.

    A pair whose baseline or treated score is None or NaN (a reply that could not be scored) is
    dropped, from both arms; `n` is the number of pairs used and `dropped` the number left out.
    Raises ValueError for arms of different lengths, fewer than 2 usable pairs, a confidence
    outside (0, 1), fewer than 100 resamples, or a score that is not a finite number.
    """
    if len(baseline) != len(treated):
        raise ValueError(f"paired_bootstrap: {len(baseline)} baseline scores but {len(treated)} treated scores "
                         "(the arms must be scored on the same prompts)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_bootstrap: confidence={confidence} must be in (0, 1), e.g. 0.95")
    if resamples < 100:
        raise ValueError(f"paired_bootstrap: resamples={resamples} must be >= 100")
    base = np.array([_score(v, "baseline", i) for i, v in enumerate(baseline)], dtype=float)
    treat = np.array([_score(v, "treated", i) for i, v in enumerate(treated)], dtype=float)
    kept = ~(np.isnan(base) | np.isnan(treat))
    base, treat = base[kept], treat[kept]
    n, dropped = len(base), len(kept) - len(base)
    if n < 2:
        raise ValueError(f"paired_bootstrap: {n} usable pair(s) ({dropped} dropped for a missing score); "
                         "at least 2 are needed")

    differences = treat - base
    rng = np.random.default_rng(seed)
    block = max(1, _INDICES_PER_BLOCK // n)
    means = np.concatenate([differences[rng.integers(0, n, size=(min(block, resamples - start), n))].mean(axis=1)
                            for start in range(0, resamples, block)])
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    mean_baseline, mean_treated = float(base.mean()), float(treat.mean())
    return Interval(n=n, mean_baseline=mean_baseline, mean_treated=mean_treated, diff=mean_treated - mean_baseline,
                    lo=float(lo), hi=float(hi), resamples=resamples, confidence=confidence, seed=seed,
                    dropped=dropped)


def format_interval(interval: Interval, digits: int = 2) -> str:
    """The difference and its interval for a table, signs always shown: "+0.12 [-0.05, +0.30]"."""
    def signed(x: float) -> str:
        return f"{x + 0.0:+.{digits}f}"  # + 0.0 turns -0.0 into 0.0, so an exact zero prints "+0.00"
    return f"{signed(interval.diff)} [{signed(interval.lo)}, {signed(interval.hi)}]"
