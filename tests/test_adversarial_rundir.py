"""A tampered run folder, read back by `discover resume` / `leaderboard` (issue #26): never a traceback, never
a read, write or delete outside the folder; one line `discover <cmd>: error: ...` and exit 2 instead."""

from __future__ import annotations

import json
import shutil

import pytest
from test_cli import exit_code, one_error_line, run_args

from discover_agent.cli import main
from discover_agent.storage import read_jsonl


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A two-step best-of-n run folder (4 logged rows), made once; tests tamper with copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(run_args(tiny_model_dir, out, "--agent", "best-of-n", "--steps", "2", "--quiet")) == 0
    return out


@pytest.fixture
def run(finished, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    return out


def resume(out) -> int:
    return exit_code(["resume", str(out), "--steps", "3", "--quiet"])


def edit_checkpoint(out, **fields) -> None:
    checkpoint = json.loads((out / "checkpoint.json").read_text())
    checkpoint.update(fields)
    (out / "checkpoint.json").write_text(json.dumps({k: v for k, v in checkpoint.items() if v is not ...}))


def test_a_steps_folder_that_is_a_link_is_refused_and_nothing_outside_is_deleted(run, tmp_path, capsys):
    """Before, `commit_step` deleted every subfolder of the link's target but the new step."""
    outside = tmp_path / "outside"
    shutil.copytree(run / "steps", outside)
    (outside / "precious").mkdir()
    shutil.rmtree(run / "steps")
    (run / "steps").symlink_to(outside)
    assert resume(run) == 2
    assert "steps is a symbolic link" in one_error_line(capsys, "resume")
    assert sorted(p.name for p in outside.iterdir()) == ["precious", "step-000002"]


def test_a_checkpoint_pointing_outside_its_steps_folder_is_refused(run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    edit_checkpoint(run, dir="../other/steps/step-000002")
    assert resume(run) == 2
    assert "'dir' must be the folder of its step" in one_error_line(capsys, "resume")


@pytest.mark.parametrize("name", [".lock", "config.json", "checkpoint.json", "rollouts.jsonl"])
def test_a_run_file_that_is_a_link_is_refused_and_its_target_untouched(run, tmp_path, capsys, name):
    target = tmp_path / "target"
    if name != ".lock":  # a dangling .lock link: the lock would create its target
        shutil.copy(run / name, target)
    before = target.read_bytes() if target.exists() else None
    (run / name).unlink()
    (run / name).symlink_to(target)
    assert resume(run) == 2
    assert f"{name} is a symbolic link" in one_error_line(capsys, "resume")
    assert (target.read_bytes() if target.exists() else None) == before


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"lineage": ...}, "'lineage' must be", id="no-lineage"),
        pytest.param({"lineage": [1]}, "'lineage' must be", id="lineage-list"),
        pytest.param({"step": "x"}, "'step' must be an integer >= 0", id="step-text"),
        pytest.param({"step": True}, "'step' must be an integer >= 0", id="step-true"),
        pytest.param({"rollouts": -1000}, "'rollouts' must be an integer >= 0", id="negative-rollouts"),
        pytest.param({"tokens": "x"}, "'tokens' must be", id="tokens-text"),
        pytest.param({"wall_s": "x"}, "'wall_s' must be", id="wall-text"),
        pytest.param({"metrics": {}}, "'metrics' must be", id="metrics-object"),
        pytest.param({"curve": [[1]]}, "'curve' must be", id="curve-short-pair"),
    ],
)
def test_a_checkpoint_with_a_bad_field_is_one_line_naming_it(run, capsys, fields, message):
    edit_checkpoint(run, **fields)
    assert resume(run) == 2
    line = one_error_line(capsys, "resume")
    assert "checkpoint.json" in line and message in line


def test_a_checkpoint_nested_100k_deep_is_one_line(run, capsys):
    (run / "checkpoint.json").write_text("[" * 100_000 + "]" * 100_000)
    assert resume(run) == 2
    assert "checkpoint.json is not valid JSON: nested too deeply" in one_error_line(capsys, "resume")


def test_a_logged_row_with_a_boolean_step_is_one_line_naming_it(run, capsys):
    (run / "rollouts.jsonl").write_text('{"step": true}\n')
    assert resume(run) == 2
    assert "rollouts.jsonl:1: a row needs an integer 'step'" in one_error_line(capsys, "resume")


def test_a_deleted_checkpoint_with_committed_steps_is_refused_not_started_over(run, capsys):
    """Before, resume started over and deleted the 4 logged rows."""
    (run / "checkpoint.json").unlink()
    assert resume(run) == 2
    assert "holds committed steps" in one_error_line(capsys, "resume")
    assert len(read_jsonl(run / "rollouts.jsonl")) == 4


def test_a_result_without_rollouts_is_one_leaderboard_line_naming_it(tmp_path, capsys):
    entry = {
        "env": "discover/AC1-v0", "agent": "puct", "model": "m", "seed": 0, "best_score": 1.6, "wall_s": 1.0,
        "env_kwargs": {"n": 3}, "curve": [[2, 1.6]], "mean_reward_per_step": [0.5],
    }  # fmt: skip
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "result.json").write_text(json.dumps(entry))
    assert exit_code(["leaderboard", str(tmp_path / "runs"), "--write", str(tmp_path / "lb")]) == 2
    assert "result.json: 'rollouts' must be an integer" in one_error_line(capsys, "leaderboard")
