"""Cascade attention (each shared prompt read once per decode step) against plain SDPA over per-row caches."""

from __future__ import annotations

import pytest
import torch
from test_policy import PROMPTS, SEQUENCE_WIDE, perturbed
from tiny_model import build_model
from transformers import LlamaConfig, LlamaForCausalLM

from discover_agent import cascade
from discover_agent.cascade import CASCADE, cascade_cache


@pytest.mark.parametrize("per_kv", [1, 3])
def test_cascade_attention_equals_sdpa_over_each_rows_prompt_and_own_tokens(per_kv):
    """Rows of two prompts of different lengths, interleaved; grouped-query heads as in SmolLM2 (per_kv 3)."""
    gen = torch.Generator().manual_seed(0)
    kv_heads, dim, own = 2, 8, 5
    index = [1, 0, 1, 1, 0]
    shapes = [(1, kv_heads, length, dim) for length in (7, 12)]
    prompts = [[(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))] for shape in shapes]
    layer = cascade_cache(prompts, index, capacity=own).layers[0]
    keys, values = torch.randn((2, len(index), kv_heads, own, dim), generator=gen)
    layer.update(keys, values)
    query = torch.randn((len(index), kv_heads * per_kv, 1, dim), generator=gen)
    out = layer.attend(query, layer.keys, layer.values, scaling=0.3)
    for row, prompt in enumerate(index):
        k = torch.cat([prompts[prompt][0][0][0], keys[row]], 1).repeat_interleave(per_kv, 0)
        v = torch.cat([prompts[prompt][0][1][0], values[row]], 1).repeat_interleave(per_kv, 0)
        expected = torch.nn.functional.scaled_dot_product_attention(query[row], k, v, scale=0.3)  # [heads, 1, dim]
        torch.testing.assert_close(out[row, 0], expected[:, 0], atol=1e-6, rtol=1e-5)


def test_the_cache_fills_up_like_a_preallocated_one():
    prompt = [[(torch.zeros((1, 1, 3, 4)), torch.zeros((1, 1, 3, 4)))]]
    layer = cascade_cache(prompt, [0, 0], capacity=1).layers[0]
    layer.update(torch.ones((2, 1, 1, 4)), torch.ones((2, 1, 1, 4)))
    with pytest.raises(RuntimeError, match="decode cache full: 2 positions for a capacity of 1"):
        layer.update(torch.ones((2, 1, 1, 4)), torch.ones((2, 1, 1, 4)))


def test_a_switched_model_runs_plain_sdpa_where_no_cascade_is_given(tiny_tokenizer):
    """Training passes and prefills of a switched model are exactly SDPA's (same function, same masks)."""
    plain, switched = build_model(tiny_tokenizer), build_model(tiny_tokenizer)
    assert cascade.enable(switched) and switched.config._attn_implementation == CASCADE
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        assert torch.equal(
            plain(input_ids=ids, attention_mask=mask).logits, switched(input_ids=ids, attention_mask=mask).logits
        )


def test_models_on_other_attention_are_left_alone():
    config = LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, attn_implementation="eager",
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    assert not cascade.enable(model) and model.config._attn_implementation == "eager"


@pytest.mark.parametrize("config", [{}, {"temperature": 0.7, "batch_size": 4}])
def test_sampling_with_cascade_draws_the_replies_and_logprobs_of_per_row_caches(make_tiny_policy, config):
    """Prompts of different lengths (the per-row path pads and masks them) in one batch, with and without a
    grammar that computes only the allowed tokens' logits."""
    runs = []
    for on in (True, False):
        policy = perturbed(make_tiny_policy, **config)
        assert policy._cascade
        policy._cascade = on
        plain = policy.sample(PROMPTS, n=3)
        constrained = policy.sample(PROMPTS, n=3, constraint_spec=SEQUENCE_WIDE)
        runs.append([s for g in plain + constrained for s in g])
    assert [s.completion_ids for s in runs[0]] == [s.completion_ids for s in runs[1]]
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
