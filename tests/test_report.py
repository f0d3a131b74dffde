"""`discover report`: one self-contained HTML page of a run or a bench folder, checked as a reader would see it."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import toy_env
from PIL import Image
from test_cli import run_args

from discover_agent.agents import _lineage
from discover_agent.cli import main
from discover_agent.config import PUCTConfig, save_run_config
from discover_agent.report import Drawer, ReportError, write_report
from discover_agent.rundir import Checkpoint, Lineage, RunDir
from discover_agent.storage import read_jsonl, write_json

ENV = "discover/ErdosMinOverlap-v0"
IMAGES = re.compile(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def synthetic_run(out: Path, rollouts: int = 64, group: int = 8, seed: int = 0, buffer_size: int = 1000) -> Path:
    """A run folder as `discover run` writes it (PUCT on Erdős n = 16), made without a model: each step's
    replies are ```json perturbations of the best state (one invalid reply a step), scored by the env itself,
    with an extra metrics column (agents add their own) and a buffer of the `buffer_size` best states."""
    env = gym.make(ENV, n=16)
    rng = np.random.default_rng(seed)
    _, info = env.reset(seed=seed)
    root = best = info["state"]
    states, lineage, rows, metrics, curve = {root["id"]: root}, {}, [], [], []
    for step in range(rollouts // group):
        rewards = []
        for k in range(group):
            values = np.clip(np.asarray(best["construction"]) + rng.normal(0, 0.03, 16), 0, 1).round(4)
            reply = "no block" if k == 0 else "```json\n" + json.dumps(values.tolist()) + "\n```"
            env.reset(options={"state": best})
            _, reward, *_, info = env.step(reply)
            child = info["next_state"]
            rows.append({
                "step": step, "parent_id": best["id"], "reward": reward, "score": info["score"],
                "valid": info["valid"], "error": info["error"], "tokens": 120, "id": child and child["id"],
                "sandbox": info["sandbox"], "reply": reply,
            })  # fmt: skip
            rewards.append(reward)
            if child is not None:
                states.setdefault(child["id"], child)
                lineage.setdefault(child["id"], Lineage(child["parent_id"], child["score"], step))
        best = max(states.values(), key=lambda s: s["reward"])
        curve.append((len(rows), best["score"]))
        metrics.append({
            "step": step, "rollouts": group, "valid_frac": (group - 1) / group, "mean_reward": float(np.mean(rewards)),
            "best_score": best["score"], "copy_rate": 0.0, "tokens": 120 * group,
        })  # fmt: skip
    run = RunDir(out)
    out.mkdir(parents=True)
    config = PUCTConfig(
        env=ENV, env_kwargs={"n": 16}, steps=rollouts // group, groups=1, group_size=group, out=str(out)
    )
    save_run_config(out / "config.json", "puct", config, sandbox={"mode": "none-needed"})
    run.log_rollouts(rows)
    kept = sorted(states.values(), key=lambda s: -s["reward"])[:buffer_size]
    step_dir = f"steps/step-{len(metrics):06d}"
    write_json(out / step_dir / "buffer.json", {"kind": "PUCTSampler", "buffer": kept})
    checkpoint = Checkpoint(
        agent="puct", env=ENV, initial=[root], step=len(metrics), rollouts=len(rows), tokens=120 * len(rows),
        wall_s=1.0, lineage=lineage, metrics=metrics, curve=curve,
    )  # fmt: skip
    assert checkpoint.dir == step_dir
    write_json(out / "checkpoint.json", checkpoint.to_json())
    run.write_best(best, _lineage(best, lineage), {"env": ENV, "agent": "puct", "step": len(metrics), "score": 0})
    run.write_metrics(metrics)
    return out


def pngs(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in IMAGES.findall(page)]


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory) -> tuple[Path, str]:
    """A synthetic run and its report (drawing is the slow part: one page serves several tests)."""
    run = synthetic_run(tmp_path_factory.mktemp("reported") / "run")
    return run, write_report(run).read_text()


def test_run_report_shows_the_run_its_diagnostics_best_state_and_lineage(reported_run):
    run, page = reported_run
    best = json.loads((run / "best.json").read_text())
    assert (run / "report.html").is_file()
    score = f"{best['state']['score']:.10g}"
    for text in (ENV, "puct", "{&quot;n&quot;: 16}", "valid_frac", "mean_reward", "copy_rate", score):
        assert text in page, text
    assert f"<td>best score</td><td>{score}</td>" in page
    for link in best["lineage"]:
        assert link["id"] in page
    images = pngs(page)
    # progress, diagnostics, the best state, up to 6 lineage states, up to 6 top states of the buffer
    assert len(images) == 3 + min(6, len(best["lineage"])) + 6
    colours = [len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) for image in images]
    assert min(colours) > 10, "every picture shows something"


def test_run_report_is_self_contained(reported_run):
    _, page = reported_run
    assert "<script" not in page and "<link" not in page
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def test_ancestors_dropped_from_the_buffer_are_drawn_from_their_json_replies_only_if_ids_match(tmp_path):
    run = synthetic_run(tmp_path / "run", rollouts=40, buffer_size=1)
    lineage = json.loads((run / "best.json").read_text())["lineage"]
    assert 3 <= len(lineage) <= 6, "every ancestor is drawn"
    assert "not drawn" not in write_report(run).read_text()
    rows = read_jsonl(run / "rollouts.jsonl")
    for row in rows:
        if row["id"] == lineage[1]["id"]:
            row["reply"] = row["reply"].replace("[", "[0.5, ", 1)  # the logged reply no longer makes that state
    (run / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert write_report(run).read_text().count("not drawn") == 1


def test_without_metrics_csv_the_checkpoints_metrics_are_shown(tmp_path):
    run = synthetic_run(tmp_path / "run", rollouts=16)
    (run / "metrics.csv").unlink()
    page = write_report(run).read_text()
    assert "<td>copy_rate</td>" in page and "<td>valid_frac</td><td>0.875</td>" in page


def test_report_of_ten_thousand_rollouts_stays_under_three_megabytes(tmp_path):
    run = synthetic_run(tmp_path / "run", rollouts=10_000)
    path = write_report(run)
    assert path.stat().st_size < 3 << 20
    assert "1250 / 1250" in path.read_text(), "steps done / asked"


def test_bench_report_shows_the_leaderboard_and_each_agents_best_state(tmp_path):
    bench = tmp_path / "bench"
    for agent, seed in (("puct", 0), ("best-of-n", 1)):
        run = synthetic_run(bench / "ErdosMinOverlap-v0" / agent / "seed0", seed=seed)
        best = json.loads((run / "best.json").read_text())["state"]
        entry = {
            "env": ENV, "agent": agent, "model": "synthetic", "rollouts": 64, "seed": 0, "best_score": best["score"],
            "best_reward": best["reward"], "wall_s": 1.0, "tokens": 0, "command": "synthetic",
            "best_state_file": str((run / "best.json").relative_to(bench)), "env_kwargs": {"n": 16},
            "curve": [[64, best["score"]]],
            "mean_reward_per_step": [2.0, 2.1],
        }  # fmt: skip
        write_json(run / "result.json", entry)
    page = write_report(bench).read_text()
    assert "best score (mean ± sd)" in page, "the leaderboard table"
    assert "puct, seed 0" in page and "best-of-n, seed 0" in page
    shown = [float(x) for x in re.findall(r"seed 0: best ([0-9.]+)", page)]
    assert len(shown) == 2 and shown == sorted(shown), "best first (lower is better on Erdős)"
    assert len(pngs(page)) == 1 + 2, "the leaderboard plot and one best state per agent"


class PictureGuessEnv(toy_env.GuessEnv):
    """Someone else's env that draws its states (`rgb_array`): the report draws them through `render()`."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 1}  # noqa: RUF012

    def render(self) -> np.ndarray | None:
        image = np.full((40, 60, 3), 255, dtype=np.uint8)
        image[:, : int(self.state["guess"]) % 60] = (200, 30, 30)
        return image


gym.register("toy/PictureGuess-v0", entry_point=PictureGuessEnv)


def test_states_of_any_env_that_renders_rgb_array_are_drawn_through_render_and_others_say_why():
    drawer = Drawer("toy/PictureGuess-v0", {})
    _, info = drawer.env.reset(seed=0)
    png = drawer.png(info["state"])
    assert np.asarray(Image.open(io.BytesIO(png))).shape[:2] == (40, 60)
    assert "does not match" in drawer.png({**info["state"], "score": 99.0, "id": "x"}), "reset re-checks the state"
    drawer.close()
    assert "declares no rgb_array" in Drawer("toy_env:toy/Guess-v0", {}).png(info["state"])


def test_report_of_a_folder_without_a_run_or_bench_names_both(tmp_path):
    with pytest.raises(ReportError, match=r"neither a run .* nor a bench"):
        write_report(tmp_path)


def test_report_command_writes_the_page_where_asked_and_prints_its_path(tmp_path, capsys):
    run = synthetic_run(tmp_path / "run", rollouts=8)
    assert main(["report", str(run), "--out", str(tmp_path / "elsewhere" / "r.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "elsewhere" / "r.html")
    assert not (run / "report.html").exists()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("discover report: error: ")


def test_a_report_that_cannot_be_written_after_a_run_is_a_warning_naming_the_retry(tmp_path, capsys):
    from discover_agent.cli import _report

    _report("run", tmp_path)  # the run is saved: its command must not fail over the page
    err = capsys.readouterr().err
    assert err.startswith(f"discover run: warning: report not written (ReportError: {tmp_path}")
    assert f"retry with `discover report {tmp_path}`" in err


def test_run_ends_by_writing_its_report_and_naming_it_unless_told_not_to(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(tiny_model_dir, out)) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {out / 'report.html'}"
    assert "discover/AC1-v0" in (out / "report.html").read_text()
    quiet = tmp_path / "quiet"
    assert main([*run_args(tiny_model_dir, quiet), "--no-report"]) == 0
    assert not (quiet / "report.html").exists()


def test_bench_ends_by_writing_its_report(tiny_model_dir, tmp_path, capsys):
    args = [
        "bench", "--envs", "discover/AC1-v0", "--agents", "puct", "--rollouts", "2", "--seeds", "0",
        "--model", str(tiny_model_dir), "--env-kwargs", '{"n": 3}', "--groups", "1", "--group-size", "2",
        "--max-new-tokens", "40", "--device", "cpu", "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {tmp_path / 'report.html'}"
    assert "discover/AC1-v0" in (tmp_path / "report.html").read_text()


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
]  # fmt: skip


@pytest.mark.slow
def test_report_page_renders_in_headless_chromium_without_console_errors(tmp_path):
    """As a person opens it: Chromium loads the page from disk; the screenshot shows text and pictures, and the
    console says nothing (Chromium logs console messages and uncaught errors as CONSOLE lines)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    page = write_report(synthetic_run(tmp_path / "run"))
    shot = tmp_path / "shot.png"
    argv = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400",
            f"--screenshot={shot}", page.resolve().as_uri()]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert shot.is_file(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (2400, 1280)
    not_white = (image < 240).any(axis=-1)
    assert not_white.mean() > 0.05, "the page shows text and pictures, not a blank screen"
    colourful = (image.max(axis=-1).astype(int) - image.min(axis=-1)) > 60
    assert colourful.sum() > 5000, "the drawings are rendered (matplotlib's blue), not only text"
