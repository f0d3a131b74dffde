"""The benchmark harness and leaderboards: equal budgets, reproducible entries, a user's own agent plugged in."""

from __future__ import annotations

import json
import time

import gymnasium as gym
import pytest

from discover_agent.agents import Agent
from discover_agent.bench import AgentSpec, run_bench
from discover_agent.cli import main
from discover_agent.config import AgentConfig
from discover_agent.leaderboard import write_leaderboards
from discover_agent.types import RunResult

ENV = "discover/AC1-v0"


class ConstantAgent(Agent):
    """A user's agent: always answers the same flat construction (shows the plug-in contract)."""

    name = "constant"
    steps_taken = 1

    def run(self, progress: bool = True, resume: bool = False) -> RunResult:
        cfg = self.config
        env = gym.make(cfg.env, **cfg.resolved_env_kwargs())
        _, info = env.reset(seed=cfg.seed)
        n = env.metadata["construction_spec"].min_length
        start, best = time.perf_counter(), info["state"]
        for _ in range(self.steps_taken):
            env.reset(options={"state": best})
            _, reward, _, _, info = env.step("```json\n" + json.dumps([1.0] * n) + "\n```")
            if info["valid"] and reward > best["reward"]:
                best = info["next_state"]
        return RunResult(
            env=cfg.env, agent=self.name, model="none", best=best, best_score=best["score"],
            best_reward=best["reward"], rollouts=1, steps=1, wall_s=time.perf_counter() - start, tokens=0,
            out=cfg.out, curve=[(1, best["score"])],
        )  # fmt: skip


class UnderreportingAgent(ConstantAgent):
    """Says it used one rollout but steps the env three times."""

    steps_taken = 3


class GreedyAgent(ConstantAgent):
    """Steps the env more often than any budget below allows."""

    steps_taken = 50


def test_bench_runs_every_agent_and_seed_at_the_same_budget_then_writes_leaderboards(tiny_model_dir, tmp_path):
    common = {
        "model": str(tiny_model_dir), "env_kwargs": {"n": 3}, "groups": 1, "group_size": 2, "max_new_tokens": 40,
        "device": "cpu",
    }  # fmt: skip
    agents = ["ttt", "best-of-n", "test_bench:ConstantAgent"]
    entries = run_bench([ENV], agents, rollouts=4, seeds=[0, 1], out=tmp_path / "runs", common=common, progress=False)
    assert len(entries) == 6
    for entry in entries:
        assert {"env", "agent", "model", "rollouts", "seed", "best_score", "best_reward", "wall_s", "tokens", "date",
                "command", "best_state_file"} <= set(entry)  # fmt: skip
        assert entry["command"].startswith("discover bench --envs discover/AC1-v0")
    assert {e["rollouts"] for e in entries if e["agent"] != "test_bench:ConstantAgent"} == {4}
    assert {e["rollouts"] for e in entries if e["agent"] == "test_bench:ConstantAgent"} == {1}

    written = write_leaderboards(tmp_path / "runs", tmp_path / "leaderboards")
    names = sorted(p.name for p in written)
    assert names == ["AC1-v0.json", "AC1-v0.md", "AC1-v0.png", "README.md"]
    table = (tmp_path / "leaderboards" / "AC1-v0.md").read_text()
    for agent in ("ttt", "best-of-n", "test_bench:ConstantAgent"):
        assert f"| {agent} |" in table
    assert "Matolcsi" in table
    assert (tmp_path / "leaderboards" / "AC1-v0.png").stat().st_size > 5000
    assert len(json.loads((tmp_path / "leaderboards" / "AC1-v0.json").read_text())) == 6


def test_bench_counts_env_steps_itself_instead_of_trusting_the_agent(tmp_path):
    common = {"env_kwargs": {"n": 3}, "groups": 1, "group_size": 2}
    entries = run_bench([ENV], ["test_bench:UnderreportingAgent"], 4, [0], tmp_path, common)
    assert entries[0]["rollouts"] == 3
    with pytest.raises(ValueError, match="took 50 env steps"):
        run_bench([ENV], ["test_bench:GreedyAgent"], 4, [0], tmp_path / "b", common)
    assert gym.spec(ENV).additional_wrappers == (), "the counting wrapper must be removed after a run"


