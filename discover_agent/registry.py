"""Every agent by name, as `discover run --agent` and `discover bench --agents` know them: adding one is a class in
its own module plus one line here."""

from __future__ import annotations

from discover_agent.agents import BestOfN, Greedy, PUCTSearch, SearchAgent, TTTDiscover
from discover_agent.calibration import EvolutionStrategy, RandomSearch

AGENTS: dict[str, type[SearchAgent]] = {
    cls.name: cls for cls in (TTTDiscover, BestOfN, PUCTSearch, Greedy, RandomSearch, EvolutionStrategy)
}
