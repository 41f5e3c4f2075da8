"""Evaluate's comparison of methods with SFT (tasks/evaluation.py): known data, known answers."""
from __future__ import annotations

import random

import pytest

from instructflow.tasks.evaluation import compare_policies, comparison_lines, flat_metrics, judge_scores


def values(shift: float, n: int = 64, seed: int = 0) -> dict:
    rng = random.Random(seed)
    sft = [rng.gauss(0.0, 1.0) for _ in range(n)]
    return {"sft": {"rm_score": sft, "ended": [float(i % 2) for i in range(n)], "words": [30.0] * n},
            "dpo": {"rm_score": [s + shift + rng.gauss(0.0, 0.3) for s in sft],
                    "ended": [1.0] * n, "words": [30.0] * n, "kl_to_sft": [0.2 + rng.random() * 0.1 for _ in range(n)],
                    "win": judge_scores(["win", "loss", "tie", "disagree"] * (n // 4))}}


def by(comparisons, method, measure):
    [found] = [c for c in comparisons if c.method == method and c.measure == measure]
    return found


def test_a_clear_shift_excludes_zero_and_no_shift_includes_it():
    shifted = by(compare_policies(values(0.5)), "dpo", "rm_score")
    assert shifted.lo > 0 and shifted.baseline is not None and shifted.diff == pytest.approx(shifted.mean - shifted.baseline)
    flat = by(compare_policies(values(0.0)), "dpo", "rm_score")
    assert flat.lo < 0 < flat.hi
    ended = by(compare_policies(values(0.0)), "dpo", "ended")   # half of SFT's replies ended, all of dpo's
    assert ended.diff == pytest.approx(0.5) and ended.lo > 0.3


def test_the_same_seed_gives_the_same_intervals():
    first, again = compare_policies(values(0.2), seed=5), compare_policies(values(0.2), seed=5)
    assert first == again
    assert compare_policies(values(0.2), seed=6) != first


def test_single_measures_and_the_flat_keys():
    comparisons = compare_policies(values(0.3))
    kl, win = by(comparisons, "dpo", "kl_to_sft"), by(comparisons, "dpo", "win")
    assert kl.baseline is None and 0.2 <= kl.lo <= kl.mean <= kl.hi <= 0.3
    # win 1, loss 0, tie 0.5; disagreements are not scored: (1 + 0 + 0.5) / 3
    assert win.mean == pytest.approx(0.5) and win.n == 48
    flat = flat_metrics(comparisons)
    assert flat["rm_score_diff_dpo"] == by(comparisons, "dpo", "rm_score").diff
    assert flat["kl_dpo"] == kl.mean and flat["win_rate_dpo_vs_sft"] == win.mean and len(flat["kl_dpo_ci"]) == 2
    assert "rm_holdout_score_diff_dpo" not in flat   # a measure nobody measured is not invented
    [line] = comparison_lines(comparisons, 64)
    assert line.startswith("dpo - sft on 64 prompts: RM +") and " KL +" in line and "[" in line


def test_without_sft_values_it_refuses():
    with pytest.raises(ValueError, match="no 'sft' values"):
        compare_policies({"dpo": {"rm_score": [1.0, 2.0]}})
