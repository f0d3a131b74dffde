"""AHC058 speed: judging one case (500 turns, counts beyond 64 bits) must take milliseconds, next to the
program runs (tens of ms each).

Run for real with `pytest tests/benchmarks/test_bench_ahc058.py --benchmark-enable`.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from discover_envs.problems.ahc058 import BASELINE, AppleMachines, case_score, parse_actions, simulate


@pytest.fixture(scope="module")
def played():
    """Case 0 and the start program's output for it (trusted code, run directly)."""
    problem = AppleMachines(n_cases=1)
    data, case = problem.case(0)
    out = subprocess.run([sys.executable, "-c", BASELINE], input=data, capture_output=True, check=True).stdout
    return problem, case, out


def test_bench_judge_500_turns(benchmark, played):
    problem, case, out = played
    stored, score = benchmark(problem.judge, out, case)
    assert score == case_score(simulate(case, parse_actions(out, case))) > 3_000_000
    assert problem.rejudge(stored, case) == score


def test_bench_simulate_500_turns(benchmark, played):
    _, case, out = played
    actions = parse_actions(out, case)
    assert sum(a is not None for a in actions) > 50
    assert benchmark(simulate, case, actions) > 2**30
