"""The exact verifiers attacked by their inputs (issue #26): a short reply must not cost the trusted parent
minutes of CPU, and whatever is accepted is still scored exactly."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import discover_envs  # noqa: F401 - registers the ids
from discover_envs.problem import InvalidSolution
from discover_envs.problems.autocorrelation import FirstAutocorrelation, SecondAutocorrelation

#: A two-line reply: a centred box of 200,000 steps, whose overlap is flat over 100,001 shifts.
BOX_REPLY = "```python\ndef run(**_):\n    return [0.0] * 50000 + [1.0] * 100000 + [0.0] * 50000\n```"


def sidon_set(p: int) -> np.ndarray:
    """Erdős–Turán: {2pk + (k² mod p)} is a Sidon set, so its 0/1 autoconvolution peaks at 2 for every one of
    its p(p-1)/2 pair sums: a maximum with tens of thousands of exact ties."""
    k = np.arange(p)
    a = np.zeros(2 * p * p)
    a[2 * p * k + k * k % p] = 1.0
    return a


def test_a_flat_erdos_reply_is_refused_as_over_the_verifier_budget():
    """Before, the exact re-check of 100,002 tied candidates took the parent 56-89 s of CPU, no deadline."""
    env = gym.make("discover/ErdosMinOverlap-v0", timeout_s=60.0)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(BOX_REPLY)
    assert not info["valid"] and info["error"].startswith("verifier budget exceeded: 100002 entries")
    assert reward == env.unwrapped.problem.failure_reward
    env.close()


@pytest.mark.parametrize("problem", [FirstAutocorrelation(), SecondAutocorrelation()], ids=["AC1", "AC2"])
def test_an_autoconvolution_with_tens_of_thousands_of_tied_maxima_is_refused(problem):
    """The 313-element Sidon set in 195,938 steps: 48,828 ties, ~10^10 multiply-adds to re-check before."""
    with pytest.raises(InvalidSolution, match=r"verifier budget exceeded: \d+ entries"):
        problem.verify(sidon_set(313).tolist())
