"""Leaderboards from bench runs: per-env tables with paired statistics against TTT, plots, and an index.

`write_leaderboards` gathers every `result.json` under a bench folder into leaderboards/<env-slug>.{json,md,png}
and an index README.md that states the primary metrics (`PRIMARY_METRICS`). Each agent is compared with the
default TTT agent (label "ttt") seed by seed: seeds share the start state and the env, so paired differences
remove the seed-to-seed spread that unpaired means carry.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from discover_agent.agents import open_env
from discover_agent.plots import plot_leaderboard
from discover_agent.storage import CorruptFile, atomic_write_bytes, read_json, write_json

#: The agent every other one is compared with.
REFERENCE = "ttt"

PRIMARY_METRICS = """\
## Primary metrics (fixed before the runs)

Each run of an agent on an env with a seed gives two numbers, both in the env's own figure (its direction:
lower is better for upper bounds such as C1, higher for lower bounds such as C2):

1. **best score at the final budget**: the best valid score found within the run's rollouts (`best_score`);
2. **AUC**: the area under the best-so-far curve, divided by the rollouts: the best score after each step,
   weighted by the step's rollouts, so it rewards finding good states early as well as finally.

Against the default TTT agent (`ttt`), each agent gets the paired difference over the seeds both ran
(agent minus ttt, in the figure's units), its 95% confidence interval (Student t with n - 1 degrees of
freedom) and the number of seeds where the agent was better. An interval that contains 0 does not separate
the two agents. Diagnostics (not primary): the share of valid replies, and the mean reward of the valid
replies per step, first quarter of the steps against the last (did the agent learn within a run?).
"""


@dataclass(frozen=True)
class Paired:
    """Agent minus reference over the seeds both ran: mean, 95% t interval (NaN for one seed), seeds won."""

    n: int
    mean: float
    low: float
    high: float
    wins: int
    ties: int

    def text(self) -> str:
        interval = f" [{self.low:+.3g}, {self.high:+.3g}]" if self.n >= 2 else ""
        return f"{self.mean:+.3g}{interval}"


def paired_difference(agent: dict[int, float], reference: dict[int, float], higher_is_better: bool) -> Paired | None:
    """`agent` minus `reference` (values by seed) over their common seeds; a win is a seed where the agent's
    value is better in the figure's direction. None without a common seed."""
    seeds = sorted(set(agent) & set(reference))
    if not seeds:
        return None
    diffs = np.array([agent[s] - reference[s] for s in seeds], dtype=np.float64)
    mean = float(diffs.mean())
    if len(diffs) >= 2:
        half = float(stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs)))
    else:
        half = math.nan
    better = diffs > 0 if higher_is_better else diffs < 0
    return Paired(len(diffs), mean, mean - half, mean + half, int(better.sum()), int((diffs == 0).sum()))


def area_under_best(entry: dict[str, Any]) -> float | None:
    """The best-so-far curve's area per rollout: sum over steps of (rollouts in the step) x (best after it),
    divided by the rollouts; None for a run without a curve."""
    curve = [(int(x), float(y)) for x, y in entry.get("curve") or [] if y is not None]
    if not curve or curve[-1][0] <= 0:
        return None
    area, before = 0.0, 0
    for rollouts, best in curve:
        area += (rollouts - before) * best
        before = rollouts
    return area / before


def valid_curve(entry: dict[str, Any]) -> list[float]:
    """The mean reward of the valid replies per step (NaN for a step without one); entries written before the
    per-step diagnostics existed give their mean reward over all replies."""
    per_step = entry.get("per_step") or {}
    values = per_step.get("mean_valid_reward", entry.get("mean_reward_per_step") or [])
    return [math.nan if v is None else float(v) for v in values]


#: What the leaderboard reads from each result.json: field -> (description, check).
_ENTRY_FIELDS: dict[str, tuple[str, Any]] = {
    "env": ("a string", lambda v: isinstance(v, str)),
    "agent": ("a string", lambda v: isinstance(v, str)),
    "model": ("a string", lambda v: isinstance(v, str)),
    "rollouts": ("an integer", lambda v: type(v) is int),
    "seed": ("an integer", lambda v: type(v) is int),
    "wall_s": ("a number", lambda v: type(v) in (int, float)),
    "best_score": ("a number or null", lambda v: v is None or type(v) in (int, float)),
    "env_kwargs": ("an object", lambda v: isinstance(v, dict)),
    "curve": (
        "a list of [rollouts, score] pairs",
        lambda v: isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and _numbers(p) for p in v),
    ),
    "mean_reward_per_step": ("a list of numbers", lambda v: isinstance(v, list) and _numbers(v)),
    "per_step": (
        "an object of lists of numbers or nulls",
        lambda v: (
            isinstance(v, dict)
            and all(isinstance(c, list) and _numbers(x for x in c if x is not None) for c in v.values())
        ),
    ),
}
_OPTIONAL_FIELDS = ("env_kwargs", "curve", "mean_reward_per_step", "per_step")


