"""TriMul env: GPUMode's interface (reference, inputs, the official template), the parent-held clock against
forged reports, the verdicts (wrong output, caching, cores, timeout), restarts and the Gymnasium contract.
Each evaluation starts two sandboxed workers that import torch (~3 s each), so evaluations are few; no test
asserts a speed (that is for the benchmarks)."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import discover_envs  # noqa: F401 - registers the ids
from discover_envs import sandbox
from discover_envs.problem import InvalidSolution, InvalidState
from discover_envs.problems import trimul_clock
from discover_envs.problems.trimul import BASELINE_CODE, CPU_SHAPES, CUDA_SHAPES, CUDA_TEST_SHAPES, TriMul
from discover_envs.problems.trimul_clock import TASK_MODULE, Worker, check_output, make_inputs, reference_trimul

DATA = Path(__file__).parent / "data" / "trimul"
GPU_CHECK = Path(__file__).parent.parent / "scripts" / "trimul_gpu_check.py"
TEMPLATE_CODE = (DATA / "gpumode_template.py").read_text()
FORGER_CODE = (DATA / "forger.py").read_text()
WEIGHT_SHAPES = {
    "norm.weight": ("dim",),
    "norm.bias": ("dim",),
    "left_proj.weight": ("hidden_dim", "dim"),
    "right_proj.weight": ("hidden_dim", "dim"),
    "left_gate.weight": ("hidden_dim", "dim"),
    "right_gate.weight": ("hidden_dim", "dim"),
    "out_gate.weight": ("hidden_dim", "dim"),
    "to_out_norm.weight": ("hidden_dim",),
    "to_out_norm.bias": ("hidden_dim",),
    "to_out.weight": ("dim", "hidden_dim"),
}

FAST_CODE = '''
import torch
import torch.nn.functional as F


def custom_kernel(data):
    """One fused projection per batch straight into channel-major layout, then one bmm for the product."""
    x, mask, w, cfg = data
    b, n, _, c = x.shape
    h = cfg["hidden_dim"]
    x = F.layer_norm(x, (c,), w["norm.weight"], w["norm.bias"]).reshape(b, n * n, c)
    names = ("left_proj", "right_proj", "left_gate", "right_gate")
    weight = torch.cat([w[f"{name}.weight"] for name in names])
    p = torch.stack([weight @ xb.t() for xb in x]).view(b, 2, 2, h, n * n)
    ab = p[:, 0] * torch.sigmoid(p[:, 1]) * mask.view(b, 1, 1, n * n).to(x.dtype)
    z = torch.bmm(ab[:, 0].reshape(b * h, n, n), ab[:, 1].reshape(b * h, n, n).transpose(1, 2))
    z = z.view(b, h, n, n).permute(0, 2, 3, 1)
    gate = torch.sigmoid(F.linear(x, w["out_gate.weight"])).view(b, n, n, h)
    z = F.layer_norm(z, (h,), w["to_out_norm.weight"], w["to_out_norm.bias"]).mul_(gate)
    return F.linear(z, w["to_out.weight"])
'''

#: Incoming edges (sum over the first index) instead of outgoing: a plausible, wrong, kernel.
INCOMING_CODE = BASELINE_CODE.replace('"... i k d, ... j k d -> ... i j d"', '"... k i d, ... k j d -> ... i j d"')

CACHING_CODE = (
    BASELINE_CODE
    + """
_seen = []


def custom_kernel(data):
    if not _seen:
        _seen.append(reference_trimul(data))
    return _seen[0]
