"""The Gymnasium contract every environment keeps: make, check_env, seeding, steps, restarts, rendering,
and registering a problem of one's own from outside the package."""

from __future__ import annotations

import json
import warnings
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import discover_envs
from discover_envs import ConstructionProblem, ConstructionSpec, InvalidState
from discover_envs.state import content_id

MATH_IDS = [
    "discover/ErdosMinOverlap-v0",
    "discover/AC1-v0",
    "discover/AC2-v0",
    "discover/CirclePacking26-v0",
    "discover/CirclePacking32-v0",
]
IDENTITY_CODE = "def run(construction, **kwargs):\n    return construction\n"


@pytest.fixture(params=MATH_IDS)
def env_id(request) -> str:
    return request.param


@pytest.fixture
def env(env_id) -> gym.Env:
    return gym.make(env_id, timeout_s=10)


def json_reply(construction) -> str:
    return "```json\n" + json.dumps(construction) + "\n```"


def valid_step(env: gym.Env, seed: int = 0) -> dict:
    """Step with the start construction itself: always a valid attempt."""
    _, info = env.reset(seed=seed)
    *_, step_info = env.step(json_reply(info["state"]["construction"]))
    assert step_info["valid"], step_info["error"]
    return step_info


def test_math_ids_are_registered():
    assert set(MATH_IDS) <= set(discover_envs.env_ids())


def test_make_works_with_and_without_module_prefix(env_id):
    assert isinstance(gym.make(env_id).unwrapped, discover_envs.DiscoverEnv)
    assert isinstance(gym.make("discover_envs:" + env_id).unwrapped, discover_envs.DiscoverEnv)


@pytest.mark.parametrize("env_id", discover_envs.env_ids())
def test_every_registered_env_passes_the_checker_without_a_warning(env_id):
    """As Gymnasium's own test_all_env_api: make with the passive checker on, check_env, reset, step, render."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make(env_id, render_mode="ansi")
        assert any(isinstance(e, gym.wrappers.PassiveEnvChecker) for e in _wrappers(env)), "env checker is off"
        check_env(env.unwrapped)
        _, info = env.reset(seed=0)
        env.step("no block here")
        assert isinstance(env.render(), str)
        assert {"id", "score", "reward"} <= set(info["state"])
        env.close()


def _wrappers(env: gym.Env) -> list[gym.Env]:
    chain = [env]
    while isinstance(chain[-1], gym.Wrapper):
        chain.append(chain[-1].env)
    return chain


def test_an_id_cannot_be_made_with_another_problem():
    with pytest.raises(TypeError, match=r"bound to discover_envs\.problems\.erdos"):
        gym.make("discover/ErdosMinOverlap-v0", problem="discover_envs.problems.circle_packing:CirclePacking")


def test_render_ansi_shows_the_current_state(env):
    env = gym.make(env.spec.id, render_mode="ansi")
    _, info = env.reset(seed=0)
    assert "ansi" in env.metadata["render_modes"]
    assert f"{info['state']['score']:.{env.unwrapped.problem.shown_digits}f}" in env.render()
    assert env.render() in env.reset(options={"state": info["state"]})[0], "the prompt shows the same state"
    plain = gym.make(env.spec.id)
    plain.reset(seed=0)
    assert plain.render() is None


def test_metadata_tells_agents_the_direction_and_the_construction_spec(env):
    problem = env.unwrapped.problem
    assert env.metadata["higher_is_better"] is problem.higher_is_better
    assert env.metadata["construction_spec"] == problem.spec
    assert env.metadata["score_name"] == problem.figure


class SquareSum(ConstructionProblem):
    """A problem of one's own: n numbers in [0, 1], score the sum of their squares (higher is better)."""

    title: ClassVar[str] = "Square sum"
    higher_is_better: ClassVar[bool] = True
    figure: ClassVar[str] = "sum of squares"

    def __init__(self, n: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = ConstructionSpec(kind="sequence", min_length=n, max_length=n, low=0.0, high=1.0)

    def statement(self) -> str:
        return f"Give {self.spec.min_length} numbers in [0, 1] with the largest sum of squares."

    def validate(self, construction: Any) -> np.ndarray:
        return self.check_array(construction)

    def score(self, construction: np.ndarray) -> float:
        return float(np.sum(construction**2))

    def initial_construction(self, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(0, 0.5, self.spec.min_length)


def test_a_problem_of_ones_own_is_registered_from_outside_the_package():
    discover_envs.register("mine/SquareSum-v0", SquareSum, n=4)
    discover_envs.register("mine/SquareSum-v0", SquareSum, n=4)  # importing twice is harmless
    with pytest.raises(ValueError, match="already registered"):
        discover_envs.register("mine/SquareSum-v0", "discover_envs.problems.erdos:ErdosMinOverlap")
    env = gym.make("mine/SquareSum-v0")
    check_env(env.unwrapped)
    env.reset(seed=0)
    *_, step_info = env.step(json_reply([1.0, 1.0, 1.0, 0.5]))
    assert step_info["valid"] and step_info["score"] == pytest.approx(3.25)
    assert env.metadata["construction_spec"].min_length == 4


def test_reset_with_the_same_seed_gives_the_same_prompt(env):
    first, _ = env.reset(seed=7)
    again, _ = env.reset(seed=7)
    other, _ = env.reset(seed=8)
    assert first == again
    assert first != other


def test_step_ends_the_episode_with_a_finite_reward_and_full_info(env):
    _, info = env.reset(seed=0)
    obs, reward, terminated, truncated, step_info = env.step(json_reply(info["state"]["construction"]))
    assert (terminated, truncated) == (True, False)
    assert isinstance(reward, float) and np.isfinite(reward)
    assert {"valid", "score", "error", "next_state"} <= set(step_info)
    assert step_info["valid"] and step_info["error"] is None
    assert step_info["score"] == pytest.approx(info["state"]["score"], rel=1e-12)
    assert env.observation_space.contains(obs)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ("I would rather not answer.", "no fenced ```json or ```python block"),
        ("```json\n[0.5, 0.5\n```", "not valid JSON"),
        ('```json\n"0.5"\n```', "string"),
        ("```json\n[NaN, 0.5, 0.5]\n```", "construction"),
        ("```python\ndef run(**kwargs):\n    raise RuntimeError('nothing found')\n```", "nothing found"),
    ],
)
def test_invalid_reply_gets_failure_reward_and_says_why(env, reply, message):
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(reply)
    assert terminated
    assert reward == env.unwrapped.problem.failure_reward
    assert info["valid"] is False and info["score"] is None and info["next_state"] is None
    assert message in info["error"]


