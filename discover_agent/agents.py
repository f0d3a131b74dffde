"""Agents behind one interface: TTT-Discover and the baselines share the loop, the budget, the logs.

One step: the policy is reseeded from (seed, step); the sampler picks `groups` start states (picks of one
state form one larger group); the policy samples `group_size` replies per pick; the executor scores them (the
next group is generated while the last one is evaluated); valid children go to the buffer; the agent learns
from the groups (only TTT does); the step is committed to the run folder (`rundir`), then best and metrics.
A user's agent subclasses `Agent` (or `SearchAgent` to reuse the loop) and plugs into `discover bench`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

import discover_envs  # noqa: F401 - registers the env ids
from discover_agent.config import (
    AgentConfig,
    ConfigError,
    GreedyConfig,
    PUCTConfig,
    TTTConfig,
    load_run_config,
    save_run_config,
)
from discover_agent.executor import Outcome, make_executor
from discover_agent.objective import entropic_advantages, mean_baseline_advantages
from discover_agent.plots import plot_progress
from discover_agent.rundir import RunDir, RunDirError, code_version
from discover_agent.sampler import FixedSampler, GreedySampler, PUCTSampler, Sampler
from discover_agent.storage import write_json


class StepProgress:
    """A transient bar under the step bar showing the phase in flight (tokens generated, replies evaluated,
    replies through the update), so work is visible within seconds of a step's start; off when not a TTY."""

    def __init__(self, enabled: bool) -> None:
        self.bar = tqdm(desc="step", leave=False, disable=not enabled, position=1, dynamic_ncols=True)

    def phase(self, name: str, total: int | None, unit: str) -> None:
        self.bar.reset(total=total)
        self.bar.unit = unit
        self.bar.set_description_str(name)

    def tick(self, n: int = 1) -> None:
        self.bar.update(n)

    def done(self, outcome: Any) -> Any:
        """Count one evaluated reply and pass its outcome through."""
        self.bar.update(1)
        return outcome

    def close(self) -> None:
        self.bar.close()


@dataclass
class RunResult:
    """What every agent returns: the single best state, and what it cost."""

    env: str
    agent: str
    model: str
    best: dict[str, Any]
    best_score: float | None
    best_reward: float
    rollouts: int
    steps: int
    wall_s: float
    tokens: int
    out: str
    curve: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Group:
    """The replies sampled from one start state, with their outcomes."""

    parent: dict[str, Any]
    samples: list[Any]
    outcomes: list[Outcome]

    @property
    def rewards(self) -> list[float]:
        return [reward for reward, _ in self.outcomes]


def derived_seed(seed: int, *keys: int) -> int:
    """A seed for one purpose (start state i, step k) of a run: a pure function of the run seed and the keys,
    so a resumed run draws at step k exactly what an uninterrupted one draws."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


INITIAL_KEY, STEP_KEY = 0, 1
#: Fields `discover resume` may change: budgets, and where the work runs (neither changes what is sampled).
RESUME_OVERRIDES = frozenset({"steps", "max_rollouts", "max_wall_s", "out", "workers", "executor", "ray_address"})


def open_env(env_id: str, env_kwargs: dict[str, Any]) -> gym.Env:
    """`gym.make` with errors that name the id or the bad --env-kwargs."""
    try:
        return gym.make(env_id, **env_kwargs)
    except gym.error.Error as exc:
        raise ConfigError(f"unknown or broken env {env_id!r}: {exc} (see `discover envs`)") from None
    except TypeError as exc:
        raise ConfigError(f"--env-kwargs {json.dumps(env_kwargs)} do not fit {env_id}: {exc}") from None


def construction_spec(env: gym.Env) -> Any:
    """The env's construction spec for constrained decoding (`env.metadata`), or None: free-text replies."""
    return env.metadata.get("construction_spec")


