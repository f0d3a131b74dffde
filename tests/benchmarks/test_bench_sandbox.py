"""Overhead of the sandbox: a trivial code action end to end against a bare `python -c "import numpy"`.

Target: `run_function` <= 1.5x the bare subprocess (compare the two means of group "sandbox-overhead").
"auto" is the default isolation (bubblewrap, a per-run cgroup, the drop to uid 65534 under root); "none" the
opted-in run without namespaces.
Run: .venv/bin/pytest tests/benchmarks/test_bench_sandbox.py --benchmark-enable
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from discover_envs.sandbox import SandboxLimits, run_function

TRIVIAL = "def run():\n    return [1.0]\n"


@pytest.mark.benchmark(group="sandbox-overhead")
def test_bench_bare_python_importing_numpy(benchmark):
    completed = benchmark(subprocess.run, [sys.executable, "-c", "import numpy"], check=False)
    assert completed.returncode == 0


@pytest.mark.benchmark(group="sandbox-overhead")
@pytest.mark.parametrize("isolation", ["auto", "none"])
def test_bench_trivial_code_action_in_the_sandbox(benchmark, isolation):
    limits = SandboxLimits(isolation=isolation, unsafe_no_isolation=isolation == "none")
    result = benchmark(run_function, TRIVIAL, "run", {}, limits)
    assert result.ok, result.error
    assert result.value.tolist() == [1.0]
