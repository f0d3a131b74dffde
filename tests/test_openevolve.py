"""OpenEvolve as a bench peer on the CPU path: `discover serve` with the tiny model, a few iterations, the env's
verifier judging every program in this process (so bench counts its steps), the same result.json."""

from __future__ import annotations

import json
import logging
import signal

import gymnasium as gym
import pytest
from tiny_model import build_model

from discover_agent.bench import run_bench
from discover_agent.openevolve_eval import EvaluationService
from discover_agent.policy import PolicyConfig
from discover_agent.serve import ServedPolicy, create_app, running
from discover_agent.storage import read_jsonl

ENV, KWARGS = "discover/ErdosMinOverlap-v0", {"n": 4}


@pytest.fixture
def server(tiny_tokenizer, one_thread):
    policy = ServedPolicy(build_model(tiny_tokenizer), tiny_tokenizer, PolicyConfig(device="cpu", seed=0))
    with running(create_app(policy, "tiny", max_tokens=64)) as url:
        yield url


def test_evaluator_file_scores_programs_with_the_env_in_this_process(tmp_path):
    pytest.importorskip("openevolve", reason="openevolve is not installed (pip install 'discover[openevolve]')")
    env = gym.make(ENV, **KWARGS).unwrapped
    _, info = env.reset(seed=0)
    service = EvaluationService(lambda: gym.make(ENV, **KWARGS), info["state"])
    good = tmp_path / "good.py"
    good.write_text("def run(construction, **kwargs):\n    return [0.5, 0.5, 0.5, 0.5]\n")
    bad = tmp_path / "bad.py"
    bad.write_text("def run(construction, **kwargs):\n    return [7]\n")
    with service.serving(tmp_path / "oe") as path:
        namespace: dict = {}
        exec(path.read_text(), namespace)
        results = [namespace["evaluate"](str(p)) for p in (good, bad)]
    expected = env.step("```python\n" + good.read_text() + "```")
    assert results[0].metrics == {"combined_score": expected[1], "valid": 1.0, "score": expected[4]["score"]}
    assert results[1].metrics == {"combined_score": env.problem.failure_reward, "valid": 0.0}
    assert "elements" in results[1].artifacts["verifier_error"]
    assert [r["valid"] for r in service.rows] == [True, False]


def test_a_wrong_key_is_refused(tmp_path):
    pytest.importorskip("openevolve", reason="openevolve is not installed")
    service = EvaluationService(lambda: gym.make(ENV, **KWARGS), {})
    with service.serving(tmp_path) as path:
        text = path.read_text()
        key = text.split("'")[-2]
        namespace: dict = {}
        exec(text.replace(key, "0" * len(key)), namespace)
        program = tmp_path / "p.py"
        program.write_text("x = 1\n")
        with pytest.raises(Exception, match="403"):
            namespace["evaluate"](str(program))
    assert service.rows == []


@pytest.mark.slow
def test_bench_runs_openevolve_against_discover_serve(server, tmp_path):
    pytest.importorskip("openevolve", reason="openevolve is not installed (pip install 'discover[openevolve]')")
    common = {"endpoint": server, "model": "tiny", "env_kwargs": KWARGS, "groups": 1, "group_size": 2, "workers": 1,
              "max_new_tokens": 64}  # fmt: skip
    handlers, sigint = list(logging.getLogger().handlers), signal.getsignal(signal.SIGINT)
    [entry] = run_bench([ENV], ["openevolve"], 4, [0], tmp_path, common, progress=False)
    assert logging.getLogger().handlers == handlers and signal.getsignal(signal.SIGINT) == sigint
    run = tmp_path / "ErdosMinOverlap-v0" / "openevolve" / "seed0"
    assert json.loads((run / "result.json").read_text()) == json.loads(json.dumps(entry))
    rows = read_jsonl(run / "rollouts.jsonl")
    assert entry["agent"] == "openevolve" and 1 <= entry["rollouts"] == len(rows) <= 4
    assert rows[0]["valid"], "the start program returns the start construction"
    start = gym.make(ENV, **KWARGS).unwrapped.reset(seed=0)[1]["state"]
    assert rows[0]["score"] == start["score"] and entry["best_score"] <= start["score"]
    assert json.loads((run / "best.json").read_text())["state"]["score"] == entry["best_score"]


@pytest.mark.slow
def test_bench_starts_an_interrupted_openevolve_run_over(server, tmp_path):
    """Before, the bench resumed it with `run(resume=True)`, which OpenEvolve's agent did not take (issue #26)."""
    pytest.importorskip("openevolve", reason="openevolve is not installed (pip install 'discover[openevolve]')")
    common = {"endpoint": server, "model": "tiny", "env_kwargs": KWARGS, "groups": 1, "group_size": 2, "workers": 1,
              "max_new_tokens": 64}  # fmt: skip
    run = tmp_path / "ErdosMinOverlap-v0" / "openevolve" / "seed0"
    run.mkdir(parents=True)
    (run / "rollouts.jsonl").write_text('{"step": 0, "reward": 9.0, "score": 0.1, "valid": true}\n')
    [entry] = run_bench([ENV], ["openevolve"], 4, [0], tmp_path, common, progress=False)
    rows = read_jsonl(run / "rollouts.jsonl")
    assert 1 <= entry["rollouts"] == len(rows) <= 4
    assert rows[0]["reward"] != 9.0, "the interrupted run's rows are dropped"
