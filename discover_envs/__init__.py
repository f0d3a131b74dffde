"""Gymnasium text environments for test-time discovery: one problem, exact verifier, restartable states.

`import discover_envs` registers the `discover/...-v0` ids with Gymnasium; `discover_envs.register` adds
an id for a problem of one's own.
"""

from discover_envs.env import DiscoverEnv
from discover_envs.problem import (
    ConstructionProblem,
    ConstructionSpec,
    Evaluation,
    InvalidSolution,
    InvalidState,
    Problem,
)
from discover_envs.registry import cpu_preset, env_ids, register, register_envs
from discover_envs.trl_rewards import trl_prompt_dataset, trl_reward_func

register_envs()

__all__ = [
    "ConstructionProblem",
    "ConstructionSpec",
    "DiscoverEnv",
    "Evaluation",
    "InvalidSolution",
    "InvalidState",
    "Problem",
    "cpu_preset",
    "env_ids",
    "register",
    "trl_prompt_dataset",
    "trl_reward_func",
]