class Agent(ABC):
    """The one interface: build from a config (and optionally a ready policy), `run()` returns a RunResult."""

    name: ClassVar[str]
    config_class: ClassVar[type[AgentConfig]] = AgentConfig
    #: Whether the agent samples from a language model (a `Policy` may be passed in); calibration agents do not.
    uses_model: ClassVar[bool] = True

    def __init__(self, config: AgentConfig, policy: Any = None) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self._policy = policy
        self._inner = StepProgress(False)  # the in-step bar; `SearchAgent._run` shows a live one

    @abstractmethod
    def run(self, progress: bool = True, resume: bool = False) -> RunResult:
        """Run into `config.out`; `resume=True` continues the run held there (or starts it over, if the agent
        cannot continue one), as `discover bench` asks after an interruption."""


class SearchAgent(Agent):
    """The shared loop; subclasses choose the sampler and whether (and how) to learn.

    It uses the env only through Gymnasium (see the README's agent contract): the prompt is the observation
    of `reset(options={"state": parent})`, a reply is scored by `step(reply)` (in the executor), and
    `env.metadata` may give a construction spec for constrained decoding.
    """

    #: The env's construction spec when replies are constrained (set by `run`).
    _spec: Any = None

    @abstractmethod
    def make_sampler(self, initial: list[dict[str, Any]]) -> Sampler: ...

    def learn(self, groups: list[Group]) -> dict[str, float]:
        """Update the policy from a step's groups; search-only agents learn nothing."""
        return {}

    @property
    def policy(self) -> Any:
        if self._policy is None:
            self._policy = build_policy(self.config, trainable=False, spec=self._spec)
        return self._policy

    def checkpoint_extra(self, step_dir: Path) -> None:
        """Save into the step folder what besides the buffer a resume needs (TTT: adapter, optimiser)."""

    def restore_extra(self, step_dir: Path) -> None:
        """Load what `checkpoint_extra` saved."""

    def run(self, progress: bool = True, resume: bool = False) -> RunResult:
        """Run into `config.out`, which must not hold a run; `resume=True` continues the run it holds, whose
        config.json must match this config except for `RESUME_OVERRIDES`."""
        cfg = self.config
        run_dir = RunDir(cfg.out)
        if resume and cfg.env_kwargs is None and run_dir.file("config.json").is_file():
            # "the default" of a resumed run is what it resolved to when it started (pinned secrets included)
            saved = load_run_config(run_dir.file("config.json"))[1]
            cfg = self.config = dataclasses.replace(cfg, env_kwargs=saved.env_kwargs)
        env = open_env(cfg.env, cfg.resolved_env_kwargs())
        if not resume:  # config.json holds the arguments the env ran with, including secrets it drew itself
            pinned = env.metadata.get("pinned_kwargs") or {}
            cfg = self.config = dataclasses.replace(cfg, env_kwargs={**cfg.given_env_kwargs(), **pinned})
        self._spec = construction_spec(env) if cfg.constrained else None
        _ = self.policy  # built here, so a bad --model fails before the run folder is touched
        try:
            with run_dir.locked():
                if resume:
                    self._check_resumable(run_dir)
                elif run_dir.holds_run:
                    raise RunDirError(
                        f"{run_dir.path} holds a run; continue it with `discover resume {run_dir.path}` "
                        "or choose another --out"
                    )
                return self._run(env, run_dir, progress, resume)
        finally:
            env.close()

    def _check_resumable(self, run_dir: RunDir) -> None:
        path = run_dir.file("config.json")
        if not path.is_file():
            raise RunDirError(f"{path} not found: {run_dir.path} holds no run to resume")
        agent, saved = load_run_config(path)
        if agent != self.name or type(saved) is not type(self.config):
            raise RunDirError(f"{run_dir.path} holds a {agent} run; refusing to resume it as {self.name}")
        changed = sorted(
            key for key, value in saved.to_dict().items()
            if key not in RESUME_OVERRIDES and self.config.to_dict()[key] != value
        )  # fmt: skip
        if changed:
            raise RunDirError(f"resuming {run_dir.path} may change only budgets, not {changed} (see its config.json)")

    def _start(self, env: gym.Env, run_dir: RunDir, resume: bool) -> tuple[Sampler, dict[str, Any], list[Any]]:
        """A fresh sampler and checkpoint, or the saved ones (re-verified through `reset`) on resume."""
        cfg = self.config
        saved = run_dir.load_checkpoint() if resume else None
        if saved is None:
            initial: dict[str, dict[str, Any]] = {}
            for i in range(cfg.initial_states):
                _, info = env.reset(seed=cfg.seed if i == 0 else derived_seed(cfg.seed, INITIAL_KEY, i))
                initial.setdefault(info["state"]["id"], info["state"])
            checkpoint = {
                "agent": self.name, "env": cfg.env, "step": 0, "rollouts": 0, "tokens": 0, "wall_s": 0.0,
                "initial": list(initial.values()), "lineage": {}, "metrics": [], "curve": [],
            }  # fmt: skip
            return self.make_sampler(checkpoint["initial"]), checkpoint, run_dir.kept_rows(0)
        checkpoint, buffer, step_dir = saved
        if checkpoint["agent"] != self.name or checkpoint["env"] != cfg.env:
            raise RunDirError(
                f"{run_dir.file('checkpoint.json')} is a {checkpoint['agent']} run on {checkpoint['env']}; "
                f"refusing to resume it as {self.name} on {cfg.env}"
            )
        sampler = self.make_sampler(checkpoint["initial"])
        sampler.load_state_dict(buffer)
        states = [*checkpoint["initial"], *sampler.states(), sampler.best()]
        _verify_states(env, states, step_dir / "buffer.json")
        self.restore_extra(step_dir)
        return sampler, checkpoint, run_dir.kept_rows(checkpoint["step"])

    def _run(self, env: gym.Env, run_dir: RunDir, progress: bool, resume: bool) -> RunResult:
        cfg = self.config
        sampler, checkpoint, history = self._start(env, run_dir, resume)
        save_run_config(
            run_dir.file("config.json"), self.name, cfg, version=code_version(), sandbox=env.metadata.get("sandbox")
        )
        executor = make_executor(cfg.executor, cfg.env, cfg.resolved_env_kwargs(), cfg.workers, cfg.ray_address)
        initial_ids = {s["id"] for s in checkpoint["initial"]}
        started = time.perf_counter() - checkpoint["wall_s"]
        bar = tqdm(total=cfg.steps, initial=checkpoint["step"], desc=f"{self.name} {cfg.env}", disable=not progress)
        self._inner = StepProgress(progress and sys.stderr.isatty())
        self._hook(self.policy, self._inner.tick)
        try:
            while checkpoint["step"] < cfg.steps and not self._out_of_budget(checkpoint, started):
                step = checkpoint["step"]
                tick = time.perf_counter()
                reseed = getattr(self.policy, "reseed", None)
                if reseed is not None:
                    reseed(derived_seed(cfg.seed, STEP_KEY, step))
                groups = self._rollouts(env, sampler, executor)
                gen_tokens = sum(len(s.completion_ids) for g in groups for s in g.samples)
                for group in groups:
                    children = [info["next_state"] for _, info in group.outcomes if info["valid"]]
                    sampler.update(group.parent, children, len(group.samples))
                    for child in children:
                        # A state found again (e.g. a start state copied back) keeps its first parent.
                        if child["id"] not in initial_ids:
                            checkpoint["lineage"].setdefault(child["id"], [child["parent_id"], child["score"], step])
                metrics = self.learn(groups)
                checkpoint["rollouts"] += sum(len(g.samples) for g in groups)
                checkpoint["tokens"] += gen_tokens
                checkpoint["step"] = step + 1
                checkpoint["wall_s"] = time.perf_counter() - started
                best = sampler.best()
                checkpoint["curve"].append([checkpoint["rollouts"], best["score"]])
                row = self._metrics_row(step, groups, best, metrics, gen_tokens, time.perf_counter() - tick)
                checkpoint["metrics"].append(row)
                self._save(env, run_dir, step, groups, sampler, checkpoint, history)
                bar.update(1)
                bar.set_postfix(
                    best=f"{best['score']:.6g}", mean_r=f"{row['mean_reward']:.4g}", valid=row["valid_frac"],
                    beta=row.get("beta", "-"), kl=row.get("kl", "-"), tok_s=f"{row['tokens_per_s']:.1f}",
                )  # fmt: skip
        finally:
            self._hook(self.policy, None)
            self._inner.close()
            bar.close()
            executor.close()
        best = sampler.best()
        return RunResult(
            env=cfg.env, agent=self.name, model=self._model_name(), best=best, best_score=best["score"],
            best_reward=best["reward"], rollouts=checkpoint["rollouts"], steps=checkpoint["step"],
            wall_s=checkpoint["wall_s"], tokens=checkpoint["tokens"], out=str(run_dir.path),
            curve=[tuple(point) for point in checkpoint["curve"]],
        )  # fmt: skip

    def _out_of_budget(self, checkpoint: dict[str, Any], started: float) -> bool:
        cfg = self.config
        per_step = cfg.groups * cfg.group_size
        if cfg.max_rollouts is not None and checkpoint["rollouts"] + per_step > cfg.max_rollouts:
            return True
        return cfg.max_wall_s is not None and time.perf_counter() - started >= cfg.max_wall_s

    def _rollouts(self, env: gym.Env, sampler: Sampler, executor: Any) -> list[Group]:
        """Propose every group of the step at once (`propose`), then evaluate; evaluations do not overlap
        generation, so the sandboxed processes and torch's threads never compete for the cores.
        Picks of one start state form one larger group (`Sampler.select_groups`)."""
        picks = list(sampler.select_groups(self.config.groups, self.config.group_size))
        replies = self.propose(env, picks)
        pending = [
            (parent, samples, [executor.submit(parent, s.text) for s in samples])
            for (parent, _), samples in zip(picks, replies, strict=True)
        ]
        self._inner.phase("evaluating", sum(len(futures) for _, _, futures in pending), "reply")
        return [
            Group(parent, samples, [self._inner.done(f.result()) for f in futures])
            for parent, samples, futures in pending
        ]

    def propose(self, env: gym.Env, picks: list[tuple[dict[str, Any], int]]) -> list[list[Any]]:
        """The replies of each (start state, replies) pick: the policy samples every group of the step in one
        batched call (`Policy.sample_groups`; decoding costs about the same per token at batch 8 as at 4) from
        the prompts `reset` gives for the start states."""
        prompts = [env.reset(options={"state": parent})[0] for parent, _ in picks]
        self._inner.phase("generating", None, "tok")
        return self.policy.sample_groups(prompts, [size for _, size in picks], self._spec)

    @staticmethod
    def _hook(component: Any, tick: Callable[[int], None] | None) -> None:
        """Point a component's optional `progress` hook (LocalPolicy, Trainer) at the in-step bar."""
        if hasattr(component, "progress"):
            component.progress = tick

    def _metrics_row(
        self,
        step: int,
        groups: list[Group],
        best: dict[str, Any],
        learned: dict[str, float],
        tokens: int,
        secs: float,
    ) -> dict[str, Any]:
        rewards = np.array([r for g in groups for r in g.rewards], dtype=np.float64)
        valid = [info["valid"] for g in groups for _, info in g.outcomes]
        valid_rewards = [r for g in groups for r, info in g.outcomes if info["valid"]]
        scores = [info["score"] for g in groups for _, info in g.outcomes if info["valid"]]
        improved = [info["valid"] and r > g.parent["reward"] for g in groups for r, info in g.outcomes]
        copies = [info["valid"] and _is_copy(g.parent, info) for g in groups for _, info in g.outcomes]
        row: dict[str, Any] = {
            "step": step,
            "rollouts": len(rewards),
            "valid_frac": round(float(np.mean(valid)), 4) if valid else 0.0,
            "mean_reward": float(rewards.mean()) if rewards.size else math.nan,
            "mean_valid_reward": float(np.mean(valid_rewards)) if valid_rewards else None,
            "max_reward": float(rewards.max()) if rewards.size else math.nan,
            "improve_rate": round(float(np.mean(improved)), 4) if improved else 0.0,
            "copy_rate": round(float(np.mean(copies)), 4) if copies else 0.0,
            "step_best_score": scores[int(np.argmax(valid_rewards))] if scores else None,
            "best_score": best["score"],
            "best_reward": best["reward"],
            "tokens": tokens,
            "tokens_per_s": tokens / secs if secs > 0 else 0.0,
            "step_s": secs,
        }
        row.update({k: round(v, 6) if isinstance(v, float) else v for k, v in learned.items()})
        return row

    def _save(
        self,
        env: gym.Env,
        run_dir: RunDir,
        step: int,
        groups: list[Group],
        sampler: Sampler,
        checkpoint: dict[str, Any],
        history: list[dict[str, Any]],
    ) -> None:
        """Log the step's rollouts, commit the step (see `rundir`), then best, metrics and plot; `history`
        (the rows logged so far) is extended in place so the plot never re-reads the growing log."""
        rows = []
        for group in groups:
            for sample, (reward, info) in zip(group.samples, group.outcomes, strict=True):
                rows.append({
                    "step": step, "parent_id": group.parent["id"], "reward": reward, "score": info["score"],
                    "valid": info["valid"], "error": info["error"], "tokens": len(sample.completion_ids),
                    "id": info["next_state"]["id"] if info["valid"] else None, "sandbox": info.get("sandbox"),
                    "reply": sample.text,
                })  # fmt: skip
        run_dir.log_rollouts(rows)
        history.extend(rows)

        def write_step(folder: Path) -> None:
            write_json(folder / "buffer.json", sampler.state_dict())
            self.checkpoint_extra(folder)

        run_dir.commit_step(checkpoint, write_step)
        best = sampler.best()
        meta = {"env": self.config.env, "agent": self.name, "step": checkpoint["step"], "score": best["score"]}
        run_dir.write_best(best, _lineage(best, checkpoint["lineage"]), meta)
        run_dir.write_metrics(checkpoint["metrics"])
        score_name = env.metadata.get("score_name", "score")
        plot_progress(history, run_dir.file("progress.png"), f"{self.name} on {self.config.env}", score_name)

    def _model_name(self) -> str:
        cfg = self.config
        return cfg.endpoint or cfg.model or "SmolLM2-135M-Instruct (embedded)"


