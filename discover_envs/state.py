"""States: JSON-serialisable start points for an episode, named by a hash of their content.

A state is a plain dict so it can be logged, saved in a buffer file and handed back to
`reset(options={"state": ...})`. Its id depends only on what it contains (construction and code), so the
same attempt found twice has the same id and a buffer can deduplicate by id.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

STATE_KEYS = frozenset({"id", "score", "reward", "construction", "code", "parent_id", "parent_score"})


def content_id(construction: Any, code: str | None) -> str:
    """sha256 over the canonical JSON of (construction, code); 16 hex digits are plenty for one run."""
    payload = json.dumps({"construction": construction, "code": code}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def make_state(
    *,
    score: float,
    reward: float,
    construction: Any = None,
    code: str | None = None,
    parent_id: str | None = None,
    parent_score: float | None = None,
) -> dict[str, Any]:
    """A state; `parent_score` (the score of the state it was made from) is only shown in prompts ("before and
    after: a -> b", as the paper's prompts do), so it is not part of the id and is not re-verified."""
    if not (math.isfinite(score) and math.isfinite(reward)):
        raise ValueError(f"a state needs a finite score and reward, got score={score!r}, reward={reward!r}")
    if parent_score is not None and (
        isinstance(parent_score, bool) or not isinstance(parent_score, (int, float)) or not math.isfinite(parent_score)
    ):
        raise ValueError(f"a state's parent_score must be a finite number or None, got {parent_score!r}")
    return {
        "id": content_id(construction, code),
        "score": float(score),
        "reward": float(reward),
        "construction": construction,
        "code": code,
        "parent_id": parent_id,
        "parent_score": None if parent_score is None else float(parent_score),
    }
