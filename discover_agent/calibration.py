"""Calibration agents without a model: what an LLM agent has to beat on a construction task at equal budget.

Both write ```json replies within the env's construction spec (`env.metadata["construction_spec"]`) and act
only through the Gymnasium contract, inside the shared loop (`SearchAgent`): `discover bench` counts their env
steps like any agent's, and they write the same run folder, curves and resume exactly.

- `random-search`: every reply a uniform draw within the spec's bounds (the floor: search with no memory).
- `es`: a (1+λ)-ES with the 1/5th success rule, started from the env's start state. Each step draws its
  λ = groups x group_size replies as the best state's construction plus Gaussian noise of step size sigma
  (clipped to the bounds); the buffer keeps the best (plus-selection), and sigma follows the share p of replies
  that beat their parent: sigma <- sigma * exp((p - 1/5) / (4/5 * d)), d = 3 / sqrt(λ). For λ = 1 this is the
  (1+1)-ES rule of Auger & Hansen (x exp(1/3) on a success, x exp(-1/12) on a failure); with more replies a
  step's p is a steadier estimate, so the damping shrinks with sqrt(λ).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from discover_agent.agents import SearchAgent
from discover_agent.config import AgentConfig, ConfigError, ESConfig
from discover_agent.rundir import RunDirError
from discover_agent.sampler import FixedSampler, GreedySampler, Sampler
from discover_agent.storage import read_json, write_json
from discover_agent.types import Group, Sample
from discover_envs.problem import ConstructionSpec

#: The success rate the step size aims at (Rechenberg's 1/5th rule).
TARGET_SUCCESS = 0.2


class NumericPolicy:
    """The policy of a calibration agent: no model, only a numpy generator the loop reseeds every step from
    (run seed, step), so a resumed run draws exactly what an uninterrupted one does."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)


def reply_for(construction: np.ndarray) -> str:
    """A ```json reply holding `construction` at full float precision."""
    return "```json\n" + json.dumps(construction.tolist()) + "\n```"


def uniform_construction(spec: ConstructionSpec, length: int, rng: np.random.Generator) -> np.ndarray:
    shape = (length,) if spec.kind == "sequence" else (length, spec.arity)
    return rng.uniform(spec.low, spec.high, size=shape)


class _Calibration(SearchAgent):
    """The shared part: a construction spec is required, replies come from `draw`, no tokens."""

    config_class = AgentConfig
    uses_model = False
    #: What the run record names as the "model".
    method: str

    def __init__(self, config: AgentConfig, policy: Any = None) -> None:
        if policy is not None and not isinstance(policy, NumericPolicy):
            raise TypeError(f"{self.name} draws its replies itself; it takes no language-model policy")
        super().__init__(config, policy)

    @property
    def policy(self) -> NumericPolicy:
        if self._policy is None:
            self._policy = NumericPolicy()
        return self._policy

    def _model_name(self) -> str:
        return f"none ({self.method})"

    def spec_of(self, env: gym.Env) -> ConstructionSpec:
        spec = env.metadata.get("construction_spec")
        if not isinstance(spec, ConstructionSpec):
            raise ConfigError(
                f"{self.name} writes constructions, but {self.config.env} declares no construction_spec in "
                "env.metadata (a code task or a free-text env)"
            )
        return spec

    def propose(self, env: gym.Env, picks: list[tuple[dict[str, Any], int]]) -> list[list[Sample]]:
        spec = self.spec_of(env)
        self._inner.phase("drawing", None, "reply")
        return [[self._sample(self.draw(spec, parent)) for _ in range(size)] for parent, size in picks]

    def draw(self, spec: ConstructionSpec, parent: dict[str, Any]) -> np.ndarray:
        raise NotImplementedError

    def length(self, spec: ConstructionSpec, parent: dict[str, Any]) -> int:
        """The spec's length when fixed; else the parent's, where its construction is known; else the least."""
        if spec.min_length == spec.max_length:
            return spec.min_length
        known = parent.get("construction")
        return len(known) if isinstance(known, list) and known else spec.min_length

    @staticmethod
    def _sample(construction: np.ndarray) -> Sample:
        return Sample(text=reply_for(construction), prompt_ids=[], completion_ids=[], logprobs=[])


