"""`DiscoverEnv`: the Gymnasium face of a `Problem` — one prompt in, one reply out, one verified reward.

Episodes are one step long. `reset(options={"state": s})` restarts from any earlier attempt after checking
it (its score is recomputed; a tampered one is rejected). The problem's class docstring is the manual.
"""

from __future__ import annotations

import importlib
import logging
import math
import string
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from discover_envs.drawing import state_image
from discover_envs.problem import Evaluation, InvalidSolution, InvalidState, Problem
from discover_envs.sandbox import IsolationUnavailable, allow_unsafe_no_isolation, isolation_report, recorded_modes
from discover_envs.state import STATE_KEYS, content_id, make_state

#: Characters a prompt or reply may contain; covers ASCII text, code and the maths in the prompts.
CHARSET = string.printable + "őáéíóúöüäß×≤≥±≈∞∑∫√πβλ–—‘’“”…·²³⁻∈"
MAX_TEXT = 2_000_000
#: Longest error kept in `info["error"]` (it lands in logs and prompts).
MAX_ERROR = 10_000
#: Most (problem, state id, score) triples remembered as verified in this process (see `_VERIFIED`).
MAX_VERIFIED = 100_000
#: States this process has verified (produced by `step` or checked by `reset`), so an agent restarting from
#: its own buffer does not re-run code tasks. Sound because the id is re-derived from the content each time
#: and the score must equal the verified one.
_VERIFIED: set[tuple[str, str, float]] = set()
_log = logging.getLogger(__name__)


def load_problem(problem: str | type[Problem], kwargs: dict[str, Any]) -> Problem:
    """Build a problem from a class or a "module:Class" path (what the registry stores)."""
    if isinstance(problem, str):
        module, _, name = problem.partition(":")
        problem = getattr(importlib.import_module(module), name)
    if not (isinstance(problem, type) and issubclass(problem, Problem)):
        raise TypeError(f"problem must be a Problem subclass, got {problem!r}")
    return problem(**kwargs)