"""
)

SLEEP_CODE = "import time\n\ndef custom_kernel(data):\n    time.sleep(1000)\n"

#: Few repetitions: the tests check verdicts, not speed.
QUICK = {"warmup": 1, "reps": 2}


def reply(code: str) -> str:
    return f"Here is my kernel.\n```python\n{code}\n```\n"


def slow_trimul(data) -> np.ndarray:
    """The update written out with explicit loops over (b, i, j, k) in float64."""
    x, mask, w, _ = data
    x, mask = x.double().numpy(), mask.double().numpy()
    w = {k: v.double().numpy() for k, v in w.items()}
    batch, n, _, c = x.shape
    h = w["left_proj.weight"].shape[0]

    def layer_norm(v, gain, bias):
        centred = v - v.mean()
        return centred / math.sqrt((centred**2).mean() + 1e-5) * gain + bias

    def sigmoid(v):
        return 1.0 / (1.0 + np.exp(-v))

    left, right, gate = (np.zeros((batch, n, n, h)) for _ in range(3))
    for b in range(batch):
        for i in range(n):
            for j in range(n):
                v = layer_norm(x[b, i, j], w["norm.weight"], w["norm.bias"])
                left[b, i, j] = mask[b, i, j] * (w["left_proj.weight"] @ v) * sigmoid(w["left_gate.weight"] @ v)
                right[b, i, j] = mask[b, i, j] * (w["right_proj.weight"] @ v) * sigmoid(w["right_gate.weight"] @ v)
                gate[b, i, j] = sigmoid(w["out_gate.weight"] @ v)
    out = np.zeros((batch, n, n, c))
    for b in range(batch):
        for i in range(n):
            for j in range(n):
                z = np.zeros(h)
                for k in range(n):
                    z += left[b, i, k] * right[b, j, k]
                z = layer_norm(z, w["to_out_norm.weight"], w["to_out_norm.bias"]) * gate[b, i, j]
                out[b, i, j] = w["to_out.weight"] @ z
    return out


def small(**spec) -> dict:
    return {"seqlen": 6, "bs": 2, "dim": 8, "hidden_dim": 4, "nomask": False, "distribution": "normal", **spec}


@pytest.mark.parametrize(
    "spec", [small(), small(seqlen=7, bs=1, dim=4, hidden_dim=6, nomask=True, distribution="cauchy")]
)
def test_reference_matches_slow_loop_implementation(spec):
    data = make_inputs(spec, 3, "cpu")
    np.testing.assert_allclose(reference_trimul(data).double().numpy(), slow_trimul(data), rtol=1e-4, atol=1e-5)


def test_reference_is_the_gpumode_template_module(tmp_path, monkeypatch):
    (tmp_path / "task.py").write_text(TASK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location("gpumode_template", DATA / "gpumode_template.py")
    template = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(template)
    data = make_inputs(CPU_SHAPES[0], 7, "cpu")
    torch.testing.assert_close(template.custom_kernel(data), reference_trimul(data), rtol=1e-6, atol=1e-6)


def test_inputs_follow_gpumode_names_shapes_and_distributions():
    spec = small(seqlen=64, dim=16, hidden_dim=8)
    x, mask, weights, config = make_inputs(spec, 1, "cpu")
    assert config == {"dim": 16, "hidden_dim": 8}
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        k: tuple(config[d] for d in dims) for k, dims in WEIGHT_SHAPES.items()
    }
    assert x.dtype == torch.float32 and x.shape == (2, 64, 64, 16)
    assert not mask.is_floating_point() and set(mask.unique().tolist()) == {0, 1}
    assert 0.4 < mask.float().mean() < 0.6
    assert torch.equal(make_inputs(dict(spec, nomask=True), 1, "cpu")[1], torch.ones(2, 64, 64))
    cauchy = make_inputs(dict(spec, distribution="cauchy"), 1, "cpu")[0]
    assert 1.8 < cauchy.abs().median() < 2.2  # median |x| of Cauchy(0, 2) is 2
    assert 0.6 < x.abs().median() < 0.75  # of N(0, 1): 0.674


def test_inputs_are_reproducible_per_seed_and_fresh_across_seeds():
    first, again, other = (make_inputs(CPU_SHAPES[0], seed, "cpu") for seed in (1, 1, 2))
    assert torch.equal(first[0], again[0]) and torch.equal(first[2]["to_out.weight"], again[2]["to_out.weight"])
    assert not torch.equal(first[0], other[0])


def gpumode_shapes(kind: str) -> list[dict]:
    """GPUMode's official `tests` or `benchmarks` (tests/data/trimul/gpumode_shapes.json), without their seeds."""
    rows = json.loads((DATA / "gpumode_shapes.json").read_text())[kind]
    keys = ("seqlen", "bs", "dim", "hidden_dim", "seed", "nomask", "distribution")
    return [{k: v for k, v in zip(keys, row, strict=True) if k != "seed"} for row in rows]


