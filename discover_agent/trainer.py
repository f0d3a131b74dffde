"""The LoRA update: one importance-sampled policy-gradient step with per-token KL shaping toward the base model.

loss = -sum_bt ratio_bt * A_bt * mask_bt / (number of completion tokens), where ratio_bt = exp(logp_current -
logp_sampled) (the sampling log-prob is a constant) and A_bt = `kl_shaped_advantages(A_b, logp_sampled,
logp_base, mask, kl_coef)`: as in the released code (`incorporate_kl_penalty` in ttt_discover/rl/train.py) the
penalty compares the sampling log-probs with the base model's, so it needs one no-grad pass of the base model
(the same network with the adapter disabled) and none at all when kl_coef is 0. Micro-batches accumulate
gradients of that one loss, so the step does not depend on their size; there is one optimiser step per step
(the released code's `num_substeps = 1`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from discover_agent import threads
from discover_agent.model import is_embedded_model
from discover_agent.policy import LocalPolicy
from discover_agent.types import Sample

__all__ = [
    "DEFAULT_KL_COEF", "EMBEDDED_LR", "PAPER_LR", "Trainer", "TrainerConfig", "default_lr", "kl_shaped_advantages",
]  # fmt: skip

#: The paper's Adam rate for its LoRA on gpt-oss-120b; the default for models nobody has swept here.
PAPER_LR = 4e-5
#: The rate for the embedded SmolLM2-135M, from the sweep in leaderboards/history-128/ErdosMinOverlap-v0.md (Erdős
#: n = 16, rates 4e-5, 3e-4, 1e-3, 3e-3 x 3 seeds x 128 rollouts): its best score matched the smallest rate's (mean
#: of the seeds 0.4406 vs 0.4396, lower is better) while the update is no longer a no-op (KL to the base model 1e-3
#: to 8e-3 a token after 16 steps, vs below 1e-3). At 1e-3 the step's mean reward rose in every seed, but the policy
#: concentrated on what it had found and its bests were worse (0.4570); 3e-3 was unstable (valid replies fell to
#: 50%).
EMBEDDED_LR = 3e-4

#: lambda of the KL shaping where the task names none (`Problem.kl_coef` is the paper's per task).
DEFAULT_KL_COEF = 0.1


def default_lr(model: str | None) -> float:
    """`EMBEDDED_LR` for the embedded model (None, or its folder given by path), else `PAPER_LR`: sweep yours
    with `discover bench --agents 'ttt[lr=...],...'` (README, Benchmarks)."""
    return EMBEDDED_LR if is_embedded_model(model) else PAPER_LR


@dataclass
class TrainerConfig:
    """lr: Adam learning rate of the LoRA weights. kl_coef: lambda of the KL shaping (0 turns it off and skips
    the base-model pass). max_grad_norm: clip of the total gradient norm; None (the default, as in the released
    code) does not clip. betas: Adam's (beta1, beta2); (0.9, 0.95) as the released code's `enqueue_optim_step`.
    micro_batch_size: replies per forward/backward pass. Prompts kept with the samples
    (`PolicyConfig.reuse_prompts`) are used by the update's pass and released after the step."""

    lr: float = PAPER_LR
    kl_coef: float = DEFAULT_KL_COEF
    max_grad_norm: float | None = None
    micro_batch_size: int = 16
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"kl_coef must be finite and >= 0, got {self.kl_coef!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))


