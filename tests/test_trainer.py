"""Trainer: an importance-sampled, KL-shaped policy-gradient step on the LoRA weights only."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_model import CountingConstraint

from discover_agent.policy import LocalPolicy
from discover_agent.trainer import Trainer, TrainerConfig, kl_shaped_advantages
from discover_agent.types import Sample
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
    assert metrics["trained_tokens"] == sum(len(s.completion_ids) for s in samples)
    assert set(metrics) >= {"loss", "kl", "grad_norm", "ratio", "trained_tokens", "seconds"}


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


@pytest.mark.parametrize("micro_batch_size", [6, 4])  # 4 splits the second group across two passes
def test_reusing_the_sampled_prompts_gives_the_same_update(make_tiny_policy, micro_batch_size):
    results = []
    for reuse in (True, False):
        policy = make_tiny_policy(reuse_prompts=reuse)
        trainer = Trainer(policy, TrainerConfig(lr=1e-2, kl_coef=0.5, micro_batch_size=micro_batch_size))
        for advantages in ([1.0, -0.5, 0.2, -1.0, 0.8, -0.5], [0.3, -0.1, 0.9, 0.5, -1.0, 0.4]):
            samples = [s for group in policy.sample(PROMPTS, n=3) for s in group]
            held = {id(s.prompt_cache) for s in samples if s.prompt_cache is not None and s.prompt_cache.held}
            assert len(held) == (2 if reuse else 0)
            metrics = trainer.step(samples, advantages, group_sizes=[3, 3])
            assert not any(s.prompt_cache.held for s in samples if s.prompt_cache is not None)  # released
        results.append((metrics, lora_state(policy)))
    for key in ("loss", "kl", "grad_norm", "ratio"):
        assert results[0][0][key] == pytest.approx(results[1][0][key], rel=1e-4, abs=1e-7)
    for name, value in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], value, atol=1e-4, rtol=0)


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


def test_defaults_follow_the_released_code():
    config = TrainerConfig()
    assert config.betas == (0.9, 0.95) and config.max_grad_norm is None
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainerConfig(max_grad_norm=0.0)
    with pytest.raises(ValueError, match="betas"):
        TrainerConfig(betas=(0.9, 1.0))


def test_adam_uses_the_configured_betas_and_clips_only_when_asked(make_tiny_policy):
    policy = make_tiny_policy()
    samples = [s for group in policy.sample(PROMPTS, n=2) for s in group]
    trainer = Trainer(policy, TrainerConfig(lr=1e-2, betas=(0.8, 0.9)))
    assert trainer.optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    unclipped = trainer.step(samples, [1.0, -1.0, 0.5, -0.5])["grad_norm"]
    clipped = Trainer(make_tiny_policy(), TrainerConfig(lr=1e-2, max_grad_norm=unclipped / 10))
    assert clipped.step(samples, [1.0, -1.0, 0.5, -0.5])["grad_norm"] == pytest.approx(unclipped, rel=1e-5)


def test_zero_kl_coef_skips_the_base_model_pass(make_tiny_policy, monkeypatch):
    policy = make_tiny_policy()
    samples = [s for group in policy.sample(PROMPTS, n=2) for s in group]
    passes = []
    original = policy.token_logprobs
    monkeypatch.setattr(policy, "token_logprobs", lambda chunk: passes.append(len(chunk)) or original(chunk))
    metrics = Trainer(policy, TrainerConfig(kl_coef=0.0)).step(samples, [1.0, -1.0, 0.5, -0.5])
    assert passes == [4] and "kl" not in metrics
    passes.clear()
    assert "kl" in Trainer(policy, TrainerConfig(kl_coef=0.1)).step(samples, [1.0, -1.0, 0.5, -0.5])
    assert passes == [4, 4]  # base model, then the differentiable pass


def test_groups_with_equal_rewards_are_left_out_and_all_constant_means_no_update(make_tiny_policy):
    samples = [s for group in make_tiny_policy().sample(PROMPTS, n=2) for s in group]
    with_constant, alone = make_tiny_policy(), make_tiny_policy()
    Trainer(with_constant, TrainerConfig(lr=1e-2)).step(samples, [1.0, -1.0, 0.0, 0.0], group_sizes=[2, 2])
    Trainer(alone, TrainerConfig(lr=1e-2)).step(samples[:2], [1.0, -1.0])
    for name, value in lora_state(alone).items():
        torch.testing.assert_close(lora_state(with_constant)[name], value, atol=1e-6, rtol=0)
    untouched = make_tiny_policy()
    before = lora_state(untouched)
    metrics = Trainer(untouched, TrainerConfig(lr=1e-2)).step(samples, [0.0] * 4, group_sizes=[2, 2])
    assert metrics["skipped"] == 1.0
    assert all(torch.equal(value, before[name]) for name, value in lora_state(untouched).items())
    with pytest.raises(ValueError, match="group_sizes"):
        Trainer(untouched).step(samples, [1.0, -1.0, 0.0, 0.0], group_sizes=[2, 1])


def test_state_dict_resumes_the_optimiser_exactly(make_tiny_policy, tmp_path):
    samples = [s for group in make_tiny_policy().sample(PROMPTS, n=2) for s in group]
    first, second = [1.0, -1.0, 0.5, -0.5], [-0.5, 1.0, -1.0, 0.5]
    uninterrupted = make_tiny_policy()
    trainer = Trainer(uninterrupted, TrainerConfig(lr=1e-2))
    trainer.step(samples, first)
    saved_state = trainer.state_dict()
    uninterrupted.save_adapter(tmp_path / "adapter")
    trainer.step(samples, second)
    resumed = make_tiny_policy()
    resumed.load_adapter(tmp_path / "adapter")
    restored = Trainer(resumed, TrainerConfig(lr=1e-2))
    restored.load_state_dict(saved_state)
    restored.step(samples, second)
    fresh = make_tiny_policy()
    fresh.load_adapter(tmp_path / "adapter")
    Trainer(fresh, TrainerConfig(lr=1e-2)).step(samples, second)  # without the moments: a different step
    for name, value in lora_state(uninterrupted).items():
        torch.testing.assert_close(lora_state(resumed)[name], value, atol=1e-7, rtol=0)
    assert any(not torch.allclose(lora_state(fresh)[n], v, atol=1e-6) for n, v in lora_state(uninterrupted).items())


def test_ttt_learns_a_learnable_task_while_an_untrained_policy_stays_flat(make_tiny_policy):
    """Reward: the fraction of reply tokens among the ids 4..103 (about a quarter of the vocabulary)."""
    from discover_agent.objective import entropic_advantages

    def mean_rewards(train: bool, steps: int = 12) -> list[float]:
        policy = make_tiny_policy(max_new_tokens=6, batch_size=16, lora_lm_head=True)
        trainer = Trainer(policy, TrainerConfig(lr=5e-2))
        means = []
        for _ in range(steps):
            groups = policy.sample(["short", "numbers"], n=8)
            rewards = [[sum(4 <= t < 104 for t in s.completion_ids) / len(s.completion_ids) for s in g] for g in groups]
            means.append(sum(map(sum, rewards)) / 16)
            if train:
                advantages = [a for r in rewards for a in entropic_advantages(r)[0]]
                trainer.step([s for g in groups for s in g], advantages, group_sizes=[8, 8])
        return means

    trained, untrained = mean_rewards(train=True), mean_rewards(train=False)
    assert trained[0] == untrained[0]  # same seed, same first step
    assert sum(trained[-3:]) / 3 > trained[0] + 0.4
    assert max(untrained[-3:]) < untrained[0] + 0.15


def test_kl_coefficient_is_the_tasks_where_the_paper_sets_one(tiny_policy):
    """The paper's lambda lives with the task (`Problem.kl_coef`, in env.metadata): 0.01 for the contests."""
    import gymnasium as gym

    from discover_agent.config import TTTConfig
    from discover_agent.trainer import DEFAULT_KL_COEF
    from discover_agent.ttt import build_trainer

    assert gym.make("discover/AHC039-v0").metadata["kl_coef"] == 0.01
    assert gym.make("discover/ErdosMinOverlap-v0", n=4).metadata["kl_coef"] == DEFAULT_KL_COEF == 0.1
    assert build_trainer(TTTConfig(), tiny_policy, 0.01).config.kl_coef == 0.01
    assert build_trainer(TTTConfig(), tiny_policy).config.kl_coef == DEFAULT_KL_COEF == TrainerConfig().kl_coef
    assert build_trainer(TTTConfig(kl_coef=0.5), tiny_policy, 0.01).config.kl_coef == 0.5


