"""`LocalPolicy`: prompts in, groups of sampled replies out, with what the trainer needs (token ids, log-probs).

It samples from a transformers causal LM wrapped with a peft LoRA adapter; with a `ConstructionSpec` it
grammar-constrains the reply to a valid ```json construction. Log-probs are taken under the exact distribution
each token was drawn from (temperature-scaled, constraint-masked), and `token_logprobs` recomputes that same
distribution for the trainer's importance ratios. This module holds the settings and the public API; how
replies are drawn is in `discover_agent.decoding`, how they are scored again in `discover_agent.scoring`, and
the adapter's weights (merged copy, plain head, files) in `discover_agent.adapter`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from discover_agent import cascade
from discover_agent.adapter import MergedCopy, base_model, load_adapter, plain_head, save_adapter, weights_version
from discover_agent.constrained import JsonArrayConstraint
from discover_agent.decoding import Decoding, KeptPrompt
from discover_agent.model import (
    DEFAULT_TARGET_MODULES,
    default_lora_rank,
    load_model_and_tokenizer,
    resolve_device,
    wrap_lora,
)
from discover_agent.scoring import Scoring
from discover_agent.types import Policy, Sample, TokenConstraint
from discover_envs.problem import ConstructionSpec

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["LocalPolicy", "PolicyConfig"]


@dataclass
class PolicyConfig:
    """Sampling and LoRA settings of a `LocalPolicy`.

    lora_rank: None picks by device: 32 on CUDA (the paper's rank), 8 on CPU (small, fast presets).
    lora_alpha: None means 2 * rank, so the adapter's scale alpha/rank stays 2 whatever the rank.
    lora_dropout: 0 by default, because dropout makes training log-probs differ from the sampling ones.
    lora_lm_head: also adapt the unembedding (`lm_head`), as the paper's training service does by default; it
    lets a small model move its output distribution directly (with tied embeddings the input side stays put).
    temperature: > 0. There is no top-p/top-k: truncation would make the trainer's recomputed distribution
    differ from the sampled one. batch_size: sequences decoded together (prompts x n are split into these); with
    the cascade (`discover_agent.cascade`) rows of different prompts batch at no extra attention cost, so a default
    TTT step's 2 groups x 8 replies read the weights once per token.
    device: "auto" (CUDA if available), "cpu" or "cuda". seed: sampling is reproducible for a given seed.
    share_prefix: run each distinct prompt once and share its keys/values with the replies drawn from it, in
    sampling and in training (False: every reply recomputes its prompt; the reference the tests compare to).
    merged_sampling: sample from a plain copy of the model with the adapter merged into its weights (re-merged
    after every update): no LoRA wrappers and matmuls in the decode loop, for a second copy of the weights in
    memory. None: on CPU only (where the wrappers' per-token overhead is a sixth of decoding).
    reuse_prompts: each sample carries its prompt's keys/values with their graph (`Sample.prompt_cache`), and
    the trainer's pass uses them instead of running the prompt again (same numbers; the memory is held from
    sampling to the update). For a policy that trains (TTT); with share_prefix and no LoRA dropout only.
    """

    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    lora_lm_head: bool = False
    temperature: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 16
    device: str = "auto"
    seed: int = 0
    share_prefix: bool = True
    merged_sampling: bool | None = None
    reuse_prompts: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")


def _json_array_constraint(
    tokenizer: PreTrainedTokenizerBase, spec: ConstructionSpec, max_new_tokens: int | None = None
) -> TokenConstraint:
    """The JSON-array grammar; with the reply budget, so every reply closes its array in time."""
    return JsonArrayConstraint(tokenizer, spec, max_new_tokens=max_new_tokens)


class LocalPolicy(Decoding, Scoring, Policy):
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
            model = model.to(self.device)  # type: ignore[arg-type]  # transformers' stubs type .to() oddly
            self.model = wrap_lora(model, rank, alpha, config.lora_dropout, targets).eval()
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
        self._head = plain_head(self.model, self.device)
        merged = config.merged_sampling if config.merged_sampling is not None else self.device.type == "cpu"
        self._sampler = MergedCopy(self.model) if merged and MergedCopy.supports(self.model) else None
        self._sample_head = self._head if self._sampler is None else plain_head(self._sampler.model, self.device)
        sampling = base_model(self.model) if self._sampler is None else self._sampler.model
        self._cascade = config.share_prefix and cascade.enable(sampling)
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
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)  # untokenized
        return text

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
        # The shared path draws each reply from its own stream, so a reply does not depend on its batch.
        streams = np.random.SeedSequence([self.config.seed, self._calls, 1])
        row_seeds = [int(x) for x in streams.generate_state(len(rows))]
        self._calls += 1
        devices = [self.device] if self.device.type == "cuda" else []
        if self._sampler is not None:
            self._sampler.sync(weights_version(self.model))
        samples: list[Sample] = []
        kept: dict[tuple[int, ...], KeptPrompt] = {}
        with torch.random.fork_rng(devices=devices, device_type=self.device.type), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(rows), self.config.batch_size):
                batch = slice(start, start + self.config.batch_size)
                if self.config.share_prefix:
                    samples.extend(self._decode_shared(rows[batch], constraint, kept, row_seeds[batch]))
                else:
                    samples.extend(self._generate(rows[batch], constraint))
        ends = np.cumsum(sizes).tolist()
        return [samples[end - n : end] for n, end in zip(sizes, ends, strict=True)]

    def save_adapter(self, path: str | Path) -> Path:
        """Write the LoRA adapter to the folder `path`, replacing it atomically (a crash leaves the old one)."""
        return save_adapter(self.model, path)

    def load_adapter(self, path: str | Path) -> None:
        """Load LoRA weights saved by `save_adapter`; the rank and target modules must match this policy's."""
        load_adapter(self.model, path, self.device)
