"""Policies: turn prompts into groups of sampled replies, keeping what the trainer needs (token ids, log-probs).

`LocalPolicy` samples from a transformers causal LM wrapped with a peft LoRA adapter; with a `ConstructionSpec`
it grammar-constrains the reply to a valid ```json construction. Log-probs are taken under the exact
distribution each token was drawn from (temperature-scaled, constraint-masked), and `token_logprobs`
recomputes that same distribution for the trainer's importance ratios.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from peft import PeftConfig, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
)

from discover_agent.model import (
    DEFAULT_TARGET_MODULES,
    default_lora_rank,
    load_model_and_tokenizer,
    replace_dir,
    resolve_device,
    wrap_lora,
)
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


@dataclass
class PolicyConfig:
    """Sampling and LoRA settings of a `LocalPolicy`.

    lora_rank: None picks by device: 32 on CUDA (the paper's rank), 8 on CPU (small, fast presets).
    lora_alpha: None means 2 * rank, so the adapter's scale alpha/rank stays 2 whatever the rank.
    lora_dropout: 0 by default, because dropout makes training log-probs differ from the sampling ones.
    temperature: > 0. There is no top-p/top-k: truncation would make the trainer's recomputed distribution
    differ from the sampled one. batch_size: sequences per `generate` call (prompts x n are split into these).
    device: "auto" (CUDA if available), "cpu" or "cuda". seed: sampling is reproducible for a given seed.
    """

    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    temperature: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 8
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")


def _json_array_constraint(tokenizer: PreTrainedTokenizerBase, spec: ConstructionSpec) -> TokenConstraint:
    from discover_agent.constrained import JsonArrayConstraint

    return JsonArrayConstraint(tokenizer, spec)


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
        self.model = wrap_lora(model.to(self.device), rank, alpha, config.lora_dropout, config.target_modules).eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted({*eos, tokenizer.eos_token_id} - {None})
        self._constraint_factory = constraint_factory or _json_array_constraint
        self._constraints: dict[ConstructionSpec, TokenConstraint] = {}
        self._calls = 0

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | None, config: PolicyConfig | None = None) -> LocalPolicy:
        """Load a local model folder (or a model id already in the HF cache); None -> embedded SmolLM2."""
        config = config or PolicyConfig()
        model, tokenizer = load_model_and_tokenizer(name_or_path, resolve_device(config.device))
        return cls(model, tokenizer, config)

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
        constraint = None if constraint_spec is None else self.constraint(constraint_spec)
        prefix = "" if constraint is None else constraint.prefix
        encoded = [self.tokenizer(self.chat_prompt(p) + prefix, add_special_tokens=False)["input_ids"] for p in prompts]
        rows = [ids for ids in encoded for _ in range(n)]
        # Each call draws from its own seed (seed, call index): a fresh policy replays the same sequence of
        # calls exactly, while the global torch RNG of the caller is left untouched.
        seed = int(np.random.SeedSequence([self.config.seed, self._calls]).generate_state(1)[0])
        self._calls += 1
        devices = [self.device] if self.device.type == "cuda" else []
        samples: list[Sample] = []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(rows), self.config.batch_size):
                samples.extend(self._generate(rows[start : start + self.config.batch_size], constraint))
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

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
        sequences = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=generation,
            logits_processor=processors,
        ).cpu()
        completions = sequences[:, width:]
        logprobs = recorder.finish(completions).cpu()
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

        Layout: prompts left-padded to one width P, completions after them, so logits are needed (and kept,
        via `logits_to_keep`) only for the last T positions — long prompts cost no vocabulary projection.
        """
        pad = self.tokenizer.pad_token_id
        width = max(len(s.prompt_ids) for s in samples)
        steps = max(len(s.completion_ids) for s in samples)
        if steps == 0:
            raise ValueError("the samples have no completion tokens")
        input_ids = torch.full((len(samples), width + steps - 1), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        targets = torch.full((len(samples), steps), pad, dtype=torch.long)
        mask = torch.zeros((len(samples), steps), dtype=torch.bool)
        for i, s in enumerate(samples):
            p, c = len(s.prompt_ids), len(s.completion_ids)
            input_ids[i, width - p : width] = torch.tensor(s.prompt_ids, dtype=torch.long)
            input_ids[i, width : width + c - 1] = torch.tensor(s.completion_ids[:-1], dtype=torch.long)
            attention[i, width - p : width + c - 1] = 1
            targets[i, :c] = torch.tensor(s.completion_ids, dtype=torch.long)
            mask[i, :c] = True
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            position_ids=positions.to(self.device),
            logits_to_keep=steps,
        ).logits.float()
        temperatures = torch.tensor([s.temperature for s in samples], device=self.device)
        logits = logits / temperatures[:, None, None]
        targets, mask = targets.to(self.device), mask.to(self.device)
        if any(s.constraint is not None for s in samples):
            logits = logits.masked_fill(~self._allowed(samples, steps, logits.shape[-1]), -torch.inf)
        logp = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
        return torch.where(mask, logp, torch.zeros_like(logp)), mask

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
