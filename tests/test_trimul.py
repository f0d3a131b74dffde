"""TriMul env: the reference against a slow loop, the harness's verdicts (speed, wrong output, caching, threads,
forgery, timeout) and the Gymnasium contract. Each sandbox run costs a torch import (~3 s), so runs are few."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import discover_envs  # noqa: F401 - registers the ids
from discover_envs.problem import InvalidSolution, InvalidState
from discover_envs.problems.trimul import BASELINE_CODE, CPU_SHAPES, TriMul, make_inputs, reference_trimul

FAST_CODE = '''
import torch
import torch.nn.functional as F


def custom_kernel(data):
    """One fused projection per batch straight into channel-major layout, then one bmm for the product."""
    x, mask, w, cfg = data
    b, n, _, c = x.shape
    h = w["left_proj"].shape[0]
    x = F.layer_norm(x, (c,), w["norm_in.weight"], w["norm_in.bias"]).reshape(b, n * n, c)
    weight = torch.cat([w["left_proj"], w["right_proj"], w["left_gate"], w["right_gate"]])
    p = torch.stack([weight @ xb.t() for xb in x]).view(b, 2, 2, h, n * n)
    ab = p[:, 0] * torch.sigmoid(p[:, 1])
    if cfg["masked"]:
        ab *= mask.view(b, 1, 1, n * n)
    z = torch.bmm(ab[:, 0].reshape(b * h, n, n), ab[:, 1].reshape(b * h, n, n).transpose(1, 2))
    z = z.view(b, h, n, n).permute(0, 2, 3, 1)
    gate = torch.sigmoid(F.linear(x, w["out_gate"])).view(b, n, n, h)
    z = F.layer_norm(z, (h,), w["norm_out.weight"], w["norm_out.bias"]).mul_(gate)
    return F.linear(z, w["out_proj"])
'''

#: Incoming edges (sum over the first index) instead of outgoing: a plausible, wrong, kernel.
INCOMING_CODE = BASELINE_CODE.replace('"bikh,bjkh->bijh"', '"bkih,bkjh->bijh"')

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

THREADS_CODE = (
    BASELINE_CODE
    + """
import threading
import time


def custom_kernel(data):
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    return reference_trimul(data)
"""
)

FORGED_CODE = """
import json, os
report = {"nonce": "guess", "shapes": [{"candidate_us": 1.0, "reference_us": 1e6, "max_error": 0.0}] * 3}
with open("result.json", "w") as fh:
    json.dump({"ok": True, "kind": "json", "value": json.dumps(report)}, fh)
