"""TriMul: make AlphaFold's outgoing triangle multiplicative update fast, without changing its output.

GPUMode's task (bioml/trimul) as its submissions see it: `custom_kernel(data)` with data = (input, mask,
weights, config), GPUMode's weight names and input distributions, and a `task` module to import types from.

Timing is held by the (trusted) parent through `trimul_clock`: the candidate runs in a sandboxed worker that
answers seeds with outputs, timed by the parent. The reference goes through the same protocol in a second worker
that never runs candidate code, and its outputs are what the candidate's are checked against. This module holds
the task: its shapes, rules, scoring and states.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import secrets
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch

from discover_envs.problem import Evaluation, InvalidSolution, InvalidState, Problem, extract_block
from discover_envs.problems.trimul_clock import WORKER_GRACE_S, Worker, WorkerFailed, check_output, reference_trimul
from discover_envs.state import content_id, make_state

#: Shapes on CPU: GPUMode's benchmark shapes scaled down (sequence 32-64 instead of 256-1024, dim 32-64
#: instead of 128-384, hidden 32 instead of 128) so that an evaluation takes seconds on one core; one with a
#: mask, two without, one with Cauchy inputs, as the official mix.
CPU_SHAPES = (
    {"seqlen": 32, "bs": 1, "dim": 32, "hidden_dim": 32, "nomask": False, "distribution": "normal"},
    {"seqlen": 32, "bs": 2, "dim": 64, "hidden_dim": 32, "nomask": True, "distribution": "normal"},
    {"seqlen": 64, "bs": 1, "dim": 32, "hidden_dim": 32, "nomask": True, "distribution": "cauchy"},
)
#: Shapes on CUDA: GPUMode's seven ranked benchmark shapes (their fixed seeds are not used: every call here
#: draws fresh inputs).
CUDA_SHAPES = (
    {"seqlen": 256, "bs": 2, "dim": 128, "hidden_dim": 128, "nomask": True, "distribution": "normal"},
    {"seqlen": 768, "bs": 1, "dim": 128, "hidden_dim": 128, "nomask": True, "distribution": "cauchy"},
    {"seqlen": 256, "bs": 2, "dim": 384, "hidden_dim": 128, "nomask": False, "distribution": "normal"},
    {"seqlen": 512, "bs": 1, "dim": 128, "hidden_dim": 128, "nomask": True, "distribution": "normal"},
    {"seqlen": 1024, "bs": 1, "dim": 128, "hidden_dim": 128, "nomask": True, "distribution": "cauchy"},
    {"seqlen": 768, "bs": 1, "dim": 384, "hidden_dim": 128, "nomask": False, "distribution": "normal"},
    {"seqlen": 1024, "bs": 1, "dim": 384, "hidden_dim": 128, "nomask": True, "distribution": "normal"},
)
#: GPUMode's eighteen test shapes (seqlen, bs, dim, hidden_dim, nomask, distribution): on CUDA, before any
#: timing, each is run once, untimed, and its output checked against the reference, as GPUMode's harness does.
#: Their fixed seeds are not used either. On CPU there is no such step (the scaled-down shapes are checked on
#: every timed call).
CUDA_TEST_SHAPES = tuple(
    {"seqlen": n, "bs": bs, "dim": dim, "hidden_dim": hidden, "nomask": nomask, "distribution": distribution}
    for n, bs, dim, hidden, nomask, distribution in (
        (32, 1, 128, 128, True, "normal"),
        (32, 1, 128, 128, False, "normal"),
        (64, 2, 256, 128, True, "normal"),
        (64, 2, 256, 128, False, "normal"),
        (128, 1, 768, 128, True, "normal"),
        (256, 1, 128, 128, True, "normal"),
        (256, 1, 128, 128, False, "normal"),
        (768, 2, 128, 128, True, "normal"),
        (1024, 1, 384, 128, False, "normal"),
        (1024, 1, 768, 128, True, "normal"),
        (1024, 1, 768, 128, False, "normal"),
        (32, 1, 128, 128, True, "cauchy"),
        (64, 2, 256, 128, True, "cauchy"),
        (128, 1, 768, 128, True, "cauchy"),
        (256, 1, 128, 128, True, "cauchy"),
        (768, 2, 128, 128, True, "cauchy"),
        (1024, 1, 384, 128, False, "cauchy"),
        (1024, 1, 768, 128, False, "cauchy"),
    )
)
SHAPE_KEYS = frozenset(CPU_SHAPES[0])
DISTRIBUTIONS = ("normal", "cauchy")
#: CUDA reserves tens of GiB of virtual address space when it starts, so an address-space limit that
#: suits CPU work kills it; on GPU the limit is lifted to 64 TiB (GPU memory is bounded by the device).
CUDA_MEMORY_MB = 1 << 26
#: Codes (and scores) whose measurements this instance keeps, so restarting from its states needs no new run.
SCORE_CACHE_SIZE = 1024
#: On CPU the code may use one core: CPU time over wall time above this (plus 5 ms) makes the attempt invalid.
MAX_CORES = 1.5
BASELINE_CODE = (
    "import torch\nimport torch.nn.functional as F\n\n\n"
    + inspect.getsource(reference_trimul)
    + "\n\ndef custom_kernel(data):\n    return reference_trimul(data)\n"
)


@dataclass(frozen=True)
class Measurement:
    """One evaluation: geometric means over shapes (microseconds), the per-shape figures and the largest error
    on the untimed test shapes (0 when there are none)."""

    score: float
    reference_us: float
    shapes: list[dict[str, float]]
    test_max_error: float = 0.0


def _geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _check_shape(spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict) or set(spec) != SHAPE_KEYS:
        raise ValueError(f"a TriMul shape must be a dict with keys {sorted(SHAPE_KEYS)}, got {spec!r}")
    for key in ("seqlen", "bs", "dim", "hidden_dim"):
        if isinstance(spec[key], bool) or not isinstance(spec[key], int) or spec[key] < 1:
            raise ValueError(f"TriMul shape {key} must be a positive int, got {spec[key]!r}")
    if not isinstance(spec["nomask"], bool):
        raise ValueError(f"TriMul shape nomask must be True or False, got {spec['nomask']!r}")
    if spec["distribution"] not in DISTRIBUTIONS:
        raise ValueError(f"TriMul shape distribution must be one of {DISTRIBUTIONS}, got {spec['distribution']!r}")
    return dict(spec)


class TriMul(Problem):
    """TriMul: a fast kernel for the outgoing triangle multiplicative update (GPUMode's bioml/trimul task).

    ## Description
    The triangle multiplicative update of AlphaFold 2 (Algorithm 11, outgoing edges) maps a pair
    representation x (bs, N, N, dim) and a pair mask (bs, N, N) to (bs, N, N, dim): LayerNorm over dim; left
    and right projections to hidden_dim channels, each masked and gated by a sigmoid of its own projection;
    z[b, i, j] = sum_k left[b, i, k] * right[b, j, k]; LayerNorm over hidden_dim; a sigmoid output gate; a
    projection back to dim. `reference_trimul` is GPUMode's reference, written with torch functions.

    ## Action
    One ```python block defining `custom_kernel(data)` as a GPUMode submission does: data = (input, mask,
    weights, config); input float32 (bs, N, N, dim); mask (bs, N, N), integer 0/1 (float ones when unmasked);
    weights keyed norm.weight/bias, left_proj.weight, right_proj.weight, left_gate.weight, right_gate.weight,
    out_gate.weight (hidden, dim), to_out_norm.weight/bias (hidden), to_out.weight (dim, hidden); config
    {"dim", "hidden_dim"}; all on the env's device. It returns a floating-point tensor (bs, N, N, dim) on that
    device. `from task import input_t, output_t` works, so GPUMode's template runs unmodified
    (tests/data/trimul/gpumode_template.py). The code is the module `submission` of a sandboxed worker
    process (libraries on one thread; on GPU pinned to one device), torch available, and on GPU whatever the
    host has (e.g. Triton).

    ## Inputs
    GPUMode's generator (`make_inputs`): input ~ N(0, 1), or Cauchy(0, 2) as 2 tan(pi (u - 1/2)); mask all
    ones (nomask) or randint(0, 2); LayerNorm parameters ~ N(0, 1); the five projections ~ N(0, 1)/sqrt(hidden);
    to_out ~ N(0, 1)/sqrt(dim). The seed of every call is fresh from OS randomness (GPUMode's fixed seeds are
    not used). Shapes: on CUDA GPUMode's seven ranked benchmark shapes (CUDA_SHAPES), timed, after its
    eighteen test shapes (CUDA_TEST_SHAPES), untimed; on CPU the scaled-down CPU_SHAPES (N 32-64, dim 32-64,
    hidden 32), timed, and no test shapes, so an evaluation takes seconds on one core.

    ## Verifier and metric
    The parent holds the clock. Two sandboxed workers are started, one with the candidate, one with
    BASELINE_CODE (the reference), and each says when it is ready. Each test shape (if any) is first run once
    through both, untimed, and its output checked as below. Then for every shape and repetition (`warmup`
    untimed, then `reps` timed) the parent draws a seed, sends it to each worker in turn (alternating who goes
    first) and times from the send to the last byte of the reply, which carries the whole output: drawing the
    inputs from the seed on the device, the kernel, and bringing the output back to the parent are inside the
    window, the same for both. The inputs do not exist before the seed is sent, so nothing can be precomputed,
    and no secret, report or clock lives in the candidate's process. The candidate's output must be finite,
    of the right shape and within |out - ref| <= atol + rtol * |ref| of the reference worker's output on the
    same inputs (atol = rtol = 2e-2, GPUMode's tolerance); one failure makes the attempt invalid, with the
    shape, the worst error and where it is in `info["error"]`. On CPU the worker's CPU time (read from the
    kernel's accounting of its process) over a call may not exceed `MAX_CORES` times its wall time: thread pools
    would make wall time a count of cores. While the reference is timed, every process of the candidate's
    sandbox is stopped (its run cgroup frozen; without a cgroup freezer, SIGSTOP to its PID namespace under
    bubblewrap, where no nested namespace can be made, or its session otherwise), so nothing the code left
    running can slow the reference down and inflate the ratio. Per shape the figure is the median of the
    `reps` timed calls; `score` is the geometric mean over shapes, in microseconds (lower is better). `info`
    has `reference_us` (same statistic for the reference, same run), `speedup` (their ratio), `shape_us` and
    `max_error` (timed calls) and `test_max_error` (test shapes).

    Limits of the figure: the window includes input generation and the device-to-host copy of the output, so
    absolute times exceed the kernel's and speed-ups are understated, most at large shapes on CUDA, where the
    copy can rival the kernel (not measured here: no GPU was available). Helper processes that the code
    starts are not counted by the CPU-time check (their work still shows in the wall time). GPU work the code
    queued before replying keeps running while its processes are stopped. Without bubblewrap the sandbox is
    no boundary (see `discover_envs.sandbox`), and none of this holds against a hostile candidate.

    ## Reward and failure reward
    reward = the reference's time / the candidate's time, both from the same run (`info["speedup"]`). Each
    score this instance measured keeps its run's ratio, so `reward(score)` (used again by `reset`) is a
    function of the score; a score it never measured (e.g. a state restored in a fresh instance) gets
    `reference_us / score`, with reference_us from this instance's first run, measured then if need be (or the
    `reference_us` argument). An invalid attempt gets `failure_reward` = 0, below every valid reward.

    ## Restart states
    A state is the code and its score (construction None). The start state is BASELINE_CODE, measured once
    per instance. Timings vary from run to run, so no exact re-check exists: `rescore` returns a score this
    instance measured for the same code as it is, else its latest measurement of the code, made now if there
    is none; `reset` accepts the claim within `score_rtol` = 0.3 (relative) of that.

    ## Published figures (GPUMode's harness and shapes on H100/A100; not comparable to these runs)
    TTT-Discover: 1161 us on H100 and 2198 us on A100, against 1371 us and 4531 us for the best human
    submissions (arXiv 2601.16175).

    ## Arguments
    device: "auto" (CUDA when available), "cpu" or "cuda". gpu: index of the GPU to pin (among the parent's
    CUDA_VISIBLE_DEVICES when set). shapes: list of dicts with seqlen, bs, dim, hidden_dim, nomask and
    distribution ("normal" or "cauchy"); default CPU_SHAPES or CUDA_SHAPES. test_shapes: shapes checked once,
    untimed, before timing, in the same form; default CUDA_TEST_SHAPES on CUDA, none on CPU (the CUDA order
    can be exercised on CPU with small ones; `scripts/trimul_gpu_check.py --dry-run` does). warmup, reps:
    untimed and timed calls per shape (2 and 10). atol, rtol: output tolerance (2e-2). reference_us: fix the
    reward's calibration instead of measuring it. timeout_s: wall clock of one whole evaluation, worker start-up
    included (60 s). memory_mb: address-space limit per worker (4096 on CPU; lifted on CUDA).

    ## Version history
    v0: GPUMode's interface (data, weight names, config, integer mask, Cauchy(0, 2) inputs, `task` module);
    timing by the parent over a socket, the reference in its own worker. Revised: GPUMode's test shapes
    checked, untimed, before timing on CUDA.
    """

    title: ClassVar[str] = "TriMul: triangle multiplicative update kernel (outgoing edges)"
    higher_is_better: ClassVar[bool] = False
    #: Timings vary from run to run (wall time on a shared machine).
    score_rtol: ClassVar[float] = 0.3

    def __init__(
        self,
        *,
        device: str = "auto",
        gpu: int = 0,
        shapes: list[dict[str, Any]] | None = None,
        test_shapes: list[dict[str, Any]] | None = None,
        warmup: int = 2,
        reps: int = 10,
        atol: float = 2e-2,
        rtol: float = 2e-2,
        reference_us: float | None = None,
        timeout_s: float = 60.0,
        memory_mb: int | None = None,
    ) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise ValueError(f"TriMul device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        default_mb = CUDA_MEMORY_MB if device == "cuda" else 4096
        super().__init__(timeout_s=timeout_s, memory_mb=default_mb if memory_mb is None else memory_mb)
        if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
            raise ValueError(f"TriMul gpu must be a GPU index >= 0, got {gpu!r}")
        if not (isinstance(warmup, int) and warmup >= 0 and isinstance(reps, int) and reps >= 1):
            raise ValueError(f"TriMul needs warmup >= 0 and reps >= 1, got warmup={warmup!r}, reps={reps!r}")
        if not (atol >= 0 and rtol >= 0):
            raise ValueError(f"TriMul tolerances must be >= 0, got atol={atol!r}, rtol={rtol!r}")
        if reference_us is not None and not (math.isfinite(reference_us) and reference_us > 0):
            raise ValueError(f"TriMul reference_us must be a positive time, got {reference_us!r}")
        default_shapes = CUDA_SHAPES if device == "cuda" else CPU_SHAPES
        self.shapes = [_check_shape(s) for s in (default_shapes if shapes is None else shapes)]
        if not self.shapes:
            raise ValueError("TriMul needs at least one shape")
        default_tests = CUDA_TEST_SHAPES if device == "cuda" else ()
        self.test_shapes = [_check_shape(s) for s in (default_tests if test_shapes is None else test_shapes)]
        self.device = device
        self.visible_devices = _pinned_device(gpu) if device == "cuda" else None
        self.warmup, self.reps = warmup, reps
        self.atol, self.rtol = float(atol), float(rtol)
        self.reference_us = reference_us
        self._start: dict[str, Any] | None = None
        self._measured: dict[str, list[float]] = {}
        self._speedups: dict[float, float] = {}

    def statement(self) -> str:
        where = (
            "on one GPU"
            if self.device == "cuda"
            else "on one CPU core (using more than one, e.g. with thread pools, makes the attempt invalid)"
        )
        shapes = "\n".join(map(_describe, self.shapes))
        tests = "\n".join(map(_describe, self.test_shapes))
        if tests:
            tests = f"Before any timing, your output is checked once (untimed) on each of these test shapes:\n{tests}\n"
        return (
            f"# {self.title}\n"
            "Write a faster `custom_kernel(data)` that computes what GPUMode's TriMul reference below computes\n"
            "(AlphaFold 2's outgoing triangle multiplicative update):\n\n"
            f"```python\n{inspect.getsource(reference_trimul).rstrip()}\n```\n\n"
            "data = (input, mask, weights, config): input float32 (bs, seqlen, seqlen, dim); mask (bs, seqlen,\n"
            "seqlen) of 0/1 (integer, or float ones without mask); weights holds norm.weight/bias (dim),\n"
            "left_proj.weight, right_proj.weight, left_gate.weight, right_gate.weight, out_gate.weight\n"
            "(hidden_dim, dim), to_out_norm.weight/bias (hidden_dim) and to_out.weight (dim, hidden_dim); config\n"
            f"is {{'dim', 'hidden_dim'}}. Everything is on device '{self.device}'; return a float tensor\n"
            "(bs, seqlen, seqlen, dim) on it. `from task import input_t, output_t` is available.\n"
            f"{tests}Your code runs {where}, on these shapes:\n{shapes}\n"
            f"Every call gets fresh random inputs and every output is checked: |out - ref| <= {self.atol:g} +\n"
            f"{self.rtol:g} * |ref| everywhere, or the attempt is invalid. Each shape is run {self.warmup} times\n"
            f"untimed, then {self.reps} times timed; the score is the geometric mean over shapes of the median\n"
            "time per call, in microseconds (lower is better); the reward is the reference's time divided\n"
            "by yours.\n\n"
            "## How to answer\n"
            "One ```python block defining `custom_kernel(data)` (and anything it needs); the last such block\n"
            "counts."
        )

    def initial_state(self, rng: np.random.Generator) -> dict[str, Any]:
        """BASELINE_CODE, measured once per instance (timings vary, a restart should not)."""
        if self._start is None:
            measured = self._measure_baseline()
            self._start = make_state(score=measured.score, reward=self.reward(measured.score), code=BASELINE_CODE)
        return dict(self._start)

    def _measure_baseline(self) -> Measurement:
        try:
            return self.measure(BASELINE_CODE)
        except InvalidSolution as exc:
            raise RuntimeError(f"the TriMul baseline failed on {self.device}: {exc}") from None

    def measure(self, code: str) -> Measurement:
        """Check and time `code` against the reference, each in its own worker; raise `InvalidSolution`."""
        limits = replace(self.limits, timeout_s=self.limits.timeout_s + WORKER_GRACE_S)
        # Test shape k is the worker's shape len(self.shapes) + k.
        all_shapes = [*self.shapes, *self.test_shapes]
        config = {"device": self.device, "shapes": all_shapes, "visible_devices": self.visible_devices}
        deadline = time.monotonic() + self.limits.timeout_s
        reference = Worker(BASELINE_CODE, config, limits, is_reference=True)
        try:
            candidate = Worker(code, config, limits)
            try:
                self._call(reference, "connect", deadline)
                self._call(candidate, "connect", deadline)
                test_max_error = self._check(reference, candidate, deadline)
                shapes = self._time(reference, candidate, deadline)
            finally:
                candidate.close()
        finally:
            reference.close()
        measured = Measurement(
            score=_geometric_mean([s["candidate_us"] for s in shapes]),
            reference_us=_geometric_mean([s["reference_us"] for s in shapes]),
            shapes=shapes,
            test_max_error=test_max_error,
        )
        self._remember(code, measured)
        return measured

    def _check(self, reference: Worker, candidate: Worker, deadline: float) -> float:
        """GPUMode's correctness step, before any timing: each test shape once, untimed, the candidate's output
        against the reference's on the same fresh inputs. Raise `InvalidSolution` at the first wrong output;
        return the largest error."""
        worst = 0.0
        for k, spec in enumerate(self.test_shapes):
            index, seed = len(self.shapes) + k, secrets.randbits(63)
            shape = (spec["bs"], spec["seqlen"], spec["seqlen"], spec["dim"])
            expected = self._call(reference, "call", deadline, index, seed, shape)[0]
            out = self._call(candidate, "call", deadline, index, seed, shape)[0]
            why, err = check_output(out, expected, self.atol, self.rtol)
            if why is not None:
                raise InvalidSolution(f"wrong output on test shape {k} ({spec}), checked before timing: {why}")
            worst = max(worst, err)
        return worst

    def _time(self, reference: Worker, candidate: Worker, deadline: float) -> list[dict[str, float]]:
        """Run every shape and repetition through both (connected) workers; the per-shape medians (us) and worst
        error."""
        report = []
        for index, spec in enumerate(self.shapes):
            shape = (spec["bs"], spec["seqlen"], spec["seqlen"], spec["dim"])
            times: dict[Worker, list[float]] = {reference: [], candidate: []}
            worst = 0.0
            for rep in range(self.warmup + self.reps):
                seed = secrets.randbits(63)
                outputs = {}
                for worker in (reference, candidate) if rep % 2 == 0 else (candidate, reference):
                    # While the reference is timed, the candidate's sandbox is stopped: nothing it left running
                    # (threads, helper processes) can slow the reference down and inflate the ratio.
                    with candidate.frozen() if worker is reference else contextlib.nullcontext():
                        outputs[worker], wall, cpu = self._call(worker, "call", deadline, index, seed, shape)
                    if worker is candidate and self.device == "cpu" and cpu > MAX_CORES * wall + 0.005:
                        raise InvalidSolution(
                            f"custom_kernel used {1e3 * cpu:.1f} ms of CPU time in {1e3 * wall:.1f} ms on shape "
                            f"{index}: more than one core (thread pools or set_num_threads); on CPU it must run "
                            "on one"
                        )
                    if rep >= self.warmup:
                        times[worker].append(wall)
                why, err = check_output(outputs[candidate], outputs[reference], self.atol, self.rtol)
                if why is not None:
                    raise InvalidSolution(f"wrong output on shape {index} ({spec}), repetition {rep}: {why}")
                worst = max(worst, err)
            report.append(
                {
                    "candidate_us": 1e6 * statistics.median(times[candidate]),
                    "reference_us": 1e6 * statistics.median(times[reference]),
                    "max_error": worst,
                }
            )
        return report

    def _call(self, worker: Worker, method: str, deadline: float, *args: Any) -> Any:
        """`worker.method(*args, deadline)`; its failure is the candidate's (`InvalidSolution`), or, from the
        reference's worker, a broken environment (`RuntimeError`) unless time had run out."""
        try:
            return getattr(worker, method)(*args, deadline)
        except WorkerFailed as exc:
            message = str(exc)
            if message == "timed out" or time.monotonic() > deadline:
                raise InvalidSolution(f"timed out after {self.limits.timeout_s:g} s (wall clock)") from None
            if worker.is_reference:
                raise RuntimeError(f"the TriMul reference worker failed on {self.device}: {message}") from None
            raise InvalidSolution(message) from None

    def _remember(self, code: str, measured: Measurement) -> None:
        if self.reference_us is None:
            self.reference_us = measured.reference_us
        if len(self._speedups) >= SCORE_CACHE_SIZE:
            del self._speedups[next(iter(self._speedups))]
        self._speedups[measured.score] = measured.reference_us / measured.score
        key = content_id(None, code)
        if key not in self._measured and len(self._measured) >= SCORE_CACHE_SIZE:
            del self._measured[next(iter(self._measured))]
        self._measured.setdefault(key, []).append(measured.score)

    def reward(self, score: float) -> float:
        """The same-run speed-up of a score measured here, else the calibrated reference time over it (the
        reference is measured now if this instance has no calibration yet, e.g. restoring another's state)."""
        if score in self._speedups:
            return self._speedups[score]
        if not score > 0:
            raise ValueError(f"TriMul score must be a positive time, got {score!r}")
        if self.reference_us is None:
            self._measure_baseline()
        assert self.reference_us is not None  # `_measure_baseline` sets it
        return self.reference_us / float(score)

    def evaluate(self, reply: str, state: dict[str, Any]) -> Evaluation:
        block = extract_block(reply, ("python", "py"))
        if block is None:
            raise InvalidSolution("the reply has no fenced ```python block defining `custom_kernel(data)`")
        code = block[1]
        measured = self.measure(code)
        details = {
            "reference_us": measured.reference_us,
            "speedup": measured.reference_us / measured.score,
            "shape_us": [s["candidate_us"] for s in measured.shapes],
            "max_error": max(s["max_error"] for s in measured.shapes),
            "test_max_error": measured.test_max_error,
        }
        return Evaluation(score=measured.score, reward=self.reward(measured.score), code=code, details=details)

    def rescore(self, state: dict[str, Any]) -> float:
        """A score this instance measured for the same code as it is, else its latest measurement of the code
        (made now if there is none); `reset` then compares the claim with `score_rtol`."""
        code, claimed = state.get("code"), state.get("score")
        if not isinstance(code, str) or state.get("construction") is not None:
            raise InvalidState("a TriMul state is code (a str) with construction None")
        known = self._measured.get(content_id(None, code))
        if known is not None:
            return float(claimed) if claimed in known else known[-1]
        try:
            return self.measure(code).score
        except InvalidSolution as exc:
            raise InvalidState(f"state code fails the TriMul check: {exc}") from None

    def render_state(self, state: dict[str, Any]) -> str:
        return (
            f"## Start state\nMedian time per call, geometric mean over shapes: {state['score']:.1f} us "
            f"(reward {state['reward']:.3f}: the reference's time over this one)\n\n"
            f"Code that produced it:\n```python\n{state['code'].rstrip()}\n```"
        )


def _describe(spec: dict[str, Any]) -> str:
    return (
        f"- bs={spec['bs']}, seqlen={spec['seqlen']}, dim={spec['dim']}, hidden_dim={spec['hidden_dim']}, "
        f"{'no mask' if spec['nomask'] else 'random integer mask'}, {spec['distribution']} inputs"
    )


def _pinned_device(gpu: int) -> str:
    """CUDA_VISIBLE_DEVICES for the sandbox: entry `gpu` of the parent's list, or `gpu` itself."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(gpu)
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    if gpu >= len(devices):
        raise ValueError(f"TriMul gpu={gpu} but CUDA_VISIBLE_DEVICES={visible!r} lists {len(devices)} device(s)")
    return devices[gpu]
