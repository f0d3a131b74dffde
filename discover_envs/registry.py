"""Every environment id in one place: adding a task is a file in `problems/` plus one line here."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

ENTRY_POINT = "discover_envs.env:DiscoverEnv"


def _add(env_id: str, problem: str, *, nondeterministic: bool = False, **defaults: Any) -> None:
    """Register `env_id` as a `DiscoverEnv` around the `problem` class ("module:Class"), once."""
    if env_id in gym.registry:
        return
    gym.register(
        id=env_id,
        entry_point=ENTRY_POINT,
        kwargs={"problem": problem, **defaults},
        nondeterministic=nondeterministic,
        disable_env_checker=True,
    )


def register_envs() -> None:
    """Construction actions are deterministic; `nondeterministic=True` marks ids whose actions run code
    whose result may vary (timings, candidate randomness)."""
    _add("discover/ErdosMinOverlap-v0", "discover_envs.problems.erdos:ErdosMinOverlap", nondeterministic=True)
    _add(
        "discover/AC1-v0",
        "discover_envs.problems.autocorrelation:FirstAutocorrelation",
        nondeterministic=True,
    )
    _add(
        "discover/AC2-v0",
        "discover_envs.problems.autocorrelation:SecondAutocorrelation",
        nondeterministic=True,
    )
    _add("discover/CirclePacking26-v0", "discover_envs.problems.circle_packing:CirclePacking", n=26,
         nondeterministic=True)  # fmt: skip
    _add("discover/CirclePacking32-v0", "discover_envs.problems.circle_packing:CirclePacking", n=32,
         nondeterministic=True)  # fmt: skip
    _add("discover/Denoising-v0", "discover_envs.problems.denoising:Denoising", nondeterministic=True)
    _add("discover/AHC039-v0", "discover_envs.problems.ahc039:PurseSeine", nondeterministic=True)
    _add("discover/TriMul-v0", "discover_envs.problems.trimul:TriMul", nondeterministic=True)


def env_ids() -> list[str]:
    return sorted(env_id for env_id in gym.registry if env_id.startswith("discover/"))
