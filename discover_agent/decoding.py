"""How `LocalPolicy` draws replies, kept apart from its public sampling API.

Replies of one group share their prompt, so by default (`PolicyConfig.share_prefix`) each distinct prompt is
prefilled once and its keys/values are reused by the group's replies in a plain decode loop; the unshared path
(every reply recomputes its prompt, through `generate`) stays as the reference the tests compare with. Under a
grammar only the logits of the tokens it allows are computed (the unembedding is a fifth of SmolLM2's weights),
and with `reuse_prompts` each sample carries its prompt's keys/values with their autograd graph to the update.
Every path records each token's log-prob under the exact distribution it was drawn from.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
from peft import PeftModelForCausalLM
from transformers import (
    DynamicCache,
    DynamicLayer,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
)

from discover_agent import threads
from discover_agent.adapter import Head, MergedCopy, weights_version
from discover_agent.constraint_processor import row_index
from discover_agent.types import Sample, TokenConstraint

if TYPE_CHECKING:
    from discover_agent.policy import PolicyConfig

__all__ = ["Decoding", "KeptPrompt"]


class KeptPrompt:
    """A sampled prompt's differentiable keys/values per layer (all but its last token), tagged with the
    weights' version they were computed under; the replies drawn from the prompt share it, and one pass with
    grad under the same weights uses it (its backward frees the graph)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], version: tuple[int, ...]) -> None:
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] | None = layers
        self.version = version

    @property
    def held(self) -> bool:
        return self._layers is not None

    def renew(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Hold `layers` instead: the prompt run again, in a later micro-batch of the same call."""
        self._layers = layers

    def take(self, version: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The layers if they were made under `version` (None if stale or taken); never given twice."""
        layers, self._layers = self._layers, None
        return layers if version == self.version else None

    def release(self) -> None:
        self._layers = None


class _PreallocatedLayer(DynamicLayer):
    """A decode cache layer with room for `capacity` positions: each new token's keys/values are written in
    place instead of `torch.cat`-copying the whole layer every step (at batch 8 and ~800 positions that copy
    moves about as many bytes per step as reading SmolLM2's weights)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        shape = (*keys.shape[:2], capacity, keys.shape[-1])
        self._keys, self._values = keys.new_empty(shape), values.new_empty(shape)
        self._length = 0
        self.update(keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self._length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            raise RuntimeError(f"decode cache full: {end} positions for a capacity of {self._keys.shape[-2]}")
        self._keys[:, :, self._length : end] = key_states
        self._values[:, :, self._length : end] = value_states
        self._length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values


def _left_pad(states: torch.Tensor, gap: int) -> torch.Tensor:
    """Cached keys or values [1, heads, P, dim] with `gap` zero positions in front."""
    return torch.nn.functional.pad(states, (0, 0, gap, 0)) if gap else states


class _LogProbRecorder(LogitsProcessor):
    """Runs last in `generate`: the scores it sees are exactly those sampled from, so the log-prob of the
    token drawn at step t is read at step t+1 (from `input_ids`) — one [batch, vocab] row kept at a time."""

    def __init__(self) -> None:
        self.logprobs: list[torch.Tensor] = []
        self._pending: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._pending is not None:
            self._take(input_ids[:, -1])
        self._pending = scores.float().log_softmax(-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        assert self._pending is not None  # callers check: a row of scores is waiting for its drawn token
        self.logprobs.append(self._pending.gather(1, tokens[:, None]).squeeze(1))
        self._pending = None

    def finish(self, completions: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            self._take(completions[:, len(self.logprobs)])
        return torch.stack(self.logprobs, 1)


class _Subset(NamedTuple):
    """What decoding only the allowed tokens' logits needs: the grammar's allowed ids per row (from the
    tokens generated so far), the sampling model's head and the LoRA model's (for kept prompts)."""

    allowed_ids: Callable[[torch.Tensor], list[torch.Tensor]]
    head: Head
    lora_head: Head


class Decoding:
    """`LocalPolicy`'s sampling passes: `_decode_shared` (the default) and `_generate` (the reference)."""

    config: PolicyConfig
    device: torch.device
    model: PeftModelForCausalLM
    tokenizer: PreTrainedTokenizerBase
    eos_ids: list[int]
    progress: Callable[[int], None] | None
    _head: Head | None
    _sample_head: Head | None
    _sampler: MergedCopy | None

    @property
    def _sampling_model(self) -> PreTrainedModel | PeftModelForCausalLM:
        """What draws replies: the merged copy where there is one, else the LoRA model."""
        return self.model if self._sampler is None else self._sampler.model

    def _generate(self, rows: list[list[int]], constraint: TokenConstraint | None) -> list[Sample]:
        pad = self.tokenizer.pad_token_id
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention[i, width - len(ids) :] = 1
        recorder = _LogProbRecorder()
        processors = LogitsProcessorList()
        if constraint is not None:
            processors.append(constraint.logits_processor(width))
        if self.config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(self.config.temperature))
        processors.append(recorder)
        # Temperature is applied in `processors`, before the recorder; generate() itself must not warp.
        generation = GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=self.config.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=self.eos_ids,
        )
        model = self._sampling_model
        assert isinstance(model, GenerationMixin | PeftModelForCausalLM)  # a causal LM, or the adapter on one
        sequences = model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=generation,
            logits_processor=processors,
        ).cpu()
        completions = sequences[:, width:]
        return self._samples(rows, completions, recorder.finish(completions).cpu(), constraint)

    def _decode_shared(
        self, rows: list[list[int]], constraint: TokenConstraint | None, kept: dict[tuple[int, ...], KeptPrompt]
    ) -> list[Sample]:
        """The same draws as `_generate` (one multinomial over the batch per token, finished rows padded),
        but each distinct prompt is prefilled once and its keys/values are repeated for the rows that share
        it; then a plain decode loop, without `generate`'s per-token bookkeeping. `kept` gathers the call's
        kept prompts (one per prompt across its micro-batches), which the samples carry.

        Rows of one prompt need no attention mask (so SDPA also skips expanding grouped KV heads); prompts of
        different lengths are left-padded in the cache, as `_generate` pads them.
        """
        width = max(len(r) for r in rows)
        processors = self._processors(constraint)
        # With a grammar, only the logits of the tokens some row may take are computed (a few hundred of the
        # vocabulary: the unembedding is a fifth of SmolLM2's weights, read every token step).
        subset = self._subset(processors[0]) if constraint is not None else None
        cache, logits, attention = self._shared_prefill(rows, width, kept, subset)
        positions = torch.tensor([len(r) for r in rows], device=self.device)
        eos = torch.tensor(self.eos_ids, device=self.device)
        pad = torch.tensor(self.tokenizer.pad_token_id, device=self.device)
        running = torch.ones(len(rows), dtype=torch.bool, device=self.device)
        tokens: list[torch.Tensor] = []
        logprobs: list[torch.Tensor] = []
        generated = torch.zeros((len(rows), 0), dtype=torch.long, device=self.device)
        for step in range(self.config.max_new_tokens):
            if subset is not None:
                token, logprob = self._draw_allowed(logits, subset.allowed_ids(generated), subset.head.weight)
            else:
                # transformers annotates the legacy tensor types
                scores = processors(cast(torch.LongTensor, generated), cast(torch.FloatTensor, logits.float()))
                token = torch.multinomial(scores.softmax(-1), num_samples=1)
                logprob = scores.gather(1, token) - scores.logsumexp(-1, keepdim=True)
            logprobs.append(logprob.squeeze(1))
            token = torch.where(running, token.squeeze(1), pad)
            tokens.append(token)
            generated = torch.cat([generated, token[:, None]], dim=1)
            live = int(running.sum())
            running &= ~torch.isin(token, eos)
            if self.progress is not None:
                self.progress(live)
            if step + 1 == self.config.max_new_tokens or not bool(running.any()):
                break
            threads.adapt()
            if attention is not None:
                attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=1)
            forward = self._sampling_model if subset is None else subset.head.decoder
            out = forward(
                input_ids=token[:, None], position_ids=(positions + step)[:, None], attention_mask=attention,
                cache=cache, use_cache=True,
            )  # fmt: skip
            cache, logits = out.cache, (out.logits if subset is None else out.last_hidden_state)[:, -1]
        samples = self._samples(rows, torch.stack(tokens, 1).cpu(), torch.stack(logprobs, 1).cpu(), constraint)
        for sample in samples:
            sample.prompt_cache = kept.get(tuple(sample.prompt_ids))
        return samples

    def _subset(self, processor: LogitsProcessor) -> _Subset | None:
        """Decoding by allowed logits only, where the constraint's processor lists its allowed ids and both
        the sampling and the LoRA model have a plain head."""
        allowed_ids = getattr(processor, "allowed_ids", None)
        if allowed_ids is None or self._sample_head is None or self._head is None:
            return None
        return _Subset(allowed_ids, self._sample_head, self._head)

    def _draw_allowed(
        self, hidden: torch.Tensor, allowed: list[torch.Tensor], weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token [B, 1], its log-prob [B, 1]) from the last hidden states [B, H] and the unembedding `weight`,
        computing only the logits of the `allowed` ids of each row: the same draw as `torch.multinomial` on the
        masked full-vocabulary probabilities (it is argmax(p / q) with q ~ Exp(1) over the whole vocabulary,
        drawn here likewise), so replies equal the full-logits path's and `generate`'s for the same seed."""
        union = torch.unique(torch.cat(allowed)).to(self.device)
        rows = row_index(allowed).to(self.device)
        cols = torch.searchsorted(union, torch.cat(allowed).to(self.device))
        logits = (hidden @ weight[union].T).float()
        scores = torch.full_like(logits, -torch.inf)
        scores[rows, cols] = logits[rows, cols]
        if self.config.temperature != 1.0:
            scores = scores / self.config.temperature
        probs = torch.zeros((len(allowed), weight.shape[0]), dtype=scores.dtype, device=self.device)
        probs[:, union] = scores.softmax(-1)
        token = (probs / torch.empty_like(probs).exponential_()).argmax(-1, keepdim=True)
        at = torch.searchsorted(union, token)
        return token, scores.gather(1, at) - scores.logsumexp(-1, keepdim=True)

    def _shared_prefill(
        self,
        rows: list[list[int]],
        width: int,
        kept: dict[tuple[int, ...], KeptPrompt],
        subset: _Subset | None = None,
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor | None]:
        """(cache, next-token logits, attention mask or None) for `rows` with each distinct prompt run once;
        with `subset`, the decoder's last hidden states instead of logits. With `config.reuse_prompts` each
        prompt is run by the LoRA model with grad and put in `kept` for the trainer."""
        prompts: dict[tuple[int, ...], int] = {}
        index = [prompts.setdefault(tuple(r), len(prompts)) for r in rows]
        layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        last: list[torch.Tensor] = []
        keep = self.config.reuse_prompts and self.config.share_prefix and self.config.lora_dropout == 0
        for prompt in prompts:
            threads.adapt()
            ids = torch.tensor([prompt], device=self.device)
            graph = keep and len(prompt) > 1  # then the LoRA model itself runs the prompt, with grad
            with torch.enable_grad() if graph else nullcontext():
                if subset is not None:
                    out = (subset.lora_head if graph else subset.head).decoder(input_ids=ids, use_cache=True)
                    last.append(out.last_hidden_state[0, -1].detach())
                else:
                    model = self.model if graph else self._sampling_model
                    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                    last.append(out.logits[0, -1].detach())
                kv = [(k, v) for k, v, *_ in out.cache]
                if graph:  # sliced with grad on: a view taken under no_grad would cut the graph
                    prefix = [(k[:, :, :-1], v[:, :, :-1]) for k, v in kv]
                    if prompt in kept:
                        kept[prompt].renew(prefix)
                    else:
                        kept[prompt] = KeptPrompt(prefix, weights_version(self.model))
            # Left-pad each prompt's keys/values to the batch width (the padded slots are masked below).
            gap = width - len(prompt)
            layers.append([(_left_pad(k.detach(), gap), _left_pad(v.detach(), gap)) for k, v in kv])
        select = torch.tensor(index, device=self.device)
        data = [
            (torch.cat([p[layer][0] for p in layers])[select], torch.cat([p[layer][1] for p in layers])[select])
            for layer in range(len(layers[0]))
        ]  # fmt: skip
        attention = None
        if any(len(r) != width for r in rows):
            attention = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
            for i, r in enumerate(rows):
                attention[i, width - len(r) :] = 1
        cache = DynamicCache()
        cache.layers = [_PreallocatedLayer(k, v, width + self.config.max_new_tokens) for k, v in data]
        return cache, torch.stack(last)[select], attention

    def _processors(self, constraint: TokenConstraint | None) -> LogitsProcessorList:
        """Constraint mask, then temperature: the distribution every token is drawn from and recorded under.
        The constraint's processor sees only the generated tokens (prompt length 0)."""
        processors = LogitsProcessorList()
        if constraint is not None:
            processors.append(constraint.logits_processor(0))
        if self.config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(self.config.temperature))
        return processors

    def _samples(
        self,
        rows: list[list[int]],
        completions: torch.Tensor,
        logprobs: torch.Tensor,
        constraint: TokenConstraint | None,
    ) -> list[Sample]:
        """Cut each row at its first EOS (kept) and decode it into a `Sample`."""
        eos = torch.isin(completions, torch.tensor(self.eos_ids))
        prefix, suffix = ("", "") if constraint is None else (constraint.prefix, constraint.suffix)
        samples = []
        for i, prompt_ids in enumerate(rows):
            stops = eos[i].nonzero()
            length = int(stops[0]) + 1 if len(stops) else completions.shape[1]
            ids = completions[i, :length].tolist()
            body = cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))  # one sequence: one string
            samples.append(
                Sample(
                    text=prefix + body + suffix,
                    prompt_ids=list(prompt_ids),
                    completion_ids=ids,
                    logprobs=logprobs[i, :length].tolist(),
                    temperature=self.config.temperature,
                    constraint=constraint,
                )
            )
        return samples
