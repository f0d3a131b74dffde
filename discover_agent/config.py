"""One config dataclass per agent (as in TRL): every knob with its reason, shown by --help, saved per run.

The agent builds its components (env, policy, trainer, sampler, executor) from this config alone, in
`discover_agent.agents`; `--config FILE` (JSON or YAML) sets any field and command-line flags override it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import discover_envs


def knob(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field whose help text travels with it to the CLI."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


class ConfigError(ValueError):
    """A config value, field or file that cannot be used; the message names it, and `field` the field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _at_least(config: Any, low: float, *names: str, optional: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
            raise ConfigError(f"{name} must be a number >= {low:g}, got {value!r}", name)


def _finite_positive(config: Any, *names: str, optional: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a finite number > 0, got {value!r}", name)


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
    initial_states: int = knob(1, "Start states drawn with reset(seed=...) to fill the buffer (duplicates merged).")
    max_rollouts: int | None = knob(None, "Stop after this many rollouts (replies), whatever --steps says.")
    max_wall_s: float | None = knob(None, "Stop after this many seconds of wall clock (checked between steps).")
    seed: int = knob(0, "Seed of the start states, the sampler and the sampling of each step (from seed, step).")
    out: str = knob("runs/latest", "Output folder: rollouts.jsonl, buffer, best.json, metrics.csv, progress.png.")
    model: str | None = knob(None, "Local HF folder or model id; default: the embedded SmolLM2-135M-Instruct.")
    endpoint: str | None = knob(
        None, "OpenAI-compatible base URL to sample from instead of a local model (sampling-only agents)."
    )
    device: str = knob("auto", "Torch device for a local model: auto, cpu or cuda.")
    temperature: float = knob(1.0, "Sampling temperature.")
    max_new_tokens: int | None = knob(
        None, "Longest reply in tokens; default: enough for the env's construction spec, else 256."
    )
    batch_size: int = knob(
        16, "Sequences per decode batch of a local model (a step's replies are split into these; 16: 2 groups x 8)."
    )
    share_prefix: bool = knob(
        True, "Run each distinct prompt once and share its keys/values with its replies (local models)."
    )
    merged_sampling: bool | None = knob(
        None,
        "Sample from a plain copy with the LoRA adapter merged in (re-merged after each update; a second copy of "
        "the weights in memory); default: on CPU only.",
    )
    constrained: bool = knob(
        True,
        "Constrain replies to a valid ```json construction (construction envs; a grammar for local models, "
        "a JSON schema in response_format for --endpoint).",
    )
    unsafe_no_isolation: bool = knob(
        False,
        "UNSAFE: let candidate code run without a namespace sandbox where bubblewrap cannot work (a root "
        "parent refuses otherwise); passed to the env as unsafe_no_isolation=True.",
    )
    workers: int = knob(2, "Parallel evaluations (sandboxed processes).")
    executor: str = knob("local", "Where evaluations run: local (thread pool) or ray.")
    ray_address: str | None = knob(None, "Ray cluster address for --executor ray (default: start a local one).")

    def __post_init__(self) -> None:
        _at_least(self, 0, "steps", "seed")
        _at_least(self, 1, "groups", "group_size", "initial_states", "workers", "batch_size")
        _at_least(self, 1, "max_rollouts", "max_new_tokens", optional=True)
        _finite_positive(self, "temperature")
        _finite_positive(self, "max_wall_s", optional=True)
        if not str(self.out).strip():
            raise ConfigError("out must name a folder, got an empty string", "out")
        if not self.env:
            raise ConfigError("env must be a Gymnasium id, got an empty string", "env")
        if self.executor not in ("local", "ray"):
            raise ConfigError(f"executor must be 'local' or 'ray', got {self.executor!r}", "executor")
        if self.env_kwargs is not None and not isinstance(self.env_kwargs, dict):
            raise ConfigError(f"env_kwargs must be a JSON object, got {self.env_kwargs!r}", "env_kwargs")

    def given_env_kwargs(self) -> dict[str, Any]:
        """--env-kwargs, or the env's CPU preset (`Problem.cpu_preset`) when none were given."""
        return discover_envs.cpu_preset(self.env) if self.env_kwargs is None else dict(self.env_kwargs)

    def resolved_env_kwargs(self) -> dict[str, Any]:
        kwargs = self.given_env_kwargs()
        return {**kwargs, "unsafe_no_isolation": True} if self.unsafe_no_isolation else kwargs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PUCTConfig(AgentConfig):
    """PUCT reuse of the buffer (the paper's sampler)."""

    puct_c: float = knob(1.0, "Exploration constant c of the PUCT score.")
    buffer_size: int = knob(1000, "Most states kept in the buffer (the best is always kept).")
    children_per_parent: int = knob(2, "Children of a parent kept in the buffer (its best ones).")
    visits: str = knob(
        "expansions", "PUCT visit counting: expansions (the paper's appendix, default) or rollouts (released code)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, 0, "puct_c")
        _at_least(self, 1, "buffer_size", "children_per_parent")
        if self.visits not in ("expansions", "rollouts"):
            raise ConfigError(f"visits must be 'expansions' or 'rollouts', got {self.visits!r}", "visits")


@dataclass
class TTTConfig(PUCTConfig):
    """TTT-Discover: PUCT reuse + entropic advantages + LoRA updates at test time.

    The trainer and LoRA knobs carry the names of `TrainerConfig` / `PolicyConfig` fields, which they fill.
    """

    lr: float | None = knob(
        None,
        "AdamW learning rate of the LoRA weights; default: 3e-4 for the embedded SmolLM2-135M (the sweep in "
        "leaderboards/history-128/ErdosMinOverlap-v0.md), the paper's 4e-5 for other models (`trainer.default_lr`).",
    )
    kl_coef: float | None = knob(
        None,
        "lambda of the per-token KL shaping against the base model (LoRA disabled); default: the paper's value "
        "for the task (0.01 for algorithm engineering, else 0.1; the env's metadata['kl_coef']).",
    )
    beta: float | None = knob(None, "Entropic temperature; default: adaptive, so that KL(q || uniform) = ln 2.")
    baseline: str = knob("entropic", "Advantage estimator: entropic (the paper) or mean (GRPO-style ablation).")
    lora_rank: int | None = knob(None, "LoRA rank; default 32 on GPU, 8 on CPU.")
    lora_alpha: float | None = knob(None, "LoRA alpha; default 2 * rank, so the adapter's scale stays 2.")
    lora_dropout: float = knob(0.0, "LoRA dropout; 0 keeps training log-probs equal to the sampling ones.")
    lora_lm_head: bool = knob(False, "Also put LoRA on the unembedding (lm_head), as the paper's training service.")
    target_modules: list[str] | None = knob(
        None, "Comma-separated module names that get LoRA weights; default: attention and MLP projections."
    )
    max_grad_norm: float | None = knob(None, "Gradient clipping norm; default: no clipping (the released code).")
    betas: list[float] = knob([0.9, 0.95], "Adam's beta1,beta2; (0.9, 0.95) as the released code.")
    micro_batch_size: int = knob(16, "Replies per forward/backward pass of the update (memory, not maths).")
    weight_decay: float = knob(0.0, "AdamW weight decay of the LoRA weights.")
    reuse_prompts: bool = knob(
        True,
        "Keep each sampled prompt's keys/values with their graph for the update: saves a forward pass of every "
        "prompt, holds that memory from sampling to the update (memory, not maths).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _finite_positive(self, "lr", "beta", "max_grad_norm", optional=True)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}", "betas")
        _at_least(self, 0, "lora_dropout", "weight_decay")
        _at_least(self, 0, "kl_coef", optional=True)
        _at_least(self, 1, "micro_batch_size")
        _at_least(self, 1, "lora_rank", optional=True)
        if self.baseline not in ("entropic", "mean"):
            raise ConfigError(f"baseline must be 'entropic' or 'mean', got {self.baseline!r}", "baseline")


@dataclass
class GreedyConfig(AgentConfig):
    """Epsilon-greedy reuse of the best states, no training."""

    epsilon: float = knob(0.1, "Probability of picking a random buffer state instead of a top one.")
    top_k: int = knob(8, "How many of the best states a greedy pick chooses among.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.epsilon <= 1:
            raise ConfigError(f"epsilon must be in [0, 1], got {self.epsilon!r}", "epsilon")
        _at_least(self, 1, "top_k")


@dataclass
class ESConfig(AgentConfig):
    """The (1+lambda)-ES calibration agent (`discover_agent.calibration`)."""

    sigma: float = knob(
        0.05,
        "Initial step size of the ES, as a fraction of the construction's scale (the smaller of the bounds' width "
        "and the start state's largest value).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _finite_positive(self, "sigma")


CONFIG_CLASSES: dict[str, type[AgentConfig]] = {
    c.__name__: c for c in (AgentConfig, PUCTConfig, TTTConfig, GreedyConfig, ESConfig)
}


#: Largest config file read, in bytes, and deepest nesting of its values (a run's config.json nests 3 deep).
MAX_CONFIG_BYTES = 2**20
MAX_CONFIG_DEPTH = 32


class _AliasRefused(Exception):
    """A YAML alias in a config file (see `_NoAliasLoader`)."""


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without aliases: `*name` lets a few lines stand for billions of values ("billion laughs")
    once the config is copied or saved, and a config has no use for them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(f"YAML aliases (*{event.anchor}, line {event.start_mark.line + 1}) are not allowed")
        return super().compose_node(parent, index)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A JSON or YAML file holding one mapping, with errors that name the file; at most `MAX_CONFIG_BYTES`
    and `MAX_CONFIG_DEPTH` levels deep, without YAML aliases."""
    path = Path(path)
    kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} has more than {MAX_CONFIG_BYTES} bytes; config files are read up to that")
    too_deep = f"{path} nests values more than {MAX_CONFIG_DEPTH} levels deep"
    try:
        text = raw.decode("utf-8")
        data = yaml.load(text, Loader=_NoAliasLoader) if kind == "YAML" else json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is not valid {kind}: {' '.join(str(exc).split())}") from None
    except _AliasRefused as exc:
        raise ConfigError(f"{path}: {exc} in a config file") from None
    except RecursionError:
        raise ConfigError(too_deep) from None
    if nests_deeper_than(data, MAX_CONFIG_DEPTH):
        raise ConfigError(too_deep)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config fields, got {type(data).__name__}")
    return data


def nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists and mappings in `value` nest more than `limit` levels (iteratively: no recursion limit)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def checked_fields(data: dict[str, Any], where: str, *classes: type[AgentConfig]) -> dict[str, Any]:
    """`data` if every key is a field of one of `classes`; else an error naming the unknown keys and `where`."""
    unknown = set(data) - {f.name for cls in classes for f in dataclasses.fields(cls)}
    if unknown:
        names = " or ".join(cls.__name__ for cls in classes)
        raise ConfigError(f"{where}: unknown config field(s) {sorted(unknown)} for {names}")
    return data


def save_run_config(path: Path, agent: str, config: AgentConfig, **extra: Any) -> None:
    """config.json of a run: the agent, its config class and every field, plus `extra` facts (e.g. sandbox)."""
    from discover_agent.storage import write_json

    write_json(path, {"agent": agent, "config_class": type(config).__name__, "config": config.to_dict(), **extra})


def load_run_config(path: str | Path) -> tuple[str, AgentConfig]:
    """The agent name and config saved by `save_run_config`, refusing unknown classes and fields by name."""
    data = read_mapping(path)
    name = data.get("config_class")
    if name not in CONFIG_CLASSES or not isinstance(data.get("config"), dict) or "agent" not in data:
        raise ConfigError(f"{path} is not a run's config.json (needs agent, config_class and config)")
    cls = CONFIG_CLASSES[name]
    try:
        return data["agent"], cls(**checked_fields(data["config"], str(path), cls))
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
