"""The agents' shared loop on a real env with the tiny model: outputs, budgets, one interface, crash + resume."""

from __future__ import annotations

import csv
import json

import gymnasium as gym
import pytest
import torch

from discover_agent.agents import AGENTS, BestOfN, PUCTSearch, RunResult, TTTDiscover, _lineage
from discover_agent.config import TTTConfig
from discover_agent.policy import Sample
from discover_agent.storage import read_jsonl

ENV = "discover/AC1-v0"
ENV_KWARGS = {"n": 3}


def config_for(cls, tmp_path, **overrides):
    fields = {
        "env": ENV, "env_kwargs": ENV_KWARGS, "steps": 2, "groups": 2, "group_size": 2, "out": str(tmp_path / "run"),
        "max_new_tokens": 40, "workers": 2, "device": "cpu", **overrides,
    }  # fmt: skip
    return cls.config_class(**fields)


def test_ttt_run_writes_every_output_and_updates_lora(make_tiny_policy, tmp_path):
    policy = make_tiny_policy(max_new_tokens=40)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_B" in n}
    result = TTTDiscover(config_for(TTTDiscover, tmp_path, lr=1e-2), policy=policy).run(progress=False)

    out = tmp_path / "run"
    for name in ("rollouts.jsonl", "buffer.json", "best.json", "metrics.csv", "progress.png", "config.json"):
        assert (out / name).is_file(), name
    assert (out / "adapter").is_dir()
    rows = read_jsonl(out / "rollouts.jsonl")
    assert len(rows) == result.rollouts == 2 * 2 * 2
    assert {"step", "parent_id", "reward", "score", "valid", "error", "tokens"} <= set(rows[0])
    assert sum(r["valid"] for r in rows) == len(rows), "constrained JSON replies should all be valid AC1 heights"
    best = json.loads((out / "best.json").read_text())
    assert best["state"]["id"] == result.best["id"]
    assert best["lineage"][-1]["id"] == result.best["id"]
    with open(out / "metrics.csv") as fh:
        metrics = list(csv.DictReader(fh))
    assert [int(m["step"]) for m in metrics] == [0, 1]
    assert "beta" in metrics[0] and "loss" in metrics[0]
    after = dict(policy.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before), "LoRA weights did not move"


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_every_agent_runs_through_the_same_interface(name, make_tiny_policy, tmp_path):
    cls = AGENTS[name]
    result = cls(config_for(cls, tmp_path, steps=1), policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)
    assert isinstance(result, RunResult)
    assert result.agent == name and result.rollouts == 4 and result.steps == 1
    assert result.best_score is not None and result.best["reward"] == result.best_reward
    assert result.curve == [(4, result.best_score)]


def test_max_rollouts_stops_before_a_step_would_exceed_it(make_tiny_policy, tmp_path):
    cfg = config_for(BestOfN, tmp_path, steps=10, max_rollouts=9)
    result = BestOfN(cfg, policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)
    assert result.rollouts == 8 and result.steps == 2


class Crash(Exception):
    pass


def test_resume_after_a_crash_mid_step_loses_nothing(make_tiny_policy, tmp_path):
    policy = make_tiny_policy(max_new_tokens=40)
    real_sample, calls = policy.sample, []

    def crashing_sample(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # step 1, second group: after step 0 was saved
            raise Crash
        return real_sample(*args, **kwargs)

    policy.sample = crashing_sample
    cfg = config_for(TTTDiscover, tmp_path, steps=3)
    with pytest.raises(Crash):
        TTTDiscover(cfg, policy=policy).run(progress=False)
    out = tmp_path / "run"
    saved = json.loads((out / "checkpoint.json").read_text())
    assert saved["step"] == 1
    best_before = json.loads((out / "best.json").read_text())["state"]

    result = TTTDiscover(cfg, policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)
    rows = read_jsonl(out / "rollouts.jsonl")
    assert [r["step"] for r in rows] == [0] * 4 + [1] * 4 + [2] * 4
    assert result.steps == 3 and result.rollouts == 12
    assert result.best_reward >= best_before["reward"]
    buffer_ids = {s["id"] for s in json.loads((out / "buffer.json").read_text())["buffer"]}
    assert best_before["id"] in buffer_ids or result.best_reward > best_before["reward"]


def test_resuming_a_folder_of_another_agent_is_refused(make_tiny_policy, tmp_path):
    BestOfN(config_for(BestOfN, tmp_path, steps=1), policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)
    with pytest.raises(ValueError, match="refusing to resume"):
        TTTDiscover(config_for(TTTDiscover, tmp_path), policy=make_tiny_policy()).run(progress=False)


def test_config_of_the_wrong_class_is_rejected(make_tiny_policy, tmp_path):
    with pytest.raises(TypeError, match="TTTConfig"):
        TTTDiscover(config_for(BestOfN, tmp_path))
    assert isinstance(config_for(TTTDiscover, tmp_path), TTTConfig)


class EchoPolicy:
    """Replies with a fixed construction: here the start state itself, so a child has its parent's id."""

    def __init__(self, construction):
        self.text = "```json\n" + json.dumps(construction) + "\n```"

    def sample(self, prompts, n, constraint_spec=None):
        return [[Sample(text=self.text, prompt_ids=[], completion_ids=[1], logprobs=[0.0])] * n for _ in prompts]


def test_a_reply_that_repeats_its_start_state_does_not_loop_the_lineage(tmp_path):
    _, info = gym.make(ENV, **ENV_KWARGS).reset(seed=0)
    cfg = config_for(PUCTSearch, tmp_path, steps=2)
    result = PUCTSearch(cfg, policy=EchoPolicy(info["state"]["construction"])).run(progress=False)
    lineage = json.loads((tmp_path / "run" / "best.json").read_text())["lineage"]
    assert result.best["id"] == info["state"]["id"]
    assert [link["id"] for link in lineage] == [info["state"]["id"]]


def test_lineage_stops_at_a_cycle():
    assert [link["id"] for link in _lineage({"id": "a"}, {"a": ["b", 1.0, 0], "b": ["a", 0.5, 0]})] == ["b", "a"]
