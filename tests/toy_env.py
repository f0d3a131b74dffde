"""A Gymnasium text env of someone else's, not a `DiscoverEnv`: it keeps only the README's agent contract.

The reply names a number; the score is how close it is to 7 (higher is better). States are JSON dicts with
`id`, `score`, `reward` and the env's own `guess`; `reset(options={"state": s})` recomputes the score.
Importing the module registers `toy/Guess-v0`, so `discover run toy_env:toy/Guess-v0` works, and
`toy/GuessNumbers-v0`, the same env declaring a construction spec (one number) for the calibration agents.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from discover_envs.problem import ConstructionSpec

TARGET = 7.0
#: The construction spec of toy/GuessNumbers-v0: one number in [0, 100].
SPEC = ConstructionSpec(kind="sequence", min_length=1, max_length=1, low=0.0, high=100.0)


def _state(guess: float, parent_id: str | None) -> dict[str, Any]:
    score = -abs(guess - TARGET)
    return {
        "id": hashlib.sha256(repr(guess).encode()).hexdigest()[:12],
        "score": score,
        "reward": 1.0 / (1.0 - score),
        "guess": guess,
        "parent_id": parent_id,
    }


class GuessEnv(gym.Env[str, str]):
    metadata = {"render_modes": ["ansi"], "render_fps": 1}  # noqa: RUF012

    def __init__(self, render_mode: str | None = None, spec: bool = False) -> None:
        self.render_mode = render_mode
        if spec:  # toy/GuessNumbers-v0: replies are also ```json [number] constructions (for calibration agents)
            self.metadata = {**type(self).metadata, "construction_spec": SPEC}
        self.observation_space = spaces.Text(max_length=10_000, min_length=0, charset=string.printable)
        self.action_space = spaces.Text(max_length=10_000, min_length=0, charset=string.printable)
        self.state: dict[str, Any] | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        given = (options or {}).get("state")
        if given is None:
            self.state = _state(float(self.np_random.integers(0, 100)), None)
        else:
            self.state = _state(float(given["guess"]), given.get("parent_id"))
            if self.state["id"] != given["id"] or not math.isclose(self.state["score"], given["score"]):
                raise ValueError(f"state {given['id']} does not match its guess")
        return f"Guess the number. Last guess: {self.state['guess']}. Reply with a number.", {"state": self.state}

    def step(self, action: str):
        match = re.search(r"-?\d+(\.\d+)?", action)
        if match is None:
            info = {"valid": False, "score": None, "error": "no number in the reply", "next_state": None}
            return "", 0.0, True, False, info
        child = _state(float(match.group()), self.state["id"])
        info = {"valid": True, "score": child["score"], "error": None, "next_state": child}
        return "", child["reward"], True, False, info

    def render(self) -> str | None:
        return None if self.render_mode is None else f"guess {self.state['guess']}, score {self.state['score']}"


if "toy/Guess-v0" not in gym.registry:
    gym.register("toy/Guess-v0", entry_point=GuessEnv)
    gym.register("toy/GuessNumbers-v0", entry_point=GuessEnv, kwargs={"spec": True})
