"""Trends of per-update metrics, as pure functions (no I/O)."""
from __future__ import annotations

import statistics
from typing import Sequence


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Slope of the ordinary least-squares line through (x, y): the per-update trend of a metric
    (PPO's reward), robust to one noisy first or last update. None with fewer than two distinct x."""
    if len(xs) != len(ys):
        raise ValueError(f"least_squares_slope: {len(xs)} x values but {len(ys)} y values")
    if len(set(xs)) < 2:
        return None
    return statistics.linear_regression(xs, ys).slope