os._exit(0)
"""

SLEEP_CODE = "import time\n\ndef custom_kernel(data):\n    time.sleep(1000)\n"


def reply(code: str) -> str:
    return f"Here is my kernel.\n```python\n{code}\n```\n"


def slow_trimul(data) -> np.ndarray:
    """The update written out with explicit loops over (b, i, j, k) in float64."""
    x, mask, w, _ = data
    x, mask = x.double().numpy(), mask.double().numpy()
    w = {k: v.double().numpy() for k, v in w.items()}
    batch, n, _, c = x.shape
    h = w["left_proj"].shape[0]

    def layer_norm(v, gain, bias):
        centred = v - v.mean()
        return centred / math.sqrt((centred**2).mean() + 1e-5) * gain + bias

    def sigmoid(v):
        return 1.0 / (1.0 + np.exp(-v))

    left, right, gate = (np.zeros((batch, n, n, h)) for _ in range(3))
    for b in range(batch):
        for i in range(n):
            for j in range(n):
                v = layer_norm(x[b, i, j], w["norm_in.weight"], w["norm_in.bias"])
                left[b, i, j] = mask[b, i, j] * (w["left_proj"] @ v) * sigmoid(w["left_gate"] @ v)
                right[b, i, j] = mask[b, i, j] * (w["right_proj"] @ v) * sigmoid(w["right_gate"] @ v)
                gate[b, i, j] = sigmoid(w["out_gate"] @ v)
    out = np.zeros((batch, n, n, c))
    for b in range(batch):
        for i in range(n):
            for j in range(n):
                z = np.zeros(h)
                for k in range(n):
                    z += left[b, i, k] * right[b, j, k]
                z = layer_norm(z, w["norm_out.weight"], w["norm_out.bias"]) * gate[b, i, j]
                out[b, i, j] = w["out_proj"] @ z
    return out


@pytest.mark.parametrize(
    "spec",
    [
        {"batch": 2, "seq_len": 6, "dim": 8, "hidden_dim": 4, "masked": True, "distribution": "normal"},
        {"batch": 1, "seq_len": 7, "dim": 4, "hidden_dim": 6, "masked": False, "distribution": "cauchy"},
    ],
)
def test_reference_matches_slow_loop_implementation(spec):
    data = make_inputs(spec, 3, "cpu")
    np.testing.assert_allclose(reference_trimul(data).double().numpy(), slow_trimul(data), rtol=1e-4, atol=1e-5)


def test_inputs_are_reproducible_per_seed_and_fresh_across_seeds():
    spec = CPU_SHAPES[0]
    first, again, other = (make_inputs(spec, seed, "cpu") for seed in (1, 1, 2))
    assert torch.equal(first[0], again[0]) and torch.equal(first[2]["out_proj"], again[2]["out_proj"])
    assert not torch.equal(first[0], other[0])
    assert set(first[1].unique().tolist()) == {0.0, 1.0}


def test_faster_candidate_scores_above_one():
    problem = TriMul()
    evaluation = problem.evaluate(reply(FAST_CODE), {})
    assert evaluation.reward > 1.0, evaluation.details
    assert evaluation.details["speedup"] > 1.0
    assert evaluation.details["max_error"] < 1e-3
    assert evaluation.code.strip() == FAST_CODE.strip()


def test_wrong_candidate_is_rejected_with_its_worst_error():
    with pytest.raises(InvalidSolution, match=r"wrong output on shape 0 .*max \|out - ref\| = [0-9.]+; at index"):
        TriMul(reference_us=1.0).evaluate(reply(INCOMING_CODE), {})


def test_candidate_that_caches_its_first_output_is_rejected():
    with pytest.raises(InvalidSolution, match=r"wrong output on shape 0 .*repetition 1"):
        TriMul(reference_us=1.0).evaluate(reply(CACHING_CODE), {})


def test_candidate_that_starts_threads_is_rejected():
    with pytest.raises(InvalidSolution, match="threads"):
        TriMul(reference_us=1.0).evaluate(reply(THREADS_CODE), {})


def test_result_forged_by_the_candidate_is_rejected():
    with pytest.raises(InvalidSolution, match="nonce"):
        TriMul(reference_us=1.0).evaluate(reply(FORGED_CODE), {})


def test_candidate_that_runs_too_long_times_out():
    with pytest.raises(InvalidSolution, match=r"^timed out"):
        TriMul(reference_us=1.0, timeout_s=5).evaluate(reply(SLEEP_CODE), {})


def test_code_without_custom_kernel_is_invalid():
    with pytest.raises(InvalidSolution, match="does not define a function `custom_kernel`"):
        TriMul(reference_us=1.0).evaluate(reply("x = 1"), {})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "tpu"}, "device must be"),
        ({"shapes": [{"batch": 1}]}, "shape must be a dict with keys"),
        ({"shapes": [dict(CPU_SHAPES[0], seq_len=0)]}, "seq_len must be a positive int"),
        ({"shapes": [dict(CPU_SHAPES[0], distribution="uniform")]}, "distribution must be one of"),
        ({"reps": 0}, "reps >= 1"),
        ({"reference_us": -1.0}, "reference_us must be a positive time"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TriMul(**kwargs)


def test_reward_of_an_unmeasured_score_needs_a_calibration():
    with pytest.raises(RuntimeError, match="uncalibrated"):
        TriMul().reward(100.0)
    assert TriMul(reference_us=300.0).reward(100.0) == 3.0


@pytest.fixture(scope="module")
def env():
    """One env for the contract tests: its start state (the baseline) is measured once and reused."""
    env = gym.make("discover/TriMul-v0", device="cpu")
    env.reset(seed=0)
    return env


def test_env_passes_gymnasium_checker(env):
    check_env(env.unwrapped, skip_render_check=True)


def test_prompt_shows_start_code_and_score(env):
    prompt, info = env.reset(seed=1)
    state = info["state"]
    assert state["code"] == BASELINE_CODE and state["construction"] is None
    assert "def custom_kernel(data):" in prompt and f"{state['score']:.1f} us" in prompt
    assert state["reward"] == env.unwrapped.problem.reward(state["score"]) > 0


def test_step_gives_a_restartable_state(env):
    env.reset(seed=2)
    _, reward, terminated, truncated, info = env.step(reply(FAST_CODE))
    assert info["valid"] and info["error"] is None and terminated and not truncated
    child = info["next_state"]
    assert child["code"].strip() == FAST_CODE.strip() and child["construction"] is None
    assert reward == child["reward"] == info["speedup"] > 0 and info["score"] == child["score"]
    prompt, restarted = env.reset(options={"state": child})
    assert restarted["state"]["score"] == child["score"] and restarted["state"]["reward"] == reward
    assert "fused projection" in prompt


def test_reset_from_tampered_state_is_rejected(env):
    _, info = env.reset(seed=3)
    tampered = dict(info["state"], score=info["state"]["score"] / 2)
    with pytest.raises(InvalidState, match="does not match the recomputed score"):
        env.reset(options={"state": tampered})


def test_state_from_another_instance_is_remeasured(env):
    _, info = env.reset(seed=4)
    other = TriMul()
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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_faster_candidate_is_valid_on_cuda():
    problem = TriMul(device="cuda")
    evaluation = problem.evaluate(reply(FAST_CODE), {})
    assert evaluation.details["max_error"] < 2e-2 and evaluation.score > 0
    assert problem.limits.isolation == "none"
