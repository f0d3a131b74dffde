"""The `discover` command line end to end, with the tiny model saved as a local model folder."""

from __future__ import annotations

import json

import pytest

from discover_agent.cli import main
from discover_agent.storage import read_jsonl


def run_args(tiny_model_dir, out, *extra, env="discover/AC1-v0"):
    return [
        "run", env, "--model", str(tiny_model_dir), "--env-kwargs", '{"n": 3}', "--steps", "1",
        "--groups", "1", "--group-size", "2", "--max-new-tokens", "40", "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


def exit_code(args) -> int:
    """What the shell would see: main's return value, or the code argparse exits with."""
    try:
        return main(args)
    except SystemExit as exc:
        return exc.code


def one_error_line(capsys, command: str = "run") -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line and "it/s]" not in line]  # progress bars
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"discover {command}: error: "), lines
    return lines[0]


def test_run_then_resume_extends_the_same_folder_and_keeps_config_true(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(tiny_model_dir, out)) == 0
    assert "best score" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["agent"] == "ttt" and saved["config"]["env_kwargs"] == {"n": 3}
    assert main(["resume", str(out), "--steps", "2"]) == 0
    assert [r["step"] for r in read_jsonl(out / "rollouts.jsonl")] == [0, 0, 1, 1]
    assert json.loads((out / "config.json").read_text())["config"]["steps"] == 2


def test_run_then_resume_reproduces_an_uninterrupted_ttt_run_reply_for_reply(tiny_model_dir, tmp_path):
    """Default settings (merged sampling on CPU, kept prompts, the thread governor): 2 steps, then `discover resume`
    to 4, log exactly the replies of one 4-step run. Each `main` call starts where the last left the process's
    global torch generator, as a new process would start elsewhere."""
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--lr", "0.01", "--groups", "1", "--group-size",
              "2", "--max-new-tokens", "48", "--env-kwargs", '{"n": 3}', "--quiet"]  # fmt: skip
    assert main(["run", "discover/AC1-v0", "--steps", "4", "--out", str(tmp_path / "whole"), *common]) == 0
    assert main(["run", "discover/AC1-v0", "--steps", "2", "--out", str(tmp_path / "part"), *common]) == 0
    assert main(["resume", str(tmp_path / "part"), "--steps", "4", "--quiet"]) == 0
    whole, part = (read_jsonl(tmp_path / name / "rollouts.jsonl") for name in ("whole", "part"))
    assert len(whole) == 8 and [r["reply"] for r in part] == [r["reply"] for r in whole]


def test_run_into_a_folder_holding_a_run_is_refused_naming_resume(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(tiny_model_dir, out)) == 0
    capsys.readouterr()
    assert main(run_args(tiny_model_dir, out, "--temperature", "0.5")) == 2
    assert f"discover resume {out}" in one_error_line(capsys)
    assert json.loads((out / "config.json").read_text())["config"]["temperature"] == 1.0


def test_config_file_sets_fields_and_flags_override_it(tiny_model_dir, tmp_path):
    config = tmp_path / "ttt.yaml"
    config.write_text("group_size: 3\ntemperature: 0.7\nlr: 0.001\n")
    out = tmp_path / "run"
    assert main([*run_args(tiny_model_dir, out, "--config", str(config)), "--temperature", "0.9"]) == 0
    saved = json.loads((out / "config.json").read_text())["config"]
    assert (saved["temperature"], saved["lr"]) == (0.9, 0.001)
    assert saved["group_size"] == 2, "the --group-size flag of run_args overrides the file"


