"""One config dataclass per agent (as in TRL): each knob with its reason, shown by --help, saved per run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def knob(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field whose help text travels with it to the CLI."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


#: CPU-friendly environment arguments per env id: small instances so a 135M model on 2 cores can act with a
#: short JSON construction. Used when the user gives no --env-kwargs.
CPU_PRESETS: dict[str, dict[str, Any]] = {
    "discover/ErdosMinOverlap-v0": {"n": 16},
    "discover/AC1-v0": {"n": 16},
    "discover/AC2-v0": {"n": 16},
    "discover/CirclePacking26-v0": {},
    "discover/CirclePacking32-v0": {},
}


@dataclass
class AgentConfig:
    """Knobs every agent shares: the problem, the budget, the policy and where the run is written."""

    env: str = knob("discover/ErdosMinOverlap-v0", "Gymnasium id of the problem (see `discover envs`).")
    env_kwargs: dict[str, Any] | None = knob(
        None, "JSON object of env constructor arguments; default: the CPU preset of the env, if any."
    )
    steps: int = knob(8, "Training/search steps; each samples groups * group_size rollouts.")
    groups: int = knob(2, "Start states (groups) picked per step.")
    group_size: int = knob(4, "Replies sampled per start state; advantages are computed within a group.")
    max_rollouts: int | None = knob(None, "Stop after this many rollouts (replies), whatever --steps says.")
    max_wall_s: float | None = knob(None, "Stop after this many seconds of wall clock (checked between steps).")
    seed: int = knob(0, "Seed of the env's start state, the sampler and the policy's sampling.")
    out: str = knob("runs/latest", "Output folder: rollouts.jsonl, buffer.json, best.json, metrics.csv, progress.png.")
    model: str | None = knob(None, "Local HF folder or model id; default: the embedded SmolLM2-135M-Instruct.")
    endpoint: str | None = knob(
        None, "OpenAI-compatible base URL to sample from instead of a local model (sampling-only agents)."
    )
    device: str = knob("auto", "Torch device for a local model: auto, cpu or cuda.")
    temperature: float = knob(1.0, "Sampling temperature.")
    max_new_tokens: int = knob(256, "Longest reply in tokens.")
    constrained: bool = knob(
        True, "Grammar-constrain replies to a valid ```json construction (construction envs, local models)."
    )
    workers: int = knob(2, "Parallel evaluations (sandboxed processes).")
    executor: str = knob("local", "Where evaluations run: local (thread pool) or ray.")
    ray_address: str | None = knob(None, "Ray cluster address for --executor ray (default: start a local one).")

    def __post_init__(self) -> None:
        for name, low in (("steps", 0), ("groups", 1), ("group_size", 1), ("workers", 1), ("max_new_tokens", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")

    def resolved_env_kwargs(self) -> dict[str, Any]:
        return dict(CPU_PRESETS.get(self.env, {}) if self.env_kwargs is None else self.env_kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        from discover_agent.storage import write_json

        write_json(path, {"config_class": type(self).__name__, **self.to_dict()})


@dataclass
class PUCTConfig(AgentConfig):
    """PUCT reuse of the buffer (the paper's sampler)."""

    puct_c: float = knob(1.0, "Exploration constant c of the PUCT score.")
    buffer_size: int = knob(1000, "Most states kept in the buffer (the best is always kept).")


@dataclass
class TTTConfig(PUCTConfig):
    """TTT-Discover: PUCT reuse + entropic advantages + LoRA updates at test time."""

    lr: float = knob(4e-5, "AdamW learning rate of the LoRA weights.")
    kl_coef: float = knob(0.1, "lambda of the per-token KL shaping against the base model (LoRA disabled).")
    beta: float | None = knob(None, "Entropic temperature; default: adaptive, so that KL(q || uniform) = ln 2.")
    baseline: str = knob("entropic", "Advantage estimator: entropic (the paper) or mean (GRPO-style ablation).")
    lora_rank: int | None = knob(None, "LoRA rank; default 32 on GPU, 8 on CPU.")
    max_grad_norm: float = knob(1.0, "Gradient clipping norm.")


@dataclass
class GreedyConfig(AgentConfig):
    """Epsilon-greedy reuse of the best states, no training."""

    epsilon: float = knob(0.1, "Probability of picking a random buffer state instead of a top one.")
    buffer_size: int = knob(1000, "Most states kept in the buffer.")


def load_config(path: Path) -> AgentConfig:
    """Read a config saved by `AgentConfig.save`, refusing unknown classes and fields by name."""
    data = json.loads(Path(path).read_text())
    classes = {c.__name__: c for c in (AgentConfig, PUCTConfig, TTTConfig, GreedyConfig)}
    name = data.pop("config_class", None)
    if name not in classes:
        raise ValueError(f"{path}: unknown config class {name!r}")
    cls = classes[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown config field(s) {sorted(unknown)} for {name}")
    return cls(**data)
