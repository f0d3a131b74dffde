"""Gymnasium text environments for test-time discovery: one problem, exact verifier, restartable states.

`import discover_envs` registers the `discover/...-v0` ids with Gymnasium.
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
from discover_envs.registry import env_ids, register_envs

register_envs()

__all__ = [
    "ConstructionProblem",
    "ConstructionSpec",
    "DiscoverEnv",
    "Evaluation",
    "InvalidSolution",
    "InvalidState",
    "Problem",
    "env_ids",
]
