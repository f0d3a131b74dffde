"""`DiscoverEnv`: the Gymnasium face of a `Problem` — one prompt in, one reply out, one verified reward.

Episodes are one step long. `reset(options={"state": s})` restarts from any earlier attempt after checking
it (its score is recomputed; a tampered one is rejected). The problem's class docstring is the manual.
"""

from __future__ import annotations

import importlib
import math
import string
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from discover_envs.problem import InvalidSolution, InvalidState, Problem
from discover_envs.state import STATE_KEYS, content_id, make_state

#: Characters a prompt or reply may contain; covers ASCII text, code and the maths in the prompts.
CHARSET = string.printable + "őáéíóúöüäß×≤≥±≈∞∑∫√πβλ–—‘’“”…·²³⁻∈"
MAX_TEXT = 2_000_000
#: Most (problem, state id, score) triples remembered as verified in this process (see `_VERIFIED`).
MAX_VERIFIED = 100_000
#: States this process has verified (produced by `step` or checked by `reset`), so an agent restarting from
#: its own buffer does not re-run code tasks. Sound because the id is re-derived from the content each time
#: and the score must equal the verified one.
_VERIFIED: set[tuple[str, str, float]] = set()


def load_problem(problem: str | type[Problem], kwargs: dict[str, Any]) -> Problem:
    """Build a problem from a class or a "module:Class" path (what the registry stores)."""
    if isinstance(problem, str):
        module, _, name = problem.partition(":")
        problem = getattr(importlib.import_module(module), name)
    if not (isinstance(problem, type) and issubclass(problem, Problem)):
        raise TypeError(f"problem must be a Problem subclass, got {problem!r}")
    return problem(**kwargs)


class DiscoverEnv(gym.Env[str, str]):
    """A text environment around one `Problem`; see the problem's docstring for its rules and figures."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 - Gymnasium's own convention

    def __init__(self, problem: str | type[Problem], **problem_kwargs: Any) -> None:
        self.problem = load_problem(problem, problem_kwargs)
        self._key = f"{problem}:{sorted(problem_kwargs.items())!r}"
        self.observation_space = spaces.Text(max_length=MAX_TEXT, min_length=1, charset=CHARSET)
        self.action_space = spaces.Text(max_length=MAX_TEXT, min_length=0, charset=CHARSET)
        self.state: dict[str, Any] | None = None

    @property
    def construction_spec(self):
        """Shape of a construction (kind, lengths, bounds, arity), or None for code-only tasks."""
        return getattr(self.problem, "construction_spec", None)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"state"}
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; the only option is 'state'")
        if options.get("state") is not None:
            self.state = self._checked_state(options["state"])
        else:
            self.state = self.problem.initial_state(self.np_random)
        return self.problem.prompt(self.state), {"state": self.state}

    def _checked_state(self, state: Any) -> dict[str, Any]:
        if not isinstance(state, dict):
            raise InvalidState(f"a state must be a dict, got {type(state).__name__}")
        unknown = set(state) - STATE_KEYS
        missing = {"score", "construction", "code"} - set(state)
        if unknown or missing:
            raise InvalidState(f"state has unknown keys {sorted(unknown)} / lacks keys {sorted(missing)}")
        expected_id = content_id(state["construction"], state["code"])
        if state.get("id") not in (None, expected_id):
            raise InvalidState(f"state id {state['id']!r} does not match its content (expected {expected_id})")
        claimed = state["score"]
        if isinstance(claimed, bool) or not isinstance(claimed, (int, float)) or not math.isfinite(claimed):
            raise InvalidState(f"state score must be a finite number, got {claimed!r}")
        if (self._key, expected_id, float(claimed)) in _VERIFIED:
            score = float(claimed)
        else:
            score = self.problem.rescore(state)
            if not math.isclose(score, claimed, rel_tol=self.problem.score_rtol, abs_tol=1e-300):
                raise InvalidState(f"state score {claimed!r} does not match the recomputed score {score!r}")
            self._remember(expected_id, score)
        return make_state(
            score=score,
            reward=self.problem.reward(score),
            construction=state["construction"],
            code=state["code"],
            parent_id=state.get("parent_id"),
        )

    def _remember(self, state_id: str, score: float) -> None:
        if len(_VERIFIED) >= MAX_VERIFIED:
            _VERIFIED.clear()
        _VERIFIED.add((self._key, state_id, float(score)))

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        if not isinstance(action, str):
            raise TypeError(f"the action must be the model's reply as a str, got {type(action).__name__}")
        info: dict[str, Any] = {"parent_id": self.state["id"]}
        try:
            result = self.problem.evaluate(action, self.state)
        except InvalidSolution as exc:
            reward = self.problem.failure_reward
            info.update(valid=False, score=None, error=str(exc), next_state=None)
        else:
            reward = result.reward
            child = make_state(
                score=result.score,
                reward=result.reward,
                construction=result.construction,
                code=result.code,
                parent_id=self.state["id"],
            )
            self._remember(child["id"], child["score"])
            info.update(valid=True, score=result.score, error=None, next_state=child, **result.details)
        return self.problem.prompt(self.state), float(reward), True, False, info
