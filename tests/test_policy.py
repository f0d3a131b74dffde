"""LocalPolicy: batched sampling with exact log-probs, seeds, chat template, constraints, loading, adapters."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from scipy.stats import chisquare
from tiny_model import CountingConstraint, build_model

from discover_agent.model import EMBEDDED_NAME, default_lora_rank, embedded_cache_dir, ensure_embedded_model
from discover_agent.policy import LocalPolicy, PolicyConfig
from discover_agent.types import Sample
from discover_envs.problem import ConstructionSpec

PROMPTS = ["short", "a much longer prompt with numbers 0.5, 0.25 and [1.0, 0.75] in it"]
SPEC = ConstructionSpec("sequence", 1, 3, 0.0, 1.0)
SEQUENCE_WIDE = ConstructionSpec("sequence", 3, 7, -2.0, 3.0)


def recompute_logprobs(policy: LocalPolicy, sample: Sample, masks: torch.Tensor | None = None) -> torch.Tensor:
    """Independent check: one unpadded forward pass over prompt + completion, one row at a time."""
    ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
    with torch.no_grad():
        logits = policy.model(input_ids=ids).logits[0, len(sample.prompt_ids) - 1 : -1] / sample.temperature
    if masks is not None:
        logits = logits.masked_fill(~masks, -torch.inf)
    return logits.log_softmax(-1).gather(-1, torch.tensor(sample.completion_ids)[:, None]).squeeze(-1)


def test_sample_gives_n_replies_per_prompt_with_one_logprob_per_token(tiny_policy):
    groups = tiny_policy.sample(PROMPTS, n=3)
    assert [len(g) for g in groups] == [3, 3]
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for s in group:
            assert s.prompt_ids == tiny_policy.tokenizer(tiny_policy.chat_prompt(prompt))["input_ids"]
            assert 1 <= len(s.completion_ids) <= tiny_policy.config.max_new_tokens
            assert len(s.logprobs) == len(s.completion_ids)
            assert all(lp <= 0 for lp in s.logprobs)
            assert s.text == tiny_policy.tokenizer.decode(s.completion_ids, skip_special_tokens=True)


def test_chat_template_wraps_the_prompt_as_the_user_turn(tiny_policy):
    sample = tiny_policy.sample(["hello there"], n=1)[0][0]
    prompt = tiny_policy.tokenizer.decode(sample.prompt_ids)
    assert prompt == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_a_forward_pass_recomputation(make_tiny_policy, temperature):
    # batch_size 3 over 2 prompts x 3 replies: left padding of mixed prompt lengths inside one batch.
    policy = make_tiny_policy(temperature=temperature, batch_size=3)
    samples = [s for group in policy.sample(PROMPTS, n=3) for s in group]
    for s in samples:
        torch.testing.assert_close(torch.tensor(s.logprobs), recompute_logprobs(policy, s), atol=1e-5, rtol=0)
    with torch.no_grad():
        batched, mask = policy.token_logprobs(samples)
    for i, s in enumerate(samples):
        assert int(mask[i].sum()) == len(s.completion_ids)
        torch.testing.assert_close(batched[i, mask[i]], torch.tensor(s.logprobs), atol=1e-5, rtol=0)


def test_same_seed_reproduces_samples_and_successive_calls_differ(make_tiny_policy):
    first, second = make_tiny_policy(seed=7), make_tiny_policy(seed=7)
    calls_a = [first.sample(PROMPTS, n=2) for _ in range(2)]
    calls_b = [second.sample(PROMPTS, n=2) for _ in range(2)]
    assert calls_a == calls_b
    assert calls_a[0] != calls_a[1]
    assert make_tiny_policy(seed=8).sample(PROMPTS, n=2) != calls_a[0]


def test_sampling_leaves_the_global_torch_rng_alone(tiny_policy):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_policy.sample(["hi"], n=2)
    torch.testing.assert_close(torch.rand(3), expected)


def test_constrained_reply_follows_the_grammar_and_logprobs_use_the_masked_distribution(make_tiny_policy):
    policy = make_tiny_policy(temperature=0.8, batch_size=3)
    digits = [policy.tokenizer.convert_tokens_to_ids(c) for c in "0123456789"]
    constraint = CountingConstraint(policy.tokenizer, digits, length=3)
    policy._constraint_factory = lambda tokenizer, spec: constraint
    samples = [s for group in policy.sample(PROMPTS, n=3, constraint_spec=SPEC) for s in group]
    for s in samples:
        assert s.completion_ids[:3] == [t for t in s.completion_ids[:3] if t in digits]
        assert s.completion_ids[3:] == [policy.tokenizer.eos_token_id]  # EOS forced, then generation stops
        assert policy.tokenizer.decode(s.prompt_ids).endswith("<|im_start|>assistant\n```json\n")
        body = policy.tokenizer.decode(s.completion_ids, skip_special_tokens=True)
        assert s.text == "```json\n" + body + "\n```"
        assert s.constraint is constraint
        masks = constraint.token_masks(s.completion_ids)
        torch.testing.assert_close(torch.tensor(s.logprobs), recompute_logprobs(policy, s, masks), atol=1e-5, rtol=0)
        assert s.logprobs[3] == pytest.approx(0.0, abs=1e-6)  # the forced EOS had probability 1
    with torch.no_grad():
        batched, mask = policy.token_logprobs(samples)
    expected = torch.tensor([lp for s in samples for lp in s.logprobs])
    torch.testing.assert_close(batched[mask], expected, atol=1e-5, rtol=0)


def test_constraint_is_built_once_per_spec(make_tiny_policy):
    policy = make_tiny_policy()
    built = []
    policy._constraint_factory = lambda tokenizer, spec: built.append(spec) or CountingConstraint(tokenizer, [5])
    policy.sample(["a"], n=1, constraint_spec=SPEC)
    policy.sample(["b"], n=1, constraint_spec=SPEC)
    assert built == [SPEC]


def test_token_logprobs_rejects_a_token_its_constraint_forbids(tiny_policy):
    constraint = CountingConstraint(tiny_policy.tokenizer, [5, 6], length=2)
    bad = Sample("x", [1, 2, 3], [7, 5], [0.0, 0.0], constraint=constraint)
    with pytest.raises(ValueError, match="breaks the constraint"):
        tiny_policy.token_logprobs([bad])


def test_bad_sampling_arguments_are_rejected(tiny_policy):
    with pytest.raises(TypeError, match="list of strings"):
        tiny_policy.sample("not a list", n=1)
    with pytest.raises(ValueError, match="n \\(replies per prompt\\)"):
        tiny_policy.sample(["a"], n=0)
    with pytest.raises(ValueError, match="temperature"):
        PolicyConfig(temperature=0.0)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LocalPolicy.from_pretrained(str(missing), PolicyConfig(device="cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        LocalPolicy.from_pretrained(str(tmp_path / "empty"), PolicyConfig(device="cpu"))


def test_local_folder_loads_with_the_cpu_default_lora_rank(tiny_tokenizer, tmp_path, one_thread):
    build_model(tiny_tokenizer).save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    policy = LocalPolicy.from_pretrained(str(tmp_path / "tiny"), PolicyConfig(device="cpu", max_new_tokens=4))
    assert policy.model.peft_config["default"].r == default_lora_rank(torch.device("cpu")) == 8
    assert policy.model.peft_config["default"].lora_alpha == 16
    assert default_lora_rank(torch.device("cuda")) == 32
    assert len(policy.sample(["hi"], n=2)[0]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when there is no GPU")
def test_asking_for_cuda_without_a_gpu_is_an_error(tiny_tokenizer):
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        LocalPolicy(build_model(tiny_tokenizer), tiny_tokenizer, PolicyConfig(device="cuda"))


def perturb_adapter(policy: LocalPolicy, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def logits(policy: LocalPolicy) -> torch.Tensor:
    with torch.no_grad():
        return policy.model(input_ids=torch.tensor([[5, 9, 14, 20, 33]])).logits


def test_adapter_save_load_round_trip_restores_the_logits(make_tiny_policy, tmp_path):
    trained, fresh = make_tiny_policy(), make_tiny_policy()
    perturb_adapter(trained, seed=1)
    trained.save_adapter(tmp_path / "adapter")
    perturb_adapter(trained, seed=2)
    trained.save_adapter(tmp_path / "adapter")  # replaces the first save
    assert not torch.allclose(logits(fresh), logits(trained))
    fresh.load_adapter(tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh), logits(trained))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folders left behind


def test_loading_an_adapter_of_another_rank_is_rejected(make_tiny_policy, tmp_path):
    make_tiny_policy(lora_rank=4).save_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match="rank 4"):
        make_tiny_policy(lora_rank=8).load_adapter(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="no saved adapter"):
        make_tiny_policy().load_adapter(tmp_path / "nowhere")


def test_cache_dir_follows_discover_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DISCOVER_CACHE", str(tmp_path))
    assert embedded_cache_dir() == tmp_path / EMBEDDED_NAME
    monkeypatch.delenv("DISCOVER_CACHE")
    assert embedded_cache_dir() == Path.home() / ".cache" / "discover" / EMBEDDED_NAME


@pytest.mark.embedded
def test_embedded_model_is_converted_once_and_then_loads_offline(embedded_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = json.loads((embedded_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (embedded_model_dir / "model.safetensors").is_file()
    assert [p.name for p in embedded_model_dir.parent.iterdir()] == [EMBEDDED_NAME]  # no temp folder left
    stamp = (embedded_model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_embedded_model(embedded_model_dir) == embedded_model_dir
    assert (embedded_model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    policy = LocalPolicy.from_pretrained(str(embedded_model_dir), PolicyConfig(device="cpu", max_new_tokens=8))
    [[sample]] = policy.sample(["What is 2 + 2?"], n=1)
    assert "<|im_start|>assistant\n" in policy.tokenizer.decode(sample.prompt_ids)
    assert 1 <= len(sample.completion_ids) <= 8 and isinstance(sample.text, str)


def perturbed(make_tiny_policy, **config) -> LocalPolicy:
    """A policy whose adapter is not the identity, so the prompt's keys and values depend on it."""
    policy = make_tiny_policy(**config)
    perturb_adapter(policy, seed=1)
    return policy


