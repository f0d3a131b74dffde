"""Fixtures shared by the benchmarks."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def only_when_benchmarking(request):
    """For minutes-long benchmarks on the embedded model: used module-wide, so a plain `pytest` run skips
    before loading the model."""
    options = request.config.getoption
    if options("benchmark_disable") and not options("benchmark_enable"):
        pytest.skip("a speed benchmark on the embedded model; run with --benchmark-enable")
