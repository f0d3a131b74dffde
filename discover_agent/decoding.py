"""How `LocalPolicy` draws replies, kept apart from its public sampling API.

Replies of one group share their prompt, so by default (`PolicyConfig.share_prefix`) each distinct prompt is
prefilled once and its keys/values are reused by the group's replies in a plain decode loop, each reply drawn
from its own random stream; the unshared path (every reply recomputes its prompt, through `generate`) stays as
the reference the tests compare log-probs with. Under a
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
from discover_agent.cascade import PreallocatedLayer, cascade_cache
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


def _left_pad(states: torch.Tensor, gap: int) -> torch.Tensor:
    """Cached keys or values [1, heads, P, dim] with `gap` zero positions in front."""
    return torch.nn.functional.pad(states, (0, 0, gap, 0)) if gap else states


def _draw_row(scores: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [1], its log-prob [1]) drawn from one row's scores [K] (masked ones -inf) with `generator`:
    the one draw both decoding paths make, over the whole vocabulary or over a row's allowed ids."""
    pick = torch.multinomial(scores.softmax(-1), 1, generator=generator)
    return pick, scores.log_softmax(-1)[pick]


def _draw(scores: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [B], its log-prob [B]) from each row's scores [B, V], row i drawn from `generators[i]`."""
    picks, logprobs = zip(*(_draw_row(row, g) for row, g in zip(scores, generators, strict=True)), strict=True)
    return torch.cat(picks), torch.cat(logprobs)


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
    #: Whether the sampling model reads each shared prompt once per token step (`discover_agent.cascade`).
    _cascade: bool

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
        self,
        rows: list[list[int]],
        constraint: TokenConstraint | None,
        kept: dict[tuple[int, ...], KeptPrompt],
        seeds: list[int],
    ) -> list[Sample]:
        """Each distinct prompt is prefilled once and its keys/values serve the rows that share it; then a plain
        decode loop, without `generate`'s per-token bookkeeping. Row i draws from its own generator (`seeds[i]`),
        so its reply does not depend on which rows share its batch, and a row that ends leaves the batch: the
        loop computes only rows still generating. `kept` gathers the call's kept prompts (one per prompt across
        its micro-batches), which the samples carry.

        With the cascade the rows need no mask; otherwise prompts of different lengths are left-padded in the
        cache, as `_generate` pads them.
        """
        width = max(len(r) for r in rows)
        processors = self._processors(constraint)
        # With a grammar, only the logits of the tokens some row may take are computed (a few hundred of the
        # vocabulary: the unembedding is a fifth of SmolLM2's weights, read every token step).
        subset = self._subset(processors[0]) if constraint is not None else None
        cache, logits, attention = self._shared_prefill(rows, width, kept, subset)
        generators = [torch.Generator(self.device).manual_seed(seed) for seed in seeds]
        positions = torch.tensor([len(r) for r in rows], device=self.device)
        eos = torch.tensor(self.eos_ids, device=self.device)
        tokens = torch.full((len(rows), self.config.max_new_tokens), self.tokenizer.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((len(rows), self.config.max_new_tokens))
        live = torch.arange(len(rows))  # the original rows still generating, in batch order
        generated = torch.zeros((len(rows), 0), dtype=torch.long, device=self.device)
        forward = self._sampling_model if subset is None else subset.head.decoder
        extra = {"cascade": cache} if self._cascade else {}  # the cache object persists across steps
        for step in range(self.config.max_new_tokens):
            if subset is not None:
                allowed = subset.allowed_ids(generated)
                token, logprob = self._draw_allowed(logits, allowed, subset.head.weight, generators)
            else:
                # transformers annotates the legacy tensor types
                scores = processors(cast(torch.LongTensor, generated), cast(torch.FloatTensor, logits.float()))
                token, logprob = _draw(scores, generators)
            tokens[live, step], logprobs[live, step] = token.cpu(), logprob.cpu()
            generated = torch.cat([generated, token[:, None]], dim=1)
            going = ~torch.isin(token, eos)
            if self.progress is not None:
                self.progress(len(live))
            if step + 1 == self.config.max_new_tokens or not bool(going.any()):
                break
            if not bool(going.all()):  # rows that ended leave the batch
                keep = going.nonzero().squeeze(1)
                live, generated, token, positions = live[keep.cpu()], generated[keep], token[keep], positions[keep]
                generators = [generators[i] for i in keep.tolist()]
                attention = None if attention is None else attention[keep]
                for layer in cache.layers:
                    assert isinstance(layer, PreallocatedLayer)  # `_shared_prefill` builds these
                    layer.keep(keep)
            threads.adapt()
            if attention is not None:
                attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
            out = forward(
                input_ids=token[:, None], position_ids=(positions + step)[:, None], attention_mask=attention,
                cache=cache, use_cache=True, **extra,
            )  # fmt: skip
            cache, logits = out.cache, (out.logits if subset is None else out.last_hidden_state)[:, -1]
        steps = step + 1
        samples = self._samples(rows, tokens[:, :steps], logprobs[:, :steps], constraint)
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
        self, hidden: torch.Tensor, allowed: list[torch.Tensor], weight: torch.Tensor, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token [B], its log-prob [B]) from the last hidden states [B, H] and the unembedding `weight`,
        computing only the logits of the ids each row allows (their union, in one matmul), each row drawn
        from its generator among its allowed ids only."""
        union = torch.unique(torch.cat(allowed)).to(self.device)
        logits = (hidden @ weight[union].T).float()
        if self.config.temperature != 1.0:
            logits = logits / self.config.temperature
        tokens, logprobs = [], []
        for row, (ids, generator) in enumerate(zip(allowed, generators, strict=True)):
            ids = ids.to(self.device)
            pick, logprob = _draw_row(logits[row, torch.searchsorted(union, ids)], generator)
            tokens.append(ids[pick])
            logprobs.append(logprob)
        return torch.cat(tokens), torch.cat(logprobs)

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
            layers.append([(k.detach(), v.detach()) for k, v in kv])
        select = torch.tensor(index, device=self.device)
        if self._cascade:  # each prompt kept once, unpadded: no mask
            return cascade_cache(layers, index, self.config.max_new_tokens), torch.stack(last)[select], None
        # Left-pad each prompt's keys/values to the batch width (the padded slots are masked below).
        gaps = [width - len(p) for p in prompts]
        layers = [[(_left_pad(k, gap), _left_pad(v, gap)) for k, v in kv] for gap, kv in zip(gaps, layers, strict=True)]
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
        cache.layers = [PreallocatedLayer(k, v, width + self.config.max_new_tokens) for k, v in data]
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
