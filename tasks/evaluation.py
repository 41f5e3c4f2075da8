"""Evaluate's comparison of every aligned policy with SFT, as pure functions (no models, no I/O).

Input: per policy ("sft", "ppo", "dpo", "grpo"), one value per held-out prompt for each measure,
the prompts in the same order for every policy (None where a measure is missing for a prompt).
Output: for each method and measure the method's mean, SFT's mean, the mean paired difference
(method - SFT) and its seeded paired bootstrap interval (tasks/stats.py); for KL to SFT and the judge's
win rate, which are already relative to SFT, the mean and its bootstrap interval.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from instructflow.tasks.stats import Interval, format_interval, paired_bootstrap

BASELINE = "sft"
# measure -> (label, True if higher is better, None if neither: length is reported, not judged)
PAIRED_MEASURES = {
    "rm_score": ("reward-model score", True),
    "rm_holdout_score": ("held-out reward-model score", True),
    "ended": ("ended within the token budget (share)", True),
    "repetition": ("word 3-gram repetition (share)", False),
    "words": ("length (words)", None),
}
# measures of a method alone (relative to SFT by construction): KL(policy || SFT), judge wins (1 / 0.5 / 0)
SINGLE_MEASURES = {"kl_to_sft": "KL to SFT (nats per reply)", "win": "judge win rate vs SFT (ties 0.5)"}
JUDGE_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}  # disagree / invalid: no score


@dataclass(frozen=True)
class Comparison:
    method: str
    measure: str
    label: str
    n: int
    baseline: float | None   # SFT's mean (None for a single measure)
    mean: float              # the method's mean
    diff: float              # method - SFT (single measures: the mean itself)
    lo: float
    hi: float

    def shown(self) -> str:
        return format_interval_of(self)


def format_interval_of(c: Comparison) -> str:
    return format_interval(Interval(n=c.n, mean_baseline=c.baseline or 0.0, mean_treated=c.mean, diff=c.diff,
                                    lo=c.lo, hi=c.hi, resamples=0, confidence=0.0, seed=0))


def judge_scores(outcomes: Sequence[str | None]) -> list[float | None]:
    return [JUDGE_SCORE.get(o) if o else None for o in outcomes]


def compare_policies(values: Mapping[str, Mapping[str, Sequence[float | None]]], *, resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> list[Comparison]:
    """Every method in `values` (all keys but "sft") against SFT on each measure both have (skipping a
    measure with fewer than 2 complete prompt pairs); the same seed gives the same intervals."""
    if BASELINE not in values:
        raise ValueError("compare_policies: no 'sft' values to compare with")
    baseline = values[BASELINE]
    found: list[Comparison] = []
    for method, measures in values.items():
        if method == BASELINE:
            continue
        for measure, (label, _) in PAIRED_MEASURES.items():
            a, b = baseline.get(measure), measures.get(measure)
            if a is None or b is None or _complete_pairs(a, b) < 2:
                continue
            found.append(_comparison(method, measure, label, paired_bootstrap(
                a, b, resamples=resamples, confidence=confidence, seed=seed), paired=True))
        for measure, label in SINGLE_MEASURES.items():
            b = measures.get(measure)
            if b is None or _complete_pairs(b, b) < 2:
                continue
            zeros = [0.0 if v is not None else None for v in b]
            found.append(_comparison(method, measure, label, paired_bootstrap(
                zeros, b, resamples=resamples, confidence=confidence, seed=seed), paired=False))
    return found


def _complete_pairs(a: Sequence[float | None], b: Sequence[float | None]) -> int:
    return sum(x is not None and y is not None and x == x and y == y for x, y in zip(a, b))


def _comparison(method: str, measure: str, label: str, interval: Interval, paired: bool) -> Comparison:
    return Comparison(method=method, measure=measure, label=label, n=interval.n,
                      baseline=interval.mean_baseline if paired else None, mean=interval.mean_treated,
                      diff=interval.diff, lo=interval.lo, hi=interval.hi)


def flat_metrics(comparisons: Sequence[Comparison]) -> dict[str, float | list[float]]:
    """The `status --json` keys: `<measure>_diff_<method>` and `..._ci` ([lo, hi]) for paired measures,
    `<measure>_<method>` and its `_ci` for single ones (kl_to_sft -> kl_<method>, win -> win_rate_<method>_vs_sft)."""
    flat: dict[str, float | list[float]] = {}
    for c in comparisons:
        if c.baseline is not None:
            flat[f"{c.measure}_sft"] = c.baseline
            flat[f"{c.measure}_{c.method}"] = c.mean
            flat[f"{c.measure}_diff_{c.method}"] = c.diff
            flat[f"{c.measure}_diff_{c.method}_ci"] = [c.lo, c.hi]
        else:
            key = f"kl_{c.method}" if c.measure == "kl_to_sft" else f"win_rate_{c.method}_vs_sft"
            flat[key] = c.mean
            flat[f"{key}_ci"] = [c.lo, c.hi]
    return flat


def comparison_rows(comparisons: Sequence[Comparison]) -> list[dict]:
    """The table people read (artifact, report): method, measure, SFT, method, difference [interval]."""
    return [{**asdict(c), "shown": c.shown()} for c in comparisons]


def comparison_lines(comparisons: Sequence[Comparison], prompts: int) -> list[str]:
    """One line per method for the end of `instructflow run`."""
    short = {"rm_score": "RM", "rm_holdout_score": "held-out RM", "ended": "ended", "repetition": "repetition",
             "words": "words", "kl_to_sft": "KL", "win": "win rate"}
    lines = []
    for method in dict.fromkeys(c.method for c in comparisons):
        parts = [f"{short[c.measure]} {c.shown()}" for c in comparisons if c.method == method]
        lines.append(f"{method} - sft on {prompts} prompts: " + " · ".join(parts))
    return lines