def test_official_shapes_are_gpumodes_ranked_benchmarks():
    assert list(CUDA_SHAPES) == gpumode_shapes("benchmarks")


def test_official_test_shapes_are_gpumodes_eighteen_and_checked_only_on_cuda():
    assert list(CUDA_TEST_SHAPES) == gpumode_shapes("tests")
    cuda = TriMul(device="cuda")
    assert cuda.test_shapes == list(CUDA_TEST_SHAPES) and cuda.shapes == list(CUDA_SHAPES)
    prompt = cuda.statement()
    assert "Before any timing, your output is checked once (untimed) on each of these test shapes:" in prompt
    assert prompt.count("- bs=") == len(CUDA_TEST_SHAPES) + len(CUDA_SHAPES)
    cpu = TriMul(device="cpu")
    assert cpu.test_shapes == [] and cpu.shapes == list(CPU_SHAPES) and "test shapes" not in cpu.statement()


#: Two tiny test shapes before one timed shape: the CUDA order, exercised on CPU.
TEST_SHAPES = [small(seqlen=5, bs=1), small(seqlen=7, nomask=True, distribution="cauchy")]


def wrong_only_at(seqlen: int) -> str:
    """A kernel right on every shape but those of sequence length `seqlen`, where it computes incoming edges."""
    return (
        INCOMING_CODE.replace("def custom_kernel(data):", "def incoming(data):")
        + "\n\n"
        + BASELINE_CODE.replace("def reference_trimul(data):", "def outgoing(data):").replace(
            "    return reference_trimul(data)",
            f"    return (incoming if data[0].shape[1] == {seqlen} else outgoing)(data)",
        )
    )


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, int]]:
    """Every worker call of an evaluation, in order: ("reference" or "candidate", shape index)."""
    made: list[tuple[str, int]] = []
    call = Worker.call

    def recording(self, index, seed, shape, deadline):
        made.append(("reference" if self.is_reference else "candidate", index))
        return call(self, index, seed, shape, deadline)

    monkeypatch.setattr(Worker, "call", recording)
    return made


def test_test_shapes_are_checked_once_untimed_before_any_timed_call(calls):
    problem = TriMul(shapes=[CPU_SHAPES[0]], test_shapes=TEST_SHAPES, warmup=1, reps=2)
    evaluation = problem.evaluate(reply(BASELINE_CODE), {})
    # Worker shape k is problem.shapes[k]; the test shapes follow them (indices 1 and 2 here).
    assert calls[:4] == [("reference", 1), ("candidate", 1), ("reference", 2), ("candidate", 2)]
    assert {index for _, index in calls[4:]} == {0} and len(calls[4:]) == 2 * 3
    assert evaluation.details["test_max_error"] == 0.0 and len(evaluation.details["shape_us"]) == 1


def test_kernel_wrong_only_on_a_test_shape_is_refused_before_timing(calls):
    problem = TriMul(shapes=[CPU_SHAPES[0]], test_shapes=TEST_SHAPES, reference_us=1.0, **QUICK)
    with pytest.raises(InvalidSolution, match=r"wrong output on test shape 1 .*checked before timing: max \|out"):
        problem.evaluate(reply(wrong_only_at(7)), {})
    assert all(index != 0 for _, index in calls)
    # The same kernel passes without the test shapes: the timed shape alone does not catch it.
    assert TriMul(shapes=[CPU_SHAPES[0]], **QUICK).evaluate(reply(wrong_only_at(7)), {}).score > 0