def _numbers(values: Iterable[Any]) -> bool:
    return all(type(v) in (int, float) for v in values)


def read_entry(path: Path) -> dict[str, Any]:
    """A run's result.json, with a `ValueError` naming the file and the first field the leaderboard cannot read."""
    entry = read_json(path)
    if not isinstance(entry, dict):
        raise CorruptFile(f"{path} is not a JSON object: not a result.json of `discover bench`")
    for field, (what, ok) in _ENTRY_FIELDS.items():
        if (field in entry or field not in _OPTIONAL_FIELDS) and not ok(entry.get(field)):
            raise CorruptFile(f"{path}: {field!r} must be {what}, got {json.dumps(entry.get(field))[:80]}")
    return entry


def write_leaderboards(runs: Path, dest: Path) -> list[Path]:
    """Gather every result.json under `runs` into per-env leaderboard files plus an index; returns the files."""
    by_env: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(runs.rglob("result.json")):
        entry = read_entry(path)
        by_env[entry["env"]].append(entry)
    if not by_env:
        raise ValueError(f"no result.json under {runs}: run `discover bench --out {runs}` first")
    dest.mkdir(parents=True, exist_ok=True)
    written, index = [], []
    for env_id, entries in sorted(by_env.items()):
        env = open_env(env_id, entries[0].get("env_kwargs", {}))
        higher_is_better = env.metadata.get("higher_is_better", True)
        figure = env.metadata.get("score_name", "score")
        published = env.metadata.get("published") or []
        env.close()
        name = slug(env_id)
        write_json(dest / f"{name}.json", entries)
        table = _table(env_id, entries, higher_is_better, figure, published)
        atomic_write_bytes(dest / f"{name}.md", table.encode())
        best, learning = defaultdict(list), defaultdict(list)
        for e in entries:
            best[e["agent"]].append([(int(x), float(y)) for x, y in e.get("curve") or [] if y is not None])
            learning[e["agent"]].append(valid_curve(e))
        title = f"{env_id} {entries[0].get('env_kwargs') or ''}"
        plot_leaderboard(dict(best), dict(learning), dest / f"{name}.png", title, figure)
        written += [dest / f"{name}.{ext}" for ext in ("json", "md", "png")]
        agents = ", ".join(sorted({e["agent"] for e in entries}))
        budgets = ", ".join(str(b) for b in sorted({e["rollouts"] for e in entries}))
        wall = sum(e.get("wall_s", 0.0) for e in entries)
        index.append(
            f"- [{env_id}]({name}.md): {len(entries)} runs of {agents}; rollouts per run {budgets}; "
            f"env arguments {entries[0].get('env_kwargs') or {}}; {_models(entries)}; "
            f"total wall time {wall / 60:.1f} min"
        )
    history = sorted(p.parent.name for p in dest.glob("*/README.md"))
    readme = [
        "# Leaderboards",
        "",
        "Written by `discover leaderboard`; each entry holds the command and the code version that made it.",
        "",
        *index,
        "",
        PRIMARY_METRICS,
    ]
    if history:
        readme += ["## Earlier leaderboards", "", *(f"- [{h}/]({h}/README.md)" for h in history), ""]
    atomic_write_bytes(dest / "README.md", "\n".join(readme).encode())
    return [*written, dest / "README.md"]


def slug(env_id: str) -> str:
    return env_id.replace("discover/", "").replace("/", "-")


