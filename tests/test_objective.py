import math

import numpy as np
import pytest

from discover_agent.objective import (
    MAX_LOG_WEIGHT,
    TARGET_KL,
    entropic_advantages,
    mean_baseline_advantages,
)


def kl_to_uniform(rewards, beta):
    """Independent, plain-float KL(q_beta || uniform) with q_beta ∝ exp(beta r)."""
    r = np.asarray(rewards, dtype=np.float64)
    x = beta * (r - r.max())
    q = np.exp(x) / np.exp(x).sum()
    nz = q > 0
    return float(np.sum(q[nz] * np.log(q[nz] * r.size)))


def test_entropic_pair_with_beta_one_matches_hand_computation():
    adv, beta = entropic_advantages([0.0, 1.0], beta=1.0)
    # w_0 = e^0 / e^1, w_1 = e^1 / e^0
    np.testing.assert_allclose(adv, [math.exp(-1) - 1, math.e - 1], rtol=1e-12)
    assert beta == 1.0


def test_entropic_triple_uses_leave_one_out_means():
    adv, _ = entropic_advantages([0.0, 1.0, 2.0], beta=math.log(2))
    # exp(beta r) = [1, 2, 4]; w = [1 / mean(2, 4), 2 / mean(1, 4), 4 / mean(1, 2)] = [1/3, 0.8, 8/3]
    np.testing.assert_allclose(adv, [1 / 3 - 1, 0.8 - 1, 8 / 3 - 1], rtol=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_automatic_beta_puts_random_groups_at_kl_ln2(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 65))
    rewards = rng.normal(size=n) * 10.0 ** rng.uniform(-6, 6)
    adv, beta = entropic_advantages(rewards)
    assert beta > 0
    assert kl_to_uniform(rewards, beta) == pytest.approx(TARGET_KL, abs=1e-9)
    assert np.all(np.isfinite(adv))
    assert adv.argmax() == rewards.argmax() and adv.min() > -1


def test_advantages_are_invariant_to_reward_shift_and_beta_scales_inversely():
    rewards = np.array([0.1, 0.7, 0.3, 0.9, 0.5])
    adv, beta = entropic_advantages(rewards)
    shifted, beta_shifted = entropic_advantages(rewards + 100.0)
    scaled, beta_scaled = entropic_advantages(rewards * 1e4)
    np.testing.assert_allclose(shifted, adv, rtol=1e-8, atol=1e-10)
    assert beta_shifted == pytest.approx(beta, rel=1e-8)
    np.testing.assert_allclose(scaled, adv, rtol=1e-8, atol=1e-10)
    assert beta_scaled == pytest.approx(beta / 1e4, rel=1e-8)


@pytest.mark.parametrize(
    "rewards",
    [[1e6, -1e6, 3.0], [0.0, 1e6], [1e308, -1e308, 0.0, 5.0], [1.0, 1.0 - 1e-15, 0.0], [1e-300, 0.0, 2e-300]],
)
def test_extreme_rewards_give_finite_advantages(rewards):
    adv, beta = entropic_advantages(rewards)
    assert np.all(np.isfinite(adv)) and math.isfinite(beta)
    assert adv.min() >= -1


def test_lone_winner_weight_survives_cancellation_in_the_leave_one_out_sum():
    # exp(beta r) = [e^-40, e^-39, 1] after the max shift; 1 + e^-39 - 1 is 0 in float64
    adv, _ = entropic_advantages([0.0, 1.0, 40.0], beta=1.0)
    assert adv[2] == pytest.approx(2 / (math.exp(-40) + math.exp(-39)) - 1, rel=1e-12)


def test_very_sharp_explicit_beta_is_capped_instead_of_overflowing():
    adv, _ = entropic_advantages([0.0, 1e6], beta=1.0)
    assert adv[0] == -1.0
    assert adv[1] == pytest.approx(math.exp(MAX_LOG_WEIGHT) - 1)


def test_equal_rewards_and_single_rollouts_get_zero_advantage():
    for rewards in ([3.0, 3.0, 3.0], [5.0]):
        adv, beta = entropic_advantages(rewards)
        assert np.array_equal(adv, np.zeros(len(rewards))) and beta == 0.0


def test_unreachable_ln2_falls_back_to_half_the_kl_limit():
    # A pair's KL to uniform only approaches ln 2 as beta grows: aim at ln(2) / 2 instead.
    adv, beta = entropic_advantages([0.0, 1.0])
    assert kl_to_uniform([0.0, 1.0], beta) == pytest.approx(math.log(2) / 2, abs=1e-9)
    # KL = ln2 - H(p) = ln2 / 2 at p = sigmoid(beta); w = [e^-beta, e^beta]
    np.testing.assert_allclose(adv, [math.exp(-beta) - 1, math.exp(beta) - 1], rtol=1e-9)
    # Two tied winners out of four: the limit is ln(4 / 2) = ln 2 again.
    _, beta = entropic_advantages([0.0, 0.5, 1.0, 1.0])
    assert kl_to_uniform([0.0, 0.5, 1.0, 1.0], beta) == pytest.approx(math.log(2) / 2, abs=1e-9)


@pytest.mark.parametrize(
    ("rewards", "beta", "message"),
    [
        ([], None, "at least one"),
        ([[1.0, 2.0]], None, "1-D"),
        ([1.0, float("nan")], None, "finite"),
        ([1.0, float("inf")], None, "finite"),
        (["a", "b"], None, "numbers"),
        ([1.0, 2.0], -1.0, "beta"),
        ([1.0, 2.0], float("inf"), "beta"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(rewards, beta, message):
    with pytest.raises(ValueError, match=message):
        entropic_advantages(rewards, beta=beta)


def test_mean_baseline_matches_hand_computation():
    np.testing.assert_allclose(mean_baseline_advantages([1.0, 2.0, 3.0, 6.0]), [-2.0, -1.0, 0.0, 3.0])
    # population std of [1, 2, 3, 6] = sqrt((4 + 1 + 0 + 9) / 4)
    np.testing.assert_allclose(
        mean_baseline_advantages([1.0, 2.0, 3.0, 6.0], divide_by_std=True),
        np.array([-2.0, -1.0, 0.0, 3.0]) / math.sqrt(3.5),
    )
    assert np.array_equal(mean_baseline_advantages([4.0, 4.0], divide_by_std=True), [0.0, 0.0])
    assert np.array_equal(mean_baseline_advantages([1e308, 1e308]), [0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        mean_baseline_advantages([float("nan")])