def test_check_output_names_the_worst_element():
    expected = np.zeros((1, 2, 2, 3))
    out = expected.astype(np.float32).copy()
    out[0, 1, 0, 2] = 0.5
    why, worst = check_output(out, expected, 2e-2, 2e-2)
    assert "(0, 1, 0, 2)" in why and worst == 0.5
    assert check_output(out * 0, expected, 2e-2, 2e-2) == (None, 0.0)


def test_check_output_in_chunks_finds_what_a_whole_comparison_finds(monkeypatch):
    monkeypatch.setattr(trimul_clock, "CHECK_CHUNK", 5)
    expected = np.ones((2, 3, 3, 2))
    out = expected.astype(np.float32).copy()
    out[0, 0, 0, 1] += 0.03  # chunk 0: beyond the tolerance (0.02 + 0.02), but not the worst
    out[1, 2, 1, 0] += 0.3  # chunk 6: the worst
    why, worst = check_output(out, expected, 2e-2, 2e-2)
    assert "at index (1, 2, 1, 0)" in why and worst == pytest.approx(0.3, rel=1e-6)
    out[1, 0, 2, 1] = np.nan  # a non-finite value in a later chunk is reported first
    assert check_output(out, expected, 2e-2, 2e-2) == (
        "custom_kernel returned a non-finite value at index (1, 0, 2, 1)",
        math.inf,
    )


def test_unmodified_gpumode_template_is_valid():
    evaluation = TriMul(**QUICK).evaluate(reply(TEMPLATE_CODE), {})
    assert evaluation.details["max_error"] < 1e-5
    assert evaluation.score > 0 and evaluation.reward > 0


def test_faster_candidate_is_valid():
    evaluation = TriMul(**QUICK).evaluate(reply(FAST_CODE), {})
    assert evaluation.details["max_error"] < 1e-3
    assert evaluation.code.strip() == FAST_CODE.strip()
    assert evaluation.reward == evaluation.details["speedup"] > 0


@pytest.mark.parametrize("into_sockets", [True, False], ids=["and-into-sockets", "files-only"])
def test_candidate_that_hunts_secrets_and_writes_its_own_report_gets_no_forged_score(into_sockets):
    code = FORGER_CODE.replace("FORGE_SOCKETS = True", f"FORGE_SOCKETS = {into_sockets}")
    try:
        evaluation = TriMul(**QUICK).evaluate(reply(code), {})
    except InvalidSolution as exc:
        assert into_sockets, f"the quiet forger computes the right output, yet: {exc}"
        return
    # Its report claims 0.001 us; a real call (socket round trip, inputs, kernel) takes far more than 1 us.
    assert not into_sockets
    assert evaluation.score > 1.0 and all(t > 1.0 for t in evaluation.details["shape_us"])


def test_wrong_candidate_is_rejected_with_its_worst_error():
    with pytest.raises(InvalidSolution, match=r"wrong output on shape 0 .*max \|out - ref\| = [0-9.]+; at index"):
        TriMul(reference_us=1.0, **QUICK).evaluate(reply(INCOMING_CODE), {})


def test_candidate_that_caches_its_first_output_is_rejected():
    with pytest.raises(InvalidSolution, match=r"wrong output on shape 0 .*repetition 1"):
        TriMul(reference_us=1.0, **QUICK).evaluate(reply(CACHING_CODE), {})


def test_candidate_using_more_than_one_core_is_rejected(monkeypatch):
    """The decision, given CPU time from the kernel that exceeds the wall time (the clock itself is below)."""
    monkeypatch.setattr(Worker, "_cpu_s", lambda self: 0.0 if self.is_reference else time.perf_counter() * 100)
    with pytest.raises(InvalidSolution, match="more than one core"):
        TriMul(reference_us=1.0, **QUICK).evaluate(reply(BASELINE_CODE), {})


