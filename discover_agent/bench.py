"""The benchmark harness: every (env, agent, seed) at the same rollout budget, then comparable leaderboards.

`run_bench` writes one `result.json` per run (the entry, with the exact command that reproduces it);
`write_leaderboards` gathers them into leaderboards/<env-slug>.{json,md,png} and an index README.md.
The budget is enforced by counting `env.step` calls (a wrapper added to the env id while a run lasts), not
by trusting the rollouts an agent reports; any Gymnasium text env following the README's contract works.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import json
import math
import shlex
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

import discover_envs  # noqa: F401 - registers the env ids
from discover_agent.agents import AGENTS, Agent, PUCTSearch, open_env
from discover_agent.config import AgentConfig
from discover_agent.plots import plot_leaderboard
from discover_agent.rundir import RunDir
from discover_agent.storage import CorruptFile, atomic_write_bytes, read_json, write_json

#: Published figures for context (full-size problems; TTT-Discover paper and ../shared/fixtures/README.md).
REFERENCES: dict[str, list[tuple[str, float]]] = {
    "discover/ErdosMinOverlap-v0": [
        ("Haugland 2016", 0.3809269),
        ("AlphaEvolve", 0.3809230),
        ("TTT-Discover", 0.3808753),
    ],
    "discover/AC1-v0": [
        ("Matolcsi-Vinuesa", 1.5097202),
        ("AlphaEvolve V2", 1.5031636),
        ("TTT-Discover", 1.5028629),
    ],
    "discover/AC2-v0": [
        ("Jaech-Joseph", 0.94136),
        ("AlphaEvolve V2", 0.9610211),
        ("TTT-Discover", 0.9591798),
    ],
    "discover/CirclePacking26-v0": [("best known", 2.6359831), ("TTT-Discover", 2.6359774)],
    "discover/CirclePacking32-v0": [("best known", 2.939572)],
}


@dataclass
class AgentSpec:
    """An agent named on the command line: a built-in name, `module:Class`, or `openai:MODEL@URL`."""

    label: str
    cls: type[Agent]
    overrides: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> AgentSpec:
        """`NAME[key=value,...]` sets config fields of that agent only (e.g. a learning-rate sweep in one bench,
        `ttt[lr=3e-4],ttt[lr=1e-3]`); the whole text is the entry's label."""
        if text.endswith("]") and "[" in text:
            base, _, fields = text[:-1].partition("[")
            spec = cls.parse(base)
            overrides = dict(_override(item, text) for item in fields.split(",") if item.strip())
            unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(spec.cls.config_class)})
            if unknown:
                raise ValueError(f"{text!r}: {spec.cls.config_class.__name__} has no field(s) {unknown}")
            return cls(text, spec.cls, {**spec.overrides, **overrides})
        if text in AGENTS:
            return cls(text, AGENTS[text], {})
        if text == "openevolve":
            from discover_agent.openevolve_agent import OpenEvolveAgent

            return cls(text, OpenEvolveAgent, {})
        if text.startswith("openai:"):
            model, sep, url = text.removeprefix("openai:").partition("@")
            if not (model and sep and url):
                raise ValueError(f"an endpoint agent is written openai:MODEL@URL, got {text!r}")
            return cls(text, PUCTSearch, {"model": model, "endpoint": url})
        module, sep, name = text.partition(":")
        if not sep:
            raise ValueError(f"unknown agent {text!r}: use one of {sorted(AGENTS)}, module:Class or openai:MODEL@URL")
        try:
            agent_cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import agent {text!r}: {exc}") from None
        if not (isinstance(agent_cls, type) and issubclass(agent_cls, Agent)):
            raise ValueError(f"{text!r} is not a subclass of discover_agent.agents.Agent")
        return cls(text, agent_cls, {})


def _override(item: str, text: str) -> tuple[str, Any]:
    """One `key=value` of an agent spec; the value is read as JSON where it parses (numbers, booleans)."""
    key, sep, value = item.partition("=")
    if not (sep and key.strip()):
        raise ValueError(f"{text!r}: write agent fields as NAME[key=value,...], got {item!r}")
    try:
        return key.strip().replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.strip().replace("-", "_"), value.strip()


class StepCounter(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Counts `step` calls under a run's key, across every env instance (and thread) the run makes."""

    counts: ClassVar[Counter[str]] = Counter()
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, env: gym.Env, key: str) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, key=key)
        gym.Wrapper.__init__(self, env)
        self.key = key

    def step(self, action: Any) -> Any:
        with self._lock:
            self.counts[self.key] += 1
        return self.env.step(action)


