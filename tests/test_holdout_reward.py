"""Issue 16, pure parts: evaluate.holdout_reward's split (the second reward model trains on pairs the
first never trained on; the trained model and its scores are checked in tests/test_pipeline.py, one
pipeline run) and the least-squares reward slope PPO reports."""
from __future__ import annotations

from instructflow.tasks.preferences import split_pairs


def test_split_pairs_is_a_seeded_partition_independent_of_row_order():
    pairs = [{"pair_key": f"k{i}", "n": i} for i in range(50)]
    train, held = split_pairs(pairs, 0.2, seed=42)
    train_keys, held_keys = {p["pair_key"] for p in train}, {p["pair_key"] for p in held}
    assert len(held) == 10 and len(train) == 40
    assert not train_keys & held_keys and train_keys | held_keys == {p["pair_key"] for p in pairs}
    # the reward stage and evaluate's held-out model read the pairs in whatever order the warehouse gives
    again_train, again_held = split_pairs(list(reversed(pairs)), 0.2, seed=42)
    assert {p["pair_key"] for p in again_held} == held_keys
    assert {p["pair_key"] for p in split_pairs(pairs, 0.2, seed=7)[1]} != held_keys
    assert split_pairs(pairs[:1], 0.2, seed=42) == (pairs[:1], [])


def test_least_squares_slope_of_per_update_rewards():
    from instructflow.tasks.trend import least_squares_slope

    assert least_squares_slope([1, 2, 3, 4], [0.0, 0.5, 1.0, 1.5]) == 0.5
    # one bad last update does not flip an upward trend the way last - first would
    assert least_squares_slope([1, 2, 3, 4, 5], [-1.0, -0.5, 0.0, 0.5, -1.2]) > 0
    assert least_squares_slope([1, 2, 3], [3.0, 2.0, 1.0]) == -1.0
    assert least_squares_slope([1], [2.0]) is None and least_squares_slope([2, 2], [1.0, 3.0]) is None
