"""Rollouts per hour at the experiment's shape (`scripts/experiment.sh`: discover/AC1-v0, n = 16, 2 groups x 8
replies a step, the embedded model on CPU), for the three LLM agents it compares: how many env steps an hour of
this machine buys each of them, which decides how long the experiment takes. Each agent runs STEPS steps from a
fresh run folder with the thread governor on, as `discover bench` does; the policy (and its grammar, built by the
first step) is loaded before the clock starts.

Minutes on 2 cores, so it runs only when benchmarking is enabled (take it with nothing else running):
    pytest -s tests/benchmarks/test_bench_rollouts.py --benchmark-enable
"rollouts_per_hour" and "s_per_step" are in `extra_info` and printed with -s.
"""

from __future__ import annotations

import os

import gymnasium as gym
import pytest

import discover_envs  # noqa: F401 - registers the env ids
from discover_agent import threads
from discover_agent.agents import build_policy, construction_spec
from discover_agent.registry import AGENTS

pytestmark = [pytest.mark.embedded, pytest.mark.usefixtures("only_when_benchmarking")]

ENV = "discover/AC1-v0"
STEPS = int(os.environ.get("DISCOVER_BENCH_STEPS", "2"))


@pytest.mark.parametrize("name", ["ttt", "puct", "best-of-n"])
def test_bench_rollouts_per_hour_at_the_experiments_shape(benchmark, embedded_model_dir, tmp_path, name):
    cls = AGENTS[name]
    fields = {"env": ENV, "groups": 2, "group_size": 8, "model": str(embedded_model_dir), "device": "cpu"}
    config = cls.config_class(**fields, steps=1, out=str(tmp_path / "warm-up"))
    env = gym.make(ENV, **config.resolved_env_kwargs()).unwrapped
    policy = build_policy(config, trainable=name == "ttt", spec=construction_spec(env) if config.constrained else None)
    cls(config, policy).run(progress=False)  # builds the grammar; a TTT warm-up step also trains, as a run would
    timed = cls.config_class(**fields, steps=STEPS, out=str(tmp_path / "timed"))
    threads.govern()
    try:
        result = benchmark.pedantic(lambda: cls(timed, policy).run(progress=False), rounds=1)
    finally:
        threads.stop()
    assert result.rollouts == STEPS * 16
    seconds = benchmark.stats.stats.mean
    rate = result.rollouts / seconds * 3600
    benchmark.extra_info.update(rollouts_per_hour=rate, s_per_step=seconds / STEPS, steps=STEPS)
    print(f"\n{name}: {seconds / STEPS:.1f} s a step, {rate:.0f} rollouts an hour")
