"""Circle packing: n disjoint circles in the unit square with the largest sum of radii, checked exactly."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np

from discover_envs.problem import ConstructionProblem, ConstructionSpec, InvalidSolution, checked_int

__all__ = ["CirclePacking"]

#: Most circles an instance may ask for; the pairwise check holds n(n-1)/2 pairs in memory.
MAX_CIRCLES = 2000
#: Rounding error of the float64 pair margin (dx² + dy²) - (ri + rj)², relative to d2 + s2, for inputs in
#: [0, 1]: at most γ4/(1 - γ4) ≈ 4u = 2·eps; twice that for room, plus a few subnormal steps for underflow.
PAIR_REL_ERROR = 4.0 * np.finfo(np.float64).eps
PAIR_ABS_ERROR = 16.0 * np.finfo(np.float64).smallest_subnormal
#: Safety factor of the random start state's radii (below the largest valid ones, so rounding cannot bite).
START_SHRINK = 0.99


class CirclePacking(ConstructionProblem):
    """Circle packing in the unit square: place n disjoint circles to maximise the sum of their radii.

    ## Description
    A construction is a list of n triples [x, y, r]: centre (x, y) and radius r. The circles must lie inside
    the unit square and must not overlap (touching is allowed); the figure is the sum of the radii.

    ## Verifier (exact, zero tolerance, in the parent process)
    Exactly n triples of finite numbers in [0, 1] (so r >= 0). Inside: r <= x, x + r <= 1, r <= y, y + r <= 1,
    decided in exact arithmetic on the float64 inputs: r <= x is a float comparison (exact); for x + r <= 1 a
    rounded sum other than 1 is on the same side of 1 as the exact sum (rounding is monotonic and 1 is a
    float), and a sum that rounds to 1 is decided with fractions. Disjoint: (xi - xj)² + (yi - yj)² >=
    (ri + rj)² for every pair, i.e. the squared centre distance against the squared radius sum (no square
    root). It is evaluated for all pairs at once in float64; a pair whose margin is within the proven
    rounding bound (4·eps·(d² + s²)) is decided again exactly with fractions (only near-tangent pairs, O(n)
    in a packing), so rounding can neither accept an overlap nor reject a tangency. The published
    TTT-Discover construction for n = 26 passes unchanged: its closest pairs are separated by about 3e-16
    in exact arithmetic. score = sum of radii (math.fsum).

    ## Reward
    reward = sum of radii (higher is better, >= 0); an invalid attempt gets `failure_reward` = -1, below every
    valid reward (an all-zero-radius packing is valid and scores 0).

    ## Published figures (sum of radii, higher is better)
    n = 26: AlphaEvolve 2.635; TTT-Discover 2.6359773948 (shipped in
    tests/data/circle_packing_26_ttt_discover.json); best known 2.6359831. n = 32: AlphaEvolve 2.937;
    best known 2.939572.

    ## Arguments
    n: number of circles (26 and 32 are registered as CirclePacking26-v0 and CirclePacking32-v0).
    timeout_s: wall clock for a ```python action. memory_mb: address-space limit of that action.
    The start state is random: centres uniform in the square (4 decimals), each radius 0.99 times the
    largest that keeps it inside the square and at most half-way to the nearest other centre (4 decimals,
    rounded down), so it is valid, seeded by the episode's rng and short enough to show in the prompt.

    ## Version history
    v0: first release.
    """

    title: ClassVar[str] = "Circle packing in the unit square (maximise the sum of radii)"
    higher_is_better: ClassVar[bool] = True
    failure_reward: ClassVar[float] = -1.0
    figure: ClassVar[str] = "sum of radii (higher is better)"
    draw_size: ClassVar[tuple[float, float]] = (5.5, 5.5)

    def __init__(self, *, n: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = checked_int("n (the number of circles)", n, 1, MAX_CIRCLES)
        self.spec = ConstructionSpec(kind="tuples", min_length=self.n, max_length=self.n, low=0.0, high=1.0, arity=3)

    def published(self) -> list[tuple[str, float]]:
        return {
            26: [("AlphaEvolve", 2.635), ("TTT-Discover", 2.6359774), ("best known", 2.6359831)],
            32: [("AlphaEvolve", 2.937), ("best known", 2.939572)],
        }.get(self.n, [])

    def statement(self) -> str:
        return (
            f"# {self.title} (n = {self.n})\n"
            f"Place {self.n} circles inside the unit square [0, 1] x [0, 1] without overlap so that the sum\n"
            "of their radii is as large as possible. A construction is a list of [x, y, r] triples (centre and\n"
            "radius). The verifier has zero tolerance and decides every rule exactly on your float64 numbers:\n"
            "r >= 0, r <= x, x + r <= 1, r <= y, y + r <= 1, and for every pair of circles\n"
            "(xi - xj)^2 + (yi - yj)^2 >= (ri + rj)^2 (touching is allowed, overlapping by any amount is not).\n"
            "Best known sums: 2.6359831 (n = 26), 2.939572 (n = 32).\n\n" + self.output_rules()
        )

    def initial_construction(self, rng: np.random.Generator) -> np.ndarray:
        centres = np.round(rng.uniform(0.0, 1.0, size=(self.n, 2)), 4)
        wall = np.minimum(centres, 1.0 - centres).min(axis=1)
        gaps = np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1)
        np.fill_diagonal(gaps, np.inf)
        radii = START_SHRINK * np.minimum(wall, gaps.min(axis=1) / 2.0)
        return np.column_stack([centres, np.floor(radii * 1e4) / 1e4])

    def validate(self, construction) -> np.ndarray:
        circles = self.check_array(construction)
        _check_inside(circles)
        _check_disjoint(circles)
        return circles

    def score(self, construction: np.ndarray) -> float:
        return math.fsum(construction[:, 2].tolist())

    def draw(self, state: dict[str, Any], fig: Any) -> None:
        """The circles in the unit square; circles that leave the square or overlap another are red, and each
        overlapping pair is joined by a red line (float64 test: near-tangent pairs count as touching)."""
        from matplotlib.patches import Circle, Rectangle

        circles = np.asarray(state["construction"], dtype=np.float64).reshape(-1, 3)
        x, y, r = circles.T
        outside = (x < r) | (x + r > 1.0) | (y < r) | (y + r > 1.0)
        i, j = np.triu_indices(len(circles), k=1)
        d2, s2 = (x[i] - x[j]) ** 2 + (y[i] - y[j]) ** 2, (r[i] + r[j]) ** 2
        overlapping = d2 - s2 < -(PAIR_REL_ERROR * (d2 + s2) + PAIR_ABS_ERROR)
        bad = outside.copy()
        bad[i[overlapping]] = bad[j[overlapping]] = True
        ax = fig.add_subplot()
        ax.add_patch(Rectangle((0.0, 0.0), 1.0, 1.0, fill=False, linewidth=1.5))
        for (cx, cy, radius), red in zip(circles, bad, strict=True):
            colour = "C3" if red else "C0"
            ax.add_patch(Circle((cx, cy), radius, facecolor=colour, edgecolor=colour, alpha=0.35, linewidth=1))
        for a, b in zip(i[overlapping], j[overlapping], strict=True):
            ax.plot([x[a], x[b]], [y[a], y[b]], color="C3", linewidth=1)
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal")
        problems = [f"{int(overlapping.sum())} overlapping pairs"] if overlapping.any() else []
        problems += [f"{int(outside.sum())} circles outside"] if outside.any() else []
        title = f"{len(circles)} circles, sum of radii {math.fsum(r.tolist()):.7f}"
        ax.set_title(title + (f" ({', '.join(problems)}, red)" if problems else ""), fontsize=10)


def _check_inside(circles: np.ndarray) -> None:
    x, y, r = circles.T
    for axis, centre in (("x", x), ("y", y)):
        low = np.flatnonzero(centre < r)
        if low.size:
            i = int(low[0])
            raise InvalidSolution(
                f"circle {i} crosses the square's edge {axis} = 0: {axis} - r = {centre[i] - r[i]:.3g} < 0"
            )
        # A rounded sum other than 1 lies on the same side of 1 as the exact sum; only ties need fractions.
        total = centre + r
        over = total > 1.0
        for tie in np.flatnonzero(total == 1.0):
            over[tie] = Fraction(float(centre[tie])) + Fraction(float(r[tie])) > 1
        if over.any():
            i = int(np.flatnonzero(over)[0])
            excess = Fraction(float(centre[i])) + Fraction(float(r[i])) - 1
            raise InvalidSolution(
                f"circle {i} crosses the square's edge {axis} = 1: {axis} + r - 1 = {float(excess):.3g} > 0"
            )


def _check_disjoint(circles: np.ndarray) -> None:
    if circles.shape[0] < 2:
        return
    x, y, r = circles.T
    i, j = np.triu_indices(circles.shape[0], k=1)
    dx, dy, s = x[i] - x[j], y[i] - y[j], r[i] + r[j]
    d2 = dx * dx + dy * dy
    s2 = s * s
    margin = d2 - s2
    slack = PAIR_REL_ERROR * (d2 + s2) + PAIR_ABS_ERROR
    overlapping = margin < -slack
    for k in np.flatnonzero(np.abs(margin) <= slack):
        overlapping[k] = _exact_margin(circles[i[k]], circles[j[k]]) < 0
    bad = np.flatnonzero(overlapping)
    if bad.size:
        first = int(bad[0])
        a, b = int(i[first]), int(j[first])
        gap = _exact_margin(circles[a], circles[b])
        raise InvalidSolution(
            f"circles {a} and {b} overlap: centre distance {math.sqrt(d2[first]):.17g} < r{a} + r{b} = "
            f"{s[first]:.17g} (exact squared margin {float(gap):.3g})"
        )


def _exact_margin(first: np.ndarray, second: np.ndarray) -> Fraction:
    """(dx² + dy²) - (ri + rj)² in exact rational arithmetic on the float64 values."""
    x1, y1, r1 = (Fraction(float(v)) for v in first)
    x2, y2, r2 = (Fraction(float(v)) for v in second)
    return (x1 - x2) ** 2 + (y1 - y2) ** 2 - (r1 + r2) ** 2