@contextmanager
def counting_steps(env_id: str, key: str) -> Iterator[None]:
    """While open, every `gym.make(env_id)` in this process wraps its env in `StepCounter(key)`."""
    module, _, name = env_id.rpartition(":")
    if module:
        importlib.import_module(module)
    spec = gym.spec(name)
    wrapper = gym.envs.registration.WrapperSpec("StepCounter", f"{__name__}:StepCounter", {"key": key})
    gym.registry[name] = dataclasses.replace(spec, additional_wrappers=(*spec.additional_wrappers, wrapper))
    try:
        yield
    finally:
        gym.registry[name] = spec


def slug(env_id: str) -> str:
    return env_id.replace("discover/", "").replace("/", "-")


def run_bench(
    envs: list[str],
    agents: list[str],
    rollouts: int,
    seeds: list[int],
    out: Path,
    common: dict[str, Any],
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every (env, agent, seed) with `rollouts` replies each; returns the entries (also saved as files)."""
    specs = [AgentSpec.parse(a) for a in agents]
    if common.get("executor", "local") != "local":
        raise ValueError("discover bench counts env steps in this process: it runs with --executor local only")
    defaults = AgentConfig()
    per_step = common.get("groups", defaults.groups) * common.get("group_size", defaults.group_size)
    if rollouts < per_step:
        raise ValueError(f"--rollouts {rollouts} is less than one step (groups x group-size = {per_step})")
    entries = []
    for env_id in envs:
        for spec in specs:
            for seed in seeds:
                run_out = out / slug(env_id) / spec.label.replace("/", "_").replace(":", "_") / f"seed{seed}"
                fields = {
                    **common, **spec.overrides, "env": env_id, "seed": seed, "out": str(run_out),
                    "steps": math.ceil(rollouts / per_step), "max_rollouts": rollouts,
                }  # fmt: skip
                done = run_out / "result.json"
                if done.is_file():  # finished in an earlier invocation: a bench resumes across sessions
                    entries.append(read_entry(done))
                    continue
                config = _config_for(spec.cls, fields)
                key = str(run_out)
                resume = RunDir(run_out).holds_run
                # Steps before an interruption were counted by the earlier process; its checkpoint holds them.
                before = _checkpointed_rollouts(run_out) if resume else 0
                with counting_steps(env_id, key):
                    result = spec.cls(config).run(progress=progress, **({"resume": True} if resume else {}))
                steps = StepCounter.counts.pop(key, 0) + before
                if steps > rollouts:
                    raise ValueError(f"{spec.label} took {steps} env steps on {env_id}, over the budget of {rollouts}")
                entry = {
                    "env": env_id, "agent": spec.label, "model": result.model, "rollouts": steps,
                    "seed": seed, "best_score": result.best_score, "best_reward": result.best_reward,
                    "wall_s": round(result.wall_s, 2), "tokens": result.tokens,
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": _command(env_id, spec.label, rollouts, seed, common, out),
                    "best_state_file": str(run_out / "best.json"), "env_kwargs": config.resolved_env_kwargs(),
                    "curve": result.curve, "mean_reward_per_step": _mean_rewards(run_out),
                }  # fmt: skip
                write_json(run_out / "result.json", entry)
                entries.append(entry)
    return entries


def _mean_rewards(run_out: Path) -> list[float]:
    """The learning curve of a run that keeps the shared run folder (mean reward of each step), else []."""
    checkpoint = RunDir(run_out).checkpoint()
    return [float(row["mean_reward"]) for row in checkpoint["metrics"]] if checkpoint else []


def _checkpointed_rollouts(run_out: Path) -> int:
    """Rollouts of the steps an interrupted run committed (a step in flight is redone on resume)."""
    checkpoint = RunDir(run_out).checkpoint()
    return checkpoint["rollouts"] if checkpoint else 0


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
}
_OPTIONAL_FIELDS = ("env_kwargs", "curve", "mean_reward_per_step")


def _numbers(values: list[Any]) -> bool:
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


def _config_for(agent_cls: type[Agent], fields: dict[str, Any]) -> AgentConfig:
    config_cls = agent_cls.config_class
    known = {f for f in config_cls.__dataclass_fields__}
    return config_cls(**{k: v for k, v in fields.items() if k in known})


def _command(env_id: str, agent: str, rollouts: int, seed: int, common: dict[str, Any], out: Path) -> str:
    parts = ["discover", "bench", "--envs", env_id, "--agents", agent, "--rollouts", str(rollouts)]
    parts += ["--seeds", str(seed)]
    defaults = AgentConfig().to_dict()
    for key, value in sorted(common.items()):
        if key in defaults and value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + key.replace("_", "-"))
        elif value is not None:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            parts += [flag, json.dumps(value) if isinstance(value, dict) else text]
    return shlex.join([*parts, "--out", str(out)])


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
        env.close()
        name = slug(env_id)
        write_json(dest / f"{name}.json", entries)
        atomic_write_bytes(dest / f"{name}.md", _table(env_id, entries, higher_is_better, figure).encode())
        plot_leaderboard(entries, dest / f"{name}.png", f"{env_id} {entries[0].get('env_kwargs') or ''}", figure)
        written += [dest / f"{name}.{ext}" for ext in ("json", "md", "png")]
        agents = ", ".join(sorted({e["agent"] for e in entries}))
        budgets = ", ".join(str(b) for b in sorted({e["rollouts"] for e in entries}))
        wall = sum(e["wall_s"] for e in entries)
        index.append(
            f"- [{env_id}]({name}.md): {len(entries)} runs of {agents}; rollouts per run {budgets}; "
            f"env arguments {entries[0].get('env_kwargs') or {}}; model {entries[0]['model']}; "
            f"total wall time {wall / 60:.1f} min"
        )
    readme = "# Leaderboards\n\nWritten by `discover leaderboard`; each entry holds the command that reproduces it.\n\n"
    atomic_write_bytes(dest / "README.md", (readme + "\n".join(index) + "\n").encode())
    return [*written, dest / "README.md"]


def _table(env_id: str, entries: list[dict[str, Any]], higher_is_better: bool, figure: str) -> str:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        groups[(entry["agent"], entry["rollouts"])].append(entry)
    pick = max if higher_is_better else min
    lines = [
        f"# {env_id}",
        "",
        f"{figure}; env arguments {entries[0].get('env_kwargs') or {}}; model {entries[0]['model']}.",
        "",
        "| agent | rollouts | seeds | best score (mean ± std) | best of seeds | valid runs | wall s (mean) "
        "| mean reward, first → last quarter of steps (Δ mean ± std) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ranked = sorted(groups.items(), key=lambda kv: _mean_score(kv[1], higher_is_better))
    for (agent, rollouts), runs in ranked:
        scores = np.array([r["best_score"] for r in runs if r["best_score"] is not None], dtype=np.float64)
        stat = f"{scores.mean():.6g} ± {scores.std():.2g}" if scores.size else "-"
        best = f"{pick(scores):.8g}" if scores.size else "-"
        wall = np.mean([r["wall_s"] for r in runs])
        seeds = ",".join(str(r["seed"]) for r in runs)
        lines.append(
            f"| {agent} | {rollouts} | {seeds} | {stat} | {best} | {scores.size}/{len(runs)} | {wall:.0f} "
            f"| {_learning(runs)} |"
        )
    refs = REFERENCES.get(env_id)
    if refs:
        lines += ["", "Published figures on the full-size problem, for context only:", ""]
        lines += [f"- {who}: {value}" for who, value in refs]
    lines += ["", "Reproduce a row with the `command` field of its entry in the JSON file.", ""]
    return "\n".join(lines)


def _learning(runs: list[dict[str, Any]]) -> str:
    """Did the step's mean reward rise within a run? Mean over seeds of the first and the last quarter of its
    steps, and their paired difference (mean ± std over seeds); "-" for runs that logged no learning curve."""
    curves = [r["mean_reward_per_step"] for r in runs if len(r.get("mean_reward_per_step") or []) >= 2]
    if not curves:
        return "-"
    first = np.array([np.mean(c[: max(1, len(c) // 4)]) for c in curves])
    last = np.array([np.mean(c[-max(1, len(c) // 4) :]) for c in curves])
    delta = last - first
    return f"{first.mean():.4g} → {last.mean():.4g} ({delta.mean():+.3g} ± {delta.std():.2g})"


def _mean_score(runs: list[dict[str, Any]], higher_is_better: bool) -> float:
    scores = [r["best_score"] for r in runs if r["best_score"] is not None]
    if not scores:
        return math.inf
    mean = float(np.mean(scores))
    return -mean if higher_is_better else mean