class DiscoverEnv(gym.Env[str, str]):
    """A text environment around one `Problem`; see the problem's docstring for its rules and figures.

    `metadata` carries what an agent may use beyond the Gymnasium API (see the README's agent contract):
    `higher_is_better` and `score_name` of the problem's figure, `construction_spec` (None for code-only
    tasks) for constrained decoding, `sandbox`, the isolation candidate code gets here (for run records), and
    `pinned_kwargs`, arguments this instance drew itself (a secret seed) that agents pin in the run's config,
    `published`, the literature's figures for the problem as (who, value) pairs (context for leaderboards), and
    `kl_coef`, the paper's lambda of the KL penalty for the task (TTT's default).
    A valid step's `info["copy"]` says whether the reply only restated its start state (`Problem.is_copy`).
    `render_mode="ansi"`: `render()` returns the current state as the prompt shows it; `"rgb_array"`: a
    picture of it (H x W x 3 uint8) drawn by the problem's `draw` (a step function, a packing, per-case scores).
    The current state is the episode's start state; a step's result is `info["next_state"]`, which
    `reset(options={"state": ...})` makes current.
    `unsafe_no_isolation=True` lets candidate code run without a namespace sandbox where bubblewrap cannot
    (a root parent refuses otherwise; see `discover_envs.sandbox`); it holds for the whole process.
    """

    #: render_fps: Gymnasium's checker asks for one; a text env renders once per step.
    metadata: dict[str, Any] = {"render_modes": ["ansi", "rgb_array"], "render_fps": 1}  # noqa: RUF012 - Gymnasium's convention

    def __init__(self, problem: str | type[Problem], render_mode: str | None = None, **problem_kwargs: Any) -> None:
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.render_mode = render_mode
        if problem_kwargs.pop("unsafe_no_isolation", False):
            allow_unsafe_no_isolation()  # process-wide: see `discover_envs.sandbox`
        self.problem = load_problem(problem, problem_kwargs)
        pinned = self.problem.pinned_kwargs()
        # Two instances that drew different secrets (e.g. Denoising's split) must not share verified states.
        self._key = f"{problem}:{sorted({**problem_kwargs, **pinned}.items())!r}"
        self.metadata = {
            **type(self).metadata,
            "higher_is_better": self.problem.higher_is_better,
            "score_name": getattr(self.problem, "figure", "score"),
            "construction_spec": self.construction_spec,
            "sandbox": isolation_report(self.problem.limits),
            "pinned_kwargs": pinned,
            "published": self.problem.published(),
            "kl_coef": self.problem.kl_coef,
        }
        self.observation_space = spaces.Text(max_length=MAX_TEXT, min_length=1, charset=CHARSET)
        self.action_space = spaces.Text(max_length=MAX_TEXT, min_length=0, charset=CHARSET)
        self.state: dict[str, Any] | None = None

    @property
    def construction_spec(self):
        """Shape of a construction (kind, lengths, bounds, arity), or None for code-only tasks."""
        return getattr(self.problem, "construction_spec", None)

    def render(self) -> str | np.ndarray | None:
        """The current state as text ("ansi") or as an RGB image ("rgb_array"); None without a render mode."""
        if self.render_mode is None:
            return None
        if self.state is None:
            raise RuntimeError("call reset() before render()")
        if self.render_mode == "rgb_array":
            return state_image(self.problem, self.state)
        return self.problem.render_state(self.state)

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
        for key in ("code", "id", "parent_id"):
            value = state.get(key)
            if value is not None and not isinstance(value, str):
                raise InvalidState(f"state {key} must be a str or None, got {type(value).__name__}")
        code = state["code"]
        if code is not None and len(code) > MAX_TEXT:
            raise InvalidState(f"state code has {len(code)} characters; at most {MAX_TEXT} are read")
        try:
            if code is not None:
                code.encode("utf-8")
            expected_id = content_id(state["construction"], code)
        except UnicodeEncodeError as exc:
            raise InvalidState(f"state code is not valid Unicode text ({exc.reason} at index {exc.start})") from None
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidState(f"state construction is not JSON data: {str(exc) or 'nested too deeply'}") from None
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
        try:
            return make_state(
                score=score,
                reward=self.problem.reward(score),
                construction=state["construction"],
                code=state["code"],
                parent_id=state.get("parent_id"),
                parent_score=state.get("parent_score"),
            )
        except ValueError as exc:
            raise InvalidState(str(exc)) from None

    def _remember(self, state_id: str, score: float) -> None:
        if len(_VERIFIED) >= MAX_VERIFIED:
            _VERIFIED.clear()
        _VERIFIED.add((self._key, state_id, float(score)))

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Verify one reply. Nothing the reply or its code does raises out of here: every failure, including a
        crash of the verifier itself (logged with its traceback), is `valid=False` with a readable `error`.
        `info["sandbox"]` names the mode the code ran in ("refused" when none was allowed, "none-needed" when
        the reply ran no code)."""
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        if not isinstance(action, str):
            raise TypeError(f"the action must be the model's reply as a str, got {type(action).__name__}")
        info: dict[str, Any] = {"parent_id": self.state["id"]}
        with recorded_modes() as modes:
            outcome = self._verified(action)
        if isinstance(outcome, str):
            reward = self.problem.failure_reward
            info.update(valid=False, score=None, error=outcome[:MAX_ERROR], next_state=None)
        else:
            result, child = outcome
            reward = child["reward"]
            self._remember(child["id"], child["score"])
            copy = self.problem.is_copy(self.state, child)
            info.update(valid=True, score=child["score"], error=None, next_state=child, copy=copy, **result.details)
        info["sandbox"] = modes[-1] if modes else "none-needed"
        return self.problem.prompt(self.state), float(reward), True, False, info

    def _verified(self, action: str) -> tuple[Evaluation, dict[str, Any]] | str:
        """(evaluation, child state) of a valid reply, else the reason it is invalid."""
        assert self.state is not None  # `step` checked it
        if len(action) > MAX_TEXT:
            return f"the reply has {len(action)} characters; at most {MAX_TEXT} are read"
        try:
            action.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"the reply is not valid Unicode text ({exc.reason} at index {exc.start})"
        try:
            result = self.problem.evaluate(action, self.state)
            if not (math.isfinite(result.score) and math.isfinite(result.reward)):
                return f"the verifier gave a non-finite score {result.score!r} (reward {result.reward!r})"
            child = make_state(
                score=float(result.score),
                reward=float(result.reward),
                construction=result.construction,
                code=result.code,
                parent_id=self.state["id"],
                parent_score=self.state["score"],
            )
        except InvalidSolution as exc:
            return str(exc) or "the reply breaks the problem's rules"
        except IsolationUnavailable as exc:
            return f"the code was not run: {exc}"
        except Exception as exc:  # a verifier bug must cost one attempt, not the run; the log keeps it visible
            _log.exception("%s: the verifier failed on a reply", self.problem.title)
            return f"the verifier failed on this reply: {type(exc).__name__}: {exc}"
        return result, child