@pytest.mark.parametrize("grammar", [False, True])
def test_a_reply_does_not_depend_on_its_batch(make_tiny_policy, grammar):
    """Each row draws from its own stream and leaves the batch when it ends: the same replies and log-probs at
    any batch size, with the cascade or per-row caches, with a constraint that may end a row at any token
    (full-vocabulary draws) or the JSON grammar (draws among its allowed ids)."""
    runs = []
    for batch_size, cascade in [(16, True), (3, True), (1, True), (4, False)]:
        policy = perturbed(make_tiny_policy, temperature=1.5, batch_size=batch_size, max_new_tokens=24)
        policy._cascade = cascade
        if not grammar:
            ids = [policy.tokenizer.convert_tokens_to_ids(c) for c in "0123456789"] + [policy.tokenizer.eos_token_id]
            constraint = CountingConstraint(policy.tokenizer, ids, length=24)
            policy._constraint_factory = lambda tokenizer, spec, constraint=constraint: constraint
        runs.append([s for g in policy.sample(PROMPTS, n=4, constraint_spec=SEQUENCE_WIDE) for s in g])
    for run in runs[1:]:
        assert [s.completion_ids for s in run] == [s.completion_ids for s in runs[0]]
        for a, b in zip(run, runs[0], strict=True):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert len({len(s.completion_ids) for s in runs[0]}) > 1  # rows ended at different steps


