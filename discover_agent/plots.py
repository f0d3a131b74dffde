"""Pictures people would rather see than read: a run's progress, a leaderboard's curves (matplotlib PNG)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from scipy import stats


def plot_progress(rollouts: list[dict[str, Any]], path: Path, title: str, score_name: str) -> None:
    """Best valid score so far per step (left) and every reply's reward per step (right); rows are grouped by
    step once, so a long run (800 one-reply steps) plots in time linear in its rows."""
    fig, (ax_best, ax_reward) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    by_step: dict[int, list[dict[str, Any]]] = {}
    for row in rollouts:
        by_step.setdefault(row["step"], []).append(row)
    steps = sorted(by_step)
    best_curve, best = [], None
    xs: list[float] = []
    ys: list[float] = []
    colors: list[str] = []
    for step in steps:
        rows = by_step[step]
        valid = [r for r in rows if r["valid"]]
        if valid:
            top = max(valid, key=lambda r: r["reward"])
            if best is None or top["reward"] > best[0]:
                best = (top["reward"], top["score"])
        best_curve.append(np.nan if best is None else best[1])
        jitter = np.linspace(-0.2, 0.2, len(rows)) if len(rows) > 1 else [0.0]
        xs.extend(np.asarray(jitter) + step)
        ys.extend(r["reward"] for r in rows)
        colors.extend("tab:blue" if r["valid"] else "tab:red" for r in rows)
    ax_best.plot(steps, best_curve, marker="o" if len(steps) <= 100 else None)
    ax_best.set(xlabel="step", ylabel=score_name, title="best valid score so far")
    ax_reward.scatter(xs, ys, s=12, c=colors, alpha=0.7)
    ax_reward.set(xlabel="step", ylabel="reward", title="rewards per step (red: invalid)")
    for ax in (ax_best, ax_reward):
        if len(steps) <= 20:
            ax.set_xticks(steps)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_leaderboard(
    best: dict[str, list[list[tuple[int, float]]]],
    learning: dict[str, list[list[float]]],
    path: Path,
    title: str,
    score_name: str,
) -> None:
    """Best score against rollouts (`best`: each agent's runs as (rollouts, best so far) points), and the valid
    replies' mean reward per step (`learning`: each agent's runs, NaN for a step without a valid reply): one
    line per agent (mean over seeds) with a band of the mean's 95% t interval over seeds."""
    # Best-so-far is a step function of rollouts; a step's mean reward is one point per step.
    panels = [
        ({a: c for a, c in best.items() if c}, "rollouts", f"best {score_name}", "steps-post"),
        (
            {a: [list(enumerate(run)) for run in runs if run] for a, runs in learning.items()},
            "step",
            "mean reward of the valid replies",
            "default",
        ),
    ]
    panels = [panel for panel in panels if any(panel[0].values())] or panels[:1]
    colours = {agent: f"C{i}" for i, agent in enumerate(sorted({*best, *learning}))}  # one colour per agent
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), constrained_layout=True, squeeze=False)
    for ax, (curves_by_agent, xlabel, ylabel, style) in zip(axes[0], panels, strict=True):
        for agent, curves in sorted(curves_by_agent.items()):
            if not curves:
                continue
            grid = sorted({x for curve in curves for x, _ in curve})
            values = np.array([[_value_at(curve, x) for x in grid] for curve in curves], dtype=np.float64)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a grid point no seed has a value for
                mean = np.nanmean(values, axis=0)
                count = np.sum(np.isfinite(values), axis=0)
                half = stats.t.ppf(0.975, np.maximum(count - 1, 1)) * np.nanstd(values, 0, ddof=1) / np.sqrt(count)
            colour = colours[agent]
            ax.plot(grid, mean, label=f"{agent} (n={len(curves)})", drawstyle=style, marker=".", color=colour)
            if len(curves) > 1:
                step = "post" if style == "steps-post" else None
                ax.fill_between(grid, mean - half, mean + half, color=colour, alpha=0.2, step=step)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.suptitle(f"{title}\nmean over seeds, band: 95% CI of the mean")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _value_at(curve: list[tuple[int, float]], x: int) -> float:
    """The best score a run had reached after `x` rollouts (step function), NaN before its first valid one."""
    value = np.nan
    for cx, cy in curve:
        if cx > x:
            break
        value = cy
    return value
