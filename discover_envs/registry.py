"""Every environment id in one place: adding a task is a file in `problems/` plus one line here.

Each id is bound to its problem: `gym.make(id, problem=...)` is refused rather than swapping the task behind
an id. A problem of one's own gets its own id with `discover_envs.register` (see the README).
"""

from __future__ import annotations

import importlib
from typing import Any

import gymnasium as gym

from discover_envs.env import DiscoverEnv
from discover_envs.problem import Problem


class BoundProblem:
    """The entry point of one id: a `DiscoverEnv` around its problem, whatever kwargs `gym.make` adds."""

    metadata = DiscoverEnv.metadata  # gym.make reads the render modes here

    def __init__(self, env_id: str, problem: str | type[Problem]) -> None:
        self.env_id, self.problem = env_id, problem

    def __call__(self, **kwargs: Any) -> DiscoverEnv:
        if "problem" in kwargs:
            raise TypeError(
                f"{self.env_id} is bound to {self.problem}; register another problem under its own id with "
                "discover_envs.register(env_id, problem)"
            )
        return DiscoverEnv(self.problem, **kwargs)

    def __repr__(self) -> str:
        return f"BoundProblem({self.env_id!r}, {self.problem!r})"


def register(env_id: str, problem: str | type[Problem], *, nondeterministic: bool = False, **defaults: Any) -> None:
    """Register `env_id` as a `DiscoverEnv` around `problem` (a `Problem` subclass or "module:Class").

    `defaults` are the problem's constructor arguments unless `gym.make` overrides them. Registering an id
    twice is an error unless it names the same problem (so importing a module twice is harmless).
    """
    if env_id in gym.registry:
        entry_point = gym.registry[env_id].entry_point
        if isinstance(entry_point, BoundProblem) and entry_point.problem == problem:
            return
        raise ValueError(f"{env_id} is already registered, for {entry_point!r}")
    gym.register(
        id=env_id, entry_point=BoundProblem(env_id, problem), kwargs=defaults, nondeterministic=nondeterministic
    )


def register_envs() -> None:
    """Construction actions are deterministic; `nondeterministic=True` marks ids whose actions run code
    whose result may vary (timings, candidate randomness)."""
    register("discover/ErdosMinOverlap-v0", "discover_envs.problems.erdos:ErdosMinOverlap", nondeterministic=True)
    register(
        "discover/AC1-v0",
        "discover_envs.problems.autocorrelation:FirstAutocorrelation",
        nondeterministic=True,
    )
    register(
        "discover/AC2-v0",
        "discover_envs.problems.autocorrelation:SecondAutocorrelation",
        nondeterministic=True,
    )
    register("discover/CirclePacking26-v0", "discover_envs.problems.circle_packing:CirclePacking", n=26,
             nondeterministic=True)  # fmt: skip
    register("discover/CirclePacking32-v0", "discover_envs.problems.circle_packing:CirclePacking", n=32,
             nondeterministic=True)  # fmt: skip
    register("discover/Denoising-v0", "discover_envs.problems.denoising:Denoising", nondeterministic=True)
    register("discover/AHC039-v0", "discover_envs.problems.ahc039:PurseSeine", nondeterministic=True)
    register("discover/AHC058-v0", "discover_envs.problems.ahc058:AppleMachines", nondeterministic=True)
    register("discover/TriMul-v0", "discover_envs.problems.trimul:TriMul", nondeterministic=True)


def cpu_preset(env_id: str) -> dict[str, Any]:
    """The CPU preset of a registered discover id (`Problem.cpu_preset`, read from its class without building
    the env); {} for any other env."""
    module, _, name = env_id.rpartition(":")
    try:
        if module:
            importlib.import_module(module)
        entry_point = gym.spec(name).entry_point
    except (ImportError, gym.error.Error):
        return {}  # `gym.make` names the problem when the env is built
    if not isinstance(entry_point, BoundProblem):
        return {}
    problem = entry_point.problem
    if isinstance(problem, str):
        module, _, name = problem.partition(":")
        problem = getattr(importlib.import_module(module), name)
    return dict(problem.cpu_preset)


def env_ids() -> list[str]:
    return sorted(env_id for env_id in gym.registry if env_id.startswith("discover/"))