def draws_at(policy: LocalPolicy, spec: ConstructionSpec | None, n: int, position: int) -> tuple[Counter, torch.Tensor]:
    """How often each token was drawn at `position` in `n` replies to one prompt whose earlier tokens are all
    the same (forced), and the distribution it should follow: the softmax of the model's next-token logits
    there, over the grammar's allowed ids under `spec`."""
    policy.config.max_new_tokens = position + 1
    [group] = policy.sample([PROMPTS[1]], n=n, constraint_spec=spec)
    [before] = {tuple(s.completion_ids[:position]) for s in group}
    ids = torch.tensor([group[0].prompt_ids + list(before)])
    with torch.no_grad():
        logits = policy.model(input_ids=ids).logits[0, -1].double() / policy.config.temperature
    if spec is not None:
        allowed = policy.constraint(spec).token_allowed_ids(group[0].completion_ids)[position]
        logits = torch.full_like(logits, -torch.inf).index_copy(0, allowed, logits[allowed])
    return Counter(s.completion_ids[position] for s in group), logits.softmax(-1)


@pytest.mark.parametrize(
    ("spec", "position", "temperature"), [(None, 0, 0.3), (SEQUENCE_WIDE, 1, 1.0), (SEQUENCE_WIDE, 1, 0.6)]
)
def test_the_shared_path_draws_from_the_models_distribution(make_tiny_policy, spec, position, temperature):
    """Chi-square goodness of fit of 6000 draws against the model's (masked) next-token distribution, for
    full-vocabulary draws and for draws among the grammar's allowed ids only (after its forced "["). Checked
    by mutation: a sampler that scales the logits by 1.5 fails every case (p < 1e-4); the seed is fixed."""
    policy = make_tiny_policy(temperature=temperature, batch_size=1000)
    counts, probs = draws_at(policy, spec, n=6000, position=position)
    expected = probs * 6000
    frequent = expected >= 5  # cells with fewer expected draws are pooled into one
    observed = [counts.get(i, 0) for i in frequent.nonzero().squeeze(1).tolist()]
    cells = expected[frequent].tolist()
    if bool((probs[~frequent] > 0).any()):
        observed.append(6000 - sum(observed))
        cells.append(float(expected[~frequent].sum()))
    assert len(cells) >= 5 and set(counts) <= set(probs.nonzero().squeeze(1).tolist())
    assert chisquare(observed, cells).pvalue > 1e-4


