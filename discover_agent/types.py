"""The contract agents, policies, executors and the bench share, importable without torch.

A state is the JSON dict an env produces (README, agent contract); a reply's `Outcome` is what `env.step`
returned for it; a `Group` is the replies sampled from one start state; a `RunResult` is what every agent's
`run` returns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

#: A state as envs produce it: at least `id`, `score`, `reward` (and `parent_id` for a child); otherwise opaque.
State = dict[str, Any]


class Outcome(NamedTuple):
    """One scored reply: the reward `env.step` gave and its `info` (`valid`, `score`, `error`, `next_state`)."""

    reward: float
    info: dict[str, Any]


@dataclass
class Group:
    """The replies sampled from one start state, with their outcomes."""

    parent: State
    samples: list[Any]
    outcomes: list[Outcome]

    @property
    def rewards(self) -> list[float]:
        return [outcome.reward for outcome in self.outcomes]


@dataclass
class RunResult:
    """What every agent returns: the single best state, and what it cost."""

    env: str
    agent: str
    model: str
    best: State
    best_score: float | None
    best_reward: float
    rollouts: int
    steps: int
    wall_s: float
    tokens: int
    out: str
    curve: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
