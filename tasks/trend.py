"""Trends of per-update metrics, as pure functions (no I/O)."""
from __future__ import annotations

from typing import Sequence


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Slope of the ordinary least-squares line through (x, y): the per-update trend of a metric
    (PPO's reward), robust to one noisy first or last update. None with fewer than two distinct x."""
    if len(xs) != len(ys):
        raise ValueError(f"least_squares_slope: {len(xs)} x values but {len(ys)} y values")
    n = len(xs)
    if n < 2:
        return None
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