def test_worker_cpu_clock_reads_another_process():
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        worker = object.__new__(Worker)
        worker.pid = child.pid
        deadline = time.monotonic() + 20
        while worker._cpu_s() < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0.3 <= worker._cpu_s() < 1.0
    finally:
        child.kill()
        child.wait()


TICKER_CODE = """
import subprocess
import sys

# A helper left running by the code: it counts in a file of the run folder (replaced whole), 100 times a second.
loop = (
    "import os, time\\nn = 0\\nwhile True:\\n    n += 1\\n    open('t', 'w').write(str(n))\\n"
    "    os.replace('t', 'ticks')\\n    time.sleep(0.01)"
)
subprocess.Popen(LAUNCHER + [sys.executable, "-c", loop], start_new_session=True)


def custom_kernel(data):
    return None
"""


def _has_freezer() -> bool:
    cgroups = Path("/proc/self/cgroup").read_text()
    return ":freezer:" in cgroups or Path("/sys/fs/cgroup/cgroup.controllers").exists()


@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param([], id="own-session"),
        # Issue 26: a nested user + PID namespace hid a helper from a freeze by PID namespace. The namespace filter
        # is off here, to test the freeze alone (it would stop the helper from starting).
        pytest.param(
            ["unshare", "-U", "-r", "-p", "-f"],
            id="nested-user-and-pid-namespace",
            marks=pytest.mark.skipif(not _has_freezer(), reason="no cgroup freezer here"),
        ),
    ],
)
def test_candidate_sandbox_is_stopped_while_the_reference_is_timed(launcher, monkeypatch):
    monkeypatch.setattr(sandbox, "namespace_filter_missing", lambda: "off for this test", raising=False)
    problem = TriMul(reference_us=1.0, **QUICK)
    config = {"device": "cpu", "shapes": problem.shapes, "visible_devices": None}
    worker = Worker(TICKER_CODE.replace("LAUNCHER", repr(launcher)), config, problem.limits)
    ticks = Path(worker.work) / "ticks"

    def count() -> int:
        time.sleep(0.3)
        return int(ticks.read_text())

    try:
        worker.connect(time.monotonic() + 60)
        deadline = time.monotonic() + 20
        while not ticks.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count() < count(), "the helper never ran"
        with worker.frozen():
            stopped = count()
            assert count() == stopped
        assert count() > stopped
    finally:
        worker.close()


#: Issue 26's forge as the red team ran it: a helper that burns a core only while the worker is stopped (SIGSTOP,
#: state T) or frozen (cgroup v1 freezer, state D), i.e. while the parent times the reference; it ends with the
#: worker. Its argument is the worker's PID.
SPIN_LOOP = """
import sys, time
stat = f"/proc/{sys.argv[1]}/stat"
while True:
    try:
        state = open(stat).read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        break
    if state in "tTD":
        end = time.perf_counter() + 0.002
        while time.perf_counter() < end:
            pass
    else:
        time.sleep(0.001)
"""

#: The reference's own code plus one spinning helper per core, started in a nested user + PID namespace (hidden
#: from a freeze that looks processes up by PID namespace) or, where the sandbox refuses that, as plain children
#: in sessions of their own.
SPINNERS_CODE = (
    f"""
import os
import subprocess
import sys

NESTED = ["unshare", "-U", "-r", "-p", "-f"]
try:
    refused = subprocess.run([*NESTED, "true"], capture_output=True, timeout=10).returncode != 0
except (OSError, subprocess.TimeoutExpired):
    refused = True
for _ in range(max(2, os.cpu_count() or 1)):
    argv = [sys.executable, "-c", {SPIN_LOOP!r}, str(os.getpid())]
    subprocess.Popen(
        argv if refused else NESTED + argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
"""
    + BASELINE_CODE
)