class RandomSearch(_Calibration):
    """Uniform draws within the construction spec's bounds; the buffer only keeps the best (best-of-N)."""

    name = "random-search"
    method = "uniform random draws"

    def make_sampler(self, initial: list[dict[str, Any]]) -> Sampler:
        return FixedSampler(initial)

    def draw(self, spec: ConstructionSpec, parent: dict[str, Any]) -> np.ndarray:
        return uniform_construction(spec, self.length(spec, parent), self.policy.rng)


class EvolutionStrategy(_Calibration):
    """A (1+λ)-ES with the 1/5th success rule on the construction (see the module docstring)."""

    name = "es"
    method = "(1+lambda)-ES, 1/5th success rule"
    config_class = ESConfig

    def __init__(self, config: ESConfig, policy: Any = None) -> None:
        super().__init__(config, policy)
        #: sigma (absolute), the scale it was set from, and the construction of the best state by id.
        self.sigma: float | None = None
        self.best_id: str | None = None
        self.best_x: list[Any] | None = None
        self._proposed: list[list[np.ndarray]] = []

    def make_sampler(self, initial: list[dict[str, Any]]) -> Sampler:
        return GreedySampler(initial, epsilon=0.0, top_k=1, seed=self.config.seed)

    def propose(self, env: gym.Env, picks: list[tuple[dict[str, Any], int]]) -> list[list[Sample]]:
        spec = self.spec_of(env)
        self._inner.phase("drawing", None, "reply")
        self._proposed = []
        groups = []
        for parent, size in picks:
            start = self._start_of(spec, parent)
            if self.sigma is None:  # the step size is relative to the start state's scale
                scale = min(spec.high - spec.low, float(np.abs(start).max(initial=0.0)) or 1.0)
                self.sigma = self.config.sigma * scale
            noise = self.policy.rng.standard_normal((size, *start.shape))
            drawn = [np.clip(start + self.sigma * z, spec.low, spec.high) for z in noise]
            self._proposed.append(drawn)
            groups.append([self._sample(x) for x in drawn])
        return groups

    def _start_of(self, spec: ConstructionSpec, parent: dict[str, Any]) -> np.ndarray:
        """The parent's construction: what this ES wrote for it, else what the env's state holds, else (an env
        whose states keep it private) a uniform draw."""
        if parent["id"] == self.best_id and self.best_x is not None:
            return np.asarray(self.best_x, dtype=np.float64)
        known = parent.get("construction")
        if known is not None:
            return np.asarray(known, dtype=np.float64)
        return uniform_construction(spec, self.length(spec, parent), self.policy.rng)

    def learn(self, groups: list[Group]) -> dict[str, float]:
        trials = successes = 0
        for group, drawn in zip(groups, self._proposed, strict=True):
            best_reward = group.parent["reward"]  # the parent is the buffer's best (plus-selection)
            for x, (reward, info) in zip(drawn, group.outcomes, strict=True):
                trials += 1
                if info["valid"] and reward > group.parent["reward"]:
                    successes += 1
                if info["valid"] and reward > best_reward:
                    best_reward = reward
                    self.best_id, self.best_x = info["next_state"]["id"], x.tolist()
        rate = successes / trials
        damping = 3.0 / math.sqrt(trials)
        assert self.sigma is not None  # set by `propose` before any step is learned from
        self.sigma = float(self.sigma * math.exp((rate - TARGET_SUCCESS) / ((1 - TARGET_SUCCESS) * damping)))
        return {"sigma": self.sigma, "success_rate": rate}

    def checkpoint_extra(self, step_dir: Path) -> None:
        write_json(step_dir / "es.json", {"sigma": self.sigma, "best_id": self.best_id, "best_x": self.best_x})

    def restore_extra(self, step_dir: Path) -> None:
        path = step_dir / "es.json"
        saved = read_json(path)
        sigma = saved.get("sigma") if isinstance(saved, dict) else None
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma > 0):
            raise RunDirError(f"{path}: sigma must be a finite number > 0, got {sigma!r}")
        self.sigma, self.best_id, self.best_x = float(sigma), saved.get("best_id"), saved.get("best_x")
