"""Pictures people would rather see than read: a run's progress, a leaderboard's curves (matplotlib PNG)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator


def plot_progress(rollouts: list[dict[str, Any]], path: Path, title: str, score_name: str) -> None:
    """Best valid score so far per step (left) and every reply's reward per step (right)."""
    fig, (ax_best, ax_reward) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    steps = sorted({row["step"] for row in rollouts})
    best_curve, best = [], None
    for step in steps:
        scores = [r["score"] for r in rollouts if r["step"] == step and r["valid"]]
        rewards = [r["reward"] for r in rollouts if r["step"] == step and r["valid"]]
        if scores:
            pick = scores[int(np.argmax(rewards))]
            if best is None or max(rewards) > best[0]:
                best = (max(rewards), pick)
        best_curve.append(np.nan if best is None else best[1])
    ax_best.plot(steps, best_curve, marker="o")
    ax_best.set(xlabel="step", ylabel=score_name, title="best valid score so far")
    for step in steps:
        rewards = [r["reward"] for r in rollouts if r["step"] == step]
        valid = [r["valid"] for r in rollouts if r["step"] == step]
        jitter = np.linspace(-0.2, 0.2, len(rewards)) if len(rewards) > 1 else [0.0]
        colors = ["tab:blue" if v else "tab:red" for v in valid]
        ax_reward.scatter(np.asarray(jitter) + step, rewards, s=12, c=colors, alpha=0.7)
    ax_reward.set(xlabel="step", ylabel="reward", title="rewards per step (red: invalid)")
    for ax in (ax_best, ax_reward):
        if len(steps) <= 20:
            ax.set_xticks(steps)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_leaderboard(entries: list[dict[str, Any]], path: Path, title: str, score_name: str) -> None:
    """Best score against rollouts, one line per agent (mean over seeds), seeds' min-max as a band."""
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    by_agent: dict[str, list[list[tuple[int, float]]]] = defaultdict(list)
    for entry in entries:
        curve = entry.get("curve") or []
        if curve:
            by_agent[entry["agent"]].append([(int(x), float(y)) for x, y in curve])
    for agent, curves in sorted(by_agent.items()):
        grid = sorted({x for curve in curves for x, _ in curve})
        values = np.array([[_value_at(curve, x) for x in grid] for curve in curves])
        mean = np.nanmean(values, axis=0)
        line = ax.plot(grid, mean, label=f"{agent} (n={len(curves)})", drawstyle="steps-post", marker="o")[0]
        if len(curves) > 1:
            low, high = np.nanmin(values, 0), np.nanmax(values, 0)
            ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, step="post")
    ax.set(xlabel="rollouts", ylabel=score_name, title=title)
    ax.legend()
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
