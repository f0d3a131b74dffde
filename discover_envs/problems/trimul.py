"""TriMul: make AlphaFold's outgoing triangle multiplicative update fast, without changing its output.

The reference, the input generator and the timing harness are plain module functions: the parent imports
them (tests compare the reference with a slow loop), and `harness_source` ships their source text to the
sandbox, where the harness loads the candidate's `custom_kernel` into its own namespace, checks it against
the reference on fresh inputs and times both. Timings can only be taken where the kernel runs, so the
harness captures its clock and synchronisation before the candidate's code is loaded.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import secrets
import statistics
import time
import traceback
from dataclasses import dataclass, replace
from functools import cache
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from discover_envs.problem import Evaluation, InvalidSolution, InvalidState, Problem, extract_block
from discover_envs.sandbox import run_function
from discover_envs.state import content_id, make_state

#: Shapes timed on CPU: small enough that one evaluation (torch import included) takes a few seconds on a
#: single thread; one masked, one unmasked, one with heavy-tailed (Cauchy) inputs.
CPU_SHAPES = (
    {"batch": 1, "seq_len": 32, "dim": 32, "hidden_dim": 32, "masked": True, "distribution": "normal"},
    {"batch": 2, "seq_len": 32, "dim": 64, "hidden_dim": 32, "masked": False, "distribution": "normal"},
    {"batch": 1, "seq_len": 64, "dim": 32, "hidden_dim": 32, "masked": True, "distribution": "cauchy"},
)
#: Shapes timed on CUDA, in the range of the GPUMode competition's benchmarks (sequence 256 to 1024,
#: dim 128 or 384, hidden 128, with and without mask, normal and Cauchy inputs).
CUDA_SHAPES = (
    {"batch": 2, "seq_len": 256, "dim": 128, "hidden_dim": 128, "masked": False, "distribution": "normal"},
    {"batch": 1, "seq_len": 512, "dim": 128, "hidden_dim": 128, "masked": True, "distribution": "normal"},
    {"batch": 1, "seq_len": 768, "dim": 384, "hidden_dim": 128, "masked": True, "distribution": "cauchy"},
    {"batch": 2, "seq_len": 512, "dim": 384, "hidden_dim": 128, "masked": False, "distribution": "normal"},
    {"batch": 1, "seq_len": 1024, "dim": 384, "hidden_dim": 128, "masked": True, "distribution": "normal"},
)
SHAPE_KEYS = frozenset(CPU_SHAPES[0])
DISTRIBUTIONS = ("normal", "cauchy")
#: CUDA reserves tens of GiB of virtual address space when it starts, so an address-space limit that
#: suits CPU work kills it; on GPU the limit is lifted to 64 TiB (GPU memory is bounded by the device).
CUDA_MEMORY_MB = 1 << 26
#: Sandbox isolation on GPU: bubblewrap's private /dev has no /dev/nvidia* nodes, so CUDA runs rlimits-only.
CUDA_ISOLATION = "none"
#: Codes (and scores) whose measurements this instance keeps, so restarting from its states needs no new run.
SCORE_CACHE_SIZE = 1024
#: Largest harness report read back (it holds a few numbers per shape).
MAX_REPORT_CHARS = 100_000


def reference_trimul(data):
    """Outgoing triangle multiplicative update (AlphaFold 2, Algorithm 11) in plain torch.

    data = (x, mask, weights, config): x (B, N, N, C) float32, mask (B, N, N) of 0/1, weights the dict of
    LayerNorm and projection tensors (projections shaped like nn.Linear weights), config the shape dict.
    Returns (B, N, N, C): out_proj(LayerNorm(sum_k left[i, k] * right[j, k]) * out_gate).
    """
    x, mask, w, _ = data
    x = F.layer_norm(x, (x.shape[-1],), w["norm_in.weight"], w["norm_in.bias"])
    m = mask.unsqueeze(-1)
    left = F.linear(x, w["left_proj"]) * m * torch.sigmoid(F.linear(x, w["left_gate"]))
    right = F.linear(x, w["right_proj"]) * m * torch.sigmoid(F.linear(x, w["right_gate"]))
    gate = torch.sigmoid(F.linear(x, w["out_gate"]))
    z = torch.einsum("bikh,bjkh->bijh", left, right)
    z = F.layer_norm(z, (z.shape[-1],), w["norm_out.weight"], w["norm_out.bias"]) * gate
    return F.linear(z, w["out_proj"])


def make_inputs(spec, seed, device):
    """Fresh inputs for one shape, drawn on `device` from `seed` (a new seed per repetition)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    b, n, c, h = spec["batch"], spec["seq_len"], spec["dim"], spec["hidden_dim"]

    def normal(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    if spec["distribution"] == "cauchy":
        x = torch.empty(b, n, n, c, device=device).cauchy_(generator=gen)
    else:
        x = normal(b, n, n, c)
    if spec["masked"]:
        mask = (torch.rand(b, n, n, generator=gen, device=device) < 0.75).float()
    else:
        mask = torch.ones(b, n, n, device=device)
    weights = {"norm_in.weight": 1 + 0.1 * normal(c), "norm_in.bias": 0.1 * normal(c)}
    for name in ("left_proj", "right_proj", "left_gate", "right_gate", "out_gate"):
        weights[name] = normal(h, c) / c**0.5
    weights.update({"norm_out.weight": 1 + 0.1 * normal(h), "norm_out.bias": 0.1 * normal(h)})
    weights["out_proj"] = normal(c, h) / h**0.5
    config = {"batch": b, "seq_len": n, "dim": c, "hidden_dim": h, "masked": spec["masked"]}
    return x, mask, weights, config


def check_output(out, expected, atol, rtol):
    """(why `out` is wrong or None, largest |out - expected|); wrong means |out - ref| > atol + rtol*|ref|."""
    if not isinstance(out, torch.Tensor):
        return f"custom_kernel returned {type(out).__name__}, not a torch.Tensor", math.inf
    if tuple(out.shape) != tuple(expected.shape) or out.device != expected.device:
        want = f"{tuple(expected.shape)} on {expected.device}"
        return f"custom_kernel returned shape {tuple(out.shape)} on {out.device}, expected {want}", math.inf
    if not out.is_floating_point():
        return f"custom_kernel returned dtype {out.dtype}, not a floating-point tensor", math.inf
    out = out.detach().float()
    if not bool(torch.isfinite(out).all()):
        index = tuple(int(i) for i in torch.nonzero(~torch.isfinite(out))[0])
        return f"custom_kernel returned a non-finite value at index {index}", math.inf
    diff = (out - expected).abs()
    worst = float(diff.max())
    excess = diff - (atol + rtol * expected.abs())
    if float(excess.max()) > 0:
        flat = int(excess.argmax())
        index = tuple(int(i) for i in np.unravel_index(flat, tuple(out.shape)))
        got, want = float(out.flatten()[flat]), float(expected.flatten()[flat])
        return (
            f"max |out - ref| = {worst:.4g}; at index {index} out = {got:.6g}, ref = {want:.6g}, beyond "
            f"atol + rtol*|ref| (atol = {atol:g}, rtol = {rtol:g})"
        ), worst
    return None, worst


def describe_error(exc):
    """The exception and the line of the candidate's code it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = next((f.lineno for f in reversed(frames) if f.filename == "submission.py"), None)
    return f"{type(exc).__name__}: {exc}" + (f" (line {where} of the code)" if where else "")


def thread_count():
    """Threads of this process now (Linux), to notice work moved off the timed thread."""
    return len(os.listdir("/proc/self/task"))


def run_harness(code, shapes, device, visible_devices, warmup, reps, atol, rtol, seed, nonce):
    """Sandbox entry point: load `code`, then per shape and repetition draw fresh inputs, time the reference
    and `custom_kernel` on copies of them and check the output. Returns a JSON report carrying `nonce`.

    On CUDA the clock is wall time between device synchronisations. On CPU it is the calling thread's CPU
    time, which other load on the machine does not inflate (process CPU clocks tick at the scheduler's 4 ms
    under RLIMIT_CPU, so they cannot time millisecond calls); work moved to other threads would escape it,
    so the process may not gain threads once the candidate is loaded.
    """

    def fail(error, **extra):
        return json.dumps({"nonce": nonce, "error": error, **extra})

    if visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    os.remove("call.json")  # the runner has read it; the candidate must not learn the seed or the nonce
    if device == "cuda":
        if not torch.cuda.is_available():
            return fail("CUDA was asked for but is not available")
        clock, sync = time.perf_counter, torch.cuda.synchronize
    else:
        clock = time.thread_time

        def sync():
            return None

    reference, count = reference_trimul, thread_count
    reference(make_inputs(shapes[0], seed, device))  # lets torch (and CUDA) start what it keeps
    threads = count()
    namespace = {"__name__": "submission"}
    try:
        exec(compile(code, "submission.py", "exec"), namespace)
    except BaseException as exc:
        return fail(f"the code failed to load: {describe_error(exc)}")
    kernel = namespace.get("custom_kernel")
    if not callable(kernel):
        return fail("the code does not define a function `custom_kernel`")
    report = []
    for index, spec in enumerate(shapes):
        ref_times, times, worst = [], [], 0.0
        for rep in range(warmup + reps):
            # Each gets its own copy (the candidate may write to its inputs) and they take turns going first,
            # so neither is always the one that finds the inputs warm in cache.
            rep_seed = seed + 1 + 1000 * index + rep
            copies = [make_inputs(spec, rep_seed, device) for _ in range(2)]
            for turn in (rep % 2, 1 - rep % 2):
                sync()
                start = clock()
                try:
                    result = kernel(copies[1]) if turn else reference(copies[0])
                    sync()
                except BaseException as exc:
                    if not turn:
                        raise
                    return fail(f"custom_kernel raised {describe_error(exc)} on shape {index} ({spec})")
                if turn:
                    out, elapsed = result, clock() - start
                else:
                    expected, ref_time = result, clock() - start
            if device == "cpu" and count() > threads:
                return fail(
                    f"the process went from {threads} to {count()} threads; on CPU only the calling thread's "
                    "time is counted, so custom_kernel must run on it alone (no thread pools, no set_num_threads)"
                )
            why, err = check_output(out, expected, atol, rtol)
            if why is not None:
                return fail(f"wrong output on shape {index} ({spec}), repetition {rep}: {why}", max_error=err)
            worst = max(worst, err)
            if rep >= warmup:
                ref_times.append(ref_time)
                times.append(elapsed)
        report.append(
            {
                "candidate_us": 1e6 * statistics.median(times),
                "reference_us": 1e6 * statistics.median(ref_times),
                "max_error": worst,
            }
        )
    return json.dumps({"nonce": nonce, "shapes": report})


_SANDBOX_IMPORTS = """\
import json
import math
import os
import statistics
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F
"""


@cache
def harness_source() -> str:
    """The sandbox program: the functions above, as written here, behind their imports."""
    functions = (reference_trimul, make_inputs, check_output, describe_error, thread_count, run_harness)
    return "\n\n".join([_SANDBOX_IMPORTS, *(inspect.getsource(f) for f in functions)])


#: The start state: the reference itself, as a candidate would write it.
BASELINE_CODE = (
    "import torch\nimport torch.nn.functional as F\n\n\n"
    + inspect.getsource(reference_trimul)
    + "\n\ndef custom_kernel(data):\n    return reference_trimul(data)\n"
)


@dataclass(frozen=True)
class Measurement:
    """One harness run: geometric means over shapes (microseconds) and the per-shape figures."""

    score: float
    reference_us: float
    shapes: list[dict[str, float]]


def _geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _check_shape(spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict) or set(spec) != SHAPE_KEYS:
        raise ValueError(f"a TriMul shape must be a dict with keys {sorted(SHAPE_KEYS)}, got {spec!r}")
    for key in ("batch", "seq_len", "dim", "hidden_dim"):
        if isinstance(spec[key], bool) or not isinstance(spec[key], int) or spec[key] < 1:
            raise ValueError(f"TriMul shape {key} must be a positive int, got {spec[key]!r}")
    if not isinstance(spec["masked"], bool):
        raise ValueError(f"TriMul shape masked must be True or False, got {spec['masked']!r}")
    if spec["distribution"] not in DISTRIBUTIONS:
        raise ValueError(f"TriMul shape distribution must be one of {DISTRIBUTIONS}, got {spec['distribution']!r}")
    return dict(spec)


class TriMul(Problem):
    """TriMul: a fast kernel for the outgoing triangle multiplicative update (GPUMode's TriMul task).

    ## Description
    The triangle multiplicative update of AlphaFold 2 (Algorithm 11, outgoing edges) maps a pair
    representation x (B, N, N, C) and a pair mask (B, N, N) to (B, N, N, C): LayerNorm over C; left and
    right projections to H channels, each masked and gated by a sigmoid of its own projection; the product
    z[b, i, j] = sum_k left[b, i, k] * right[b, j, k]; LayerNorm over H; a sigmoid output gate (projected
    from the normalised x); a projection back to C. `reference_trimul` is the plain-torch definition.

    ## Action
    One ```python block defining `custom_kernel(data)` with the reference's signature: data = (x, mask,
    weights, config), all float32 tensors on the env's device (weights keyed norm_in.weight/bias, left_proj,
    right_proj, left_gate, right_gate, out_gate (H, C), norm_out.weight/bias (H), out_proj (C, H)); config
    holds batch, seq_len, dim, hidden_dim and masked. It returns a floating-point tensor (B, N, N, C) on the
    same device. The code runs in the sandbox in its own process (one CPU thread; on GPU with
    CUDA_VISIBLE_DEVICES pinned to one device); torch is available, and on GPU so is whatever the host has
    installed (e.g. Triton).

    ## Verifier and metric
    For every shape and every repetition (`warmup` + `reps`) fresh inputs are drawn from a seed chosen at
    random per evaluation; the reference and `custom_kernel` each run on their own copy, taking turns to go
    first (neither always finds the inputs warm in cache), each timed, and the
    candidate's output must satisfy |out - ref| <= atol + rtol * |ref| everywhere (default atol = rtol =
    2e-2, which admits bf16/TF32 arithmetic) and be finite, of the right shape and on the right device. One
    failure makes the attempt invalid, with the shape, the worst error and where it is in `info["error"]`.
    Fresh inputs every time and a check of every output defeat caching across calls. Clock: on CUDA, wall
    time between device synchronisations; on CPU, the calling thread's CPU time (robust to other load on a
    shared machine), so the process may not gain threads once the code is loaded. Per shape the figure is the
    median over the `reps` timed calls (robust to preemption); `score` is the geometric mean of these over
    the shapes, in microseconds (lower is better). `info` also has `reference_us` (same statistic for the
    reference, same run), `speedup` (their ratio), `shape_us` and `max_error`.

    Trust: timings can only be taken in the candidate's process, so a candidate that sets out to tamper with
    the harness in memory can (e.g. by monkeypatching the torch functions the reference calls). The harness
    binds its clock, synchronisation and reference before loading the code, deletes its call file first and
    tags its report with a per-run nonce, so a result written by the candidate itself is refused; the
    sandbox bounds what a hostile candidate can reach. On CUDA the sandbox runs without bubblewrap
    (CUDA_ISOLATION).

    ## Reward and failure reward
    reward = the reference's time / the candidate's time, both from the same run (`info["speedup"]`): timed
    turn about on the same inputs, the ratio holds up where absolute times drift by ~20% between runs. Each
    score this instance measured keeps its run's ratio, so `reward(score)` (used again by `reset`) is a
    function of the score; a score it never measured gets `reference_us / score`, with reference_us the
    reference's time in this instance's first run (or the `reference_us` argument). An invalid attempt (no
    block, error, timeout, wrong output) gets `failure_reward` = 0, below every valid reward.

    ## Restart states
    A state is the code and its score (construction None). The start state is BASELINE_CODE (the reference
    as a candidate), measured once per instance. Timings vary from run to run, so no exact re-check exists:
    `rescore` returns a score this instance measured for the same code as it is (its own states restart
    exactly, with no new run), else this instance's latest measurement of the code, made now (full check
    and timing) if there is none; `reset` accepts the claim within `score_rtol` = 0.3 (relative,
    math.isclose) of that and continues from the measurement, and rejects a claim further off.

    ## Published figures (A100, GPUMode's harness and shapes; not comparable to these runs)
    TTT-Discover: 2198 us on A100 against 4531 us for the best human submission (arXiv 2601.16175).

    ## Arguments
    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda". gpu: index of the GPU to pin (among
    the parent's CUDA_VISIBLE_DEVICES when that is set). shapes: list of dicts with batch, seq_len, dim,
    hidden_dim, masked and distribution ("normal" or "cauchy"); default CPU_SHAPES or CUDA_SHAPES.
    warmup, reps: untimed and timed calls per shape (2 and 10). atol, rtol: output tolerance (2e-2).
    reference_us: fix the reward's calibration instead of measuring it. timeout_s: wall clock of one whole
    evaluation (60 s). memory_mb: address-space limit (4096 on CPU; lifted on CUDA, see CUDA_MEMORY_MB).

    ## Version history
    v0: first release.
    """

    title: ClassVar[str] = "TriMul: triangle multiplicative update kernel (outgoing edges)"
    higher_is_better: ClassVar[bool] = False
    #: Timings vary from run to run (thread CPU time on a shared machine: ~20% seen under heavy load).
    score_rtol: ClassVar[float] = 0.3

    def __init__(
        self,
        *,
        device: str = "auto",
        gpu: int = 0,
        shapes: list[dict[str, Any]] | None = None,
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
        if device == "cuda":
            self.limits = replace(self.limits, isolation=CUDA_ISOLATION)
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
            "on one GPU (wall time between synchronisations is measured)"
            if self.device == "cuda"
            else "on one CPU thread (its CPU time is measured; starting threads makes the attempt invalid)"
        )
        shapes = "\n".join(
            f"- B={s['batch']}, N={s['seq_len']}, C={s['dim']}, H={s['hidden_dim']}, "
            f"{'masked' if s['masked'] else 'mask all ones'}, {s['distribution']} inputs"
            for s in self.shapes
        )
        return (
            f"# {self.title}\n"
            "Write a faster `custom_kernel(data)` that computes exactly what the reference below computes\n"
            "(AlphaFold 2's outgoing triangle multiplicative update):\n\n"
            f"```python\n{inspect.getsource(reference_trimul).rstrip()}\n```\n\n"
            "data = (x, mask, weights, config): x is float32 (B, N, N, C); mask is float32 (B, N, N) of 0/1;\n"
            "weights holds norm_in.weight/bias (C), left_proj, right_proj, left_gate, right_gate, out_gate\n"
            "(H, C), norm_out.weight/bias (H) and out_proj (C, H); config has batch, seq_len, dim, hidden_dim,\n"
            f"masked. Everything is on device '{self.device}'; return a floating-point tensor (B, N, N, C) on it.\n"
            f"Your code runs {where}, on these shapes:\n{shapes}\n"
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
            try:
                measured = self.measure(BASELINE_CODE)
            except InvalidSolution as exc:
                raise RuntimeError(f"the TriMul baseline failed on {self.device}: {exc}") from None
            self._start = make_state(score=measured.score, reward=self.reward(measured.score), code=BASELINE_CODE)
        return dict(self._start)

    def measure(self, code: str) -> Measurement:
        """Check and time `code` in the sandbox; raise `InvalidSolution` with the harness's reason."""
        nonce = secrets.token_hex(16)
        kwargs = {
            "code": code,
            "shapes": self.shapes,
            "device": self.device,
            "visible_devices": self.visible_devices,
            "warmup": self.warmup,
            "reps": self.reps,
            "atol": self.atol,
            "rtol": self.rtol,
            "seed": secrets.randbelow(2**40),
            "nonce": nonce,
        }
        result = run_function(harness_source(), "run_harness", kwargs, self.limits)
        if not result.ok:
            raise InvalidSolution(result.error)
        report = _read_report(result.value, nonce, len(self.shapes))
        if "error" in report:
            raise InvalidSolution(str(report["error"]))
        shapes = report["shapes"]
        measured = Measurement(
            score=_geometric_mean([s["candidate_us"] for s in shapes]),
            reference_us=_geometric_mean([s["reference_us"] for s in shapes]),
            shapes=shapes,
        )
        if self.reference_us is None:
            self.reference_us = measured.reference_us
        if len(self._speedups) >= SCORE_CACHE_SIZE:
            del self._speedups[next(iter(self._speedups))]
        self._speedups[measured.score] = measured.reference_us / measured.score
        key = content_id(None, code)
        if key not in self._measured and len(self._measured) >= SCORE_CACHE_SIZE:
            del self._measured[next(iter(self._measured))]
        self._measured.setdefault(key, []).append(measured.score)
        return measured

    def reward(self, score: float) -> float:
        """The same-run speed-up of a score measured here, else the calibrated reference time over it."""
        if score in self._speedups:
            return self._speedups[score]
        if self.reference_us is None:
            raise RuntimeError("TriMul's reward is uncalibrated: measure some code first or pass reference_us")
        if not score > 0:
            raise ValueError(f"TriMul score must be a positive time, got {score!r}")
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


def _pinned_device(gpu: int) -> str:
    """CUDA_VISIBLE_DEVICES for the sandbox: entry `gpu` of the parent's list, or `gpu` itself."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(gpu)
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    if gpu >= len(devices):
        raise ValueError(f"TriMul gpu={gpu} but CUDA_VISIBLE_DEVICES={visible!r} lists {len(devices)} device(s)")
    return devices[gpu]


def _read_report(value: Any, nonce: str, n_shapes: int) -> dict[str, Any]:
    """Parse the harness's JSON report; refuse one without this run's nonce (it was not the harness's)."""
    if not isinstance(value, str) or len(value) > MAX_REPORT_CHARS:
        raise InvalidSolution("the sandbox returned no harness report (did the code write its own result?)")
    try:
        report = json.loads(value)
    except json.JSONDecodeError:
        raise InvalidSolution("the harness report is not valid JSON") from None
    if not isinstance(report, dict) or report.get("nonce") != nonce:
        raise InvalidSolution("the result does not carry this run's nonce, so it did not come from the harness")
    if "error" in report:
        return report
    shapes = report.get("shapes")
    keys = ("candidate_us", "reference_us", "max_error")
    if not isinstance(shapes, list) or len(shapes) != n_shapes:
        raise InvalidSolution("the harness report does not cover every shape")
    for entry in shapes:
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), (int, float)) and math.isfinite(entry[k]) for k in keys
        ):
            raise InvalidSolution(f"malformed harness report entry {str(entry)[:200]}")
        if not (entry["candidate_us"] > 0 and entry["reference_us"] > 0):
            raise InvalidSolution("the harness reported a time that is not positive")
    return report