def _table(
    env_id: str,
    entries: list[dict[str, Any]],
    higher_is_better: bool,
    figure: str,
    published: list[tuple[str, float]],
) -> str:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        groups[(entry["agent"], entry["rollouts"])].append(entry)
    pick = max if higher_is_better else min
    sign = 1.0 if higher_is_better else -1.0
    lines = [
        f"# {env_id}",
        "",
        f"{figure}; env arguments {entries[0].get('env_kwargs') or {}}; {_models(entries)}; code "
        f"{_versions(entries)}. Δ: the agent minus `{REFERENCE}` paired by seed, with its 95% CI (see README.md "
        "for the metrics).",
        "",
        f"| agent | rollouts | seeds | best score (mean ± sd) | AUC (mean ± sd) | Δ best vs {REFERENCE} [95% CI] "
        f"| Δ AUC vs {REFERENCE} [95% CI] | seeds better than {REFERENCE} (best) | best of seeds | valid replies "
        "| valid-only mean reward, first → last quarter of steps (Δ mean ± sd) | wall s (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def by_seed(runs: list[dict[str, Any]], metric: Any) -> dict[int, float]:
        values = {r["seed"]: metric(r) for r in runs}
        return {seed: value for seed, value in values.items() if value is not None}

    def ranking(item: tuple[tuple[str, int], list[dict[str, Any]]]) -> float:
        scores = list(by_seed(item[1], lambda r: r["best_score"]).values())
        return -sign * float(np.mean(scores)) if scores else math.inf

    for (agent, rollouts), runs in sorted(groups.items(), key=ranking):
        best = by_seed(runs, lambda r: r["best_score"])
        auc = by_seed(runs, area_under_best)
        reference = groups.get((REFERENCE, rollouts), [])
        compare = agent != REFERENCE and reference
        d_best = paired_difference(best, by_seed(reference, lambda r: r["best_score"]), higher_is_better)
        d_auc = paired_difference(auc, by_seed(reference, area_under_best), higher_is_better)
        wins = f"{d_best.wins}/{d_best.n}" if compare and d_best else "-"
        valid = [v for r in runs for v in (r.get("per_step") or {}).get("valid_frac", []) if v is not None]
        lines.append(
            f"| {agent} | {rollouts} | {','.join(str(r['seed']) for r in runs)} | {_spread(best)} | {_spread(auc)} "
            f"| {d_best.text() if compare and d_best else '-'} | {d_auc.text() if compare and d_auc else '-'} "
            f"| {wins} | {f'{pick(best.values()):.8g}' if best else '-'} "
            f"| {f'{np.mean(valid):.0%}' if valid else '-'} | {_learning(runs)} "
            f"| {np.mean([r.get('wall_s', 0.0) for r in runs]):.0f} |"
        )
    if published:
        lines += ["", "Published figures on the full-size problem, for context only:", ""]
        lines += [f"- {who}: {value}" for who, value in published]
    lines += ["", "Reproduce a row with the `command` field of its entries in the JSON file.", ""]
    return "\n".join(lines)


def _models(entries: list[dict[str, Any]]) -> str:
    """Which model each agent ran (calibration agents run none): one header must not name the first run's only."""
    agents: dict[str, set[str]] = defaultdict(set)
    for e in entries:
        agents[str(e.get("model"))].add(e["agent"])
    return "; ".join(f"model {model} ({', '.join(sorted(names))})" for model, names in sorted(agents.items()))


def _versions(entries: list[dict[str, Any]]) -> str:
    counts = Counter(str(e.get("version", "unrecorded")) for e in entries)
    return ", ".join(f"{version} ({n} run{'s' if n > 1 else ''})" for version, n in sorted(counts.items()))


def _spread(values: dict[int, float]) -> str:
    array = np.array(list(values.values()), dtype=np.float64)
    if not array.size:
        return "-"
    return f"{array.mean():.6g} ± {array.std(ddof=1):.2g}" if array.size > 1 else f"{array[0]:.6g}"


def _learning(runs: list[dict[str, Any]]) -> str:
    """Did the valid replies' mean reward rise within a run? Mean over seeds of the first and the last quarter of
    its steps, and their paired difference (mean ± sample sd over seeds); "-" for runs without a curve."""
    curves = [c for c in (valid_curve(r) for r in runs) if len(c) >= 2]
    pairs = []
    for curve in curves:
        quarter = max(1, len(curve) // 4)
        first, last = np.array(curve[:quarter]), np.array(curve[-quarter:])
        if np.isfinite(first).any() and np.isfinite(last).any():
            pairs.append((float(np.nanmean(first)), float(np.nanmean(last))))
    if not pairs:
        return "-"
    first_means, last_means = np.array(pairs).T
    delta = last_means - first_means
    spread = f" ± {delta.std(ddof=1):.2g}" if delta.size > 1 else ""
    return f"{first_means.mean():.4g} → {last_means.mean():.4g} ({delta.mean():+.3g}{spread})"