def kl_shaped_advantages(
    advantages: torch.Tensor,
    logp_current: torch.Tensor,
    logp_base: torch.Tensor,
    mask: torch.Tensor,
    coef: float = 0.1,
) -> torch.Tensor:
    """Per-token advantages A_bt = A_b + coef * (mean_logdiff - (logp_current - logp_base)_bt).

    The trainer passes the sampling log-probs as `logp_current`, as the released code does
    (`incorporate_kl_penalty`): they are the policy's log-probs at the start of the step, with no extra pass.

    The penalty pulls the LoRA policy towards the base model (LoRA disabled) token by token; subtracting the
    batch mean of the log-ratio over unmasked tokens keeps the penalty from shifting the overall advantage
    level. Masked positions (prompt, padding) are 0, even where their log-probs are -inf or NaN. No gradient
    flows through the result: it is a fixed weight for the policy-gradient loss.
    """
    if advantages.ndim != 1:
        raise ValueError(f"advantages must have shape [B], got {tuple(advantages.shape)}")
    if logp_current.ndim != 2 or logp_current.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"logp_current must have shape [B, T] with B={advantages.shape[0]}, got {tuple(logp_current.shape)}"
        )
    if logp_base.shape != logp_current.shape or mask.shape != logp_current.shape:
        raise ValueError(
            f"logp_base {tuple(logp_base.shape)} and mask {tuple(mask.shape)} must match "
            f"logp_current {tuple(logp_current.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    if not math.isfinite(coef):
        raise ValueError(f"coef must be finite, got {coef!r}")
    with torch.no_grad():
        dtype = torch.promote_types(torch.promote_types(advantages.dtype, logp_current.dtype), torch.float32)
        diff = logp_current.detach().to(dtype) - logp_base.detach().to(dtype)
        diff = torch.where(mask, diff, torch.zeros((), dtype=dtype, device=diff.device))
        count = int(mask.sum())
        mean_logdiff = diff.sum() / count if count else diff.sum()
        shaped = advantages.detach().to(dtype=dtype, device=diff.device)[:, None] + coef * (mean_logdiff - diff)
        return torch.where(mask, shaped, torch.zeros((), dtype=dtype, device=diff.device))


def _pad(rows: list[torch.Tensor], width: int, value: float | bool = 0) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=value) for r in rows])


def _informative(advantages: Sequence[float], group_sizes: Sequence[int] | None) -> list[int]:
    """Indices of the replies whose group carries signal. A group whose advantages are all zero (its rewards
    were all equal) is left out, as the released code's `remove_constant_reward_groups` does: it would only
    add KL terms and dilute the mean over tokens."""
    if group_sizes is None:
        return list(range(len(advantages)))
    if any(size < 1 for size in group_sizes) or sum(group_sizes) != len(advantages):
        raise ValueError(f"group_sizes {list(group_sizes)} must be positive and sum to {len(advantages)} replies")
    keep: list[int] = []
    start = 0
    for size in group_sizes:
        if any(a != 0 for a in advantages[start : start + size]):
            keep.extend(range(start, start + size))
        start += size
    return keep