@pytest.mark.slow
@pytest.mark.skipif(not sandbox.bwrap_available(), reason="bubblewrap cannot run here (the sandbox a user gets)")
@pytest.mark.skipif(not _has_freezer(), reason="no cgroup freezer here")
def test_reference_plus_spinning_helpers_gets_no_speedup_over_itself():
    """Issue 26: the reference's code with helpers that spin while the reference is timed got a median 1.67x
    speed-up over the reference itself (5 runs). Now, in the default sandbox (bubblewrap, namespace filter on),
    the median of 5 runs stays within the reference's own noise (<= 1.1x); the same code without helpers is run
    5 times too, for that noise (printed, not asserted)."""
    env = gym.make("discover/TriMul-v0", device="cpu")
    env.reset(seed=0)
    speedups: dict[str, list[float]] = {"with helpers": [], "without": []}
    for _ in range(5):
        for name, code in (("with helpers", SPINNERS_CODE), ("without", BASELINE_CODE)):
            _, _, _, _, info = env.step(reply(code))
            assert info["valid"], info["error"]
            assert info["sandbox"] == "bwrap"
            speedups[name].append(info["speedup"])
    report = {name: (statistics.median(s), [round(x, 3) for x in s]) for name, s in speedups.items()}
    print(f"TriMul speed-up over the reference, median and runs: {report}")
    assert statistics.median(speedups["with helpers"]) <= 1.1, report


