"""How `LocalPolicy` recomputes its samples' log-probs for the trainer, kept apart from sampling.

`token_logprobs` rebuilds the distribution each token was drawn from (temperature-scaled, constraint-masked)
under the weights as they are now, for the trainer's importance ratios. With `PolicyConfig.share_prefix` each
distinct prompt runs once, or not at all where sampling kept its keys/values with their graph; under a grammar
that lists its allowed ids only those ids' logits are computed. The padded path (every row carries its prompt)
stays as the reference the tests compare with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from peft import PeftModelForCausalLM
from transformers import DynamicCache, DynamicLayer, PreTrainedTokenizerBase

from discover_agent.adapter import Head, weights_version
from discover_agent.constraint_processor import row_index
from discover_agent.decoding import KeptPrompt
from discover_agent.types import Sample, SubsetConstraint

if TYPE_CHECKING:
    from discover_agent.policy import PolicyConfig

__all__ = ["Scoring"]


def _prefix_groups(samples: Sequence[Sample]) -> list[list[int]]:
    """Indices of the samples that share a prompt, one list per distinct prompt, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(s.prompt_ids), []).append(i)
    return list(groups.values())


class Scoring:
    """`LocalPolicy`'s passes over sampled replies: `token_logprobs` and the kept prompts it consumes."""

    config: PolicyConfig
    device: torch.device
    model: PeftModelForCausalLM
    tokenizer: PreTrainedTokenizerBase
    _head: Head | None

    def token_logprobs(self, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs [B, T] of each sample's completion tokens under the model as it is now (adapter on unless
        inside `model.disable_adapter()`), at the sample's temperature and constraint masks, with the mask
        [B, T] of real tokens. Differentiable when grad is enabled.

        With `config.share_prefix` each distinct prompt is run once and its keys/values are expanded to the
        replies that share it (`_shared_token_logprobs`); otherwise every row carries its own copy of the
        prompt (`_padded_token_logprobs`, the reference the shared path is tested against).
        """
        samples = list(samples)
        if not samples or max(len(s.completion_ids) for s in samples) == 0:
            raise ValueError("the samples have no completion tokens")
        if self.config.share_prefix:
            return self._shared_token_logprobs(samples)
        return self._padded_token_logprobs(samples)

    def _padded_token_logprobs(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts left-padded to one width P, completions after them; logits are kept (`logits_to_keep`)
        only for the last T positions, so long prompts cost no vocabulary projection."""
        pad = self.tokenizer.pad_token_id
        width = max(len(s.prompt_ids) for s in samples)
        steps = max(len(s.completion_ids) for s in samples)
        input_ids = torch.full((len(samples), width + steps - 1), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, s in enumerate(samples):
            p, c = len(s.prompt_ids), len(s.completion_ids)
            input_ids[i, width - p : width] = torch.tensor(s.prompt_ids, dtype=torch.long)
            input_ids[i, width : width + c - 1] = torch.tensor(s.completion_ids[:-1], dtype=torch.long)
            attention[i, width - p : width + c - 1] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        inputs = {
            "input_ids": input_ids.to(self.device), "attention_mask": attention.to(self.device),
            "position_ids": positions.to(self.device),
        }  # fmt: skip
        head = self._allowed_head(samples)
        if head is not None:
            return self._completion_logprobs(head.decoder(**inputs).last_hidden_state[:, -steps:], samples, head)
        return self._completion_logprobs(self.model(**inputs, logits_to_keep=steps).logits, samples)

    def _shared_token_logprobs(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each distinct prompt once: its first P-1 tokens fill a cache (with grad, since the adapter changes
        the prompt's keys and values), which is repeated for the group's replies; the replies then run as
        [last prompt token, completion[:-1]] on it, right-padded (causal attention never sees the padding).
        Prompt work drops from B prompts to one per group, in the forward and the backward pass."""
        steps = max(len(s.completion_ids) for s in samples)
        rows: list[torch.Tensor] = []
        order: list[int] = []
        for members in _prefix_groups(samples):
            group = [samples[i] for i in members]
            prompt = torch.tensor(group[0].prompt_ids, dtype=torch.long, device=self.device)
            cache = None
            if len(prompt) > 1:
                cache = self._kept_prompt(group[0])
                if cache is None:
                    cache = self.model(input_ids=prompt[None, :-1], use_cache=True, logits_to_keep=1).cache
                cache.batch_repeat_interleave(len(group))
            width = max(len(s.completion_ids) for s in group)
            inputs = torch.full((len(group), width), int(prompt[-1]), dtype=torch.long)
            for i, s in enumerate(group):
                inputs[i, 1 : len(s.completion_ids)] = torch.tensor(s.completion_ids[:-1], dtype=torch.long)
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + width, device=self.device)
            head = self._allowed_head(group)
            out = (self.model if head is None else head.decoder)(
                input_ids=inputs.to(self.device),
                position_ids=positions.expand(len(group), -1),
                cache=cache,
                use_cache=cache is not None,
            )
            group_logp, _ = self._completion_logprobs(
                out.logits if head is None else out.last_hidden_state, group, head
            )
            rows.append(torch.nn.functional.pad(group_logp, (0, steps - width)))
            order.extend(members)
        logp = torch.cat(rows)[torch.tensor(order, device=self.device).argsort()]
        lengths = torch.tensor([len(s.completion_ids) for s in samples], device=self.device)
        return logp, torch.arange(steps, device=self.device) < lengths[:, None]

    def _kept_prompt(self, sample: Sample) -> DynamicCache | None:
        """The differentiable keys/values of the sample's prompt but its last token, kept when it was sampled,
        for a pass with grad under the same weights; used once (the backward frees them). The sampling prefill
        with grad costs little more than without, and the trainer's pass then skips the prompt's forward."""
        if not torch.is_grad_enabled():  # e.g. the trainer's base-model pass, which must not consume them
            return None
        kept = sample.prompt_cache
        layers = kept.take(weights_version(self.model)) if isinstance(kept, KeptPrompt) else None
        if layers is None:
            return None
        cache = DynamicCache()
        cache.layers = []
        for keys, values in layers:
            layer = DynamicLayer()
            layer.update(keys, values)
            cache.layers.append(layer)
        return cache

    def _allowed_head(self, samples: Sequence[Sample]) -> Head | None:
        """The plain head, where the trainer's passes can compute only the logits of the tokens the samples'
        grammar allowed (constraints that list those ids): `_completion_logprobs` then takes the decoder's
        hidden states instead of logits."""
        if all(isinstance(s.constraint, SubsetConstraint) for s in samples):
            return self._head
        return None

    def _completion_logprobs(
        self, values: torch.Tensor, samples: list[Sample], head: Head | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs [B, T] of the completion tokens from their logits [B, T, V] (row t predicts token t) and
        the mask of real tokens: temperature, constraint masks, then gather - logsumexp, which never
        materialises a second [B, T, V] log-softmax tensor. With `head` (from `_allowed_head`), `values` are the
        last hidden states [B, T, H] and only the logits of the allowed tokens are computed."""
        steps = values.shape[1]
        targets = torch.zeros((len(samples), steps), dtype=torch.long)
        mask = torch.zeros((len(samples), steps), dtype=torch.bool)
        for i, s in enumerate(samples):
            targets[i, : len(s.completion_ids)] = torch.tensor(s.completion_ids, dtype=torch.long)
            mask[i, : len(s.completion_ids)] = True
        targets, mask = targets.to(self.device), mask.to(self.device)
        allowed: torch.Tensor | None
        if head is not None:
            logits, allowed, targets = self._allowed_logits(values, samples, targets, head.weight)
        else:
            logits = values
            allowed = self._allowed(samples, steps, values.shape[-1]) if any(s.constraint for s in samples) else None
        logits = logits.float()
        temperatures = torch.tensor([s.temperature for s in samples], device=self.device)
        if bool((temperatures != 1.0).any()):
            logits = logits / temperatures[:, None, None]
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -torch.inf)
        logp = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
        return torch.where(mask, logp, torch.zeros_like(logp)), mask

    def _allowed_logits(
        self, hidden: torch.Tensor, samples: Sequence[Sample], targets: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [B, T, K] of the K ids any position allows, allowed mask [B, T, K], targets as indices into
        those K ids) from hidden states [B, T, H] and the unembedding `weight`. Positions past a completion
        allow every id (finite values, masked out of the result)."""
        per_sample: list[list[torch.Tensor]] = []
        for s in samples:
            assert isinstance(s.constraint, SubsetConstraint)  # `_allowed_head` checked every sample
            per_sample.append(s.constraint.token_allowed_ids(s.completion_ids))
        union = torch.unique(torch.cat([ids for ids_at in per_sample for ids in ids_at])).to(self.device)
        allowed = torch.zeros((*targets.shape, len(union)), dtype=torch.bool, device=self.device)
        for i, ids_at in enumerate(per_sample):
            if ids_at:
                cols = torch.searchsorted(union, torch.cat(ids_at).to(self.device))
                allowed[i, row_index(ids_at).to(self.device), cols] = True
            allowed[i, len(ids_at) :] = True
        index = torch.searchsorted(union, targets).clamp(max=len(union) - 1)
        return hidden @ weight[union].T, allowed, index

    def _allowed(self, samples: Sequence[Sample], steps: int, vocab: int) -> torch.Tensor:
        """[B, T, V] allowed tokens: the constraint's replayed masks (its `token_masks` rejects a completion
        that breaks the grammar) for constrained samples, all True for the others."""
        allowed = torch.ones((len(samples), steps, vocab), dtype=torch.bool, device=self.device)
        for i, s in enumerate(samples):
            if s.constraint is None or not s.completion_ids:
                continue
            rows = s.constraint.token_masks(s.completion_ids).to(self.device)
            if rows.shape[1] > vocab:
                raise ValueError(f"constraint masks cover {rows.shape[1]} tokens but the model has {vocab} logits")
            allowed[i, : rows.shape[0], : rows.shape[1]] = rows
            allowed[i, : rows.shape[0], rows.shape[1] :] = False
        return allowed
