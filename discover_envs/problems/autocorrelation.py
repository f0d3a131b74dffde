"""Autocorrelation inequalities AC1 (upper bound on C1) and AC2 (lower bound on C2), verified in O(n log n).

Both figures need the autoconvolution of n = 30,000-100,000 step heights, which a direct convolution computes
in O(n^2). `convolve_exact_max` uses an FFT instead and then recomputes, with exact dot products, every entry
that the FFT's rounding could have made or kept from being the maximum, so the maximum is the one a direct
convolution would give (to float64 dot-product accuracy), never an FFT artefact. That re-check has a budget
(`MAX_RECHECK_WORK`): a construction whose maximum is a plateau too wide to re-check in it is refused as an
invalid attempt ("verifier budget exceeded"), never scored from the FFT alone.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.fft import irfft, next_fast_len, rfft

from discover_envs.problem import ConstructionProblem, ConstructionSpec, InvalidSolution, checked_int

__all__ = ["FirstAutocorrelation", "SecondAutocorrelation", "convolve_exact_max", "fft_error_bound"]

#: A construction longer than this is refused before any arithmetic (memory and time guard).
MAX_N = 200_000
#: Heights are scale-free (both figures are invariant under a ⋅ s); the cap keeps the spec finite JSON.
MAX_HEIGHT = 1e6
#: Below this many multiply-adds a direct convolution is faster than an FFT (n ~ 1000 with the re-check).
DIRECT_MAX_WORK = 1 << 20
#: Constant of the FFT error bound; see `fft_error_bound`.
FFT_ERROR_C = 16.0
#: Elements gathered per block when re-checking candidate maxima (bounds memory at 32 MiB).
RECHECK_BLOCK = 1 << 22
#: Multiply-adds the exact re-check may cost (about a second): every entry up to n = 11,585, and 1,342
#: candidates at n = 200,000, where the published constructions need one. A flat 200,000-step box needed
#: 100,002 (~2·10^10 multiply-adds, a minute of the parent's CPU) before this budget.
MAX_RECHECK_WORK = 1 << 28


def fft_error_bound(a: np.ndarray, b: np.ndarray, size: int) -> float:
    """Bound on |fft_convolution - exact| for every entry, for an FFT of length `size`.

    Each FFT of length N has relative 2-norm error <= c·log2(N)·eps (Higham, Accuracy and Stability of
    Numerical Algorithms, §24.1, c ≈ 3.4 with accurate twiddles). Propagating the two forward transforms, the
    product and the inverse transform (|A_k| <= ‖a‖₁, ‖A‖₂ = √N·‖a‖₂) gives
    ‖ĉ - c‖∞ <= ‖ĉ - c‖₂ <= 2(c·log2 N + 1)·eps·(‖a‖₂‖b‖₁ + ‖a‖₁‖b‖₂); FFT_ERROR_C = 16 covers c with room for
    mixed-radix stages. Measured errors on the published constructions are ~1e-4 of this bound.
    """
    eps = np.finfo(np.float64).eps
    l1_a, l1_b = np.abs(a).sum(), np.abs(b).sum()
    l2_a, l2_b = np.sqrt(np.square(a).sum()), np.sqrt(np.square(b).sum())
    return float(FFT_ERROR_C * np.log2(size) * eps * (l2_a * l1_b + l1_a * l2_b))


def _exact_entries(a: np.ndarray, b: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Entries `indices` of the full convolution a*b as direct dot products, in blocks of windows.

    numpy's pairwise sums, not BLAS: a threaded BLAS call per row is slow on a busy machine (measured 10x).
    """
    padded = np.concatenate([np.zeros(a.size - 1), b, np.zeros(a.size - 1)])
    windows = sliding_window_view(padded, a.size)  # windows[k] · a[::-1] == (a*b)[k]
    reversed_a = a[::-1]
    rows = max(1, RECHECK_BLOCK // a.size)
    return np.concatenate(
        [(windows[indices[i : i + rows]] * reversed_a).sum(axis=1) for i in range(0, indices.size, rows)]
    )


def convolve_exact_max(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """The full convolution a*b (via FFT when large) and its maximum, exact to float64 dot-product accuracy.

    Every entry whose FFT value is within twice the error bound of the FFT maximum could be the true maximum
    (the true maximum's FFT value is at least max - 2·bound), so all of them are recomputed directly. For the
    published constructions that is one entry; when recomputing them would cost more than `MAX_RECHECK_WORK`
    multiply-adds (a flat maximum), `InvalidSolution` says the verifier's budget is exceeded.
    """
    if a.size * b.size <= DIRECT_MAX_WORK:
        full = np.convolve(a, b)
        return full, float(full.max())
    n_out = a.size + b.size - 1
    size = next_fast_len(n_out, real=True)
    spectrum_a = rfft(a, size)
    spectrum_b = spectrum_a if b is a else rfft(b, size)
    full = irfft(spectrum_a * spectrum_b, size)[:n_out]
    bound = fft_error_bound(a, b, size)
    candidates = np.flatnonzero(full >= full.max() - 2.0 * bound)
    if candidates.size * a.size > MAX_RECHECK_WORK:
        raise InvalidSolution(
            f"verifier budget exceeded: {candidates.size} entries of the convolution tie for its maximum within "
            f"the FFT's rounding, and re-checking them exactly takes {candidates.size * a.size:.3g} multiply-adds "
            f"(budget {MAX_RECHECK_WORK:.3g}); make the maximum less flat or use fewer steps"
        )
    return full, float(_exact_entries(a, b, candidates).max())


class _Autocorrelation(ConstructionProblem):
    """Shared rules of the step-function problems: nonnegative finite heights with a positive sum."""

    cpu_preset: ClassVar[dict[str, Any]] = {"n": 16}

    #: Length of the random start construction when `n` is not fixed.
    default_start_n: ClassVar[int] = 200

    def __init__(self, *, n: int | None = None, start_n: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        n = None if n is None else checked_int("n", n, 1, MAX_N)
        start_n = None if start_n is None else checked_int("start_n", start_n, 1, MAX_N)
        if n is not None and start_n is not None and start_n != n:
            raise ValueError(f"start_n={start_n} contradicts the fixed length n={n}")
        self.n = n
        self.start_n = n or start_n or self.default_start_n
        self.spec = ConstructionSpec(
            kind="sequence", min_length=n or 1, max_length=n or MAX_N, low=0.0, high=MAX_HEIGHT
        )

    def initial_construction(self, rng: np.random.Generator) -> np.ndarray:
        """Random heights in {0.001, ..., 1}: three decimals keep the start state short in the prompt."""
        return rng.integers(1, 1001, size=self.start_n) / 1000.0

    def validate(self, construction) -> np.ndarray:
        heights = self.check_array(construction)
        if not heights.sum() > 0:
            raise InvalidSolution("the heights sum to 0; at least one height must be positive")
        return heights

    draw_size: ClassVar[tuple[float, float]] = (10.0, 4.0)
    #: Where `draw` puts the step function on the x axis.
    support: ClassVar[tuple[float, float]] = (-0.25, 0.25)

    def draw(self, state: dict[str, Any], fig: Any) -> None:
        """The step function (left) and its autoconvolution f*f, piecewise linear through its nodes, scaled
        so that the figure of the problem reads off it (right)."""
        heights, error = self.drawable(state)
        a = self.normalised(heights)
        ax_f, ax_c = fig.subplots(1, 2)
        edges = np.linspace(*self.support, a.size + 1)
        ax_f.stairs(a, edges, fill=True, alpha=0.35)
        ax_f.stairs(a, edges, color="C0")
        ax_f.set(xlabel="x", ylabel="f(x) / max f")
        ax_f.set_title(f"f: {a.size} steps" if error is None else f"invalid: {error}"[:90], fontsize=10)
        full, peak = convolve_exact_max(a, a)
        y = np.concatenate([[0.0], full, [0.0]])
        t = np.linspace(2 * self.support[0], 2 * self.support[1], y.size)
        scale, label = self.autoconvolution_view(a, peak)
        ax_c.plot(t, y * scale, color="C0")
        ax_c.axhline(peak * scale, color="C3", linestyle="--")
        ax_c.set(xlabel="t", ylabel=label)
        figure = self.figure.split(" (")[0]
        ax_c.set_title(f"f*f: {figure} {self.score(heights):.7f}" if error is None else "f*f", fontsize=10)

    def autoconvolution_view(self, a: np.ndarray, peak: float) -> tuple[float, str]:
        """(factor on the autoconvolution's nodes, y label) for `draw`."""
        return 1.0 / peak, "(f*f)(t) / max"

    @staticmethod
    def normalised(heights: np.ndarray) -> np.ndarray:
        """Heights scaled to max 1: both figures are scale-free, and this rules out overflow and underflow."""
        return heights / heights.max()


class FirstAutocorrelation(_Autocorrelation):
    """First autocorrelation inequality: find a step function that certifies a small upper bound on C1.

    ## Description
    C1 is the largest constant with max_t (f*f)(t) >= C1 (∫f)² for every nonnegative f supported on
    [-1/4, 1/4] (1.28 <= C1). A construction is the list of n heights a_0..a_{n-1} of a step function on n
    equal steps of [-1/4, 1/4]; any such f proves C1 <= max_t (f*f)(t) / (∫f)².

    ## Verifier (exact, in the parent process)
    Heights must be finite, in [0, 1e6] (the figure is scale-free) and have a positive sum. For a step function
    f*f is piecewise linear with nodes at the discrete autoconvolution, so the bound is exactly
    bound = 2n · max(a*a) / (Σa)², with a*a = numpy.convolve(a, a). a*a is computed with an FFT when
    n > 1024; every entry within twice the FFT error bound (`fft_error_bound`, 16·log2(N)·eps·2‖a‖₁‖a‖₂) of the
    FFT maximum is recomputed as a direct dot product, so the maximum is exact to float64 dot-product
    accuracy even where the FFT's rounding would pick another index. A maximum too flat to re-check within
    `MAX_RECHECK_WORK` multiply-adds is an invalid attempt ("verifier budget exceeded").

    ## Reward
    reward = 1 / bound (higher is better, as in TTT-Discover); an invalid attempt gets `failure_reward` = 0,
    below every valid reward (bounds are positive and finite).

    ## Published figures (upper bounds on C1, lower is better)
    Matolcsi–Vinuesa 2010: 1.5097202; AlphaEvolve: 1.5052940; AlphaEvolve V2: 1.5031636;
    TTT-Discover: 1.5028628983 (30,000 steps, shipped in tests/data/ac1_ttt_discover.json).

    ## Arguments
    n: fix the construction length (default: any length 1..200,000; the start state has 200 heights).
    start_n: length of the random start state when n is not fixed.
    timeout_s: wall clock for a ```python action. memory_mb: address-space limit of that action.

    ## Version history
    v0: first release.
    """

    title: ClassVar[str] = "First autocorrelation inequality (upper bound on C1)"
    higher_is_better: ClassVar[bool] = False
    figure: ClassVar[str] = "C1 upper bound (lower is better)"
    published_figures: ClassVar[tuple[tuple[str, float], ...]] = (
        ("Matolcsi-Vinuesa 2010", 1.5097202),
        ("AlphaEvolve", 1.5052940),
        ("AlphaEvolve V2", 1.5031636),
        ("TTT-Discover", 1.5028629),
    )

    def statement(self) -> str:
        return (
            f"# {self.title}\n"
            "Find a nonnegative step function f on [-1/4, 1/4] (n equal steps with heights a_0..a_{n-1})\n"
            "that makes max_t (f*f)(t) / (integral of f)^2 as small as possible; any such f proves\n"
            "C1 <= that value. For step functions it equals 2n * max(a*a) / (sum of a)^2, where\n"
            "a*a = numpy.convolve(a, a) is the autoconvolution; the verifier computes exactly this.\n"
            "Heights must be finite, >= 0 and have a positive sum; scaling them changes nothing.\n"
            "Best known: 1.5028629 (30,000 steps).\n\n" + self.output_rules()
        )

    def autoconvolution_view(self, a: np.ndarray, peak: float) -> tuple[float, str]:
        """f*f / (∫f)², whose maximum is the bound (dashed)."""
        return 2.0 * a.size / a.sum() ** 2, "(f*f)(t) / (∫f)²"

    def score(self, construction: np.ndarray) -> float:
        a = self.normalised(construction)
        _, peak = convolve_exact_max(a, a)
        return float(2.0 * a.size * peak / a.sum() ** 2)


class SecondAutocorrelation(_Autocorrelation):
    """Second autocorrelation inequality: find a step function that certifies a large lower bound on C2.

    ## Description
    C2 is the smallest constant with ‖f*f‖₂² <= C2 ‖f*f‖₁ ‖f*f‖∞ for every nonnegative f; any f proves
    C2 >= ‖f*f‖₂² / (‖f*f‖₁ ‖f*f‖∞). A construction is the list of n heights of a step function on n equal
    steps; heights must be >= 0 (the inequality is stated for nonnegative f, and it keeps ‖f*f‖₁ = (∫f)²).

    ## Verifier (exact, in the parent process)
    Heights must be finite, in [0, 1e6] (the figure is scale-free) and have a positive sum. f*f is piecewise
    linear through the nodes y = [0, c, 0], c = a*a, at spacing h = 1/(len(c) + 1), so its norms are exact:
    L2² = (h/3) Σ (y_i² + y_i y_{i+1} + y_{i+1}²) over consecutive pairs, L1 = Σ|c| · h (= (Σa)² · h, computed
    that way), L∞ = max|c|; bound = L2² / (L1 · L∞). c comes from an FFT when n > 1024 (negative rounding
    noise clipped to 0); L∞ is exact to float64 dot-product accuracy as in AC1 (with its re-check budget),
    and the FFT error B per entry
    (`fft_error_bound`) moves L2² by at most 6·B·(Σa)²·h/3, i.e. the figure by a relative ~1e-13 for the
    published construction.

    ## Reward
    reward = bound (higher is better); an invalid attempt gets `failure_reward` = 0, below every valid
    reward (bounds are positive).

    ## Published figures (lower bounds on C2, higher is better)
    AlphaEvolve: 0.8962799; Jaech–Joseph: 0.94136; AlphaEvolve V2: 0.9610211;
    TTT-Discover: 0.9591797711 (50,000 steps, shipped in tests/data/ac2_ttt_discover.json).

    ## Arguments
    n: fix the construction length (default: any length 1..200,000; the start state has 200 heights).
    start_n: length of the random start state when n is not fixed.
    timeout_s: wall clock for a ```python action. memory_mb: address-space limit of that action.

    ## Version history
    v0: first release.
    """

    title: ClassVar[str] = "Second autocorrelation inequality (lower bound on C2)"
    higher_is_better: ClassVar[bool] = True
    figure: ClassVar[str] = "C2 lower bound (higher is better)"
    published_figures: ClassVar[tuple[tuple[str, float], ...]] = (
        ("AlphaEvolve", 0.8962799),
        ("Jaech-Joseph", 0.94136),
        ("TTT-Discover", 0.9591798),
        ("AlphaEvolve V2", 0.9610211),
    )
    support: ClassVar[tuple[float, float]] = (0.0, 0.5)

    def statement(self) -> str:
        return (
            f"# {self.title}\n"
            "Find a nonnegative step function f (n equal steps with heights a_0..a_{n-1}) that makes\n"
            "||f*f||_2^2 / (||f*f||_1 * ||f*f||_inf) as large as possible; any such f proves C2 >= that value.\n"
            "With c = numpy.convolve(a, a), y = [0, c, 0] and h = 1 / (len(c) + 1), f*f is piecewise linear\n"
            "through y, so the verifier computes exactly L2^2 = (h/3) * sum(y_i^2 + y_i*y_{i+1} + y_{i+1}^2),\n"
            "L1 = sum(c) * h, Linf = max(c) and the bound L2^2 / (L1 * Linf).\n"
            "Heights must be finite, >= 0 and have a positive sum; scaling them changes nothing.\n"
            "Best known: 0.9610211 (AlphaEvolve V2).\n\n" + self.output_rules()
        )

    def score(self, construction: np.ndarray) -> float:
        a = self.normalised(construction)
        full, peak = convolve_exact_max(a, a)
        c = np.maximum(full, 0.0)
        h = 1.0 / (c.size + 1)
        y = np.concatenate([[0.0], c, [0.0]])
        left, right = y[:-1], y[1:]
        l2_squared = h / 3.0 * np.sum(left * left + left * right + right * right)
        l1 = a.sum() ** 2 * h
        return float(l2_squared / (l1 * peak))
