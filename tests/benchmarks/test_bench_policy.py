"""Prefix sharing on the embedded SmolLM2-135M (CPU), against the unshared reference path in the same run:
sampling and the LoRA update separately, at 2 groups x 4 and 1 group x 8 replies from Erdős prompts (~654
tokens, as in the default `discover run`).

Each case takes tens of seconds on 2 cores, so they run only when benchmarking is enabled:
    DISCOVER_BENCH_TOKENS=145 pytest tests/benchmarks/test_bench_policy.py --benchmark-enable
(145 tokens per reply is the default run's average.) `extra_info` holds tokens/s and the prompt length.
"""

from __future__ import annotations

import os

import gymnasium as gym
import pytest
import torch

import discover_envs  # noqa: F401 - registers the env ids
from discover_agent.policy import LocalPolicy, PolicyConfig
from discover_agent.trainer import Trainer, TrainerConfig
from discover_agent.types import Sample

pytestmark = [pytest.mark.embedded, pytest.mark.usefixtures("only_when_benchmarking")]

TOKENS = int(os.environ.get("DISCOVER_BENCH_TOKENS", "32"))
ROUNDS = int(os.environ.get("DISCOVER_BENCH_ROUNDS", "2"))
SHAPES = {"2x4": (2, 4), "1x8": (1, 8)}


@pytest.fixture(scope="module")
def smollm2(embedded_model_dir) -> LocalPolicy:
    config = PolicyConfig(device="cpu", max_new_tokens=TOKENS, batch_size=8)
    return LocalPolicy.from_pretrained(str(embedded_model_dir), config)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Two different start states of the default env, as two groups of a step would see them."""
    env = gym.make("discover/ErdosMinOverlap-v0", n=16)
    first, second = env.reset(seed=0)[0], env.reset(seed=1)[0]
    assert first != second
    return [first, second]


def completions(policy: LocalPolicy, prompts: list[str], groups: int, size: int) -> list[Sample]:
    """`groups` x `size` replies of exactly TOKENS random tokens, with their true log-probs recorded."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for prompt in prompts[:groups]:
        prompt_ids = policy.tokenizer(policy.chat_prompt(prompt), add_special_tokens=False)["input_ids"]
        for ids in torch.randint(100, len(policy.tokenizer), (size, TOKENS), generator=generator).tolist():
            samples.append(Sample("", prompt_ids, ids, [0.0] * TOKENS))
    with torch.no_grad():
        logprobs, _ = policy.token_logprobs(samples)
    for sample, row in zip(samples, logprobs, strict=True):
        sample.logprobs = row.tolist()
    return samples


@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bench_sampling(benchmark, smollm2, prompts, shape, share):
    groups, size = SHAPES[shape]
    smollm2.config.share_prefix = share
    result = benchmark.pedantic(smollm2.sample_groups, args=(prompts[:groups], [size] * groups), rounds=ROUNDS)
    tokens = sum(len(s.completion_ids) for g in result for s in g)
    benchmark.extra_info.update(generated_tokens=tokens, tokens_per_s=tokens / benchmark.stats.stats.mean)


@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bench_lora_update(benchmark, smollm2, prompts, shape, share):
    groups, size = SHAPES[shape]
    smollm2.config.share_prefix = share
    samples = completions(smollm2, prompts, groups, size)
    trainer = Trainer(smollm2, TrainerConfig(micro_batch_size=8))
    advantages = [1.0, -1.0, 0.5, -0.5, 0.25, -0.25, 0.0, 0.0]
    metrics = benchmark.pedantic(trainer.step, args=(samples, advantages), rounds=ROUNDS)
    assert metrics["trained_tokens"] == groups * size * TOKENS
    benchmark.extra_info.update(prompt_tokens=len(samples[0].prompt_ids), trained_tokens=metrics["trained_tokens"])