def test_learning_rate_defaults_to_the_sweeps_for_the_embedded_model_and_the_papers_otherwise(tiny_policy):
    from discover_agent.config import TTTConfig
    from discover_agent.trainer import EMBEDDED_LR, PAPER_LR, default_lr
    from discover_agent.ttt import build_trainer

    assert default_lr(None) == EMBEDDED_LR == 3e-4 and default_lr("/models/other") == PAPER_LR == 4e-5
    for model, lr in [(None, EMBEDDED_LR), ("/models/other", PAPER_LR)]:
        assert build_trainer(TTTConfig(model=model), tiny_policy).optimizer.param_groups[0]["lr"] == lr
    assert build_trainer(TTTConfig(lr=1e-3), tiny_policy).optimizer.param_groups[0]["lr"] == 1e-3


def test_the_embedded_model_given_by_path_gets_its_own_learning_rate(tmp_path, monkeypatch):
    """A converted embedded folder (with its marker) or the cache folder itself is the embedded model."""
    from discover_agent.model import EMBEDDED_MARKER
    from discover_agent.trainer import EMBEDDED_LR, PAPER_LR, default_lr

    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / EMBEDDED_MARKER).write_text("{}")
    monkeypatch.setenv("DISCOVER_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "smollm2-135m-instruct"
    assert default_lr(str(converted)) == default_lr(str(cache)) == EMBEDDED_LR
    assert default_lr(str(tmp_path / "other")) == PAPER_LR


def _kl_case():
    advantages = torch.tensor([1.0, -0.5])
    current = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.0, -3.0]], requires_grad=True)
    base = torch.tensor([[-1.5, -2.0, 0.0], [-1.0, -0.5, -math.inf]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    return advantages, current, base, mask


def test_kl_shaping_matches_hand_computation_and_zeroes_masked_tokens():
    advantages, current, base, mask = _kl_case()
    out = kl_shaped_advantages(advantages, current, base, mask, coef=0.1)
    # unmasked log-ratios: [0.5, 0.0] and [0.5, -0.5]; their mean is 0.125
    expected = torch.tensor(
        [
            [1.0 + 0.1 * (0.125 - 0.5), 1.0 + 0.1 * 0.125, 0.0],
            [-0.5 + 0.1 * (0.125 - 0.5), -0.5 + 0.1 * (0.125 + 0.5), 0.0],
        ]
    )
    torch.testing.assert_close(out, expected)
    assert not out.requires_grad


def test_kl_shaping_rejects_mismatched_shapes_and_non_bool_masks():
    advantages, current, base, mask = _kl_case()
    with pytest.raises(ValueError, match="logp_base"):
        kl_shaped_advantages(advantages, current, base[:, :2], mask)
    with pytest.raises(ValueError, match="bool"):
        kl_shaped_advantages(advantages, current, base, mask.float())
    with pytest.raises(ValueError, match=r"\[B\]"):
        kl_shaped_advantages(advantages[:, None], current, base, mask)
    with pytest.raises(ValueError, match="B=1"):
        kl_shaped_advantages(advantages[:1], current, base, mask)


def test_kl_shaping_with_everything_masked_returns_zeros():
    advantages, current, base, mask = _kl_case()
    out = kl_shaped_advantages(advantages, current, base, torch.zeros_like(mask))
    assert torch.equal(out, torch.zeros_like(out))
