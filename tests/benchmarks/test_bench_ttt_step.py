"""The headline figure of the fast loop: one default TTT step (sampling + evaluation + LoRA update, as `discover
run` does it) against plain transformers `generate` of the same number of replies and tokens from the same
prompt, in one run. The target is a ratio <= 1.0: learning should cost no more than the generation it learns from.

Minutes on 2 cores, so it runs only when benchmarking is enabled:
    pytest tests/benchmarks/test_bench_ttt_step.py --benchmark-enable
The ratios are in the generate benchmarks' `extra_info` ("ttt_step_over_generate", against `generate` on the LoRA
model; "ttt_step_over_merged_generate", against a merged plain copy) and printed with -s.
"""

from __future__ import annotations

import copy
import os

import gymnasium as gym
import pytest
import torch

import discover_envs  # noqa: F401 - registers the env ids
from discover_agent.agents import TTTDiscover, build_policy, construction_spec
from discover_agent.config import TTTConfig

pytestmark = [pytest.mark.embedded, pytest.mark.usefixtures("only_when_benchmarking")]

ENV = "discover/ErdosMinOverlap-v0"
ROUNDS = int(os.environ.get("DISCOVER_BENCH_ROUNDS", "2"))
#: The TTT step's mean time and tokens, read by the `generate` benchmark that follows it.
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(embedded_model_dir, tmp_path_factory):
    config = TTTConfig(env=ENV, steps=1, model=str(embedded_model_dir), device="cpu")
    env = gym.make(ENV, **config.resolved_env_kwargs()).unwrapped
    policy = build_policy(config, trainable=True, spec=construction_spec(env) if config.constrained else None)
    return config, env, policy, tmp_path_factory


def test_bench_default_ttt_step(benchmark, setup):
    config, _, policy, tmp = setup
    rounds = []

    def fresh_agent():
        out = tmp.mktemp("ttt-step")
        agent = TTTDiscover(TTTConfig(**{**config.to_dict(), "out": str(out)}), policy)
        return (agent,), {}

    def step(agent):
        result = agent.run(progress=False)
        rounds.append(result.tokens)
        return result

    result = benchmark.pedantic(step, setup=fresh_agent, rounds=ROUNDS)
    assert result.steps == 1 and result.rollouts == config.groups * config.group_size
    MEASURED.update(seconds=benchmark.stats.stats.mean, tokens=sum(rounds) / len(rounds))
    benchmark.extra_info.update(replies=result.rollouts, generated_tokens=result.tokens)


def test_bench_plain_generate_of_the_same_replies_and_tokens(benchmark, setup):
    """`generate` on the policy's LoRA model (the issue's baseline); the ratio is "ttt_step_over_generate"."""
    _bench_generate(benchmark, setup, lambda policy: policy.model, "generate")


def test_bench_plain_generate_on_the_merged_model(benchmark, setup):
    """The stricter baseline: `generate` on a plain copy with the adapter merged in (peft's `merge_and_unload`),
    so the baseline pays no LoRA wrappers either; the ratio is "ttt_step_over_merged_generate"."""
    _bench_generate(benchmark, setup, lambda policy: copy.deepcopy(policy.model).merge_and_unload(), "merged_generate")


def _bench_generate(benchmark, setup, model_of, name: str) -> None:
    """Time `generate` of the TTT step's replies and tokens from the same prompt, and the step's ratio to it."""
    if not MEASURED:
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
    ratio = MEASURED["seconds"] / benchmark.stats.stats.mean
    benchmark.extra_info.update(replies=replies, tokens_per_reply=per_reply, **{f"ttt_step_over_{name}": ratio})
    print(f"\nTTT step {MEASURED['seconds']:.1f} s / {name} {benchmark.stats.stats.mean:.1f} s = {ratio:.2f}")
