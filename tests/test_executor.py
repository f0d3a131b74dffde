"""The evaluation seam: the local thread pool and Ray run the same sandboxed evaluation."""

from __future__ import annotations

import importlib.util

import gymnasium as gym
import pytest

from discover_agent.executor import LocalExecutor, make_executor

ENV, KWARGS = "discover/AC1-v0", {"n": 3}
GOOD, BAD = "```json\n[1, 2, 1]\n```", "no block here"


@pytest.fixture(scope="module")
def parent():
    _, info = gym.make(ENV, **KWARGS).reset(seed=0)
    return info["state"]


def test_local_executor_scores_in_parallel_and_reports_invalid_replies(parent):
    executor = LocalExecutor(ENV, KWARGS, workers=2)
    try:
        good, bad = executor.submit(parent, GOOD).result(), executor.submit(parent, BAD).result()
    finally:
        executor.close()
    assert good[1]["valid"] and good[1]["score"] == pytest.approx(2 * 3 * 6 / 16)  # a*a = [1, 4, 6, 4, 1]
    assert not bad[1]["valid"] and "block" in bad[1]["error"]


def test_unknown_executor_is_rejected():
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor("dask", ENV, KWARGS, 1, None)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install discover[ray])")
def test_ray_executor_runs_the_same_evaluation_on_a_local_ray_instance(parent):
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        executor = make_executor("ray", ENV, KWARGS, 1, None)
        reward, info = executor.submit(parent, GOOD).result(timeout=120)
    finally:
        ray.shutdown()
    assert info["valid"] and info["score"] == pytest.approx(2.25)
    assert reward == pytest.approx(1 / 2.25)