def test_drawing_among_allowed_ids_only_records_the_full_logits_log_probs(make_tiny_policy):
    """Replies drawn from the allowed ids' logits alone carry the log-probs the full-vocabulary logits give
    them under the grammar's masks."""
    policy = perturbed(make_tiny_policy, temperature=0.8, batch_size=6)
    assert policy._head is not None  # a plain Llama head: the allowed-logits path is available
    samples = [s for g in policy.sample(PROMPTS, n=3, constraint_spec=SEQUENCE_WIDE) for s in g]
    constraint = policy.constraint(SEQUENCE_WIDE)
    for s in samples:
        masks = constraint.token_masks(s.completion_ids)
        torch.testing.assert_close(torch.tensor(s.logprobs), recompute_logprobs(policy, s, masks), atol=1e-5, rtol=0)
    assert len({tuple(s.completion_ids) for s in samples}) > 1


def kept(samples: list[Sample]) -> set[int]:
    """The distinct prompt caches the samples carry that still hold their keys/values."""
    return {id(s.prompt_cache) for s in samples if s.prompt_cache is not None and s.prompt_cache.held}


def test_prompts_kept_from_sampling_give_the_trainers_pass_the_same_logprobs_and_gradients(make_tiny_policy):
    policy = perturbed(make_tiny_policy, temperature=0.9, max_new_tokens=8, reuse_prompts=True)
    weights = torch.randn((6, 8), generator=torch.Generator().manual_seed(4))

    def pass_with_grad(samples):
        policy.model.zero_grad()
        logp, _ = policy.token_logprobs(samples)
        (logp * weights[:, : logp.shape[1]]).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
        return logp.detach(), grads

    samples = [s for group in policy.sample(PROMPTS, n=3) for s in group]
    assert len(kept(samples)) == 2  # one per prompt, shared by its replies
    with torch.no_grad():
        policy.token_logprobs(samples)  # a pass without grad (the base-model pass) leaves them for the trainer
    reused = pass_with_grad(samples)
    assert not kept(samples)  # used, and used once
    fresh = pass_with_grad(samples)  # recomputes each prompt
    torch.testing.assert_close(reused[0], fresh[0], atol=1e-5, rtol=0)
    assert reused[1].keys() == fresh[1].keys() and any("lora_A" in n for n in reused[1])
    for name, grad in fresh[1].items():
        torch.testing.assert_close(reused[1][name], grad, atol=1e-5, rtol=0)

    # After an optimiser step the kept keys/values are stale: they must not be used.
    samples = [s for group in policy.sample(PROMPTS, n=3) for s in group]
    with torch.no_grad():
        for p in policy.model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    assert len(kept(samples)) == 2
    after, _ = pass_with_grad(samples)
    assert not kept(samples)  # a stale one is dropped too
    torch.testing.assert_close(after, pass_with_grad(samples)[0], atol=1e-5, rtol=0)
    sampled = torch.tensor([s.logprobs + [0.0] * (after.shape[1] - len(s.logprobs)) for s in samples])
    assert not torch.allclose(after, sampled, atol=1e-3)  # the step changed the log-probs


