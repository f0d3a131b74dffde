"""A problem that draws a secret at creation and scores with it (as Denoising's split), registered as
`test/Secret-v0`: states scored by one instance rescore the same only in an instance given the same secret."""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np

import discover_envs
from discover_envs import ConstructionProblem, ConstructionSpec


class SecretOffset(ConstructionProblem):
    title = "sum plus a secret offset"
    higher_is_better = True
    figure = "sum + offset"

    def __init__(self, secret: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.secret = secrets.randbits(20) if secret is None else secret
        self.spec = ConstructionSpec("sequence", 3, 3, 0.0, 1.0)

    def pinned_kwargs(self) -> dict[str, Any]:
        return {"secret": self.secret}

    def statement(self) -> str:
        return "Maximise the sum of three numbers in [0, 1].\n\n" + self.output_rules()

    def initial_construction(self, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(0, 1, 3)

    def validate(self, construction: Any) -> np.ndarray:
        return self.check_array(construction)

    def score(self, construction: np.ndarray) -> float:
        return float(construction.sum()) + self.secret


discover_envs.register("test/Secret-v0", SecretOffset)