def test_candidate_that_runs_too_long_times_out():
    with pytest.raises(InvalidSolution, match=r"^timed out"):
        TriMul(reference_us=1.0, timeout_s=8, **QUICK).evaluate(reply(SLEEP_CODE), {})


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("x = 1", "does not define a function `custom_kernel`"),
        ("import not_a_module", "the code failed to load: ModuleNotFoundError"),
        ("def custom_kernel(data):\n    return data[1]", "custom_kernel returned a torch.int64 tensor"),
    ],
)
def test_broken_code_is_invalid_with_a_clear_message(code, message):
    with pytest.raises(InvalidSolution, match=message):
        TriMul(reference_us=1.0, **QUICK).evaluate(reply(code), {})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "tpu"}, "device must be"),
        ({"shapes": [{"bs": 1}]}, "shape must be a dict with keys"),
        ({"shapes": [dict(CPU_SHAPES[0], seqlen=0)]}, "seqlen must be a positive int"),
        ({"shapes": [dict(CPU_SHAPES[0], distribution="uniform")]}, "distribution must be one of"),
        ({"shapes": [dict(CPU_SHAPES[0], nomask=1)]}, "nomask must be True or False"),
        ({"reps": 0}, "reps >= 1"),
        ({"reference_us": -1.0}, "reference_us must be a positive time"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TriMul(**kwargs)


def test_reward_of_an_unmeasured_score_uses_the_calibration():
    assert TriMul(reference_us=300.0).reward(100.0) == 3.0


@pytest.fixture(scope="module")
def env():
    """One env for the contract tests: its start state (the baseline) is measured once and reused."""
    env = gym.make("discover/TriMul-v0", device="cpu", **QUICK)
    env.reset(seed=0)
    return env


def test_env_passes_gymnasium_checker(env):
    check_env(env.unwrapped, skip_render_check=True)


def test_prompt_shows_start_code_and_score(env):
    prompt, info = env.reset(seed=1)
    state = info["state"]
    assert state["code"] == BASELINE_CODE and state["construction"] is None
    assert "def custom_kernel(data):" in prompt and f"{state['score']:.1f} us" in prompt
    assert "from task import input_t, output_t" in prompt and '"to_out_norm.weight"' in prompt
    assert state["reward"] == env.unwrapped.problem.reward(state["score"]) > 0


@pytest.fixture(scope="module")
def fast_child(env):
    env.reset(seed=2)
    _, reward, terminated, truncated, info = env.step(reply(FAST_CODE))
    assert info["valid"] and info["error"] is None and terminated and not truncated, info["error"]
    return reward, info["next_state"]


def test_step_gives_a_restartable_state(env, fast_child):
    reward, child = fast_child
    assert child["code"].strip() == FAST_CODE.strip() and child["construction"] is None
    assert reward == child["reward"] > 0
    prompt, restarted = env.reset(options={"state": child})
    assert restarted["state"]["score"] == child["score"] and restarted["state"]["reward"] == reward
    assert "fused projection" in prompt


def test_state_restores_in_a_fresh_env_instance_of_the_same_process(fast_child):
    _, child = fast_child
    fresh = gym.make("discover/TriMul-v0", device="cpu", **QUICK)
    prompt, info = fresh.reset(options={"state": child})
    assert info["state"]["score"] == child["score"]
    assert math.isfinite(info["state"]["reward"]) and info["state"]["reward"] > 0
    assert fresh.unwrapped.problem.reference_us is not None and "fused projection" in prompt


def test_reset_from_tampered_state_is_rejected(env):
    _, info = env.reset(seed=3)
    tampered = dict(info["state"], score=info["state"]["score"] / 2)
    with pytest.raises(InvalidState, match="does not match the recomputed score"):
        env.reset(options={"state": tampered})


def test_state_from_another_instance_is_remeasured(env):
    _, info = env.reset(seed=4)
    other = TriMul(**QUICK)
    remeasured = other.rescore(info["state"])
    assert remeasured > 0 and remeasured != info["state"]["score"]
    assert other.rescore(dict(info["state"], score=remeasured)) == remeasured
    with pytest.raises(InvalidState, match="fails the TriMul check"):
        other.rescore(dict(info["state"], code=INCOMING_CODE))


def test_invalid_step_reports_the_error_and_failure_reward(env):
    env.reset(seed=5)
    _, reward, _, _, info = env.step("I would fuse the projections.")
    assert reward == 0.0 and not info["valid"] and info["next_state"] is None
    assert "no fenced ```python block" in info["error"]


def test_worker_program_is_built_from_this_module():
    source = trimul_clock.worker_source()
    compile(source, trimul_clock.WORKER_FILE, "exec")
    assert "def serve(" in source and "def make_inputs(" in source and "reference_trimul" not in source


def test_gpu_check_script_dry_run_prints_each_verdict(tmp_path):
    wrong = tmp_path / "wrong_at_seqlen_8.py"
    wrong.write_text(wrong_only_at(8))  # the dry run's second test shape
    argv = [
        sys.executable,
        str(GPU_CHECK),
        "--dry-run",
        "--warmup",
        "0",
        "--reps",
        "1",
        str(DATA / "gpumode_template.py"),
    ]
    done = subprocess.run([*argv, str(wrong)], capture_output=True, text=True, timeout=600)
    lines = done.stdout.splitlines()
    assert done.returncode == 1, done.stderr
    assert lines[0] == "TriMul on CPU (dry run): 2 test shapes (untimed, first), 1 timed shapes, warmup 0, reps 1"
    assert lines[1].startswith("reference (GPUMode): valid; ") and "0 on the test shapes" in lines[1]
    assert any(line.startswith("submission ") and "gpumode_template.py: valid; " in line for line in lines)
    assert f"submission {wrong}: INVALID: wrong output on test shape 1" in done.stdout


def test_gpu_check_script_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    done = subprocess.run([sys.executable, str(GPU_CHECK)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--dry-run" in done.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_script_passes_the_reference_and_template_on_cuda_official_shapes():
    done = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--warmup", "1", "--reps", "2"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "18 test shapes (untimed, first), 7 timed shapes" in done.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpumode_template_is_valid_on_cuda_official_shapes():
    evaluation = TriMul(device="cuda", **QUICK).evaluate(reply(TEMPLATE_CODE), {})
    assert evaluation.details["max_error"] < 2e-2 and evaluation.score > 0
