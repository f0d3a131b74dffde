"""TTT-Discover: PUCT reuse of the buffer, entropic leave-one-out advantages and a LoRA update every step.

The loop is `SearchAgent`'s with `PUCTSampler` (as `puct`); `learn` turns each group's rewards into advantages
(`objective`) and takes one optimiser step on the LoRA weights (`trainer`); the adapter and Adam's moments are
saved with every step, so a resumed run continues exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from discover_agent.agents import _matching, build_policy
from discover_agent.config import TTTConfig
from discover_agent.objective import entropic_advantages, mean_baseline_advantages
from discover_agent.search import PUCTSearch
from discover_agent.types import Group


class TTTDiscover(PUCTSearch[TTTConfig]):
    """TTT-Discover: PUCT reuse + entropic leave-one-out advantages + a LoRA update every step."""

    name = "ttt"
    config_class = TTTConfig

    def __init__(self, config: TTTConfig, policy: Any = None) -> None:
        super().__init__(config, policy)
        self._trainer: Any = None

    @property
    def policy(self) -> Any:
        if self._policy is None:
            self._policy = build_policy(self.config, trainable=True, spec=self._spec)
        return self._policy

    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            self._trainer = build_trainer(self.config, self.policy, self._task.get("kl_coef"))
        return self._trainer

    def learn(self, groups: list[Group]) -> dict[str, float]:
        self._hook(self.trainer, self._inner.tick)
        self._inner.phase("updating", sum(len(g.samples) for g in groups), "reply")
        samples: list[Any] = []
        advantages: list[float] = []
        betas: list[float] = []
        for group in groups:
            if self.config.baseline == "entropic":
                adv, beta = entropic_advantages(group.rewards, beta=self.config.beta)
                betas.append(beta)
            else:
                adv = mean_baseline_advantages(group.rewards)
            samples.extend(group.samples)
            advantages.extend(float(a) for a in adv)
        metrics = dict(self.trainer.step(samples, advantages, [len(g.samples) for g in groups]))
        if betas:
            metrics["beta"] = float(np.mean(betas))
        return metrics

    def checkpoint_extra(self, step_dir: Path) -> None:
        import torch

        self.policy.save_adapter(step_dir / "adapter")
        torch.save(self.trainer.state_dict(), step_dir / "trainer.pt")  # Adam's moments and step counts

    def restore_extra(self, step_dir: Path) -> None:
        import torch

        self.policy.load_adapter(step_dir / "adapter")
        self.trainer.load_state_dict(torch.load(step_dir / "trainer.pt", weights_only=True))


def build_trainer(config: TTTConfig, policy: Any, task_kl_coef: float | None = None) -> Any:
    """The trainer for `policy` from the config; an unset kl_coef is the task's (`env.metadata["kl_coef"]`, the
    paper's lambda for it), else the trainer's default; an unset lr is the model's default (`default_lr`)."""
    from discover_agent.trainer import DEFAULT_KL_COEF, Trainer, TrainerConfig, default_lr

    knobs = _matching(config, TrainerConfig)
    if knobs["kl_coef"] is None:
        knobs["kl_coef"] = DEFAULT_KL_COEF if task_kl_coef is None else task_kl_coef
    if knobs["lr"] is None:
        knobs["lr"] = default_lr(config.model)
    return Trainer(policy, TrainerConfig(**{**knobs, "betas": tuple(knobs["betas"])}))
