"""The calibration agents (random search, the ES): no model, the Gym contract only, the shared run folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import toy_env  # noqa: F401 - registers toy/GuessNumbers-v0

from discover_agent.calibration import EvolutionStrategy, RandomSearch
from discover_agent.config import ConfigError, ESConfig
from discover_agent.registry import AGENTS
from discover_agent.storage import read_jsonl
from discover_envs.problem import extract_block

AC1 = "discover/AC1-v0"


def config(cls, tmp_path, **overrides):
    fields = {"env": AC1, "env_kwargs": {"n": 4}, "steps": 3, "groups": 2, "group_size": 3,
              "out": str(tmp_path / "run"), **overrides}  # fmt: skip
    return cls.config_class(**fields)


def construction_of(reply: str) -> list[float]:
    block = extract_block(reply, ("json",))
    assert block is not None, reply
    return json.loads(block[1])


@pytest.mark.parametrize("cls", [RandomSearch, EvolutionStrategy])
def test_calibration_agents_run_through_the_shared_loop_on_ac1(cls, tmp_path):
    result = cls(config(cls, tmp_path)).run(progress=False)
    rows = read_jsonl(tmp_path / "run" / "rollouts.jsonl")
    assert result.rollouts == len(rows) == 18 and result.steps == 3 and result.tokens == 0
    assert all(r["valid"] for r in rows), "draws within the spec's bounds are valid AC1 heights"
    assert result.model.startswith("none (")
    assert result.best["reward"] == max(result.best_reward, *(r["reward"] for r in rows))
    for name in ("best.json", "metrics.csv", "progress.png", "config.json", "checkpoint.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert AGENTS[cls.name] is cls


def test_random_search_draws_uniformly_within_the_bounds(tmp_path):
    RandomSearch(config(RandomSearch, tmp_path, env="toy_env:toy/GuessNumbers-v0", env_kwargs={}, steps=20)).run(
        progress=False
    )
    values = [construction_of(r["reply"])[0] for r in read_jsonl(tmp_path / "run" / "rollouts.jsonl")]
    assert len(values) == 120 and all(0.0 <= v <= 100.0 for v in values)
    assert 35 < np.mean(values) < 65 and np.std(values) > 20  # uniform on [0, 100]: mean 50, sd 28.9


def test_es_climbs_on_the_toy_env_and_keeps_sigma_by_the_success_rule(tmp_path):
    cfg = config(EvolutionStrategy, tmp_path, env="toy_env:toy/GuessNumbers-v0", env_kwargs={}, steps=30,
                 groups=1, group_size=4, sigma=0.2)  # fmt: skip
    result = EvolutionStrategy(cfg).run(progress=False)
    assert result.best_score > -0.5, "a (1+4)-ES finds 7 within 30 generations on [0, 100]"
    rows = read_jsonl(tmp_path / "run" / "rollouts.jsonl")
    by_step = [[construction_of(r["reply"])[0] for r in rows if r["step"] == s] for s in (0, 29)]
    assert np.std(by_step[1]) < np.std(by_step[0]), "sigma shrinks as the ES converges"


def test_the_es_step_size_follows_the_one_fifth_rule(tmp_path):
    """For lambda = 1, a success multiplies sigma by exp(1/3), a failure by exp(-1/12) (Auger & Hansen)."""
    agent = EvolutionStrategy(config(EvolutionStrategy, tmp_path, env_kwargs={"n": 4}))
    from discover_agent.types import Group

    parent = {"id": "p", "reward": 1.0}
    agent.sigma, agent._proposed = 1.0, [[np.zeros(4)]]
    success = {"valid": True, "next_state": {"id": "c"}}
    agent.learn([Group(parent, [None], [(2.0, success)])])
    assert agent.sigma == pytest.approx(math.exp(1 / 3)) and agent.best_id == "c"
    agent.sigma = 1.0
    agent.learn([Group(parent, [None], [(0.0, {"valid": False})])])
    assert agent.sigma == pytest.approx(math.exp(-1 / 12))


def test_es_starts_from_the_envs_start_state(tmp_path):
    cfg = config(EvolutionStrategy, tmp_path, steps=1, groups=1, group_size=2, sigma=1e-6)
    EvolutionStrategy(cfg).run(progress=False)
    start = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["initial"][0]["construction"]
    for row in read_jsonl(tmp_path / "run" / "rollouts.jsonl"):
        assert np.allclose(construction_of(row["reply"]), start, atol=1e-4)


@pytest.mark.parametrize("cls", [RandomSearch, EvolutionStrategy])
def test_a_resumed_calibration_run_draws_what_an_uninterrupted_one_draws(cls, tmp_path):
    whole = cls(config(cls, tmp_path / "a", steps=4)).run(progress=False)
    cls(config(cls, tmp_path / "b", steps=2)).run(progress=False)
    resumed = cls(config(cls, tmp_path / "b", steps=4)).run(progress=False, resume=True)
    rows_a = read_jsonl(tmp_path / "a" / "run" / "rollouts.jsonl")
    rows_b = read_jsonl(tmp_path / "b" / "run" / "rollouts.jsonl")
    assert [r["reply"] for r in rows_a] == [r["reply"] for r in rows_b]
    assert whole.best == resumed.best


@pytest.mark.parametrize("cls", [RandomSearch, EvolutionStrategy])
def test_calibration_agents_refuse_an_env_without_a_construction_spec(cls, tmp_path):
    with pytest.raises(ConfigError, match="construction_spec"):
        cls(config(cls, tmp_path, env="toy_env:toy/Guess-v0", env_kwargs={})).run(progress=False)


def test_es_sigma_must_be_positive():
    with pytest.raises(ConfigError, match="sigma"):
        ESConfig(sigma=0.0)