class Trainer:
    """Adam on the policy's LoRA parameters only; `step` is one optimiser step over a batch of replies."""

    def __init__(self, policy: LocalPolicy, config: TrainerConfig | None = None) -> None:
        self.policy = policy
        self.config = config = config or TrainerConfig()
        self.params = [p for p in policy.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the policy has no trainable (LoRA) parameters")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        #: Called with the number of replies whose backward pass is done, after each micro-batch.
        self.progress: Callable[[int], None] | None = None

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (not live references) of the optimiser's moments and step counts; the LoRA weights are
        saved with `policy.save_adapter`."""
        return {"optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`: the next step then equals the one an uninterrupted run would take."""
        self.optimizer.load_state_dict(state["optimizer"])

    def step(
        self, samples: Sequence[Sample], advantages: Sequence[float], group_sizes: Sequence[int] | None = None
    ) -> dict[str, float]:
        """One update from `samples` (as sampled by the policy) and their per-reply advantages.

        `group_sizes` (consecutive replies per group) lets groups whose advantages are all zero drop out of the
        loss; if every group drops out, nothing is updated and the metrics say `skipped` = 1.

        Returns loss, kl (mean log-ratio current/base over tokens, before the update; only with kl_coef > 0),
        grad_norm (before any clipping), ratio (mean importance ratio), trained_tokens, seconds and skipped.
        The prompts kept with the samples are released, used or not.
        """
        samples = list(samples)
        try:
            return self._step(samples, advantages, group_sizes)
        finally:
            for s in samples:
                if s.prompt_cache is not None:
                    s.prompt_cache.release()

    def _step(
        self, samples: list[Sample], advantages: Sequence[float], group_sizes: Sequence[int] | None
    ) -> dict[str, float]:
        started = time.perf_counter()
        advantages = [float(a) for a in advantages]
        if len(samples) != len(advantages) or not samples:
            raise ValueError(f"need one advantage per sample, got {len(samples)} samples, {len(advantages)} advantages")
        if not all(math.isfinite(a) for a in advantages):
            raise ValueError(f"advantages must be finite, got {advantages}")
        for i, s in enumerate(samples):
            if len(s.logprobs) != len(s.completion_ids):
                raise ValueError(
                    f"sample {i} has {len(s.logprobs)} log-probs for {len(s.completion_ids)} tokens; the trainer "
                    "needs samples from a LocalPolicy (endpoints give no token ids)"
                )
        keep = _informative(advantages, group_sizes)
        samples, advantages = [samples[i] for i in keep], [advantages[i] for i in keep]
        tokens = sum(len(s.completion_ids) for s in samples)
        if not samples:
            return {"skipped": 1.0, "trained_tokens": 0.0, "seconds": time.perf_counter() - started}
        if tokens == 0:
            raise ValueError("the samples have no completion tokens to train on")
        metrics = self._update(samples, advantages, tokens)
        return {**metrics, "trained_tokens": float(tokens), "seconds": time.perf_counter() - started, "skipped": 0.0}

    def _update(self, samples: list[Sample], advantages: list[float], tokens: int) -> dict[str, float]:
        device, model, coef = self.policy.device, self.policy.model, self.config.kl_coef
        size = self.config.micro_batch_size
        chunks = [samples[i : i + size] for i in range(0, len(samples), size)]
        sampled, masks = [], []
        for chunk in chunks:
            steps = max(len(s.completion_ids) for s in chunk)
            sampled.append(torch.tensor([s.logprobs + [0.0] * (steps - len(s.logprobs)) for s in chunk], device=device))
            masks.append(torch.tensor([[t < len(s.logprobs) for t in range(steps)] for s in chunk], device=device))
        adv = torch.tensor(advantages, dtype=torch.float32, device=device)
        width = max(m.shape[1] for m in masks)
        if coef > 0:
            threads.adapt()
            with torch.no_grad(), model.disable_adapter():
                base = [self.policy.token_logprobs(c)[0] for c in chunks]
            shaped = kl_shaped_advantages(adv, _pad(sampled, width), _pad(base, width), _pad(masks, width, False), coef)
        else:
            shaped = adv[:, None] * _pad(masks, width, False)
        loss_sum = ratio_sum = kl_sum = 0.0
        row = 0
        model.train()  # LoRA dropout, if configured, during the differentiable passes only
        try:
            for i, (chunk, mask) in enumerate(zip(chunks, masks, strict=True)):
                threads.adapt()
                logp = self.policy.token_logprobs(chunk)[0]
                ratio = torch.exp(logp - sampled[i])
                loss = -(ratio * shaped[row : row + len(chunk), : logp.shape[1]] * mask).sum() / tokens
                loss.backward()
                loss_sum += float(loss.detach())
                ratio_sum += float((ratio.detach() * mask).sum())
                if coef > 0:
                    kl_sum += float(((logp.detach() - base[i]) * mask).sum())
                row += len(chunk)
                if self.progress is not None:
                    self.progress(len(chunk))
            max_norm = self.config.max_grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.params, math.inf if max_norm is None else max_norm, error_if_nonfinite=True
            )
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            model.eval()
        metrics = {"loss": loss_sum, "grad_norm": float(grad_norm), "ratio": ratio_sum / tokens}
        if coef > 0:
            metrics["kl"] = kl_sum / tokens
        return metrics
