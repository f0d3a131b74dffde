"""Speed of LocalPolicy on the embedded SmolLM2-135M (CPU): sampling overhead against raw `generate`, and one
LoRA update step at batch 8.

Targets on 2 CPU cores: LocalPolicy.sample within 10% of raw `generate` at the same batch (~74 tokens/s at batch
8); one LoRA step on 8 x 128 tokens <= 5.5 s. CI runs each once with 16 tokens; real numbers:
    DISCOVER_BENCH_TOKENS=128 pytest tests/benchmarks/test_bench_policy.py --benchmark-enable
"""

from __future__ import annotations

import os

import pytest
import torch

from discover_agent.policy import LocalPolicy, PolicyConfig, Sample
from discover_agent.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.embedded

TOKENS = int(os.environ.get("DISCOVER_BENCH_TOKENS", "16"))
BATCH = 8
PROMPT = "Write a long, detailed story about a robot who learns to paint, chapter by chapter."


@pytest.fixture(scope="module")
def smollm2(embedded_model_dir) -> LocalPolicy:
    config = PolicyConfig(device="cpu", max_new_tokens=TOKENS, batch_size=BATCH)
    return LocalPolicy.from_pretrained(str(embedded_model_dir), config)


def record(benchmark, tokens: int) -> None:
    benchmark.extra_info["generated_tokens"] = tokens
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.mean


def test_bench_raw_generate_batch8(benchmark, smollm2):
    inputs = smollm2.tokenizer([smollm2.chat_prompt(PROMPT)] * BATCH, return_tensors="pt")

    def generate():
        with torch.no_grad():
            return smollm2.model.generate(
                **inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=TOKENS,
                pad_token_id=smollm2.tokenizer.pad_token_id,
            )  # fmt: skip

    out = benchmark.pedantic(generate, rounds=3, warmup_rounds=1)
    record(benchmark, BATCH * (out.shape[1] - inputs["input_ids"].shape[1]))


def test_bench_policy_sample_batch8(benchmark, smollm2):
    groups = benchmark.pedantic(smollm2.sample, args=([PROMPT], BATCH), rounds=3, warmup_rounds=1)
    assert len(groups[0]) == BATCH
    record(benchmark, BATCH * max(len(s.completion_ids) for s in groups[0]))


def test_bench_lora_step_batch8(benchmark, smollm2):
    prompt_ids = smollm2.tokenizer(smollm2.chat_prompt(PROMPT))["input_ids"]
    generator = torch.Generator().manual_seed(0)
    completions = torch.randint(100, len(smollm2.tokenizer), (BATCH, TOKENS), generator=generator).tolist()
    samples = [Sample("", prompt_ids, ids, [0.0] * TOKENS) for ids in completions]
    with torch.no_grad():
        logprobs, _ = smollm2.token_logprobs(samples)
    for sample, row in zip(samples, logprobs, strict=True):
        sample.logprobs = row.tolist()
    trainer = Trainer(smollm2, TrainerConfig(micro_batch_size=BATCH))
    advantages = [1.0, -1.0, 0.5, -0.5, 0.25, -0.25, 0.0, 0.0]
    metrics = benchmark.pedantic(trainer.step, args=(samples, advantages), rounds=3, warmup_rounds=1)
    assert metrics["tokens"] == BATCH * TOKENS
