"""Speed target of TriMul: one env.step of the baseline (two sandboxed workers start and import torch, then
3 shapes x 12 calls, each checked and timed by the parent) should take a few seconds on 2 CPU cores. Run with
--benchmark-enable to time it."""

from __future__ import annotations

import gymnasium as gym

import discover_envs  # noqa: F401 - registers the ids
from discover_envs.problems.trimul import BASELINE_CODE


def test_bench_trimul_step_of_baseline(benchmark):
    env = gym.make("discover/TriMul-v0", device="cpu")
    env.reset(seed=0)
    action = f"```python\n{BASELINE_CODE}```\n"
    _, reward, _, _, info = benchmark.pedantic(env.step, args=(action,), rounds=3, iterations=1)
    assert info["valid"], info["error"]
    assert reward > 0 and info["max_error"] == 0.0
