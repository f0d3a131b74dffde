"""Verifier speed at the published sizes, each next to the plain direct version it replaces (same group).

The FFT verifiers must beat np.convolve by >= 50x on AC1 at n = 30,000. Both sides get the same float64
array and the same validation, so the ratio is the convolution's; each pair must also agree on the figure.
BLAS is held to one thread, as the verifier (pocketfft, numpy sums) runs: np.convolve calls a BLAS dot per
lag, and a threaded BLAS makes that erratic on a busy machine (measured 0.7 s -> 18 s for AC1).
Run for real with `pytest tests/benchmarks/test_bench_verifiers.py --benchmark-enable`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from discover_envs.problems.autocorrelation import FirstAutocorrelation, SecondAutocorrelation
from discover_envs.problems.circle_packing import CirclePacking
from discover_envs.problems.erdos import ErdosMinOverlap

DATA = Path(__file__).parents[1] / "data"


def load(name: str, key: str) -> np.ndarray:
    return np.asarray(json.loads((DATA / name).read_text())[key], dtype=np.float64)


def plain_erdos(problem: ErdosMinOverlap, construction: np.ndarray) -> float:
    h = problem.validate(construction)
    return float(np.correlate(h, 1.0 - h, "full").max() * 2.0 / h.size)


def plain_ac1(problem: FirstAutocorrelation, construction: np.ndarray) -> float:
    a = problem.validate(construction)
    return float(2.0 * a.size * np.convolve(a, a).max() / a.sum() ** 2)


def plain_ac2(problem: SecondAutocorrelation, construction: np.ndarray) -> float:
    a = problem.validate(construction)
    c = np.convolve(a, a)
    y = np.concatenate([[0.0], c, [0.0]])
    h = 1.0 / (c.size + 1)
    l2_squared = h / 3.0 * np.sum(y[:-1] ** 2 + y[:-1] * y[1:] + y[1:] ** 2)
    return float(l2_squared / (np.abs(c).sum() * h * np.abs(c).max()))


def plain_circles(problem: CirclePacking, construction: np.ndarray) -> float:
    """The textbook loop over pairs with a float64 distance test (what the vectorised verifier replaces)."""
    circles = problem.check_array(construction)
    for x, y, r in circles:
        if x - r < 0 or x + r > 1 or y - r < 0 or y + r > 1:
            raise ValueError("circle outside the square")
    for i in range(len(circles)):
        for j in range(i + 1, len(circles)):
            xi, yi, ri = circles[i]
            xj, yj, rj = circles[j]
            if math.hypot(xi - xj, yi - yj) < ri + rj:
                raise ValueError(f"circles {i} and {j} overlap")
    return math.fsum(circles[:, 2].tolist())


CASES = {
    "Erdos n=600": (ErdosMinOverlap(), lambda: load("erdos_ttt_discover.json", "sequence"), plain_erdos),
    "AC1 n=30000": (FirstAutocorrelation(), lambda: load("ac1_ttt_discover.json", "sequence"), plain_ac1),
    "AC2 n=50000": (SecondAutocorrelation(), lambda: load("ac2_ttt_discover.json", "sequence"), plain_ac2),
    "circle packing n=26": (
        CirclePacking(n=26),
        lambda: load("circle_packing_26_ttt_discover.json", "circles"),
        plain_circles,
    ),
    "circle packing n=32": (
        CirclePacking(n=32),
        lambda: CirclePacking(n=32).initial_construction(np.random.default_rng(0)),
        plain_circles,
    ),
}


@pytest.fixture(autouse=True, scope="module")
def single_threaded_blas():
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    problem, construction, plain = CASES[request.param]
    return request.param, problem, construction(), plain


def test_verifier(benchmark, case):
    group, problem, construction, plain = case
    benchmark.group = group
    _, score = benchmark(problem.verify, construction)
    assert score == pytest.approx(plain(problem, construction), rel=1e-12)


def test_plain_direct_version(benchmark, case):
    group, problem, construction, plain = case
    benchmark.group = group
    score = benchmark(plain, problem, construction)
    assert score == pytest.approx(problem.verify(construction)[1], rel=1e-12)
