"""Per-rollout advantages for one group of rollouts from the same start state (numpy only).

Discovery wants the single best attempt, not a good average, so TTT-Discover optimises the entropic utility
log E[exp(beta * R)]: its gradient weights each rollout by w = exp(beta r) / E[exp(beta r)], which puts
almost all credit on the top of the group. beta is set per group so that the tilted distribution
q_beta(i) ∝ exp(beta r_i) sits at KL(q_beta || uniform) = ln 2 from uniform, which makes the objective
invariant to the reward's offset and unit. The expectation in w leaves out the rollout itself (leave-one-out)
so a lone winner is not damped by its own term.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

#: KL(q_beta || uniform) that the automatic beta aims at.
TARGET_KL = math.log(2.0)
#: Largest beta * (max reward - min reward) the search tries. KL rises with it towards ln(n / m) (m = how many
#: rewards tie at the top); a group whose top rewards differ by less than ~1e-12 of the spread stops here.
MAX_SCALED_BETA = 1e12
#: Bisection steps after the bracket is found: the bracket [hi/2, hi] shrinks to ~1e-30 of hi.
BISECTION_STEPS = 100
#: Cap on log(w): only an explicit, very large beta reaches it. exp(80) ≈ 5.5e34 still fits in float32.
MAX_LOG_WEIGHT = 80.0
#: Scaled beta at which an explicit beta is clamped so beta * reward cannot overflow.
_MAX_EXPLICIT_SCALED_BETA = 1e300


def _as_rewards(rewards: object) -> np.ndarray:
    try:
        r = np.asarray(rewards, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rewards must be numbers, got {rewards!r}") from exc
    if r.ndim != 1:
        raise ValueError(f"rewards must be a 1-D sequence, got shape {r.shape}")
    if r.size == 0:
        raise ValueError("rewards must have at least one element")
    if not np.all(np.isfinite(r)):
        raise ValueError(f"rewards must be finite, got {r.tolist()}")
    return r


def _unit_rewards(r: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(u, magnitude, unit_spread) with u = (r - max r) / spread in [-1, 0] and spread = magnitude * unit_spread.

    Dividing by the largest |r| first keeps r - max r from overflowing for rewards near the float limit.
    """
    magnitude = float(np.max(np.abs(r)))
    if magnitude == 0.0:
        return np.zeros_like(r), 0.0, 0.0
    s = r / magnitude
    unit_spread = float(s.max() - s.min())
    if unit_spread == 0.0:
        return np.zeros_like(r), magnitude, 0.0
    return (s - s.max()) / unit_spread, magnitude, unit_spread


def _kl_to_uniform(z: float, u: np.ndarray) -> float:
    """KL(q || uniform) for q ∝ exp(z u); max(u) = 0, so the log-sum-exp needs no further shift."""
    x = z * u
    log_q = x - math.log(float(np.exp(x).sum()))
    return float(np.dot(np.exp(log_q), log_q)) + math.log(u.size)


def _solve_scaled_beta(u: np.ndarray, target: float) -> float:
    """z >= 0 with KL(z) = target: double z until KL passes the target, then bisect (dKL/dz = z Var_q(u) >= 0)."""
    if _kl_to_uniform(MAX_SCALED_BETA, u) < target:
        return MAX_SCALED_BETA
    lo, hi = 0.0, 1.0
    while _kl_to_uniform(hi, u) < target:
        lo, hi = hi, 2.0 * hi
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if _kl_to_uniform(mid, u) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _loo_log_weights(x: np.ndarray) -> np.ndarray:
    """log w_i = x_i - log mean_{j != i} exp(x_j) for max(x) = 0, without cancellation or overflow.

    Every sum that leaves out a non-top element still contains exp(0) = 1, so total - e_i is exact enough;
    the sum that leaves out the top element is taken directly, as a log-sum-exp, because it may underflow.
    """
    n = x.size
    e = np.exp(x)
    top = int(np.argmax(x))
    log_rest = np.log(np.maximum(e.sum() - e, np.finfo(np.float64).tiny))
    others = np.delete(x, top)
    peak = float(others.max())
    log_rest[top] = peak + math.log(float(np.exp(others - peak).sum()))
    return x - (log_rest - math.log(n - 1))


def entropic_advantages(rewards: object, beta: float | None = None) -> tuple[np.ndarray, float]:
    """Leave-one-out entropic advantages A_i = w_i - 1, w_i = exp(beta r_i) / mean_{j != i} exp(beta r_j).

    Returns (advantages, beta). With `beta=None`, beta is found by bisection on beta * (max r - min r) so
    that KL(q_beta || uniform) = ln 2; the result is then unchanged by adding a constant to every reward or
    by scaling them (beta scales inversely). Fallbacks, all with finite output:

    - one reward, or all rewards equal: zero advantages (nothing to compare), beta = 0 when automatic;
    - KL only approaches ln(n / m) as beta grows, m being how many rewards tie at the maximum, so when
      n <= 2m (every group of two, for instance) ln 2 is out of reach and beta aims at half of that limit,
      KL = ln(n / m) / 2, instead; capping beta would make the lone winner of a pair weigh exp(huge);
    - top rewards closer than ~1e-12 of the spread: beta * spread stops at `MAX_SCALED_BETA`.

    An explicit beta must be >= 0; log w is capped at `MAX_LOG_WEIGHT` so that a very sharp explicit tilt
    gives a large finite weight rather than inf (the automatic beta never gets near the cap).
    """
    r = _as_rewards(rewards)
    if beta is not None and (
        isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not (math.isfinite(beta) and beta >= 0)
    ):
        raise ValueError(f"beta must be a finite number >= 0 or None, got {beta!r}")
    u, magnitude, unit_spread = _unit_rewards(r)
    if r.size == 1 or unit_spread == 0.0:
        return np.zeros_like(r), (0.0 if beta is None else float(beta))
    if beta is None:
        n, m = r.size, int(np.count_nonzero(u == 0.0))
        target = TARGET_KL if n > 2 * m else 0.5 * math.log(n / m)
        z = _solve_scaled_beta(u, target)
        beta = z / magnitude / unit_spread
    else:
        z = min(float(beta) * magnitude * unit_spread, _MAX_EXPLICIT_SCALED_BETA)
    log_w = np.minimum(_loo_log_weights(z * u), MAX_LOG_WEIGHT)
    return np.exp(log_w) - 1.0, float(beta)


def mean_baseline_advantages(rewards: object, *, divide_by_std: bool = False) -> np.ndarray:
    """GRPO-style ablation: r - mean(r), or with `divide_by_std` (r - mean(r)) / std(r) (population std).

    Equal rewards give zero advantages in both forms (no division by a zero std).
    """
    r = _as_rewards(rewards)
    magnitude = float(np.max(np.abs(r)))
    if magnitude == 0.0:
        return np.zeros_like(r)
    s = r / magnitude
    centred = s - s.mean()
    if not divide_by_std:
        return centred * magnitude
    std = float(centred.std())
    return centred / std if std > 0.0 else np.zeros_like(r)
