"""Small matplotlib helpers shared by the stages: every curve or distribution a person would rather
look at than read becomes a PNG, written headless (Agg) so it works on servers and in CI."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers, CI or inside Prefect workers
import matplotlib.pyplot as plt  # noqa: E402


def plot_lines(path: Path, title: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
               xlabel: str = "step", ylabel: str = "") -> Path:
    """One axis, one line per named (xs, ys) series. Empty series are skipped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, (xs, ys) in series.items():
        if len(xs):
            ax.plot(list(xs), list(ys), label=name, marker="." if len(xs) < 40 else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if any(len(xs) for xs, _ in series.values()):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_histograms(path: Path, title: str, groups: Mapping[str, Sequence[float]], xlabel: str = "",
                    bins: int = 30) -> Path:
    """Overlaid, semi-transparent histograms, one per named group."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, values in groups.items():
        if len(values):
            ax.hist(list(values), bins=bins, alpha=0.55, label=f"{name} (n={len(values)})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    if any(len(v) for v in groups.values()):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bars(path: Path, title: str, values: Mapping[str, float], ylabel: str = "") -> Path:
    """Labelled bars, e.g. rejection reasons or PPO-vs-SFT scores."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    names = list(values)
    ax.bar(range(len(names)), [values[n] for n in names], color="#4c72b0")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_intervals(path: Path, title: str, panels: Mapping[str, Mapping[str, tuple[float, float, float]]]) -> Path:
    """One panel per measure: each method's estimate as a dot with its interval as a bar, and a line at 0
    (no difference from the baseline). `panels`: measure label -> method -> (estimate, lo, hi)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shown = {label: rows for label, rows in panels.items() if rows}
    fig, axes = plt.subplots(len(shown) or 1, 1, figsize=(7, 1.1 + 0.9 * sum(len(r) for r in shown.values())),
                             dpi=100, squeeze=False)
    for ax, (label, rows) in zip(axes[:, 0], shown.items()):
        names = list(rows)
        estimates = [rows[n][0] for n in names]
        errors = [[rows[n][0] - rows[n][1] for n in names], [rows[n][2] - rows[n][0] for n in names]]
        ax.errorbar(estimates, range(len(names)), xerr=errors, fmt="o", capsize=4)
        ax.axvline(0.0, color="grey", linewidth=1, linestyle="--")
        ax.set_yticks(range(len(names)), names)
        ax.set_ylim(-0.7, len(names) - 0.3)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def png_data_uri(path: Path) -> str:
    """A PNG as a data URI: Prefect's image artifact needs a public URL, markdown accepts this."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
