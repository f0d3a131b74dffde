"""Erdős minimum overlap problem: an upper bound on the constant C5."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from discover_envs.problem import ConstructionProblem, ConstructionSpec, InvalidSolution, checked_int
from discover_envs.problems.autocorrelation import convolve_exact_max

#: A construction longer than this is refused before any arithmetic (memory and time guard).
MAX_N = 200_000


class ErdosMinOverlap(ConstructionProblem):
    """Erdős minimum overlap: find a step function that certifies a small upper bound on C5.

    ## Description
    For h: [0, 2] -> [0, 1] with integral 1, the overlap M(h) = max_k ∫ h(x) (1 - h(x + k)) dx is an upper
    bound on Erdős's minimum overlap constant C5 (0.379005 <= C5). A construction is the list of n values of
    a step function on n equal steps of [0, 2].

    ## Verifier (exact, in the parent process)
    Values must be finite and in [0, 1] with a positive sum; h is rescaled to sum n/2 (integral 1) and must
    still lie in [0, 1]; bound = max(correlate(h, 1 - h, "full")) * 2 / n. The correlation is a convolution
    with (1 - h) reversed, computed directly when n <= 1024 and otherwise with an FFT whose candidate maxima
    (every entry within twice the FFT error bound of the FFT maximum, see `autocorrelation.fft_error_bound`)
    are recomputed as direct dot products, so the maximum is exact to float64 dot-product accuracy at any n.
    A maximum too flat to re-check within `autocorrelation.MAX_RECHECK_WORK` multiply-adds (e.g. a centred box,
    whose overlap is constant over 100,000 shifts) is an invalid attempt: "verifier budget exceeded".

    ## Reward
    reward = 1 / bound (higher is better, as in TTT-Discover); an invalid attempt gets `failure_reward` = 0,
    below every valid reward.

    ## Published figures (lower is better)
    Haugland 2016: 0.3809269; AlphaEvolve: 0.3809230; TTT-Discover: 0.3808753 (600 steps, shipped in
    tests/data/erdos_ttt_discover.json).

    ## Arguments
    n: fix the construction length (default: any length 1..200,000; start state has 50 steps).
    start_n: length of the random start state when n is not fixed.
    timeout_s: wall clock for a ```python action. memory_mb: address-space limit of that action.

    ## Version history
    v0: first release.
    """

    title: ClassVar[str] = "Erdős minimum overlap (upper bound on C5)"
    higher_is_better: ClassVar[bool] = False
    figure: ClassVar[str] = "C5 upper bound (lower is better)"
    cpu_preset: ClassVar[dict[str, Any]] = {"n": 16}
    published_figures: ClassVar[tuple[tuple[str, float], ...]] = (
        ("Haugland 2016", 0.3809269),
        ("AlphaEvolve", 0.3809230),
        ("TTT-Discover", 0.3808753),
    )
    draw_size: ClassVar[tuple[float, float]] = (10.0, 4.0)

    def __init__(self, *, n: int | None = None, start_n: int = 50, **kwargs) -> None:
        super().__init__(**kwargs)
        n = None if n is None else checked_int("n", n, 1, MAX_N)
        start_n = checked_int("start_n", start_n, 1, MAX_N)
        self.n = n
        self.start_n = n or start_n
        self.spec = ConstructionSpec(kind="sequence", min_length=n or 1, max_length=n or MAX_N, low=0.0, high=1.0)

    def statement(self) -> str:
        return (
            f"# {self.title}\n"
            "Find a step function h on [0, 2] with values in [0, 1] and integral 1 that makes the overlap\n"
            "M(h) = max over shifts k of the integral of h(x) * (1 - h(x + k)) dx as small as possible.\n"
            "Any such h proves C5 <= M(h). h is given by its values on equal steps of [0, 2]; the verifier\n"
            "rescales them to integral 1 (they must stay within [0, 1]) and computes\n"
            "M = max(correlate(h, 1 - h, 'full')) * 2 / n exactly. Best known: 0.3808753.\n\n" + self.output_rules()
        )

    def initial_construction(self, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(0.3, 0.7, size=self.start_n)

    def validate(self, construction) -> np.ndarray:
        h = self.check_array(construction)
        if not h.sum() > 0:
            raise InvalidSolution("h sums to 0; it needs a positive integral")
        # Scaling to max 1 first keeps the factor below finite when h is tiny (e.g. subnormal values).
        h = h / h.max()
        h = h * (h.size / 2.0 / h.sum())
        if h.max() > 1.0:
            raise InvalidSolution(
                f"after rescaling to integral 1, h reaches {float(h.max())!r} > 1 at index {int(h.argmax())}"
            )
        return h

    def score(self, construction: np.ndarray) -> float:
        h = construction
        _, overlap = convolve_exact_max(h, (1.0 - h)[::-1])
        return float(overlap * 2.0 / h.size)

    def draw(self, state: dict[str, Any], fig: Any) -> None:
        """h on its grid of [0, 2] (left) and the overlap at every shift k, whose maximum is the bound (right)."""
        h, error = self.drawable(state)
        n = h.size
        ax_h, ax_m = fig.subplots(1, 2)
        edges = np.linspace(0.0, 2.0, n + 1)
        ax_h.stairs(h, edges, fill=True, alpha=0.35)
        ax_h.stairs(h, edges, color="C0")
        ax_h.set(xlabel="x", ylabel="h(x)", xlim=(0.0, 2.0), ylim=(0.0, max(1.05, float(h.max()) * 1.05)))
        ax_h.set_title(f"h, {n} steps on [0, 2]" if error is None else f"invalid: {error}"[:90], fontsize=10)
        full, peak = convolve_exact_max(h, (1.0 - h)[::-1])
        shifts = (np.arange(full.size) - (n - 1)) * 2.0 / n
        ax_m.plot(shifts, full * 2.0 / n, color="C0")
        bound = peak * 2.0 / n
        ax_m.axhline(bound, color="C3", linestyle="--")
        ax_m.plot(shifts[int(np.argmax(full))], bound, "o", color="C3")
        ax_m.set(xlabel="shift k", ylabel="∫ h(x)(1 - h(x + k)) dx")
        ax_m.set_title(f"overlap by shift, max: C5 <= {bound:.7f}", fontsize=10)
