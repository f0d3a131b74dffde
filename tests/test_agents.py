"""The agents' shared loop with the tiny model: outputs, budgets, one interface, run folders, exact resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import gymnasium as gym
import pytest
import torch
import toy_env  # noqa: F401 - registers toy/Guess-v0
from safetensors.torch import load_file

import discover_envs
from discover_agent.agents import _lineage
from discover_agent.config import AgentConfig, TTTConfig, load_run_config
from discover_agent.policy import PolicyConfig
from discover_agent.registry import AGENTS
from discover_agent.rundir import Lineage, RunDir, RunDirError
from discover_agent.search import BestOfN, PUCTSearch
from discover_agent.storage import CorruptFile, read_jsonl
from discover_agent.trainer import TrainerConfig
from discover_agent.ttt import TTTDiscover, build_trainer
from discover_agent.types import Policy, RunResult, Sample

ENV = "discover/AC1-v0"
ENV_KWARGS = {"n": 3}


def config_for(cls, tmp_path, **overrides):
    fields = {
        "env": ENV, "env_kwargs": ENV_KWARGS, "steps": 2, "groups": 2, "group_size": 2, "out": str(tmp_path / "run"),
        "max_new_tokens": 40, "workers": 2, "device": "cpu", **overrides,
    }  # fmt: skip
    return cls.config_class(**fields)


def replies(out):
    return [(r["step"], r["reply"]) for r in read_jsonl(out / "rollouts.jsonl")]


def test_ttt_run_writes_every_output_and_updates_lora(make_tiny_policy, tmp_path):
    policy = make_tiny_policy(max_new_tokens=40)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_B" in n}
    result = TTTDiscover(config_for(TTTDiscover, tmp_path, lr=1e-2), policy=policy).run(progress=False)

    out = tmp_path / "run"
    for name in ("rollouts.jsonl", "checkpoint.json", "best.json", "metrics.csv", "progress.png", "config.json"):
        assert (out / name).is_file(), name
    step_dir = out / json.loads((out / "checkpoint.json").read_text())["dir"]
    assert step_dir.name == "step-000002" and [p.name for p in (out / "steps").iterdir()] == ["step-000002"]
    assert {p.name for p in step_dir.iterdir()} == {"buffer.json", "adapter", "trainer.pt"}
    rows = read_jsonl(out / "rollouts.jsonl")
    assert len(rows) == result.rollouts == 2 * 2 * 2
    assert {"step", "parent_id", "reward", "score", "valid", "error", "tokens", "sandbox", "reply"} <= set(rows[0])
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
    saved = json.loads((out / "config.json").read_text())
    assert saved["agent"] == "ttt" and saved["config"]["lr"] == 1e-2
    assert saved["version"].startswith(("git:", "discover ")), "config.json names the code that made the run"
    assert "mode" in saved["sandbox"], "config.json records the isolation candidate code gets"
    assert all(isinstance(r["sandbox"], str) for r in rows), "each row records the mode its reply ran in"


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_every_agent_runs_through_the_same_interface(name, make_tiny_policy, tmp_path):
    cls = AGENTS[name]
    policy = make_tiny_policy(max_new_tokens=40) if cls.uses_model else None
    result = cls(config_for(cls, tmp_path, steps=1), policy=policy).run(progress=False)
    assert isinstance(result, RunResult)
    assert result.agent == name and result.rollouts == 4 and result.steps == 1
    assert result.best_score is not None and result.best["reward"] == result.best_reward
    assert result.curve == [(4, result.best_score)]


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_every_agent_runs_on_a_gymnasium_env_that_is_not_a_discover_env(name, make_tiny_policy, tmp_path):
    cls = AGENTS[name]
    env = "toy_env:toy/Guess-v0" if cls.uses_model else "toy_env:toy/GuessNumbers-v0"  # calibration needs a spec
    config = config_for(cls, tmp_path, env=env, env_kwargs={}, steps=2)
    result = cls(config, policy=make_tiny_policy(max_new_tokens=8) if cls.uses_model else None).run(progress=False)
    rows = read_jsonl(tmp_path / "run" / "rollouts.jsonl")
    assert result.rollouts == len(rows) == 8
    assert result.best["reward"] == max([result.best_reward, *(r["reward"] for r in rows)])
    assert (tmp_path / "run" / "best.json").is_file()


def test_several_initial_states_are_drawn_with_distinct_seeds(make_tiny_policy, tmp_path):
    config = config_for(BestOfN, tmp_path, steps=1, initial_states=3)
    BestOfN(config, policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)
    initial = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["initial"]
    assert len({s["id"] for s in initial}) == 3
    assert initial[0] == gym.make(ENV, **ENV_KWARGS).reset(seed=0)[1]["state"]


def test_the_unsafe_opt_in_reaches_the_env_only_when_asked(tmp_path):
    assert "unsafe_no_isolation" not in config_for(BestOfN, tmp_path).resolved_env_kwargs()
    assert config_for(BestOfN, tmp_path, unsafe_no_isolation=True).resolved_env_kwargs()["unsafe_no_isolation"]


def test_max_rollouts_stops_before_a_step_would_exceed_it(make_tiny_policy, tmp_path):
    cfg = config_for(BestOfN, tmp_path, steps=10, max_rollouts=9)
    result = BestOfN(cfg, policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)
    assert result.rollouts == 8 and result.steps == 2


class Crash(Exception):
    pass


def crash_on_call(policy, call):
    real_sample, calls = policy.sample_groups, []

    def crashing_sample(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Crash
        return real_sample(*args, **kwargs)

    policy.sample_groups = crashing_sample
    return policy


def test_resume_after_a_crash_mid_step_loses_nothing(make_tiny_policy, tmp_path):
    cfg = config_for(TTTDiscover, tmp_path, steps=3)
    with pytest.raises(Crash):  # in step 1 (step 0 samples its one start state in one call)
        TTTDiscover(cfg, policy=crash_on_call(make_tiny_policy(max_new_tokens=40), 2)).run(progress=False)
    out = tmp_path / "run"
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 1
    best_before = json.loads((out / "best.json").read_text())["state"]

    result = TTTDiscover(cfg, policy=make_tiny_policy(max_new_tokens=40)).run(progress=False, resume=True)
    rows = read_jsonl(out / "rollouts.jsonl")
    assert [r["step"] for r in rows] == [0] * 4 + [1] * 4 + [2] * 4
    assert result.steps == 3 and result.rollouts == 12
    assert result.best_reward >= best_before["reward"]


@pytest.mark.parametrize("cls", [BestOfN, TTTDiscover])
def test_a_stopped_and_resumed_run_logs_exactly_the_replies_of_an_uninterrupted_one(cls, make_tiny_policy, tmp_path):
    whole = config_for(cls, tmp_path / "whole", steps=3, lr=1e-2) if cls is TTTDiscover else None
    whole = whole or config_for(cls, tmp_path / "whole", steps=3)
    cls(whole, policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)

    parts = dataclasses.replace(whole, out=str(tmp_path / "parts" / "run"), steps=1)
    cls(parts, policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)
    resumed = dataclasses.replace(parts, steps=3)
    cls(resumed, policy=make_tiny_policy(max_new_tokens=40)).run(progress=False, resume=True)

    expected = replies(tmp_path / "whole" / "run")
    assert len({text for _, text in expected}) > 4, "the replies should differ from step to step"
    assert replies(tmp_path / "parts" / "run") == expected
    saved = json.loads((tmp_path / "parts" / "run" / "config.json").read_text())
    assert saved["config"]["steps"] == 3, "config.json must say what the run now is"
    if cls is TTTDiscover:  # the optimiser moments were restored too: the same weights after the last step
        whole_weights, part_weights = (
            load_file(tmp_path / part / "run" / "steps" / "step-000003" / "adapter" / "adapter_model.safetensors")
            for part in ("whole", "parts")
        )
        assert all(torch.equal(whole_weights[k], part_weights[k]) for k in whole_weights)


def test_run_into_a_folder_holding_a_run_is_refused_naming_resume(make_tiny_policy, tmp_path):
    BestOfN(config_for(BestOfN, tmp_path, steps=1), policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)
    with pytest.raises(RunDirError, match="discover resume"):
        BestOfN(config_for(BestOfN, tmp_path, steps=2), policy=make_tiny_policy()).run(progress=False)
    assert len(read_jsonl(tmp_path / "run" / "rollouts.jsonl")) == 4


def test_resuming_a_folder_of_another_agent_is_refused(make_tiny_policy, tmp_path):
    BestOfN(config_for(BestOfN, tmp_path, steps=1), policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)
    with pytest.raises(RunDirError, match="refusing to resume"):
        TTTDiscover(config_for(TTTDiscover, tmp_path), policy=make_tiny_policy()).run(progress=False, resume=True)


def test_resume_with_changed_settings_other_than_budgets_is_refused(make_tiny_policy, tmp_path):
    BestOfN(config_for(BestOfN, tmp_path, steps=1), policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)
    changed = config_for(BestOfN, tmp_path, steps=2, temperature=0.5)
    with pytest.raises(RunDirError, match="temperature"):
        BestOfN(changed, policy=make_tiny_policy()).run(progress=False, resume=True)


@pytest.fixture
def finished_run(make_tiny_policy, tmp_path):
    """A two-step best-of-n run folder, and a function resuming it to 3 steps."""
    cfg = config_for(BestOfN, tmp_path, steps=2)
    BestOfN(cfg, policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)
    more = dataclasses.replace(cfg, steps=3)
    return tmp_path / "run", lambda: BestOfN(more, policy=make_tiny_policy(max_new_tokens=40)).run(
        progress=False, resume=True
    )


def test_a_bad_rollouts_line_is_refused_with_file_and_line(finished_run):
    out, resume = finished_run
    lines = (out / "rollouts.jsonl").read_text().splitlines(keepends=True)
    lines[2] = '{"step": 0, "rew\n'
    (out / "rollouts.jsonl").write_text("".join(lines))
    with pytest.raises(CorruptFile, match=r"rollouts.jsonl:3"):
        resume()
    assert len((out / "rollouts.jsonl").read_text().splitlines()) == 8, "the log must be left as it was"


def test_a_torn_last_line_from_a_crash_is_dropped(finished_run):
    out, resume = finished_run
    with open(out / "rollouts.jsonl", "a") as fh:
        fh.write('{"step": 2, "rew')
    assert resume().rollouts == 12
    assert [r["step"] for r in read_jsonl(out / "rollouts.jsonl")] == [0] * 4 + [1] * 4 + [2] * 4


def test_a_checkpoint_without_its_buffer_is_refused_not_started_over(finished_run):
    out, resume = finished_run
    step_dir = out / json.loads((out / "checkpoint.json").read_text())["dir"]
    (step_dir / "buffer.json").unlink()
    with pytest.raises(RunDirError, match=r"buffer\.json, which is missing"):
        resume()
    assert len(read_jsonl(out / "rollouts.jsonl")) == 8


def test_a_malformed_checkpoint_is_refused_naming_the_file(finished_run):
    out, resume = finished_run
    (out / "checkpoint.json").write_text("{not json")
    with pytest.raises(CorruptFile, match=r"checkpoint\.json is not valid JSON"):
        resume()


def test_a_tampered_buffer_state_is_refused_naming_its_id(finished_run):
    out, resume = finished_run
    buffer_path = out / json.loads((out / "checkpoint.json").read_text())["dir"] / "buffer.json"
    buffer = json.loads(buffer_path.read_text())
    state = buffer["best"]
    state["score"] *= 0.5  # a better (lower) AC1 bound than the construction gives
    buffer_path.write_text(json.dumps(buffer))
    with pytest.raises(RunDirError, match=f"state {state['id']} fails verification"):
        resume()


def test_a_crash_in_the_first_step_resumes_from_the_start(make_tiny_policy, tmp_path):
    cfg = config_for(BestOfN, tmp_path, steps=2)
    policy = make_tiny_policy(max_new_tokens=40)
    real_commit, out = RunDir.commit_step, tmp_path / "run"

    def crash(*args, **kwargs):
        raise Crash

    RunDir.commit_step = crash
    try:
        with pytest.raises(Crash):
            BestOfN(cfg, policy=policy).run(progress=False)
    finally:
        RunDir.commit_step = real_commit
    assert len(read_jsonl(out / "rollouts.jsonl")) == 4 and not (out / "checkpoint.json").exists()
    with pytest.raises(RunDirError, match="discover resume"):
        BestOfN(cfg, policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)
    BestOfN(cfg, policy=make_tiny_policy(max_new_tokens=40)).run(progress=False, resume=True)
    assert [r["step"] for r in read_jsonl(out / "rollouts.jsonl")] == [0] * 4 + [1] * 4


def test_a_second_writer_of_the_same_folder_is_refused(tmp_path):
    first, second = RunDir(tmp_path / "run"), RunDir(tmp_path / "run")
    with first.locked(), pytest.raises(RunDirError, match="another discover process"), second.locked():
        pass
    with RunDir(tmp_path / "run").locked():  # released when the first writer is done
        pass


def test_an_unwritable_out_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="cannot write the run folder"), RunDir(tmp_path / "file" / "run").locked():
        pass


def test_config_of_the_wrong_class_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="TTTConfig"):
        TTTDiscover(config_for(BestOfN, tmp_path))
    assert isinstance(config_for(TTTDiscover, tmp_path), TTTConfig)


def test_every_policy_and_trainer_knob_is_a_config_field():
    knobs = {f.name: f.default for f in dataclasses.fields(TTTConfig)}
    for component in (PolicyConfig, TrainerConfig):
        for f in dataclasses.fields(component):
            assert f.name in knobs, f"{component.__name__}.{f.name} cannot be set from the agent's config"
    trainer, config = TrainerConfig(), TTTConfig()
    for f in dataclasses.fields(TrainerConfig):
        value = getattr(config, f.name)
        if f.name == "kl_coef":  # None: the task's value (env.metadata), resolved by `build_trainer`
            value = gym.make(config.env, **config.given_env_kwargs()).metadata["kl_coef"]
        if f.name == "lr":  # None: the model's rate, resolved by `build_trainer` (tests/test_trainer.py)
            assert value is None
            continue
        assert getattr(trainer, f.name) == (tuple(value) if isinstance(value, list) else value), (
            f"the config's default of {f.name} drifted from TrainerConfig's"
        )
    assert "buffer_size" not in {f.name for f in dataclasses.fields(AGENTS["greedy"].config_class)}


@pytest.mark.parametrize(("env_id", "expected"), [("discover/AHC039-v0", 0.01), ("discover/AC1-v0", 0.1)])
def test_the_kl_coefficient_defaults_to_the_tasks_and_a_flag_overrides_it(monkeypatch, env_id, expected):
    import discover_agent.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "Trainer", lambda policy, config: config)
    task = gym.make(env_id, **discover_envs.cpu_preset(env_id)).metadata["kl_coef"]  # what `run` hands over
    assert build_trainer(TTTConfig(env=env_id), None, task).kl_coef == expected
    assert build_trainer(TTTConfig(env=env_id, kl_coef=0.5), None, task).kl_coef == 0.5


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", -1), ("max_rollouts", -5), ("max_wall_s", -1.0), ("out", ""), ("temperature", float("inf"))],
)
def test_nonsense_config_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AgentConfig(**{field: value})


class EchoPolicy(Policy):
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
    assert [link["id"] for link in _lineage({"id": "a"}, {"a": Lineage("b", 1.0, 0), "b": Lineage("a", 0.5, 0)})] == [
        "b",
        "a",
    ]


def test_old_step_folders_are_removed_after_the_checkpoint_moves_on(finished_run):
    out, resume = finished_run
    stale = out / "steps" / "step-000001"
    shutil.copytree(out / "steps" / "step-000002", stale)
    resume()
    assert [p.name for p in (out / "steps").iterdir()] == ["step-000003"]


def test_reply_budget_defaults_to_the_construction_spec_unless_set(tiny_model_dir):
    from discover_agent.agents import build_policy
    from discover_agent.json_grammar import default_max_new_tokens

    spec = gym.make(ENV, **ENV_KWARGS).metadata["construction_spec"]
    auto = build_policy(AgentConfig(model=str(tiny_model_dir), device="cpu"), trainable=False, spec=spec)
    assert auto.config.max_new_tokens == default_max_new_tokens(spec)
    fixed = build_policy(AgentConfig(model=str(tiny_model_dir), device="cpu", max_new_tokens=7), False, spec)
    assert fixed.config.max_new_tokens == 7


def test_a_secret_an_env_draws_is_pinned_in_the_config_so_a_resumed_run_verifies_its_states(tmp_path):
    import secret_problem  # noqa: F401 - registers test/Secret-v0

    cfg = AgentConfig(env="test/Secret-v0", steps=1, groups=1, group_size=2, out=str(tmp_path / "run"))
    BestOfN(cfg, policy=EchoPolicy([1.0, 1.0, 0.5])).run(progress=False)
    _, saved = load_run_config(tmp_path / "run" / "config.json")  # what `discover resume` starts from
    assert isinstance(saved.env_kwargs["secret"], int)

    resumed = dataclasses.replace(saved, steps=2)
    result = BestOfN(resumed, policy=EchoPolicy([1.0, 1.0, 1.0])).run(progress=False, resume=True)
    assert result.steps == 2 and result.best["construction"] == [1.0, 1.0, 1.0]


def test_config_json_holds_the_env_arguments_a_default_run_used(make_tiny_policy, tmp_path):
    """No --env-kwargs: the env's CPU preset is what ran, and what config.json says."""
    config = config_for(BestOfN, tmp_path, steps=1, env_kwargs=None)
    BestOfN(config, policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["env_kwargs"] == {"n": 16}
    resumed = config_for(BestOfN, tmp_path, steps=2, env_kwargs=None)  # as `discover bench` rebuilds it
    result = BestOfN(resumed, policy=make_tiny_policy(max_new_tokens=40)).run(progress=False, resume=True)
    assert result.steps == 2


def test_step_metrics_say_why_a_run_goes_as_it_does(make_tiny_policy, tmp_path):
    BestOfN(config_for(BestOfN, tmp_path, steps=2), policy=make_tiny_policy(max_new_tokens=40)).run(progress=False)
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        assert {"valid_frac", "mean_valid_reward", "improve_rate", "copy_rate"} <= set(row)
        assert 0.0 <= float(row["improve_rate"]) <= 1.0 and 0.0 <= float(row["copy_rate"]) <= 1.0
