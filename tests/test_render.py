"""`render_mode="rgb_array"`: every env draws its current state as an RGB image, drawn by its problem."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from test_env_contract import MATH_IDS

import discover_envs
from discover_envs.drawing import state_image, state_png
from discover_envs.problems.ahc058 import AppleMachines
from discover_envs.problems.circle_packing import CirclePacking


def red_pixels(image: np.ndarray) -> int:
    """Pixels of matplotlib's C3 (what a drawing marks as broken), solid or blended on white."""
    r, g, b = (image[:, :, k].astype(int) for k in range(3))
    return int(((r - g > 40) & (r - b > 40)).sum())


def test_every_env_declares_rgb_array_and_ansi():
    for env_id in discover_envs.env_ids():
        assert {"ansi", "rgb_array"} <= set(gym.spec(env_id).entry_point.metadata["render_modes"]), env_id


@pytest.mark.parametrize("env_id", MATH_IDS)
def test_rgb_array_is_a_picture_of_the_current_state(env_id):
    env = gym.make(env_id, render_mode="rgb_array")
    _, info = env.reset(seed=0)
    image = env.render()
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] >= 300 and image.shape[1] >= 300
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20, "a drawing, not a blank frame"
    env.reset(seed=1)
    assert not np.array_equal(env.render(), image), "another state draws another picture"
    env.reset(options={"state": info["state"]})
    assert np.array_equal(env.render(), image), "the same state draws the same picture"


def test_overlapping_circles_are_marked_red_and_a_packing_is_not():
    problem = CirclePacking(n=3)
    packing = [[0.25, 0.25, 0.2], [0.75, 0.25, 0.2], [0.5, 0.75, 0.2]]
    clean = state_image(problem, {"construction": packing, "score": 0.6})
    overlapping = [[0.25, 0.25, 0.2], [0.4, 0.25, 0.2], [0.5, 0.75, 0.2]]
    marked = state_image(problem, {"construction": overlapping, "score": 0.6})
    assert red_pixels(clean) == 0
    assert red_pixels(marked) > 1000


def test_an_invalid_construction_is_drawn_with_the_reason():
    """A hand-edited state must still draw (the report shows it), titled with why it is invalid."""
    problem = gym.make("discover/ErdosMinOverlap-v0", n=4).unwrapped.problem
    png = state_png(problem, {"construction": [1.0, 0.0, 0.0, 0.0], "score": 0.5})
    assert png.startswith(b"\x89PNG")


def test_contest_states_draw_their_per_case_scores_with_failed_cases_red():
    problem = AppleMachines(n_cases=2, timeout_s=10)
    state = problem.initial_state(np.random.default_rng(0))
    good = state_image(problem, state)
    outputs = state["construction"][problem.output_key]
    failed = {**state, "construction": {**state["construction"], problem.output_key: [outputs[0], None]}}
    assert red_pixels(good) == 0
    assert red_pixels(state_image(problem, failed)) > 100


def test_code_states_without_a_picture_draw_a_card_with_their_code():
    from discover_envs.problem import Problem

    class Card(Problem):
        title, higher_is_better = "card", True
        statement = initial_state = evaluate = rescore = render_state = lambda *a: None

    image = state_image(Card(), {"score": 1.5, "code": "def run():\n    return 1\n", "construction": None})
    assert image.dtype == np.uint8 and (image < 128).any(), "text is drawn"
