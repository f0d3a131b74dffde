"""Trainer: an importance-sampled, KL-shaped policy-gradient step on the LoRA weights only."""

from __future__ import annotations

import pytest
import torch
from tiny_model import CountingConstraint

from discover_agent.policy import LocalPolicy, Sample
from discover_agent.trainer import Trainer, TrainerConfig
from discover_envs.problem import ConstructionSpec

PROMPTS = ["short", "a longer prompt with numbers 0.5, 0.25 and [1.0, 0.75]"]


def sequence_logprobs(policy: LocalPolicy, samples: list[Sample]) -> torch.Tensor:
    with torch.no_grad():
        logp, _ = policy.token_logprobs(samples)
    return logp.sum(-1)


def lora_state(policy: LocalPolicy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" in n}


def test_step_raises_the_best_reply_and_lowers_the_worst(make_tiny_policy):
    policy = make_tiny_policy(max_new_tokens=8)
    samples = [s for group in policy.sample(PROMPTS, n=2) for s in group]
    advantages = [1.5, -0.5, 0.0, -1.0]
    before = sequence_logprobs(policy, samples)
    metrics = Trainer(policy, TrainerConfig(lr=1e-2, kl_coef=0.1)).step(samples, advantages)
    change = sequence_logprobs(policy, samples) - before
    assert change[0] > 0 and change[3] < 0
    assert metrics["tokens"] == sum(len(s.completion_ids) for s in samples)
    assert set(metrics) >= {"loss", "kl", "grad_norm", "ratio", "tokens", "seconds"}


def test_first_step_is_on_policy_ratio_one_and_zero_kl(make_tiny_policy):
    policy = make_tiny_policy()
    samples = [s for group in policy.sample(PROMPTS, n=2) for s in group]
    metrics = Trainer(policy, TrainerConfig(lr=1e-2)).step(samples, [1.0, -1.0, 0.5, -0.5])
    assert metrics["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the identity (B = 0)
    assert metrics["grad_norm"] > 0


def test_training_changes_only_the_adapter_and_the_base_model_stays_original(make_tiny_policy, tiny_tokenizer):
    policy = make_tiny_policy()
    ids = torch.tensor([[5, 9, 14, 20, 33]])
    with torch.no_grad():
        original = policy.model(input_ids=ids).logits
    frozen = {n: p.detach().clone() for n, p in policy.model.named_parameters() if not p.requires_grad}
    trainer = Trainer(policy, TrainerConfig(lr=1e-2))
    for _ in range(2):
        samples = [s for group in policy.sample(PROMPTS, n=2) for s in group]
        trainer.step(samples, [1.0, -1.0, 0.5, -0.5])
    assert all(torch.equal(p, frozen[n]) for n, p in policy.model.named_parameters() if not p.requires_grad)
    assert {n for n, p in policy.model.named_parameters() if p.requires_grad} == set(lora_state(policy))
    with torch.no_grad():
        assert not torch.allclose(policy.model(input_ids=ids).logits, original)
        with policy.model.disable_adapter():
            torch.testing.assert_close(policy.model(input_ids=ids).logits, original)


def test_micro_batches_give_the_same_update_as_one_batch(make_tiny_policy):
    whole, split = make_tiny_policy(), make_tiny_policy()
    samples = [s for group in whole.sample(PROMPTS, n=3) for s in group]
    advantages = [1.0, -0.5, 0.2, -1.0, 0.8, -0.5]
    for policy in (whole, split):  # a first update, so the second has a non-zero KL term to centre
        Trainer(policy, TrainerConfig(lr=1e-2, micro_batch_size=6)).step(samples, advantages)
    one = Trainer(whole, TrainerConfig(lr=1e-2, kl_coef=0.5, micro_batch_size=6)).step(samples, advantages[::-1])
    many = Trainer(split, TrainerConfig(lr=1e-2, kl_coef=0.5, micro_batch_size=4)).step(samples, advantages[::-1])
    assert one["kl"] != 0
    for key in ("loss", "kl", "grad_norm", "ratio"):
        assert many[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7)
    # Adam's first step is ~lr * sign(grad): float noise in near-zero gradients moves a weight by < 1% of lr.
    for name, value in lora_state(whole).items():
        torch.testing.assert_close(lora_state(split)[name], value, atol=1e-4, rtol=0)


def test_constrained_samples_train_on_the_constrained_distribution(make_tiny_policy):
    policy = make_tiny_policy(temperature=0.8)
    digits = [policy.tokenizer.convert_tokens_to_ids(c) for c in "0123456789"]
    policy._constraint_factory = lambda tokenizer, spec: CountingConstraint(tokenizer, digits, length=3)
    spec = ConstructionSpec("sequence", 1, 3, 0.0, 1.0)
    samples = [s for group in policy.sample(PROMPTS, n=2, constraint_spec=spec) for s in group]
    before = sequence_logprobs(policy, samples)
    metrics = Trainer(policy, TrainerConfig(lr=1e-2)).step(samples, [1.0, -1.0, 0.0, 0.0])
    # Unmasked, the recomputed log-probs would be far below the sampled ones and the ratio far from 1.
    assert metrics["ratio"] == pytest.approx(1.0, abs=1e-5)
    change = sequence_logprobs(policy, samples) - before
    assert change[0] > 0 and change[1] < 0


def test_bad_batches_are_rejected_with_the_reason(tiny_policy):
    trainer = Trainer(tiny_policy, TrainerConfig())
    [[sample]] = tiny_policy.sample(["hi"], n=1)
    with pytest.raises(ValueError, match="one advantage per sample"):
        trainer.step([sample], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        trainer.step([sample], [float("nan")])
    endpoint = Sample("text", [], [], [-0.5, -0.1])
    with pytest.raises(ValueError, match="log-probs for 0 tokens"):
        trainer.step([endpoint], [1.0])
    with pytest.raises(ValueError, match="kl_coef"):
        TrainerConfig(kl_coef=-1.0)
