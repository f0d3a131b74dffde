"""The `discover` command line end to end, with the tiny model saved as a local model folder."""

from __future__ import annotations

import json

import pytest

from discover_agent.cli import main
from discover_agent.storage import read_jsonl


def run_args(tiny_model_dir, out, *extra):
    return [
        "run", "discover/AC1-v0", "--model", str(tiny_model_dir), "--env-kwargs", '{"n": 3}', "--steps", "1",
        "--groups", "1", "--group-size", "2", "--max-new-tokens", "40", "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


def test_run_then_resume_extends_the_same_folder(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(tiny_model_dir, out)) == 0
    assert "best score" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["config_class"] == "TTTConfig" and saved["env_kwargs"] == {"n": 3}
    assert main(["resume", str(out), "--steps", "2"]) == 0
    assert [r["step"] for r in read_jsonl(out / "rollouts.jsonl")] == [0, 0, 1, 1]


def test_baseline_agent_is_chosen_by_flag(tiny_model_dir, tmp_path):
    out = tmp_path / "bon"
    assert main(run_args(tiny_model_dir, out, "--agent", "best-of-n")) == 0
    assert json.loads((out / "checkpoint.json").read_text())["agent"] == "best-of-n"


def test_envs_lists_every_registered_id(capsys):
    assert main(["envs"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"discover/ErdosMinOverlap-v0", "discover/AC1-v0", "discover/CirclePacking26-v0"} <= set(listed)


def test_unknown_env_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    args = run_args(tiny_model_dir, tmp_path / "x")
    args[1] = "discover/NoSuchProblem-v0"
    assert main(args) == 2
    assert "NoSuchProblem" in capsys.readouterr().err


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(run_args(tmp_path / "no-such-model", tmp_path / "x")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_flag_value_exits_with_usage_error(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(run_args(tiny_model_dir, tmp_path / "x", "--steps", "many"))
    assert exc.value.code == 2
    assert "--steps" in capsys.readouterr().err


def test_bad_env_kwargs_json_is_rejected(tiny_model_dir, tmp_path, capsys):
    args = run_args(tiny_model_dir, tmp_path / "x")
    args[args.index("--env-kwargs") + 1] = "[1, 2]"
    with pytest.raises(SystemExit):
        main(args)
    assert "JSON object" in capsys.readouterr().err


def test_resume_of_a_folder_without_a_run_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["resume", str(tmp_path)])
    assert "config.json" in capsys.readouterr().err


def test_nonsense_budget_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    assert main(run_args(tiny_model_dir, tmp_path / "x", "--group-size", "0")) == 2
    assert "group_size must be >= 1" in capsys.readouterr().err
