"""Every agent by name, as `discover run --agent` and `discover bench --agents` know them: adding one is a class in
its own module plus one line here."""

from __future__ import annotations

from typing import Any

from discover_agent.agents import SearchAgent
from discover_agent.calibration import EvolutionStrategy, RandomSearch
from discover_agent.search import BestOfN, Greedy, PUCTSearch
from discover_agent.ttt import TTTDiscover

AGENTS: dict[str, type[SearchAgent[Any]]] = {
    cls.name: cls for cls in (TTTDiscover, BestOfN, PUCTSearch, Greedy, RandomSearch, EvolutionStrategy)
}
