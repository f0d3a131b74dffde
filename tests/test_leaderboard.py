"""Leaderboards: primary metrics, paired statistics against TTT with known answers, the learning column."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from discover_agent.leaderboard import area_under_best, paired_difference, write_leaderboards
from discover_agent.storage import write_json

ENV = "discover/AC1-v0"  # lower is better


def entry(agent, seed, best, curve=None, valid_curve=None, **extra):
    return {
        "env": ENV, "agent": agent, "model": "m", "rollouts": 8, "seed": seed, "best_score": best, "wall_s": 1.0,
        "env_kwargs": {"n": 3}, "curve": curve or [[8, best]],
        "per_step": {"mean_valid_reward": valid_curve or []}, **extra,
    }  # fmt: skip


def table_rows(tmp_path, entries):
    for e in entries:
        write_json(tmp_path / "runs" / e["agent"] / f"seed{e['seed']}" / "result.json", e)
    write_leaderboards(tmp_path / "runs", tmp_path / "lb")
    lines = (tmp_path / "lb" / "AC1-v0.md").read_text().splitlines()
    return {line.split(" | ")[0].removeprefix("| "): line.split(" | ") for line in lines if line.startswith("| ")}


def test_area_under_the_best_so_far_curve_weights_each_step_by_its_rollouts():
    # 4 rollouts at 2.0, then 4 at 1.0, then 8 at 0.5: (8 + 4 + 4) / 16
    assert area_under_best({"curve": [[4, 2.0], [8, 1.0], [16, 0.5]]}) == pytest.approx(1.0)
    assert area_under_best({"curve": []}) is None


def test_paired_difference_has_the_t_interval_and_counts_wins_in_the_figures_direction():
    agent = {0: 1.0, 1: 2.0, 2: 3.0, 3: 9.0}
    reference = {0: 2.0, 1: 2.0, 2: 2.0, 4: 0.0}  # seeds 3 and 4 are unpaired
    lower = paired_difference(agent, reference, higher_is_better=False)
    diffs = [-1.0, 0.0, 1.0]  # mean 0, sample sd 1
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert (lower.n, lower.mean, lower.low, lower.high) == (3, 0.0, pytest.approx(-half), pytest.approx(half))
    assert (lower.wins, lower.ties) == (1, 1)  # seed 0 is lower (better), seed 1 ties
    assert paired_difference(agent, reference, higher_is_better=True).wins == 1  # seed 2
    assert sum(diffs) == 0
    assert paired_difference({0: 1.0}, {1: 1.0}, True) is None
    one = paired_difference({0: 1.0}, {0: 3.0}, False)
    assert one.n == 1 and math.isnan(one.low) and one.text() == "-2"


def test_leaderboard_rows_compare_every_agent_with_ttt_seed_by_seed(tmp_path):
    ttt = [entry("ttt", s, b) for s, b in enumerate([1.6, 1.7, 1.8])]
    puct = [entry("puct", s, b) for s, b in enumerate([1.7, 1.9, 1.8])]  # worse by 0.1, 0.2, 0.0
    rows = table_rows(tmp_path, ttt + puct)
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert rows["puct"][5] == f"{0.1:+.3g} [{0.1 - half:+.3g}, {0.1 + half:+.3g}]"
    assert rows["puct"][7] == "0/3"  # never lower than ttt (one tie)
    assert rows["ttt"][5] == rows["ttt"][7] == "-"
    assert list(rows)[1:3] == ["ttt", "puct"], "ranked by mean best score in the figure's direction"
    readme = (tmp_path / "lb" / "README.md").read_text()
    assert "Primary metrics" in readme and "AUC" in readme


def test_leaderboard_learning_column_uses_valid_replies_and_the_sample_sd(tmp_path):
    nan = None  # a step without a valid reply
    runs = [
        entry("ttt", 0, 1.5, valid_curve=[1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 4.0, 5.0]),
        entry("ttt", 1, 1.5, valid_curve=[2.0, nan, 2.0, 2.0, 2.0, 2.0, 2.0, 4.0]),
        entry("best-of-n", 0, 1.6),
    ]
    rows = table_rows(tmp_path, runs)
    # First and last quarter (2 of 8 steps): seed 0 goes 1.0 -> 4.5, seed 1 2.0 -> 3.0; deltas 3.5 and 1.0,
    # sample sd 1.77.
    assert rows["ttt"][10] == "1.5 → 3.75 (+2.25 ± 1.8)"
    assert rows["best-of-n"][10] == "-"


def test_entries_written_before_the_diagnostics_still_make_a_table(tmp_path):
    old = {"env": ENV, "agent": "ttt", "model": "m", "rollouts": 8, "seed": 0, "best_score": 1.5, "wall_s": 1.0,
           "env_kwargs": {"n": 3}, "curve": [[8, 1.5]], "mean_reward_per_step": [0.5, 0.6]}  # fmt: skip
    rows = table_rows(tmp_path, [old])
    assert rows["ttt"][10] == "0.5 → 0.6 (+0.1)"


def test_a_result_file_that_is_not_an_entry_is_named(tmp_path):
    no_rollouts = {"env": ENV, "agent": "ttt", "model": "m", "seed": 0, "wall_s": 1.0, "best_score": 1.5}
    write_json(tmp_path / "runs" / "x" / "result.json", no_rollouts)
    with pytest.raises(ValueError, match="'rollouts' must be an integer"):
        write_leaderboards(tmp_path / "runs", tmp_path / "lb")


def test_the_header_names_each_agents_model_and_every_code_version(tmp_path):
    entries = [
        entry("ttt", 0, 1.6, version="git:aaa"), entry("ttt", 1, 1.6, version="git:bbb"),
        entry("es", 0, 1.7, model="none (an ES)", version="git:aaa"),
    ]  # fmt: skip
    table_rows(tmp_path, entries)
    header = (tmp_path / "lb" / "AC1-v0.md").read_text().splitlines()[2]
    assert "model m (ttt)" in header and "model none (an ES) (es)" in header
    assert "git:aaa (2 runs), git:bbb (1 run)" in header