def test_config_file_with_an_unknown_field_names_the_file(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text('{"learning_rate": 0.1}')
    assert exit_code(run_args(tiny_model_dir, tmp_path / "x", "--config", str(config))) == 2
    err = one_error_line(capsys)
    assert "bad.json" in err and "learning_rate" in err


def test_baseline_agent_is_chosen_by_flag(tiny_model_dir, tmp_path):
    out = tmp_path / "bon"
    assert main(run_args(tiny_model_dir, out, "--agent", "best-of-n")) == 0
    assert json.loads((out / "checkpoint.json").read_text())["agent"] == "best-of-n"


def test_run_on_a_gymnasium_env_from_another_module(tiny_model_dir, tmp_path):
    out = tmp_path / "toy"
    args = run_args(tiny_model_dir, out, "--env-kwargs", "{}", "--agent", "puct", env="toy_env:toy/Guess-v0")
    assert main(args) == 0
    assert len(read_jsonl(out / "rollouts.jsonl")) == 2


def test_envs_lists_every_registered_id(capsys):
    assert main(["envs"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"discover/ErdosMinOverlap-v0", "discover/AC1-v0", "discover/CirclePacking26-v0"} <= set(listed)


def test_unknown_env_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    assert main(run_args(tiny_model_dir, tmp_path / "x", env="discover/NoSuchProblem-v0")) == 2
    assert "NoSuchProblem" in one_error_line(capsys)


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(run_args(tmp_path / "no-such-model", tmp_path / "x")) == 2
    assert "does not exist" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--steps", "many", "--steps"),
        ("--env-kwargs", "[1, 2]", "JSON object"),
        ("--env-kwargs", '{"bogus": 1}', "--env-kwargs"),
        ("--seed", "-1", "--seed"),
        ("--max-rollouts", "-5", "--max-rollouts"),
        ("--max-wall-s", "-1", "--max-wall-s"),
        ("--out", "", "--out"),
        ("--temperature", "inf", "--temperature"),
        ("--group-size", "0", "--group-size"),
    ],
)
def test_user_errors_are_one_line_naming_the_flag_with_exit_code_2(
    tiny_model_dir, tmp_path, capsys, flag, value, message
):
    assert exit_code(run_args(tiny_model_dir, tmp_path / "x", flag, value)) == 2
    assert message in one_error_line(capsys)


LAUGHS = "env_kwargs:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"  {b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("deep.json", "[" * 100_000 + "]" * 100_000, "levels deep"),
        ("deep.yaml", "env_kwargs: " + "[" * 100_000 + "]" * 100_000, "levels deep"),
        ("laughs.yaml", LAUGHS, "YAML aliases (*a, line 3) are not allowed"),
        ("big.json", '{"out": "' + "x" * 2**20 + '"}', "bytes"),
    ],
    ids=["100k-deep-json", "100k-deep-yaml", "billion-laughs", "1mb"],
)
def test_hostile_config_files_are_one_line_errors(tiny_model_dir, tmp_path, capsys, name, text, message):
    """Red-team: --config nested 100k deep ended in a RecursionError traceback; a YAML "billion laughs" in
    env_kwargs (9**9 values from 10 lines) expanded once the config was copied."""
    config = tmp_path / name
    config.write_text(text)
    assert exit_code(run_args(tiny_model_dir, tmp_path / "x", "--config", str(config))) == 2
    err = one_error_line(capsys)
    assert name in err and message in err


def test_env_kwargs_nested_too_deep_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    assert exit_code(run_args(tiny_model_dir, tmp_path / "x", "--env-kwargs", "[" * 50_000 + "]" * 50_000)) == 2
    assert "levels deep" in one_error_line(capsys)


@pytest.mark.parametrize(("flag", "value"), [("--port", "99999"), ("--port", "-1"), ("--max-tokens", "0")])
def test_serve_refuses_an_impossible_port_or_cap_in_one_line(tiny_model_dir, capsys, flag, value):
    """Red-team: `serve --port 99999` raised OverflowError (after loading the model)."""
    assert exit_code(["serve", "--model", str(tiny_model_dir), "--device", "cpu", flag, value]) == 2
    assert flag in one_error_line(capsys, "serve")


def test_an_unwritable_out_is_one_line_naming_the_folder(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert exit_code(run_args(tiny_model_dir, tmp_path / "file" / "run")) == 2
    assert str(tmp_path / "file" / "run") in one_error_line(capsys)


def test_an_unreachable_endpoint_is_one_line(tmp_path, capsys):
    args = ["run", "discover/AC1-v0", "--agent", "best-of-n", "--endpoint", "http://127.0.0.1:9/v1", "--steps", "1",
            "--groups", "1", "--group-size", "1", "--out", str(tmp_path / "x")]  # fmt: skip
    assert exit_code(args) == 2
    assert "127.0.0.1:9" in one_error_line(capsys)


def test_resume_of_a_folder_without_a_run_is_refused(tmp_path, capsys):
    assert exit_code(["resume", str(tmp_path)]) == 2
    assert "config.json" in one_error_line(capsys, "resume")


@pytest.mark.parametrize(("name", "text"), [("config.json", '{"agent": "ttt", '), ("checkpoint.json", "[")])
def test_resume_with_a_malformed_run_file_names_the_file(tiny_model_dir, tmp_path, capsys, name, text):
    out = tmp_path / "run"
    assert main(run_args(tiny_model_dir, out)) == 0
    capsys.readouterr()
    (out / name).write_text(text)
    assert exit_code(["resume", str(out), "--steps", "2"]) == 2
    assert f"{name} is not valid JSON" in one_error_line(capsys, "resume")