def test_bench_runs_on_a_gymnasium_env_from_another_module(tiny_model_dir, tmp_path):
    common = {"model": str(tiny_model_dir), "groups": 1, "group_size": 2, "max_new_tokens": 8, "device": "cpu"}
    entries = run_bench(["toy_env:toy/Guess-v0"], ["puct"], 4, [0], tmp_path, common, progress=False)
    assert entries[0]["rollouts"] == 4 and entries[0]["best_score"] <= 0
    assert write_leaderboards(tmp_path, tmp_path / "lb")


def test_bench_refuses_an_executor_whose_steps_it_cannot_count(tmp_path):
    with pytest.raises(ValueError, match="--executor local"):
        run_bench([ENV], ["puct"], 4, [0], tmp_path, {"executor": "ray"})


def test_agent_specs_parse_builtin_endpoint_and_import_path():
    assert AgentSpec.parse("puct").label == "puct"
    endpoint = AgentSpec.parse("openai:my-model@http://127.0.0.1:8000/v1")
    assert endpoint.overrides == {"model": "my-model", "endpoint": "http://127.0.0.1:8000/v1"}
    assert AgentSpec.parse("test_bench:ConstantAgent").cls is ConstantAgent
    with pytest.raises(ValueError, match="not a subclass"):
        AgentSpec.parse("json:dumps")
    with pytest.raises(ValueError, match="unknown agent"):
        AgentSpec.parse("alphaevolve")
    with pytest.raises(ValueError, match="openai:MODEL@URL"):
        AgentSpec.parse("openai:no-url")


def test_budget_smaller_than_one_step_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="less than one step"):
        run_bench([ENV], ["puct"], rollouts=3, seeds=[0], out=tmp_path, common={"groups": 2, "group_size": 2})


def test_bench_runs_the_calibration_agents_with_their_own_step_shape(tmp_path):
    common = {"env_kwargs": {"n": 3}, "groups": 2, "group_size": 2}
    agents = ["random-search", "es", "es[groups=1,group_size=1]"]
    entries = run_bench([ENV], agents, rollouts=8, seeds=[0], out=tmp_path / "bench", common=common, progress=False)
    assert [e["rollouts"] for e in entries] == [8, 8, 8]
    one_plus_one = entries[2]
    assert len(one_plus_one["curve"]) == 8, "(1+1)-ES: one reply a step"
    assert len(entries[1]["curve"]) == 2
    for e in entries:
        assert e["version"].startswith(("git:", "discover "))
        assert not e["best_state_file"].startswith("/") and (tmp_path / "bench" / e["best_state_file"]).is_file()
        assert e["command"].endswith("--out bench") and str(tmp_path) not in e["command"]
        assert set(e["per_step"]) >= {"valid_frac", "mean_valid_reward", "improve_rate", "copy_rate"}
        assert e["env_kwargs"] == {"n": 3}


def test_bench_command_line_keeps_commas_inside_an_agents_brackets(tmp_path, capsys, monkeypatch):
    """`es[groups=1,group_size=1]` is one agent (a (1+1)-ES), not "es[groups=1" and "group_size=1]"."""
    import discover_agent.bench as bench

    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda envs, agents, *rest, **kw: seen.setdefault("agents", agents) and [])
    argv = ["bench", "--envs", ENV, "--agents", "random-search, es[groups=1,group_size=1],ttt[lr=1e-3]"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert seen["agents"] == ["random-search", "es[groups=1,group_size=1]", "ttt[lr=1e-3]"]
    for bad in ("es[groups=1", "es]", ""):
        with pytest.raises(SystemExit):
            main(["bench", "--envs", ENV, "--agents", bad, "--out", str(tmp_path)])


def test_leaderboard_of_an_empty_folder_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="discover bench"):
        write_leaderboards(tmp_path, tmp_path / "lb")


def test_default_config_has_a_cpu_preset_for_the_default_env():
    assert AgentConfig().resolved_env_kwargs() == {"n": 16}


