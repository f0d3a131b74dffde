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
    """Best score against rollouts, and mean reward per step (the learning curve) where runs logged it: one line
    per agent (mean over seeds), the seeds' min-max as a band."""
    best: dict[str, list[list[tuple[int, float]]]] = defaultdict(list)
    learning: dict[str, list[list[tuple[int, float]]]] = defaultdict(list)
    for entry in entries:
        if entry.get("curve"):
            best[entry["agent"]].append([(int(x), float(y)) for x, y in entry["curve"]])
        if entry.get("mean_reward_per_step"):
            learning[entry["agent"]].append(list(enumerate(map(float, entry["mean_reward_per_step"]))))
    # Best-so-far is a step function of rollouts; a step's mean reward is one point per step.
    panels = [
        (best, "rollouts", f"best {score_name}", "steps-post"),
        (learning, "step", "mean reward of the step", "default"),
    ]
    panels = [panel for panel in panels if panel[0]] or panels[:1]
    colours = {agent: f"C{i}" for i, agent in enumerate(sorted({*best, *learning}))}  # one colour per agent
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), constrained_layout=True, squeeze=False)
    for ax, (curves_by_agent, xlabel, ylabel, style) in zip(axes[0], panels, strict=True):
        for agent, curves in sorted(curves_by_agent.items()):
            grid = sorted({x for curve in curves for x, _ in curve})
            values = np.array([[_value_at(curve, x) for x in grid] for curve in curves])
            mean = np.nanmean(values, axis=0)
            colour = colours[agent]
            ax.plot(grid, mean, label=f"{agent} (n={len(curves)})", drawstyle=style, marker="o", color=colour)
            if len(curves) > 1:
                low, high = np.nanmin(values, 0), np.nanmax(values, 0)
                step = "post" if style == "steps-post" else None
                ax.fill_between(grid, low, high, color=colour, alpha=0.2, step=step)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.suptitle(title)
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
