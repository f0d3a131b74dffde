"""The Gymnasium contract every mathematics environment keeps: make, check_env, seeding, steps, restarts."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import discover_envs
from discover_envs import InvalidState
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


def test_gymnasium_env_checker_passes(env):
    check_env(env.unwrapped)


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
    assert json.dumps(child["construction"]) in obs


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