@pytest.mark.parametrize("share", [True, False])
def test_training_logprobs_of_allowed_tokens_only_equal_full_logits_with_gradients(make_tiny_policy, share):
    policy = perturbed(make_tiny_policy, temperature=0.8, share_prefix=share)
    samples = [s for g in policy.sample(PROMPTS, n=3, constraint_spec=SEQUENCE_WIDE) for s in g]
    weights = torch.randn((len(samples), policy.config.max_new_tokens), generator=torch.Generator().manual_seed(5))
    head, results = policy._head, []
    for allowed_only in (True, False):
        policy._head = head if allowed_only else None
        assert (policy._allowed_head(samples) is not None) is allowed_only
        policy.model.zero_grad()
        logp, mask = policy.token_logprobs(samples)
        (logp * weights[:, : logp.shape[1]]).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad}
        results.append((logp.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    assert torch.isfinite(results[0][0]).all() and bool((results[0][0][mask] < 0).any())
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, atol=1e-5, rtol=0)


def test_sampling_from_the_merged_copy_follows_the_adapter_and_draws_what_the_lora_model_draws(make_tiny_policy):
    merged, lora = make_tiny_policy(temperature=0.9), make_tiny_policy(temperature=0.9, merged_sampling=False)
    assert merged._sampler is not None and lora._sampler is None
    assert not any(isinstance(m, LoraLayer) for m in merged._sampling_model.modules())  # no peft wrappers
    for policy in (merged, lora):
        policy.sample(PROMPTS, n=2)
        perturb_adapter(policy, seed=1)  # an update after the first sampling: the copy must be re-merged
    draws = [
        [s for g in policy.sample(PROMPTS, n=3, constraint_spec=SEQUENCE_WIDE) for s in g] for policy in (merged, lora)
    ]
    assert [s.completion_ids for s in draws[0]] == [s.completion_ids for s in draws[1]]
    with torch.no_grad():
        recomputed, mask = merged.token_logprobs(draws[0])  # the LoRA model, as the trainer computes them
    for i, (a, b) in enumerate(zip(*draws, strict=True)):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        torch.testing.assert_close(recomputed[i, mask[i]], torch.tensor(a.logprobs), atol=1e-5, rtol=0)


def test_an_adapted_unembedding_always_computes_full_logits(make_tiny_policy):
    policy = make_tiny_policy(lora_lm_head=True)
    assert policy._head is None and policy._sampler is None  # a merged, tied lm_head would move the embeddings


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prefix_training_logprobs_and_gradients_equal_the_unshared_path(make_tiny_policy, temperature):
    policy = perturbed(make_tiny_policy, temperature=temperature, max_new_tokens=8)
    samples = [s for group in policy.sample(PROMPTS, n=3) for s in group]
    samples = samples[::2] + samples[1::2]  # groups interleaved: rows must come back in the caller's order
    weights = torch.randn((len(samples), 8), generator=torch.Generator().manual_seed(3))
    results = []
    for share in (True, False):
        policy.config.share_prefix = share
        policy.model.zero_grad()
        logp, mask = policy.token_logprobs(samples)
        (logp * weights[:, : logp.shape[1]]).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
        results.append((logp.detach(), mask, grads))
    (shared, shared_mask, shared_grads), (ref, ref_mask, ref_grads) = results
    assert torch.equal(shared_mask, ref_mask)
    torch.testing.assert_close(shared, ref, atol=1e-5, rtol=0)
    assert shared_grads.keys() == ref_grads.keys() and len(ref_grads) > 0
    assert any(g.abs().max() > 1e-3 for g in ref_grads.values())
    for name, grad in ref_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_a_model_folders_generation_config_does_not_change_the_sampled_distribution(
    tiny_tokenizer, tmp_path, one_thread, share_prefix
):
    model = build_model(tiny_tokenizer)
    model.generation_config.update(do_sample=True, top_k=2, top_p=0.3, temperature=0.5)
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    config = PolicyConfig(device="cpu", max_new_tokens=12, batch_size=4, share_prefix=share_prefix)
    policy = LocalPolicy.from_pretrained(str(tmp_path / "tiny"), config)
    samples = [s for group in policy.sample(PROMPTS, n=4) for s in group]
    for s in samples:
        torch.testing.assert_close(torch.tensor(s.logprobs), recompute_logprobs(policy, s), atol=1e-5, rtol=0)
    # Under the folder's top_k=2 every drawn token would rank first or second; from the full distribution
    # of this near-uniform tiny model most do not.
    ranks = []
    for s in samples:
        with torch.no_grad():
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            logits = policy.model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1]
        drawn = logits.gather(-1, torch.tensor(s.completion_ids)[:, None])
        ranks.extend((logits > drawn).sum(-1).tolist())
    assert max(ranks) >= 2


