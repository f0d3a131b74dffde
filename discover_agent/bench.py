"""The benchmark harness: every (env, agent, seed) at the same rollout budget, then comparable leaderboards.

`run_bench` writes one `result.json` per run (the entry: the exact command that reproduces it, the code version,
the best-so-far curve and per-step diagnostics; paths relative to the bench folder); `discover_agent.leaderboard`
gathers them into tables with paired statistics.
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
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym

import discover_envs  # noqa: F401 - registers the env ids
from discover_agent.agents import Agent
from discover_agent.config import AgentConfig
from discover_agent.leaderboard import read_entry, slug
from discover_agent.registry import AGENTS
from discover_agent.rundir import RunDir, code_version
from discover_agent.search import PUCTSearch
from discover_agent.storage import read_json, write_json


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
    steps_of = {}
    for spec in specs:  # an agent's own fields may shape its steps, e.g. es[groups=1,group_size=1]: a (1+1)-ES
        fields = {**common, **spec.overrides}
        per_step = fields.get("groups", defaults.groups) * fields.get("group_size", defaults.group_size)
        if rollouts < per_step:
            raise ValueError(
                f"--rollouts {rollouts} is less than one step of {spec.label} (groups x group-size = {per_step})"
            )
        steps_of[spec.label] = math.ceil(rollouts / per_step)
    entries = []
    for env_id in envs:
        for spec in specs:
            for seed in seeds:
                run_out = out / slug(env_id) / spec.label.replace("/", "_").replace(":", "_") / f"seed{seed}"
                fields = {
                    **common, **spec.overrides, "env": env_id, "seed": seed, "out": str(run_out),
                    "steps": steps_of[spec.label], "max_rollouts": rollouts,
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
                    result = spec.cls(config).run(progress=progress, resume=resume)
                steps = StepCounter.counts.pop(key, 0) + before
                if steps > rollouts:
                    raise ValueError(f"{spec.label} took {steps} env steps on {env_id}, over the budget of {rollouts}")
                saved = read_json(run_out / "config.json") if (run_out / "config.json").is_file() else {}
                per_step = _per_step(run_out)
                entry = {
                    "env": env_id, "agent": spec.label, "model": result.model, "rollouts": steps,
                    "seed": seed, "best_score": result.best_score, "best_reward": result.best_reward,
                    "wall_s": round(result.wall_s, 2), "tokens": result.tokens,
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "version": saved.get("version") or code_version(),
                    "command": _command(env_id, spec.label, rollouts, seed, common, out),
                    "run_dir": run_out.relative_to(out).as_posix(),
                    "best_state_file": (run_out / "best.json").relative_to(out).as_posix(),
                    "env_kwargs": saved.get("config", {}).get("env_kwargs") or config.resolved_env_kwargs(),
                    "curve": result.curve, "mean_reward_per_step": per_step.get("mean_reward", []),
                    "per_step": per_step,
                }  # fmt: skip
                write_json(run_out / "result.json", entry)
                entries.append(entry)
    return entries


#: Per-step diagnostics a run's metrics carry into its leaderboard entry (`SearchAgent._metrics_row`).
DIAGNOSTICS = ("valid_frac", "mean_reward", "mean_valid_reward", "improve_rate", "copy_rate", "kl")


def _per_step(run_out: Path) -> dict[str, list[float | None]]:
    """The diagnostics of each step of a run that keeps the shared run folder (None where a step has no value,
    e.g. the valid-only mean reward of a step without a valid reply), else {}."""
    checkpoint = RunDir(run_out).checkpoint()
    if not checkpoint:
        return {}
    series = {}
    for name in DIAGNOSTICS:
        values = [row.get(name) for row in checkpoint.metrics]
        if any(v is not None for v in values):
            series[name] = [float(v) if v is not None and math.isfinite(v) else None for v in values]
    return series


def _checkpointed_rollouts(run_out: Path) -> int:
    """Rollouts of the steps an interrupted run committed (a step in flight is redone on resume)."""
    checkpoint = RunDir(run_out).checkpoint()
    return checkpoint.rollouts if checkpoint else 0


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
    return shlex.join([*parts, "--out", out.name])  # paths in entries are relative to the bench folder
