"""The LoRA update: one importance-sampled policy-gradient step with per-token KL shaping toward the base model.

loss = -sum_bt ratio_bt * A_bt * mask_bt / (number of completion tokens), where ratio_bt = exp(logp_current -
logp_sampled) (the sampling log-prob is a constant) and A_bt = `kl_shaped_advantages(A_b, logp_current,
logp_base, mask, kl_coef)`. The base model is the same network with the adapter disabled, so no second copy is
held in memory. Micro-batches accumulate gradients of that one loss, so the step does not depend on their size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from discover_agent.objective import kl_shaped_advantages
from discover_agent.policy import LocalPolicy, Sample

__all__ = ["Trainer", "TrainerConfig"]


@dataclass
class TrainerConfig:
    """lr: AdamW learning rate of the LoRA weights. kl_coef: lambda of the KL shaping (0 turns it off).
    max_grad_norm: clip of the total gradient norm. micro_batch_size: replies per forward/backward pass."""

    lr: float = 4e-5
    kl_coef: float = 0.1
    max_grad_norm: float = 1.0
    micro_batch_size: int = 8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"kl_coef must be finite and >= 0, got {self.kl_coef!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size!r}")


def _pad(rows: list[torch.Tensor], width: int, value: float | bool = 0) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=value) for r in rows])


class Trainer:
    """AdamW on the policy's LoRA parameters only; `step` is one optimiser step over a batch of replies."""

    def __init__(self, policy: LocalPolicy, config: TrainerConfig | None = None) -> None:
        self.policy = policy
        self.config = config = config or TrainerConfig()
        self.params = [p for p in policy.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the policy has no trainable (LoRA) parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)

    def step(self, samples: Sequence[Sample], advantages: Sequence[float]) -> dict[str, float]:
        """One update from `samples` (as sampled by the policy) and their per-reply advantages.

        Returns loss, kl (mean log-ratio current/base over tokens, before the update), grad_norm (before
        clipping), ratio (mean importance ratio), tokens and seconds.
        """
        started = time.perf_counter()
        samples = list(samples)
        if len(samples) != len(advantages) or not samples:
            raise ValueError(f"need one advantage per sample, got {len(samples)} samples, {len(advantages)} advantages")
        for i, s in enumerate(samples):
            if len(s.logprobs) != len(s.completion_ids):
                raise ValueError(
                    f"sample {i} has {len(s.logprobs)} log-probs for {len(s.completion_ids)} tokens; the trainer "
                    "needs samples from a LocalPolicy (endpoints give no token ids)"
                )
        device = self.policy.device
        adv = torch.tensor([float(a) for a in advantages], dtype=torch.float32, device=device)
        if not bool(torch.isfinite(adv).all()):
            raise ValueError(f"advantages must be finite, got {list(advantages)}")
        tokens = sum(len(s.completion_ids) for s in samples)
        if tokens == 0:
            raise ValueError("the samples have no completion tokens to train on")
        size = self.config.micro_batch_size
        chunks = [samples[i : i + size] for i in range(0, len(samples), size)]
        model = self.policy.model

        with torch.no_grad():
            with model.disable_adapter():
                base = [self.policy.token_logprobs(c)[0] for c in chunks]
            if len(chunks) > 1:
                # The KL shaping centres on the whole batch's mean log-ratio: a no-grad pass gets it first.
                current, masks = map(list, zip(*(self.policy.token_logprobs(c) for c in chunks), strict=True))
        graph = None
        model.train()  # LoRA dropout, if configured, during the differentiable passes only
        try:
            if len(chunks) == 1:
                graph, mask = self.policy.token_logprobs(chunks[0])
                current, masks = [graph.detach()], [mask]
            width = max(m.shape[1] for m in masks)
            shaped = kl_shaped_advantages(
                adv, _pad(current, width), _pad(base, width), _pad(masks, width, False),
                self.config.kl_coef,
            )  # fmt: skip
            loss_sum = ratio_sum = 0.0
            row = 0
            for chunk, mask in zip(chunks, masks, strict=True):
                logp = graph if graph is not None else self.policy.token_logprobs(chunk)[0]
                steps = logp.shape[1]
                sampled = torch.zeros_like(logp)
                for i, s in enumerate(chunk):
                    sampled[i, : len(s.logprobs)] = torch.tensor(s.logprobs, device=device)
                ratio = torch.exp(logp - sampled)
                weights = shaped[row : row + len(chunk), :steps]
                loss = -(ratio * weights * mask).sum() / tokens
                loss.backward()
                loss_sum += float(loss.detach())
                ratio_sum += float((ratio.detach() * mask).sum())
                row += len(chunk)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm, error_if_nonfinite=True)
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            model.eval()
        kl = sum(float(((c - b) * m).sum()) for c, b, m in zip(current, base, masks, strict=True)) / tokens
        return {
            "loss": loss_sum,
            "kl": kl,
            "grad_norm": float(grad_norm),
            "ratio": ratio_sum / tokens,
            "tokens": float(tokens),
            "seconds": time.perf_counter() - started,
        }
