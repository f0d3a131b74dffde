"""AHC039 speed: scoring all 5000 + 5000 fish must stay cheap next to the program runs (about 0.2 s each).

Run for real with `pytest tests/benchmarks/test_bench_ahc039.py --benchmark-enable`.
"""

from __future__ import annotations

import numpy as np
import pytest

from discover_envs.problems.ahc039 import MAX_PERIMETER, case_score, check_polygon, generate_case

# A 1000-vertex comb (250 teeth) whose perimeter is exactly the limit: the scorer's worst case.
TEETH, WIDTH, BASE, HEIGHT, X0, Y0 = 250, 100, 100, 700, 25_000, 40_000


def comb() -> np.ndarray:
    right = X0 + (2 * TEETH - 1) * WIDTH
    ring = [(X0, Y0), (right, Y0)]
    for t in reversed(range(TEETH)):
        left = X0 + 2 * t * WIDTH
        ring += [(left + WIDTH, Y0 + HEIGHT), (left, Y0 + HEIGHT)]
        if t:
            ring += [(left, Y0 + BASE), (left - WIDTH, Y0 + BASE)]
    return np.array(ring)


def comb_score(points: np.ndarray) -> int:
    """The same count from the comb's closed form: base strip or a tooth, boundaries included."""
    x, y = points[:, 0] - X0, points[:, 1] - Y0
    span = (x >= 0) & (x <= (2 * TEETH - 1) * WIDTH) & (y >= 0)
    caught = span & ((y <= BASE) | ((y <= HEIGHT) & (x % (2 * WIDTH) <= WIDTH)))
    n = len(points) // 2
    return max(0, int(caught[:n].sum()) - int(caught[n:].sum()) + 1)


@pytest.fixture(scope="module")
def points() -> np.ndarray:
    return generate_case(0)


def test_bench_comb_is_a_worst_case_polygon():
    poly = comb()
    check_polygon(poly)
    assert len(poly) == 4 * TEETH == 1000
    assert np.abs(np.roll(poly, -1, axis=0) - poly).sum() == MAX_PERIMETER


def test_bench_score_rectangle(benchmark, points):
    rect = np.array([(20_000, 20_000), (60_000, 20_000), (60_000, 60_000), (20_000, 60_000)])
    x, y = points[:, 0], points[:, 1]
    caught = (x >= 20_000) & (x <= 60_000) & (y >= 20_000) & (y <= 60_000)
    expected = max(0, int(caught[:5000].sum()) - int(caught[5000:].sum()) + 1)
    assert benchmark(case_score, rect, points) == expected


def test_bench_score_1000_vertex_comb(benchmark):
    # Shift the fish so that many sit on the comb's edges and vertex levels, not just near it.
    rng = np.random.default_rng(0)
    local = np.c_[rng.integers(X0 - 50, X0 + 50_000, 10_000), rng.integers(Y0 - 20, Y0 + 720, 10_000)]
    assert benchmark(case_score, comb(), local) == comb_score(local)


def test_bench_check_1000_vertex_polygon(benchmark):
    benchmark(check_polygon, comb())


def test_bench_generate_case(benchmark, points):
    assert np.array_equal(benchmark(generate_case, 0), points)