def test_failure_reward_is_below_the_start_state_reward(env):
    _, info = env.reset(seed=0)
    assert env.unwrapped.problem.failure_reward < info["state"]["reward"]


def test_reset_from_next_state_shows_that_state(env):
    child = valid_step(env)["next_state"]
    obs, info = env.reset(options={"state": child})
    assert info["state"]["id"] == child["id"]
    problem = env.unwrapped.problem
    assert f"{child['score']:.{problem.shown_digits}f}" in obs
    assert problem.render_state(child) in obs


def test_reset_from_tampered_score_is_rejected(env):
    child = valid_step(env)["next_state"]
    with pytest.raises(InvalidState, match="does not match the recomputed score"):
        env.reset(options={"state": {**child, "score": child["score"] * (1 + 1e-6)}})


def test_reset_from_tampered_id_is_rejected(env):
    child = valid_step(env)["next_state"]
    with pytest.raises(InvalidState, match="does not match its content"):
        env.reset(options={"state": {**child, "id": "0" * 16}})


def test_reset_from_tampered_construction_is_rejected(env):
    child = valid_step(env)["next_state"]
    construction = json.loads(json.dumps(child["construction"]))
    construction[0] = [-1.0] * 3 if isinstance(construction[0], list) else -1.0
    with pytest.raises(InvalidState, match="state construction is invalid"):
        env.reset(options={"state": {**child, "construction": construction, "id": None}})


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("code", 5, "code must be a str or None, got int"),
        ("code", ["x"], "code must be a str or None, got list"),
        ("code", "\ud800", "code is not valid Unicode"),
        ("parent_id", {1}, "parent_id must be a str or None, got set"),
        ("construction", {1, 2}, "construction is not JSON data"),
        ("construction", b"ab", "construction is not JSON data"),
        ("construction", nested(100_000), "construction is not JSON data"),
    ],
    ids=["int-code", "list-code", "surrogate-code", "set-parent", "set-construction", "bytes", "100k-deep"],
)
def test_reset_from_a_state_of_odd_types_is_rejected_by_name(field, value, message):
    """Red-team: `reset` took a non-str `code` (AttributeError when the prompt was rendered) and odd types."""
    env = gym.make("discover/ErdosMinOverlap-v0", n=16)
    _, info = env.reset(seed=0)
    with pytest.raises(InvalidState, match=message):
        env.reset(options={"state": {**info["state"], field: value, "id": None}})


@pytest.mark.parametrize(
    ("env_id", "kwargs", "message"),
    [
        ("discover/ErdosMinOverlap-v0", {"n": 1.5}, "n must be an integer, got 1.5"),
        ("discover/ErdosMinOverlap-v0", {"n": True}, "n must be an integer, got True"),
        ("discover/ErdosMinOverlap-v0", {"start_n": 2.5}, "start_n must be an integer"),
        ("discover/AC1-v0", {"n": 1.5}, "n must be an integer"),
        ("discover/AC2-v0", {"start_n": "16"}, "start_n must be an integer"),
        ("discover/CirclePacking26-v0", {"timeout_s": True}, "timeout_s must be a positive finite number"),
        ("discover/AC1-v0", {"memory_mb": "4096"}, "memory_mb must be an integer"),
        ("discover/AC1-v0", {"memory_mb": 4096.5}, "memory_mb must be an integer"),
    ],
)
def test_constructor_arguments_of_the_wrong_type_are_refused_at_make(env_id, kwargs, message):
    """Red-team: n=1.5 or True failed late (at reset), timeout_s=True became 1 s, memory_mb="4096" was taken."""
    with pytest.raises(ValueError, match=message):
        gym.make(env_id, **kwargs)


def test_unknown_reset_option_is_an_error(env):
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(seed=0, options={"temperature": 1.0})


def test_next_state_is_json_and_named_by_its_content(env):
    first = valid_step(env)["next_state"]
    again = valid_step(env)["next_state"]
    assert json.loads(json.dumps(first, allow_nan=False)) == first
    assert first["id"] == again["id"] == content_id(first["construction"], first["code"])
    assert valid_step(env, seed=1)["next_state"]["id"] != first["id"]


def test_python_action_receives_the_start_construction(env):
    _, info = env.reset(seed=0)
    _, reward, _, _, step_info = env.step("Returning the start state:\n```python\n" + IDENTITY_CODE + "```")
    assert step_info["valid"], step_info["error"]
    assert step_info["score"] == pytest.approx(info["state"]["score"], rel=1e-12)
    assert reward == pytest.approx(info["state"]["reward"], rel=1e-12)
    assert step_info["next_state"]["code"] == IDENTITY_CODE
