"""The mathematics suite's verifiers: published figures, exact FFT maxima, strict input rules, start states."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import discover_envs  # noqa: F401 - registers the ids
from discover_envs.problem import InvalidState, format_numbers
from discover_envs.problems.autocorrelation import (
    FirstAutocorrelation,
    SecondAutocorrelation,
    convolve_exact_max,
    fft_error_bound,
)
from discover_envs.problems.circle_packing import CirclePacking
from discover_envs.problems.erdos import ErdosMinOverlap

DATA = Path(__file__).parent / "data"


# Float64 margin (dx² + dy²) - (ri + rj)² is +1.4e-17 (a plain float test accepts), the exact one -3.4e-18.
FLOAT_ACCEPTS_OVERLAP = [
    [0.5547846749285816, 0.4079146855055481, 0.178],
    [0.31638940957447786, 0.3066110542114116, 0.08102650107012585],
]
# Float64 margin -1.4e-17 (a plain float test rejects), the exact one +1.2e-17: the circles do not overlap.
FLOAT_REJECTS_TANGENCY = [
    [0.31132786845818516, 0.3497133105998256, 0.189],
    [0.5682497658774521, 0.5588758046297, 0.14229716310634713],
]


def fixture(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def json_reply(construction) -> str:
    return "```json\n" + json.dumps(construction) + "\n```"


def step(env_id: str, construction, **kwargs) -> tuple[float, dict]:
    env = gym.make(env_id, **kwargs)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(json_reply(construction))
    return reward, info


def direct_ac2(a: np.ndarray) -> float:
    c = np.convolve(a, a)
    y = np.concatenate([[0.0], c, [0.0]])
    h = 1.0 / (c.size + 1)
    l2 = h / 3 * np.sum(y[:-1] ** 2 + y[:-1] * y[1:] + y[1:] ** 2)
    return l2 / (np.abs(c).sum() * h * np.abs(c).max())


@pytest.mark.parametrize(
    ("env_id", "file", "key", "published"),
    [
        ("discover/ErdosMinOverlap-v0", "erdos_ttt_discover.json", "sequence", 0.3808753232),
        ("discover/AC1-v0", "ac1_ttt_discover.json", "sequence", 1.5028628983),
        ("discover/AC2-v0", "ac2_ttt_discover.json", "sequence", 0.9591797711),
        ("discover/CirclePacking26-v0", "circle_packing_26_ttt_discover.json", "circles", 2.6359773948),
    ],
)
def test_verifier_reproduces_published_figure(env_id, file, key, published):
    reward, info = step(env_id, fixture(file)[key])
    assert info["valid"], info["error"]
    assert info["score"] == pytest.approx(published, abs=1e-9)
    problem = gym.make(env_id).unwrapped.problem
    assert reward == (info["score"] if problem.higher_is_better else 1 / info["score"])


def test_published_circle_packing_sum_matches_its_file():
    data = fixture("circle_packing_26_ttt_discover.json")
    _, info = step("discover/CirclePacking26-v0", data["circles"])
    assert info["score"] == pytest.approx(data["sum_radii"], abs=1e-15)


def test_fft_convolution_max_equals_direct_convolution_max():
    rng = np.random.default_rng(0)
    for n, m in [(10, 7), (400, 1000), (3000, 2999)]:
        a, b = rng.random(n) ** 3, rng.random(m)
        full, peak = convolve_exact_max(a, b)
        direct = np.convolve(a, b)
        assert peak == pytest.approx(direct.max(), rel=1e-14)
        assert np.abs(full - direct).max() <= fft_error_bound(a, b, full.size)


def test_fft_convolution_max_on_a_plateau_is_recomputed_exactly():
    # ones(5000) * ones(1000) is 1000 exactly on 4001 entries; FFT noise must not leak into the maximum.
    full, peak = convolve_exact_max(np.ones(5000), np.ones(1000))
    assert np.count_nonzero(np.abs(full - 1000) < 1e-6) == 4001
    assert peak == 1000.0


@pytest.mark.parametrize("n", [50, 2000])
def test_ac1_score_is_the_autoconvolution_bound(n):
    a = np.random.default_rng(n).random(n)
    expected = 2 * n * np.convolve(a, a).max() / a.sum() ** 2
    assert FirstAutocorrelation().verify(a.tolist())[1] == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("n", [50, 2000])
def test_ac2_score_is_the_piecewise_linear_norm_ratio(n):
    a = np.random.default_rng(n).random(n)
    assert SecondAutocorrelation().verify(a.tolist())[1] == pytest.approx(direct_ac2(a), rel=1e-12)


@pytest.mark.parametrize("problem", [FirstAutocorrelation(), SecondAutocorrelation()])
def test_autocorrelation_figures_are_scale_free_even_for_subnormal_heights(problem):
    a = np.random.default_rng(1).random(500)
    tiny = a * 1e-310
    assert problem.verify(tiny.tolist())[1] == pytest.approx(problem.verify(a.tolist())[1], rel=1e-12)


def test_erdos_score_is_the_correlation_bound_at_fft_sizes():
    h = np.random.default_rng(2).uniform(0.2, 0.8, size=3000)
    h *= h.size / 2 / h.sum()
    expected = np.correlate(h, 1 - h, "full").max() * 2 / h.size
    assert ErdosMinOverlap().verify(h.tolist())[1] == pytest.approx(expected, rel=1e-13)


def test_erdos_rejects_a_function_above_one_after_rescaling():
    _, info = step("discover/ErdosMinOverlap-v0", [1.0, 0.0, 0.0, 0.0])
    assert not info["valid"]
    assert "after rescaling to integral 1" in info["error"]


def test_erdos_error_shows_enough_digits_to_see_a_tiny_violation():
    _, info = step("discover/ErdosMinOverlap-v0", [1.0, 0.0, 0.0, 1.0 - 2**-50])
    assert not info["valid"]
    reached = float(info["error"].split("h reaches ")[1].split(" ")[0])
    assert reached > 1.0, info["error"]


def test_erdos_rescales_subnormal_values_without_overflow():
    reward, info = step("discover/ErdosMinOverlap-v0", [5e-324, 0.0])
    assert info["valid"], info["error"]
    assert info["next_state"]["construction"] == [1.0, 0.0]
    assert np.isfinite(reward)


@pytest.mark.parametrize("env_id", ["discover/AC1-v0", "discover/AC2-v0"])
@pytest.mark.parametrize(
    ("construction", "message"),
    [
        ([0.5, -0.1, 0.2], "outside [0.0, 1000000.0]"),
        ([0.0, 0.0, 0.0], "sum to 0"),
        ([0.5, True, 0.2], "boolean"),
        ([0.5, "1", 0.2], "string"),
        ([[0.5, 0.1]], "flat list"),
        ([0.5, 1e400], "non-finite"),
        ([], "allowed 1..200000"),
    ],
)
def test_autocorrelation_rejects_bad_heights_with_the_reason(env_id, construction, message):
    reward, info = step(env_id, construction)
    assert not info["valid"]
    assert message in info["error"]
    assert reward == gym.make(env_id).unwrapped.problem.failure_reward


def test_autocorrelation_rejects_oversize_constructions():
    _, info = step("discover/AC1-v0", [0.5] * 200_001)
    assert "200001 elements; allowed 1..200000" in info["error"]


def test_fixed_length_autocorrelation_accepts_only_that_length():
    env = gym.make("discover/AC2-v0", n=64)
    spec = env.unwrapped.construction_spec
    assert (spec.min_length, spec.max_length) == (64, 64)
    _, info = env.reset(seed=0)
    assert len(info["state"]["construction"]) == 64
    _, _, _, _, step_info = env.step(json_reply([0.5] * 63))
    assert "63 elements; allowed 64..64" in step_info["error"]


@pytest.mark.parametrize(
    ("circles", "valid"),
    [
        ([[0.25, 0.5, 0.25], [0.75, 0.5, 0.25]], True),  # tangent to each other and to three edges, exactly
        ([[0.7, 0.5, 0.30000000000000004], [0.1, 0.1, 0.0]], True),  # 0.7 + r == 1 exactly
        ([[0.7, 0.5, 0.3000000000000001], [0.1, 0.1, 0.0]], False),  # rounds to 1.0, but exceeds 1
        (FLOAT_ACCEPTS_OVERLAP, False),
        (FLOAT_REJECTS_TANGENCY, True),
    ],
)
def test_circle_packing_decides_tangencies_exactly(circles, valid):
    _, info = step("discover/CirclePacking26-v0", circles, n=2)
    assert info["valid"] is valid, info["error"]


@pytest.mark.parametrize(
    ("circles", "message"),
    [
        ([[0.1, 0.5, 0.2], [0.7, 0.5, 0.1]], "crosses the square's edge x = 0"),
        ([[0.5, 0.95, 0.1], [0.2, 0.2, 0.1]], "crosses the square's edge y = 1"),
        ([[0.3, 0.5, 0.2], [0.6, 0.5, 0.2]], "circles 0 and 1 overlap"),
        ([[0.3, 0.5, -0.1], [0.6, 0.5, 0.1]], "outside [0.0, 1.0]"),
        ([[0.3, 0.5, 0.1]], "1 elements; allowed 2..2"),
        ([[0.3, 0.5], [0.6, 0.5]], "3-number lists"),
    ],
)
def test_circle_packing_rejects_bad_packings_with_the_reason(circles, message):
    reward, info = step("discover/CirclePacking26-v0", circles, n=2)
    assert not info["valid"]
    assert message in info["error"]
    assert reward == -1.0


def test_circle_packing_failure_reward_is_below_an_all_zero_packing():
    reward, info = step("discover/CirclePacking26-v0", [[0.5, 0.5, 0.0]] * 26)
    assert info["valid"]
    assert reward == 0.0 > CirclePacking.failure_reward


def test_circle_packing_spec_describes_n_triples_in_the_unit_square():
    spec = gym.make("discover/CirclePacking32-v0").unwrapped.construction_spec
    assert spec.as_dict() == {
        "kind": "tuples", "min_length": 32, "max_length": 32, "low": 0.0, "high": 1.0, "arity": 3,
    }  # fmt: skip


@pytest.mark.parametrize("n", [26, 32])
def test_random_start_packings_are_valid(n):
    problem = CirclePacking(n=n)
    for seed in range(20):
        state = problem.initial_state(np.random.default_rng(seed))
        assert state["score"] > 0
        assert len(state["construction"]) == n


@pytest.mark.parametrize(
    "env_id",
    [
        "discover/ErdosMinOverlap-v0",
        "discover/AC1-v0",
        "discover/AC2-v0",
        "discover/CirclePacking26-v0",
        "discover/CirclePacking32-v0",
    ],
)
def test_start_state_is_shown_in_full_at_the_prompt_precision(env_id):
    env = gym.make(env_id)
    obs, info = env.reset(seed=0)
    assert "too long to show" not in obs
    assert format_numbers(info["state"]["construction"], env.unwrapped.problem.shown_decimals) in obs


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 200_001}, {"start_n": 0}, {"n": 10, "start_n": 20}])
def test_autocorrelation_rejects_bad_lengths(kwargs):
    with pytest.raises(ValueError, match="n"):
        FirstAutocorrelation(**kwargs)


@pytest.mark.parametrize("n", [0, 2001, 2.5, True])
def test_circle_packing_rejects_bad_circle_counts(n):
    with pytest.raises(ValueError, match="number of circles"):
        CirclePacking(n=n)


def test_prompt_shows_the_start_states_value_after_its_parents_the_target_and_that_only_improvement_pays():
    env = gym.make("discover/AC1-v0", n=4)
    prompt, info = env.reset(seed=0)
    root = info["state"]
    assert f"Current C1 upper bound: {root['score']:.10f}" in prompt
    assert "Target: lower it to at most 1.5028629 (best known); gap" in prompt
    assert "unless you make a meaningful improvement, you will not be rewarded" in prompt
    _, _, _, _, step = env.step("```json\n[1, 1, 1, 1]\n```")
    child = step["next_state"]
    assert child["parent_score"] == root["score"] and child["id"] != root["id"]
    prompt, _ = env.reset(options={"state": child})
    assert f"C1 upper bound before and after this construction: {root['score']:.10f} -> {child['score']:.10f}" in prompt
    higher = gym.make("discover/AC2-v0", n=4).reset(seed=0)[0]
    assert "Target: raise it to at least 0.9610211 (best known)" in higher


def test_a_reply_that_restates_the_prompts_rounding_of_its_start_state_is_a_copy():
    env = gym.make("discover/ErdosMinOverlap-v0", n=8)
    _, info = env.reset(seed=0)
    shown = format_numbers(info["state"]["construction"], 4)
    assert env.step(f"```json\n{shown}\n```")[4]["copy"] is True
    env.reset(options={"state": info["state"]})
    assert env.step("```json\n[0.5, 0.6, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5]\n```")[4]["copy"] is False


def test_a_restart_state_with_a_bad_parent_score_is_refused():
    env = gym.make("discover/AC1-v0", n=4)
    _, info = env.reset(seed=0)
    with pytest.raises(InvalidState, match="parent_score"):
        env.reset(options={"state": {**info["state"], "parent_score": "high"}})