def test_progress_hook_counts_the_rows_still_generating(make_tiny_policy):
    policy = make_tiny_policy(max_new_tokens=6)
    calls: list[int] = []
    policy.progress = calls.append
    groups = policy.sample(PROMPTS, n=2)
    assert sum(calls) == sum(len(s.completion_ids) for g in groups for s in g)
    assert 1 <= len(calls) <= 6  # one call per decode step of the single batch of 4 rows


def test_sample_groups_batches_groups_of_different_sizes_in_one_call(make_tiny_policy):
    policy = make_tiny_policy(batch_size=8)
    groups = policy.sample_groups(PROMPTS, [3, 1])
    assert [len(g) for g in groups] == [3, 1]
    for prompt, group in zip(PROMPTS, groups, strict=True):
        assert all(s.prompt_ids == policy.tokenizer(policy.chat_prompt(prompt))["input_ids"] for s in group)
    assert make_tiny_policy(seed=3).sample_groups(PROMPTS, [2, 2]) == make_tiny_policy(seed=3).sample(PROMPTS, n=2)
    with pytest.raises(ValueError, match="one group size"):
        policy.sample_groups(PROMPTS, [2])


def test_lora_starts_from_the_config_seed_not_the_global_generator(tiny_tokenizer, one_thread):
    """The A matrices are random: two policies with one seed start equal whatever the global generator did."""
    from tiny_model import build_model

    def lora_a(seed):
        policy = LocalPolicy(build_model(tiny_tokenizer), tiny_tokenizer, PolicyConfig(device="cpu", seed=seed))
        return [p.detach().clone() for n, p in policy.model.named_parameters() if "lora_A" in n]

    first = lora_a(0)
    torch.rand(1000)  # move the global generator on
    assert all(torch.equal(a, b) for a, b in zip(first, lora_a(0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, lora_a(1), strict=True))
