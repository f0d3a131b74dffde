"""The headline figures of the fast loop, in one run: one default TTT step (sampling + evaluation + LoRA update,
as `discover run` does it) on a quiet machine with the thread governor (`discover_agent.threads`, what the CLI
uses), with torch fixed at 1 thread, and with the governor beside one busy loop of normal priority; then plain
transformers `generate` of the same number of replies and tokens from the same prompt. Targets: the loaded
step <= 1.15 x the 1-thread step ("loaded_over_one_thread"), and the step <= 0.7 x `generate`.

Minutes on 2 cores, so it runs only when benchmarking is enabled (take it with nothing else running):
    pytest -s tests/benchmarks/test_bench_ttt_step.py --benchmark-enable
The ratios are in `extra_info` and printed with -s: "loaded_over_one_thread" on the loaded step,
"ttt_step_over_generate" (against `generate` on the LoRA model) and "ttt_step_over_merged_generate" (against a
merged plain copy) on the generate benchmarks.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import gymnasium as gym
import pytest
import torch

import discover_envs  # noqa: F401 - registers the env ids
from discover_agent import threads
from discover_agent.agents import build_policy, construction_spec
from discover_agent.config import TTTConfig
from discover_agent.ttt import TTTDiscover

pytestmark = [pytest.mark.embedded, pytest.mark.usefixtures("only_when_benchmarking")]

ENV = "discover/ErdosMinOverlap-v0"
ROUNDS = int(os.environ.get("DISCOVER_BENCH_ROUNDS", "2"))
#: Mean seconds of the TTT step per condition, and its tokens; read by the benchmarks that follow.
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(embedded_model_dir, tmp_path_factory):
    config = TTTConfig(env=ENV, steps=1, model=str(embedded_model_dir), device="cpu")
    env = gym.make(ENV, **config.resolved_env_kwargs()).unwrapped
    policy = build_policy(config, trainable=True, spec=construction_spec(env) if config.constrained else None)
    return config, env, policy, tmp_path_factory


@contextmanager
def condition(name: str) -> Iterator[None]:
    """quiet: the governor, as the CLI runs; one_thread: torch fixed at 1 thread, no governor; loaded: the
    governor beside a busy loop of normal priority (a second process, as a bench beside a bench)."""
    saved = torch.get_num_threads()
    busy = None
    if name == "one_thread":
        torch.set_num_threads(1)
    else:
        threads.govern()
    if name == "loaded":
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        threads.stop()
        torch.set_num_threads(saved)


def _bench_step(benchmark, setup, name: str) -> None:
    config, _, policy, tmp = setup
    tokens = []

    def fresh_agent():
        out = tmp.mktemp("ttt-step")
        agent = TTTDiscover(TTTConfig(**{**config.to_dict(), "out": str(out)}), policy)
        return (agent,), {}

    def step(agent):
        result = agent.run(progress=False)
        tokens.append(result.tokens)
        return result

    with condition(name):
        result = benchmark.pedantic(step, setup=fresh_agent, rounds=ROUNDS)
    assert result.steps == 1 and result.rollouts == config.groups * config.group_size
    MEASURED[name] = benchmark.stats.stats.mean
    MEASURED.setdefault("tokens", sum(tokens) / len(tokens))
    benchmark.extra_info.update(replies=result.rollouts, generated_tokens=result.tokens)
    if name == "loaded" and "one_thread" in MEASURED:
        ratio = MEASURED["loaded"] / MEASURED["one_thread"]
        benchmark.extra_info["loaded_over_one_thread"] = ratio
        print(f"\nTTT step loaded {MEASURED['loaded']:.1f} s / 1 thread {MEASURED['one_thread']:.1f} s = {ratio:.2f}")


def test_bench_default_ttt_step(benchmark, setup):
    _bench_step(benchmark, setup, "quiet")


def test_bench_ttt_step_on_one_thread(benchmark, setup):
    _bench_step(benchmark, setup, "one_thread")


def test_bench_ttt_step_beside_a_busy_loop(benchmark, setup):
    _bench_step(benchmark, setup, "loaded")


def test_bench_plain_generate_of_the_same_replies_and_tokens(benchmark, setup):
    """`generate` on the policy's LoRA model (the issue's baseline); the ratio is "ttt_step_over_generate"."""
    _bench_generate(benchmark, setup, lambda policy: policy.model, "generate")


def test_bench_plain_generate_on_the_merged_model(benchmark, setup):
    """The stricter baseline: `generate` on a plain copy with the adapter merged in (peft's `merge_and_unload`),
    so the baseline pays no LoRA wrappers either; the ratio is "ttt_step_over_merged_generate"."""
    _bench_generate(benchmark, setup, lambda policy: copy.deepcopy(policy.model).merge_and_unload(), "merged_generate")


def _bench_generate(benchmark, setup, model_of, name: str) -> None:
    """Time `generate` of the TTT step's replies and tokens from the same prompt, and the step's ratio to it."""
    if "quiet" not in MEASURED:
        pytest.skip("needs test_bench_default_ttt_step to run first")
    config, env, policy, _ = setup
    model = model_of(policy)
    replies = config.groups * config.group_size
    per_reply = max(1, round(MEASURED["tokens"] / replies))
    prompt = policy.chat_prompt(env.reset(seed=config.seed)[0])
    inputs = policy.tokenizer([prompt] * replies, return_tensors="pt", add_special_tokens=False)

    def generate():
        with torch.no_grad():
            return model.generate(
                **inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=per_reply,
                max_new_tokens=per_reply, pad_token_id=policy.tokenizer.pad_token_id,
            )  # fmt: skip

    benchmark.pedantic(generate, rounds=ROUNDS)
    ratio = MEASURED["quiet"] / benchmark.stats.stats.mean
    benchmark.extra_info.update(replies=replies, tokens_per_reply=per_reply, **{f"ttt_step_over_{name}": ratio})
    print(f"\nTTT step {MEASURED['quiet']:.1f} s / {name} {benchmark.stats.stats.mean:.1f} s = {ratio:.2f}")