def _verify_states(env: gym.Env, states: list[dict[str, Any]], source: Path) -> None:
    """Restart from every loaded state once: the env recomputes each score, so a hand-edited buffer is
    refused by the id of the state that fails instead of being trusted into best.json."""
    seen: set[str] = set()
    for state in states:
        key = json.dumps(state, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        try:
            env.reset(options={"state": state})
        except Exception as exc:  # any env's refusal, whatever its exception type
            raise RunDirError(f"{source}: state {state.get('id')} fails verification: {exc}") from None


def _is_copy(parent: dict[str, Any], info: dict[str, Any]) -> bool:
    """Whether a valid reply only restated its start state: the env's own judgement (`info["copy"]`, e.g.
    within the prompt's rounding) where it gives one, else the same state id."""
    copy = info.get("copy")
    return bool(copy) if copy is not None else info["next_state"]["id"] == parent["id"]


def _lineage(state: dict[str, Any], lineage: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The chain of ancestors of `state` back to the start state, oldest first (a cycle ends the walk)."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    current = state["id"]
    while current not in seen:
        seen.add(current)
        parent, score, step = lineage.get(current, [None, None, None])
        chain.append({"id": current, "score": score, "step": step})
        if parent is None:
            break
        current = parent
    return chain[::-1]


class BestOfN(SearchAgent):
    """Sample from the initial states every time, keep the best: the sampling-only baseline."""

    name = "best-of-n"

    def make_sampler(self, initial: list[dict[str, Any]]) -> Sampler:
        return FixedSampler(initial)


class PUCTSearch(SearchAgent):
    """PUCT reuse of the buffer without training (the paper's ablation)."""

    name = "puct"
    config_class = PUCTConfig

    def make_sampler(self, initial: list[dict[str, Any]]) -> Sampler:
        cfg = self.config
        return PUCTSampler(
            initial, c=cfg.puct_c, max_size=cfg.buffer_size, children_per_parent=cfg.children_per_parent,
            seed=cfg.seed, visits=cfg.visits,
        )  # fmt: skip


class Greedy(SearchAgent):
    """Epsilon-greedy restarts from the best states, no training."""

    name = "greedy"
    config_class = GreedyConfig

    def make_sampler(self, initial: list[dict[str, Any]]) -> Sampler:
        cfg = self.config
        return GreedySampler(initial, epsilon=cfg.epsilon, top_k=cfg.top_k, seed=cfg.seed)


class TTTDiscover(PUCTSearch):
    """TTT-Discover: PUCT reuse + entropic leave-one-out advantages + a LoRA update every step."""

    name = "ttt"
    config_class = TTTConfig

    def __init__(self, config: TTTConfig, policy: Any = None) -> None:
        super().__init__(config, policy)
        self._trainer = None

    @property
    def policy(self) -> Any:
        if self._policy is None:
            self._policy = build_policy(self.config, trainable=True, spec=self._spec)
        return self._policy

    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            self._trainer = build_trainer(self.config, self.policy)
        return self._trainer

    def learn(self, groups: list[Group]) -> dict[str, float]:
        self._hook(self.trainer, self._inner.tick)
        self._inner.phase("updating", sum(len(g.samples) for g in groups), "reply")
        samples, advantages, betas = [], [], []
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


# Components are built from the agent's config here, and only here: a config field named like a
# `PolicyConfig` / `TrainerConfig` field fills it (tests check that every such field has a knob).


def build_policy(config: AgentConfig, trainable: bool, spec: Any = None) -> Any:
    """A local transformers model (embedded SmolLM2 by default) or an OpenAI-compatible endpoint; `spec` (the
    env's construction spec, if replies are constrained) sizes the reply budget when max_new_tokens is unset."""
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        from discover_agent.constrained import default_max_new_tokens

        max_new_tokens = 256 if spec is None else default_max_new_tokens(spec)
    if config.endpoint is not None:
        if trainable:
            raise ConfigError("TTT trains LoRA weights locally; --endpoint only serves sampling-only agents")
        from discover_agent.openai_policy import OpenAIPolicy

        return OpenAIPolicy(
            base_url=config.endpoint, model=config.model or "default", temperature=config.temperature,
            max_tokens=max_new_tokens, seed=config.seed,
        )  # fmt: skip
    from discover_agent.policy import LocalPolicy, PolicyConfig

    knobs = _matching(config, PolicyConfig)
    if knobs.get("target_modules") is None:
        knobs.pop("target_modules", None)  # PolicyConfig's default
    else:
        knobs["target_modules"] = tuple(knobs["target_modules"])
    return LocalPolicy.from_pretrained(config.model, PolicyConfig(**{**knobs, "max_new_tokens": max_new_tokens}))


def build_trainer(config: TTTConfig, policy: Any) -> Any:
    from discover_agent.trainer import Trainer, TrainerConfig, default_kl_coef, default_lr

    knobs = _matching(config, TrainerConfig)
    if knobs["kl_coef"] is None:
        knobs["kl_coef"] = default_kl_coef(config.env)
    if knobs["lr"] is None:
        knobs["lr"] = default_lr(config.model)
    return Trainer(policy, TrainerConfig(**{**knobs, "betas": tuple(knobs["betas"])}))


def _matching(config: AgentConfig, target: type) -> dict[str, Any]:
    """The fields of `config` that `target` (a dataclass) also has, by name."""
    names = {f.name for f in dataclasses.fields(target)}
    return {key: value for key, value in config.to_dict().items() if key in names}
