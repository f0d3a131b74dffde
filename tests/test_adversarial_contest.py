"""The contest tasks (AHC039/AHC058) attacked by their programs (issue #26): a program must not carry state from
case to case, must not make the root parent hand a host path to its uid, and the time rule applied when CPU
time cannot be measured is the one reported."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid

import pytest

from discover_envs import runspace, sandbox
from discover_envs.problem import InvalidSolution
from discover_envs.problems import contest
from discover_envs.problems.ahc039 import PurseSeine
from discover_envs.sandbox import ProcessResult, bwrap_available

SQUARE = "4\\n0 0\\n50000 0\\n50000 50000\\n0 50000"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_a_program_cannot_make_the_root_parent_chown_a_host_folder(tmp_path, unisolated_as_nobody):
    """Case 0 moves its folder away and leaves a link to `victim` in its place. Before, case 1 reused the
    path and chowned it as root, following the link: `victim` became uid 65534's (with /etc, root's)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    moved = os.path.join(tempfile.gettempdir(), f"discover-moved-{uuid.uuid4().hex}")
    code = (
        "#include <cstdio>\n#include <climits>\n#include <string>\n#include <unistd.h>\n"
        "int main() {\n  char cwd[PATH_MAX];\n  if (getcwd(cwd, sizeof cwd)) {\n"
        "    std::string here(cwd);\n"
        f"    std::string away = here.substr(0, here.rfind('/')) + \"/{os.path.basename(moved)}\";\n"
        f'    if (rename(cwd, away.c_str()) == 0) symlink("{victim}", cwd);\n  }}\n'
        f'  std::puts("{SQUARE}");\n}}\n'
    )
    problem = PurseSeine(n_cases=2, timeout_s=5.0, wall_tolerance_s=20.0)
    try:
        result = problem.evaluate(f"```cpp\n{code}```", {})
    finally:
        shutil.rmtree(moved, ignore_errors=True)
        for name in os.listdir(os.path.dirname(moved)):
            if name.startswith("discover-contest-") and os.path.islink(os.path.join(os.path.dirname(moved), name)):
                os.unlink(os.path.join(os.path.dirname(moved), name))
    assert victim.stat().st_uid == 0, "the parent handed a host folder to the code's uid"
    assert result.details["case_errors"] == [None, None], result.details["case_errors"]


def test_every_case_runs_in_a_fresh_folder():
    """Before, one folder served every case: a program found what it wrote in an earlier case."""
    code = (
        "import os\nif os.path.exists('seen'):\n    raise SystemExit('state from an earlier case')\n"
        f"open('seen', 'w').close()\nprint('{SQUARE}')"
    )
    result = PurseSeine(n_cases=3, timeout_s=10.0).evaluate(f"```python\n{code}\n```", {})
    assert result.details["case_errors"] == [None] * 3, result.details["case_errors"]


@pytest.mark.skipif(runspace.folder_unbounded() is not None, reason="sized run folders need root and tmpfs")
def test_a_programs_files_are_bounded_across_its_cases():
    """Before, the cases' parent was a plain temp folder: a program could fill the disk and its inodes."""
    code = f"import os\nfor i in range(20000):\n    open(f'f{{i}}', 'w').close()\nprint('{SQUARE}')"
    problem = PurseSeine(n_cases=1, timeout_s=20.0, wall_tolerance_s=40.0)
    with pytest.raises(InvalidSolution, match="No space left on device"):
        problem.evaluate(f"```python\n{code}\n```", {})


def _run(wall: float, cpu: float, timed_out: bool = False) -> ProcessResult:
    return ProcessResult(0, b"", b"", timed_out, wall, "bwrap", cpu_s=cpu)


def test_where_cpu_time_is_unknown_the_wall_clock_alone_counts_without_tolerance(monkeypatch):
    """Before, an unknown (NaN) CPU time counted as 0 s: the CPU rule was silently off."""
    monkeypatch.setattr(contest, "_start_overhead", lambda: (0.1, math.nan))
    rule = contest.TimeRule(cpu_s=2.0, wall_tolerance_s=0.5)
    assert rule.verdict(_run(wall=2.0, cpu=math.nan)) is None
    assert rule.verdict(_run(wall=2.3, cpu=math.nan)) == (
        "timed out: 2.20 s of wall clock > 2 s allowed (CPU time cannot be measured here, so the wall clock "
        "alone counts)"
    )
    assert rule.basis(_run(wall=1.0, cpu=math.nan)) == "wall"
    assert rule.basis(_run(wall=1.0, cpu=0.9)) == "cpu"


@pytest.mark.skipif(not bwrap_available(), reason="CPU time is unknown only under bubblewrap without a cgroup")
def test_info_names_the_time_rule_each_case_was_judged_by(monkeypatch):
    monkeypatch.setattr(sandbox, "cgroup_parents", lambda: ())
    result = PurseSeine(n_cases=2, timeout_s=10.0).evaluate(f"```python\nprint('{SQUARE}')\n```", {})
    assert result.details["case_time_rule"] == ["wall", "wall"]
    assert result.details["case_cpu_s"] == [None, None], "unknown, not a number that reads as 0"