def test_bench_command_line_takes_a_config_file_for_every_agents_knobs(tmp_path, capsys):
    config = tmp_path / "bench.yaml"
    config.write_text("env_kwargs: {n: 3}\ngroups: 1\ngroup_size: 1\nepsilon: 0.2\n")
    args = ["bench", "--envs", ENV, "--agents", "test_bench:ConstantAgent", "--rollouts", "1", "--seeds", "0",
            "--config", str(config), "--out", str(tmp_path / "runs")]  # fmt: skip
    assert main(args) == 0
    entry = json.loads(next((tmp_path / "runs").rglob("result.json")).read_text())
    assert entry["env_kwargs"] == {"n": 3} and "--epsilon 0.2" in entry["command"]
    config.write_text("epsilon: 0.2\nlearning_rate: 1\n")
    with pytest.raises(SystemExit):
        main(args)
    assert "learning_rate" in capsys.readouterr().err


def test_an_interrupted_bench_resumes_its_unfinished_runs_and_skips_finished_ones(tiny_model_dir, tmp_path):
    from discover_agent.leaderboard import slug
    from discover_agent.search import BestOfN

    common = {"model": str(tiny_model_dir), "env_kwargs": {"n": 3}, "groups": 1, "group_size": 2,
              "max_new_tokens": 40, "device": "cpu"}  # fmt: skip
    run_out = tmp_path / "runs" / slug(ENV) / "best-of-n" / "seed0"
    # A bench process that died after its first step of two: the run folder holds one committed step.
    BestOfN(AgentConfig(**common, env=ENV, seed=0, out=str(run_out), steps=2, max_rollouts=2)).run(progress=False)

    (entry,) = run_bench([ENV], ["best-of-n"], rollouts=4, seeds=[0], out=tmp_path / "runs", common=common,
                         progress=False)  # fmt: skip
    assert entry["rollouts"] == 4  # 2 counted by the earlier process (its checkpoint) + 2 counted now
    rows = [json.loads(line) for line in (run_out / "rollouts.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 0, 1, 1]

    stamp = (run_out / "result.json").stat().st_mtime_ns
    (again,) = run_bench([ENV], ["best-of-n"], rollouts=4, seeds=[0], out=tmp_path / "runs", common=common,
                         progress=False)  # fmt: skip
    assert again == json.loads(json.dumps(entry)) and (run_out / "result.json").stat().st_mtime_ns == stamp


def test_agent_fields_in_brackets_make_one_bench_compare_settings(tiny_model_dir, tmp_path):
    spec = AgentSpec.parse("ttt[lr=3e-4,kl-coef=0,baseline=mean]")
    assert spec.label == "ttt[lr=3e-4,kl-coef=0,baseline=mean]"
    assert spec.overrides == {"lr": 3e-4, "kl_coef": 0, "baseline": "mean"}
    with pytest.raises(ValueError, match="no field"):
        AgentSpec.parse("best-of-n[lr=1e-3]")  # best-of-n does not train
    with pytest.raises(ValueError, match="key=value"):
        AgentSpec.parse("ttt[lr]")

    common = {"model": str(tiny_model_dir), "env_kwargs": {"n": 3}, "groups": 1, "group_size": 2,
              "max_new_tokens": 40, "device": "cpu"}  # fmt: skip
    agents = ["best-of-n[temperature=0.5]", "best-of-n"]
    entries = run_bench([ENV], agents, rollouts=4, seeds=[0], out=tmp_path / "runs", common=common, progress=False)
    assert [e["agent"] for e in entries] == agents
    assert all(len(e["mean_reward_per_step"]) == 2 for e in entries)  # the learning curve, one value a step
    config = json.loads((tmp_path / "runs" / "AC1-v0" / agents[0] / "seed0" / "config.json").read_text())
    assert json.dumps(config).count('"temperature": 0.5') == 1
    assert "--agents 'best-of-n[temperature=0.5]'" in entries[0]["command"]

    write_leaderboards(tmp_path / "runs", tmp_path / "leaderboards")
    table = (tmp_path / "leaderboards" / "AC1-v0.md").read_text()
    assert "| best-of-n[temperature=0.5] |" in table and "| best-of-n |" in table
