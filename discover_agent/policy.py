"""Policies: turn prompts into groups of sampled replies, keeping what the trainer needs (token ids, log-probs).

`LocalPolicy` samples from a transformers causal LM wrapped with a peft LoRA adapter; with a `ConstructionSpec`
it grammar-constrains the reply to a valid ```json construction. Log-probs are taken under the exact
distribution each token was drawn from (temperature-scaled, constraint-masked), and `token_logprobs`
recomputes that same distribution for the trainer's importance ratios.

Replies of one group share their prompt, so by default (`PolicyConfig.share_prefix`) each distinct prompt is
run once, in sampling and in training, and its keys/values are reused by the group's replies; the unshared
path (every reply recomputes its prompt, through `generate`) stays as the reference the tests compare with.
Two more savings keep the numbers identical: under a grammar only the logits of the tokens it allows are computed
(the unembedding is a fifth of SmolLM2's weights), and a policy with a `Trainer` keeps each sampled prompt's
keys/values with their autograd graph, so the update's pass (same weights, one optimiser step per step) does
not run the prompts again.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol, Self

import numpy as np
import torch
from peft import PeftConfig, set_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import (
    DynamicCache,
    DynamicLayer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
)

from discover_agent import threads
from discover_agent.constrained import JsonArrayConstraint, row_index
from discover_agent.model import (
    DEFAULT_TARGET_MODULES,
    default_lora_rank,
    load_model_and_tokenizer,
    resolve_device,
    wrap_lora,
)
from discover_agent.storage import replace_dir
from discover_envs.problem import ConstructionSpec

__all__ = ["LocalPolicy", "Policy", "PolicyConfig", "Sample", "TokenConstraint"]


class TokenConstraint(Protocol):
    """What the policy needs from a grammar constraint (`discover_agent.constrained.JsonArrayConstraint`)."""

    prefix: str
    suffix: str

    def logits_processor(self, prompt_length: int) -> LogitsProcessor: ...

    def token_masks(self, completion_ids: list[int]) -> torch.Tensor: ...


@dataclass
class Sample:
    """One reply. `logprobs` are per completion token under the distribution it was sampled from (empty for
    endpoints that give none); `temperature` and `constraint` let the trainer rebuild that distribution."""

    text: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    temperature: float = 1.0
    constraint: TokenConstraint | None = field(default=None, repr=False, compare=False)


class Policy(ABC):
    @abstractmethod
    def sample(self, prompts: list[str], n: int, constraint_spec: ConstructionSpec | None = None) -> list[list[Sample]]:
        """`n` replies (a group) per user-message prompt; with `constraint_spec`, a constrained JSON reply."""

    def sample_groups(
        self, prompts: list[str], sizes: list[int], constraint_spec: ConstructionSpec | None = None
    ) -> list[list[Sample]]:
        """A group of `sizes[i]` replies for each prompt: one call per group here; `LocalPolicy` samples every
        group of a step in one batched pass (decoding is bound by reading the weights, so a batch of 8 costs
        little more per token than a batch of 4)."""
        if len(prompts) != len(sizes):
            raise ValueError(f"need one group size per prompt, got {len(prompts)} prompts and {len(sizes)} sizes")
        return [self.sample([p], n, constraint_spec)[0] for p, n in zip(prompts, sizes, strict=True)]


@dataclass
class PolicyConfig:
    """Sampling and LoRA settings of a `LocalPolicy`.

    lora_rank: None picks by device: 32 on CUDA (the paper's rank), 8 on CPU (small, fast presets).
    lora_alpha: None means 2 * rank, so the adapter's scale alpha/rank stays 2 whatever the rank.
    lora_dropout: 0 by default, because dropout makes training log-probs differ from the sampling ones.
    lora_lm_head: also adapt the unembedding (`lm_head`), as the paper's training service does by default; it
    lets a small model move its output distribution directly (with tied embeddings the input side stays put).
    temperature: > 0. There is no top-p/top-k: truncation would make the trainer's recomputed distribution
    differ from the sampled one. batch_size: sequences per `generate` call (prompts x n are split into these).
    device: "auto" (CUDA if available), "cpu" or "cuda". seed: sampling is reproducible for a given seed.
    share_prefix: run each distinct prompt once and share its keys/values with the replies drawn from it, in
    sampling and in training (False: every reply recomputes its prompt; the reference the tests compare to).
    merged_sampling: sample from a plain copy of the model with the adapter merged into its weights (re-merged
    after every update): no LoRA wrappers and matmuls in the decode loop, for a second copy of the weights in
    memory. None: on CPU only (where the wrappers' per-token overhead is a sixth of decoding).
    """

    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    lora_lm_head: bool = False
    temperature: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 8
    device: str = "auto"
    seed: int = 0
    share_prefix: bool = True
    merged_sampling: bool | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")


def _prefix_groups(samples: Sequence[Sample]) -> list[list[int]]:
    """Indices of the samples that share a prompt, one list per distinct prompt, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(s.prompt_ids), []).append(i)
    return list(groups.values())


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


def _json_array_constraint(
    tokenizer: PreTrainedTokenizerBase, spec: ConstructionSpec, max_new_tokens: int | None = None
) -> TokenConstraint:
    """The JSON-array grammar; with the reply budget, so every reply closes its array in time."""
    return JsonArrayConstraint(tokenizer, spec, max_new_tokens=max_new_tokens)


def _plain_head(model: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor] | None:
    """(decoder, unembedding weight) when the model's logits are exactly `last hidden state @ weight.T` (Llama,
    Qwen, Mistral, SmolLM2 ...), checked on two tokens; None where the head has a bias, scales or soft-caps its
    logits, or carries a LoRA adapter (`lora_lm_head`): those models always compute full logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head, decoder = base.get_output_embeddings(), base.get_decoder()
    if type(head) is not torch.nn.Linear or head.bias is not None or decoder is None or decoder is base:
        return None
    ids = torch.tensor([[0, 1]], device=device)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        own = decoder(input_ids=ids).last_hidden_state @ head.weight.T
    return (decoder, head.weight) if torch.allclose(full, own, rtol=1e-4, atol=1e-4) else None


class _MergedCopy:
    """A plain copy of a LoRA model's base with W + delta(adapter) in each adapted layer, for sampling: the
    decode loop then runs no peft wrappers (Python per module and token) and no rank-r matmuls. The trainer
    keeps using the LoRA model; `sync` re-merges after the adapter changed (its weights' version counters)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = copy.deepcopy(model.get_base_model())
        self.layers: list[tuple[torch.nn.Module, torch.nn.Linear]] = []
        for name, module in model.get_base_model().named_modules():
            if isinstance(module, LoraLayer):
                parent, _, child = name.rpartition(".")
                owner = self.model.get_submodule(parent)
                plain = getattr(owner, child).base_layer
                setattr(owner, child, plain)
                self.layers.append((module, plain))
        self.model.requires_grad_(False).eval()
        self.version: tuple[int, ...] | None = None

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """Only adapted Linear layers whose weights no other module shares (an adapted, tied lm_head would
        carry the delta into the input embeddings)."""
        base = model.get_base_model()
        tied = base.get_output_embeddings()
        return all(
            type(m) is LoraLinear and not (tied is not None and m.base_layer.weight is tied.weight)
            for m in base.modules()
            if isinstance(m, LoraLayer)
        ) and not isinstance(tied, LoraLayer)

    def sync(self, version: tuple[int, ...]) -> None:
        """Re-merge unless `version` (the policy's `_weights_version`) is the one last merged."""
        if version == self.version:
            return
        with torch.no_grad():
            for lora, plain in self.layers:
                plain.weight.copy_(lora.base_layer.weight + lora.get_delta_weight("default"))
        self.version = version


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
        self.logprobs.append(self._pending.gather(1, tokens[:, None]).squeeze(1))
        self._pending = None

    def finish(self, completions: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            self._take(completions[:, len(self.logprobs)])
        return torch.stack(self.logprobs, 1)


class LocalPolicy(Policy):
    """A transformers causal LM with a LoRA adapter, sampled in left-padded micro-batches."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: PolicyConfig | None = None,
        constraint_factory: Callable[[PreTrainedTokenizerBase, ConstructionSpec], TokenConstraint] | None = None,
    ) -> None:
        self.config = config = config or PolicyConfig()
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; LocalPolicy needs a chat/instruct model")
        self.device = resolve_device(config.device)
        rank = config.lora_rank if config.lora_rank is not None else default_lora_rank(self.device)
        alpha = config.lora_alpha if config.lora_alpha is not None else 2.0 * rank
        targets = (*config.target_modules, "lm_head") if config.lora_lm_head else config.target_modules
        # LoRA's A matrices start random: drawn from the config's seed, not the process's global generator (whose
        # state differs between processes), so a run's first update, and so the whole run, repeats exactly.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = wrap_lora(model.to(self.device), rank, alpha, config.lora_dropout, targets).eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted({*eos, tokenizer.eos_token_id} - {None})
        self._constraint_factory = constraint_factory or partial(
            _json_array_constraint, max_new_tokens=config.max_new_tokens
        )
        self._constraints: dict[ConstructionSpec, TokenConstraint] = {}
        self._head = _plain_head(self.model, self.device)
        merged = config.merged_sampling if config.merged_sampling is not None else self.device.type == "cpu"
        self._sampler = _MergedCopy(self.model) if merged and _MergedCopy.supports(self.model) else None
        self._sample_head = self._head if self._sampler is None else _plain_head(self._sampler.model, self.device)
        #: Keep each sampled prompt's differentiable keys/values for the trainer's next pass (set by `Trainer`).
        self.keep_prompt_graphs = False
        self._prompt_graphs: dict[tuple[int, ...], tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[int, ...]]]
        self._prompt_graphs = {}
        self._calls = 0
        #: Called with the number of rows still generating after each sampled token step (progress display).
        self.progress: Callable[[int], None] | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | None, config: PolicyConfig | None = None) -> Self:
        """Load a local model folder (or a model id already in the HF cache); None -> embedded SmolLM2."""
        config = config or PolicyConfig()
        model, tokenizer = load_model_and_tokenizer(name_or_path, resolve_device(config.device))
        return cls(model, tokenizer, config)

    def reseed(self, seed: int) -> None:
        """Restart the per-call seeds from `seed`: agents reseed every step from (run seed, step), so a resumed
        run samples exactly what an uninterrupted one does."""
        self.config.seed, self._calls = seed, 0

    def chat_prompt(self, prompt: str) -> str:
        """The prompt as the user turn of the model's chat template, ending where the assistant reply starts."""
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def constraint(self, spec: ConstructionSpec) -> TokenConstraint:
        """The grammar for `spec`, built once (building it scans the whole vocabulary)."""
        if spec not in self._constraints:
            self._constraints[spec] = self._constraint_factory(self.tokenizer, spec)
        return self._constraints[spec]

    def sample(self, prompts: list[str], n: int, constraint_spec: ConstructionSpec | None = None) -> list[list[Sample]]:
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a non-empty list of strings")
        if n < 1:
            raise ValueError(f"n (replies per prompt) must be >= 1, got {n!r}")
        return self.sample_groups(prompts, [n] * len(prompts), constraint_spec)

    def sample_groups(
        self, prompts: list[str], sizes: list[int], constraint_spec: ConstructionSpec | None = None
    ) -> list[list[Sample]]:
        """Every group in one call: rows are split into `batch_size` micro-batches across groups."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a non-empty list of strings")
        if len(prompts) != len(sizes) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise ValueError(f"need one group size >= 1 per prompt, got {len(prompts)} prompts and sizes {sizes!r}")
        constraint = None if constraint_spec is None else self.constraint(constraint_spec)
        prefix = "" if constraint is None else constraint.prefix
        encoded = [self.tokenizer(self.chat_prompt(p) + prefix, add_special_tokens=False)["input_ids"] for p in prompts]
        rows = [ids for ids, n in zip(encoded, sizes, strict=True) for _ in range(n)]
        # Each call draws from its own seed (seed, call index): a fresh policy replays the same sequence of
        # calls exactly, while the global torch RNG of the caller is left untouched.
        seed = int(np.random.SeedSequence([self.config.seed, self._calls]).generate_state(1)[0])
        self._calls += 1
        devices = [self.device] if self.device.type == "cuda" else []
        self.release_prompt_graphs()
        if self._sampler is not None:
            self._sampler.sync(self._weights_version())
        samples: list[Sample] = []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type), torch.no_grad():
            torch.manual_seed(seed)
            generate = self._decode_shared if self.config.share_prefix else self._generate
            for start in range(0, len(rows), self.config.batch_size):
                samples.extend(generate(rows[start : start + self.config.batch_size], constraint))
        ends = np.cumsum(sizes).tolist()
        return [samples[end - n : end] for n, end in zip(sizes, ends, strict=True)]

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
        sequences = self._sampling_model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=generation,
            logits_processor=processors,
        ).cpu()
        completions = sequences[:, width:]
        return self._samples(rows, completions, recorder.finish(completions).cpu(), constraint)

    def _decode_shared(self, rows: list[list[int]], constraint: TokenConstraint | None) -> list[Sample]:
        """The same draws as `_generate` (one multinomial over the batch per token, finished rows padded),
        but each distinct prompt is prefilled once and its keys/values are repeated for the rows that share
        it; then a plain decode loop, without `generate`'s per-token bookkeeping.

        Rows of one prompt need no attention mask (so SDPA also skips expanding grouped KV heads); prompts of
        different lengths are left-padded in the cache, as `_generate` pads them.
        """
        width = max(len(r) for r in rows)
        processors = self._processors(constraint)
        # With a grammar, only the logits of the tokens some row may take are computed (a few hundred of the
        # vocabulary: the unembedding is a fifth of SmolLM2's weights, read every token step).
        allowed_ids = getattr(processors[0], "allowed_ids", None) if constraint is not None else None
        subset = allowed_ids is not None and self._sample_head is not None and self._head is not None
        cache, logits, attention = self._shared_prefill(rows, width, hidden=subset)
        positions = torch.tensor([len(r) for r in rows], device=self.device)
        eos = torch.tensor(self.eos_ids, device=self.device)
        pad = torch.tensor(self.tokenizer.pad_token_id, device=self.device)
        running = torch.ones(len(rows), dtype=torch.bool, device=self.device)
        tokens: list[torch.Tensor] = []
        logprobs: list[torch.Tensor] = []
        generated = torch.zeros((len(rows), 0), dtype=torch.long, device=self.device)
        for step in range(self.config.max_new_tokens):
            if subset:
                token, logprob = self._draw_allowed(logits, allowed_ids(generated))
            else:
                scores = processors(generated, logits.float())
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
            forward = self._sample_head[0] if subset else self._sampling_model
            out = forward(
                input_ids=token[:, None], position_ids=(positions + step)[:, None], attention_mask=attention,
                cache=cache, use_cache=True,
            )  # fmt: skip
            cache, logits = out.cache, (out.last_hidden_state if subset else out.logits)[:, -1]
        return self._samples(rows, torch.stack(tokens, 1).cpu(), torch.stack(logprobs, 1).cpu(), constraint)

    def _draw_allowed(self, hidden: torch.Tensor, allowed: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token [B, 1], its log-prob [B, 1]) from the last hidden states [B, H], computing only the logits of
        the `allowed` ids of each row: the same draw as `torch.multinomial` on the masked full-vocabulary
        probabilities (it is argmax(p / q) with q ~ Exp(1) over the whole vocabulary, drawn here likewise), so
        replies equal the full-logits path's and `generate`'s for the same seed."""
        weight = self._sample_head[1]
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
        self, rows: list[list[int]], width: int, hidden: bool = False
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor | None]:
        """(cache, next-token logits, attention mask or None) for `rows` with each distinct prompt run once;
        with `hidden`, the decoder's last hidden states instead of logits."""
        prompts: dict[tuple[int, ...], int] = {}
        index = [prompts.setdefault(tuple(r), len(prompts)) for r in rows]
        layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        last: list[torch.Tensor] = []
        keep = self.keep_prompt_graphs and self.config.share_prefix and self.config.lora_dropout == 0
        for prompt in prompts:
            threads.adapt()
            ids = torch.tensor([prompt], device=self.device)
            graph = keep and len(prompt) > 1  # then the LoRA model itself runs the prompt, with grad
            with torch.enable_grad() if graph else nullcontext():
                if hidden:
                    out = (self._head if graph else self._sample_head)[0](input_ids=ids, use_cache=True)
                    last.append(out.last_hidden_state[0, -1].detach())
                else:
                    model = self.model if graph else self._sampling_model
                    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                    last.append(out.logits[0, -1].detach())
                kv = [(k, v) for k, v, *_ in out.cache]
                if graph:  # sliced with grad on: a view taken under no_grad would cut the graph
                    kept = [(k[:, :, :-1], v[:, :, :-1]) for k, v in kv]
                    self._prompt_graphs[prompt] = (kept, self._weights_version())
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
            body = self.tokenizer.decode(ids, skip_special_tokens=True)
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
        if self._allowed_only(samples):
            return self._completion_logprobs(self._head[0](**inputs).last_hidden_state[:, -steps:], samples, True)
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
                cache = self._kept_prompt(group[0].prompt_ids)
                if cache is None:
                    cache = self.model(input_ids=prompt[None, :-1], use_cache=True, logits_to_keep=1).cache
                cache.batch_repeat_interleave(len(group))
            width = max(len(s.completion_ids) for s in group)
            inputs = torch.full((len(group), width), int(prompt[-1]), dtype=torch.long)
            for i, s in enumerate(group):
                inputs[i, 1 : len(s.completion_ids)] = torch.tensor(s.completion_ids[:-1], dtype=torch.long)
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + width, device=self.device)
            hidden = self._allowed_only(group)
            out = (self._head[0] if hidden else self.model)(
                input_ids=inputs.to(self.device),
                position_ids=positions.expand(len(group), -1),
                cache=cache,
                use_cache=cache is not None,
            )
            group_logp, _ = self._completion_logprobs(out.last_hidden_state if hidden else out.logits, group, hidden)
            rows.append(torch.nn.functional.pad(group_logp, (0, steps - width)))
            order.extend(members)
        logp = torch.cat(rows)[torch.tensor(order, device=self.device).argsort()]
        lengths = torch.tensor([len(s.completion_ids) for s in samples], device=self.device)
        return logp, torch.arange(steps, device=self.device) < lengths[:, None]

    @property
    def _sampling_model(self) -> torch.nn.Module:
        """What draws replies: the merged copy where there is one, else the LoRA model."""
        return self.model if self._sampler is None else self._sampler.model

    def _weights_version(self) -> tuple[int, ...]:
        """Changes whenever a trainable weight is modified in place (an optimiser step): kept prompts are then
        stale."""
        return tuple(p._version for p in self.model.parameters() if p.requires_grad)

    def _kept_prompt(self, prompt_ids: list[int]) -> DynamicCache | None:
        """The differentiable keys/values of the prompt's first P-1 tokens, kept when it was sampled, for a
        pass with grad under the same weights; used once (the backward frees them). The sampling prefill with
        grad costs little more than without, and the trainer's pass then skips the prompt's forward."""
        if not torch.is_grad_enabled():  # e.g. the trainer's base-model pass, which must not consume them
            return None
        kept = self._prompt_graphs.pop(tuple(prompt_ids), None)
        if kept is None or kept[1] != self._weights_version():
            return None
        cache = DynamicCache()
        cache.layers = []
        for keys, values in kept[0]:
            layer = DynamicLayer()
            layer.update(keys, values)
            cache.layers.append(layer)
        return cache

    def release_prompt_graphs(self) -> None:
        """Drop the kept prompts (and the activations they hold): the trainer calls it after its step."""
        self._prompt_graphs.clear()

    def _allowed_only(self, samples: Sequence[Sample]) -> bool:
        """Whether the trainer's passes can compute only the logits of the tokens the samples' grammar allowed
        (a plain unembedding, and constraints that list those ids): `_completion_logprobs` then takes the
        decoder's hidden states instead of logits."""
        return self._head is not None and all(
            s.constraint is not None and hasattr(s.constraint, "token_allowed_ids") for s in samples
        )

    def _completion_logprobs(
        self, values: torch.Tensor, samples: list[Sample], hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs [B, T] of the completion tokens from their logits [B, T, V] (row t predicts token t) and
        the mask of real tokens: temperature, constraint masks, then gather - logsumexp, which never
        materialises a second [B, T, V] log-softmax tensor. With `hidden` (where `_allowed_only`), `values` are the
        last hidden states [B, T, H] and only the logits of the allowed tokens are computed."""
        steps = values.shape[1]
        targets = torch.zeros((len(samples), steps), dtype=torch.long)
        mask = torch.zeros((len(samples), steps), dtype=torch.bool)
        for i, s in enumerate(samples):
            targets[i, : len(s.completion_ids)] = torch.tensor(s.completion_ids, dtype=torch.long)
            mask[i, : len(s.completion_ids)] = True
        targets, mask = targets.to(self.device), mask.to(self.device)
        if hidden:
            logits, allowed, targets = self._allowed_logits(values, samples, targets)
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
        self, hidden: torch.Tensor, samples: Sequence[Sample], targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [B, T, K] of the K ids any position allows, allowed mask [B, T, K], targets as indices into
        those K ids) from hidden states [B, T, H]. Positions past a completion allow every id (finite values,
        masked out of the result)."""
        per_sample = [s.constraint.token_allowed_ids(s.completion_ids) for s in samples]
        union = torch.unique(torch.cat([ids for ids_at in per_sample for ids in ids_at])).to(self.device)
        allowed = torch.zeros((*targets.shape, len(union)), dtype=torch.bool, device=self.device)
        for i, ids_at in enumerate(per_sample):
            if ids_at:
                cols = torch.searchsorted(union, torch.cat(ids_at).to(self.device))
                allowed[i, row_index(ids_at).to(self.device), cols] = True
            allowed[i, len(ids_at) :] = True
        index = torch.searchsorted(union, targets).clamp(max=len(union) - 1)
        return hidden @ self._head[1][union].T, allowed, index

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

    def save_adapter(self, path: str | Path) -> Path:
        """Write the LoRA adapter to the folder `path`, replacing it atomically (a crash leaves the old one)."""
        return replace_dir(self.model.save_pretrained, Path(path))

    def load_adapter(self, path: str | Path) -> None:
        """Load LoRA weights saved by `save_adapter`; the rank and target modules must match this policy's."""
        path = Path(path)
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"no saved adapter in {path} (missing {weights.name})")
        saved, current = PeftConfig.from_pretrained(str(path)), self.model.peft_config["default"]
        if saved.r != current.r or set(saved.target_modules) != set(current.target_modules):
            raise ValueError(
                f"adapter in {path} has rank {saved.r} on {sorted(saved.target_modules)}, but this policy uses "
                f"rank {current.r} on {sorted(current.target_modules)}"
            )
        result = set_peft_model_state_dict(self.model, load_file(weights, device=str(self.device)))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"adapter in {path} does not fit this model: unexpected {result.unexpected_keys[:3]}, "
                f"missing {missing[:3]}"
            )
