"""Search agents without training: the baselines TTT-Discover is measured against (the paper's ablations).

Each is the shared loop (`agents.SearchAgent`) with a start-state sampler: `best-of-n` always restarts from the
initial state(s), `puct` reuses the buffer by TTT-Discover's PUCT rule, `greedy` restarts from the best states.
"""

from __future__ import annotations

from typing import TypeVar

from discover_agent.agents import SearchAgent
from discover_agent.config import AgentConfig, GreedyConfig, PUCTConfig
from discover_agent.sampler import FixedSampler, GreedySampler, PUCTSampler, Sampler
from discover_agent.types import State

#: The config of a PUCT agent (TTT-Discover's extends it).
P = TypeVar("P", bound=PUCTConfig)


class BestOfN(SearchAgent[AgentConfig]):
    """Sample from the initial states every time, keep the best: the sampling-only baseline."""

    name = "best-of-n"

    def make_sampler(self, initial: list[State]) -> Sampler:
        return FixedSampler(initial)


class PUCTSearch(SearchAgent[P]):
    """PUCT reuse of the buffer without training (the paper's ablation)."""

    name = "puct"
    config_class = PUCTConfig

    def make_sampler(self, initial: list[State]) -> Sampler:
        cfg = self.config
        return PUCTSampler(
            initial, c=cfg.puct_c, max_size=cfg.buffer_size, children_per_parent=cfg.children_per_parent,
            seed=cfg.seed, visits=cfg.visits,
        )  # fmt: skip


class Greedy(SearchAgent[GreedyConfig]):
    """Epsilon-greedy restarts from the best states, no training."""

    name = "greedy"
    config_class = GreedyConfig

    def make_sampler(self, initial: list[State]) -> Sampler:
        cfg = self.config
        return GreedySampler(initial, epsilon=cfg.epsilon, top_k=cfg.top_k, seed=cfg.seed)
