"""The contract agents, policies, executors and the bench share, importable without torch.

A state is the JSON dict an env produces (README, agent contract); a `Policy` turns prompts into groups of
`Sample`s, optionally under a `TokenConstraint`; a reply's `Outcome` is what `env.step` returned for it; a
`Group` is the replies sampled from one start state; a `RunResult` is what every agent's `run` returns.
Torch appears only in annotations, so sampling-only agents on an endpoint never load it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from transformers import LogitsProcessor

    from discover_envs.problem import ConstructionSpec

#: A state as envs produce it: at least `id`, `score`, `reward` (and `parent_id` for a child); otherwise opaque.
State = dict[str, Any]


class TokenConstraint(Protocol):
    """What a local policy needs from a grammar constraint (`discover_agent.constrained.JsonArrayConstraint`)."""

    prefix: str
    suffix: str

    def logits_processor(self, prompt_length: int) -> LogitsProcessor: ...

    def token_masks(self, completion_ids: list[int]) -> torch.Tensor: ...


@runtime_checkable
class SubsetConstraint(TokenConstraint, Protocol):
    """A constraint that also lists the ids it allows at each position, so the trainer's passes can compute
    only those logits instead of the whole vocabulary's."""

    def token_allowed_ids(self, completion_ids: list[int]) -> list[torch.Tensor]: ...


class PromptCache(Protocol):
    """What sampling kept of a prompt for the trainer's pass (`discover_agent.decoding.KeptPrompt`)."""

    def release(self) -> None:
        """Drop what it holds (activations with their graph), used or not."""


@dataclass
class Sample:
    """One reply. `logprobs` are per completion token under the distribution it was sampled from (empty for
    endpoints that give none); `temperature` and `constraint` let the trainer rebuild that distribution.
    `prompt_cache`, shared by the replies of one prompt, spares the trainer's pass that prompt's forward."""

    text: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    temperature: float = 1.0
    constraint: TokenConstraint | None = field(default=None, repr=False, compare=False)
    prompt_cache: PromptCache | None = field(default=None, repr=False, compare=False)


class Policy(ABC):
    """What every agent samples from: a local model (`discover_agent.policy.LocalPolicy`) or an endpoint."""

    @abstractmethod
    def sample(self, prompts: list[str], n: int, constraint_spec: ConstructionSpec | None = None) -> list[list[Sample]]:
        """`n` replies (a group) per user-message prompt; with `constraint_spec`, a constrained JSON reply."""

    def sample_groups(
        self, prompts: list[str], sizes: list[int], constraint_spec: ConstructionSpec | None = None
    ) -> list[list[Sample]]:
        """A group of `sizes[i]` replies for each prompt: one call per group here; `LocalPolicy` samples every
        group of a step in one batched pass (decoding is bound by reading the weights, so a batch of 8 costs
        little more per token than a batch of 4)."""
        if len(prompts) != len(sizes):
            raise ValueError(f"need one group size per prompt, got {len(prompts)} prompts and {len(sizes)} sizes")
        return [self.sample([p], n, constraint_spec)[0] for p, n in zip(prompts, sizes, strict=True)]


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
