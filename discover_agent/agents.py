"""The agent interface and the shared loop: TTT-Discover, the baselines and the calibration agents share the loop,
the budget and the logs.

One step (`SearchAgent._step`): the policy is reseeded from (seed, step); the sampler picks `groups` start states
(picks of one state form one larger group); `propose` gives `group_size` replies per pick; the executor scores
them; valid children go to the buffer; the agent learns from the groups (only TTT does). `_commit` then writes the
step to the run folder (`rundir`): rows, buffer, checkpoint, best, metrics and plot.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

import discover_envs  # noqa: F401 - registers the env ids
from discover_agent.config import AgentConfig, ConfigError, load_run_config, save_run_config
from discover_agent.executor import Executor, make_executor
from discover_agent.plots import plot_progress
from discover_agent.rundir import Checkpoint, Lineage, RunDir, RunDirError, code_version
from discover_agent.sampler import Sampler
from discover_agent.storage import write_json
from discover_agent.types import Group, RunResult, State

#: The config class of an agent (`Agent.config` is typed by it).
C = TypeVar("C", bound=AgentConfig)


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


class Agent(ABC, Generic[C]):
    """The one interface: build from a config (and optionally a ready policy); `run` returns a RunResult."""

    name: ClassVar[str]
    config_class: ClassVar[type[AgentConfig]] = AgentConfig
    #: Whether the agent samples from a language model (a `Policy` may be passed in); calibration agents do not.
    uses_model: ClassVar[bool] = True

    def __init__(self, config: C, policy: Any = None) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config: C = config
        self._policy = policy
        self._inner = StepProgress(False)  # the in-step bar; `SearchAgent._loop` shows a live one

    @abstractmethod
    def run(self, progress: bool = True, resume: bool = False) -> RunResult:
        """Run into `config.out`; `resume=True` continues the run held there (or starts it over, if the agent
        cannot continue one), as `discover bench` asks after an interruption."""


@dataclass
class StepRecord:
    """One step of the loop: its groups, what learning reported, the tokens generated and the seconds taken."""

    index: int
    groups: list[Group]
    learned: dict[str, float]
    tokens: int
    seconds: float


@dataclass
class _Run:
    """What one run of the loop holds: its env and folder, the sampler's buffer, the executor, the checkpoint
    (counters, lineage, metrics), the rows logged so far (for the plot) and the clock's zero."""

    env: gym.Env
    folder: RunDir
    sampler: Sampler
    executor: Executor
    checkpoint: Checkpoint
    history: list[dict[str, Any]]
    started: float


class SearchAgent(Agent[C]):
    """The shared loop; subclasses choose the sampler and whether (and how) to learn.

    It uses the env only through Gymnasium (see the README's agent contract): the prompt is the observation
    of `reset(options={"state": parent})`, a reply is scored by `step(reply)` (in the executor), and
    `env.metadata` may give a construction spec for constrained decoding.
    """

    #: The env's construction spec when replies are constrained, and its metadata (set by `run`).
    _spec: Any = None
    _task: dict[str, Any] = {}  # noqa: RUF012 - replaced per run, never mutated

    @abstractmethod
    def make_sampler(self, initial: list[State]) -> Sampler: ...

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
        folder = RunDir(cfg.out)
        if resume and cfg.env_kwargs is None and folder.file("config.json").is_file():
            # "the default" of a resumed run is what it resolved to when it started (pinned secrets included)
            saved = load_run_config(folder.file("config.json"))[1]
            cfg = self.config = dataclasses.replace(cfg, env_kwargs=saved.env_kwargs)
        env = open_env(cfg.env, cfg.resolved_env_kwargs())
        if not resume:  # config.json holds the arguments the env ran with, including secrets it drew itself
            pinned = env.metadata.get("pinned_kwargs") or {}
            cfg = self.config = dataclasses.replace(cfg, env_kwargs={**cfg.given_env_kwargs(), **pinned})
        self._task = dict(env.metadata)
        self._spec = construction_spec(env) if cfg.constrained else None
        _ = self.policy  # built here, so a bad --model fails before the run folder is touched
        try:
            with folder.locked():
                if resume:
                    self._check_resumable(folder)
                elif folder.holds_run:
                    raise RunDirError(
                        f"{folder.path} holds a run; continue it with `discover resume {folder.path}` "
                        "or choose another --out"
                    )
                return self._loop(self._start(env, folder, resume), progress)
        finally:
            env.close()

    def _check_resumable(self, folder: RunDir) -> None:
        path = folder.file("config.json")
        if not path.is_file():
            raise RunDirError(f"{path} not found: {folder.path} holds no run to resume")
        agent, saved = load_run_config(path)
        if agent != self.name or type(saved) is not type(self.config):
            raise RunDirError(f"{folder.path} holds a {agent} run; refusing to resume it as {self.name}")
        changed = sorted(
            key for key, value in saved.to_dict().items()
            if key not in RESUME_OVERRIDES and self.config.to_dict()[key] != value
        )  # fmt: skip
        if changed:
            raise RunDirError(f"resuming {folder.path} may change only budgets, not {changed} (see its config.json)")

    def _start(self, env: gym.Env, folder: RunDir, resume: bool) -> _Run:
        """A fresh sampler and checkpoint, or the saved ones (re-verified through `reset`) on resume; then
        config.json and the executor."""
        cfg = self.config
        saved = folder.load_checkpoint() if resume else None
        if saved is None:
            initial: dict[str, State] = {}
            for i in range(cfg.initial_states):
                _, info = env.reset(seed=cfg.seed if i == 0 else derived_seed(cfg.seed, INITIAL_KEY, i))
                initial.setdefault(info["state"]["id"], info["state"])
            checkpoint = Checkpoint(agent=self.name, env=cfg.env, initial=list(initial.values()))
            sampler = self.make_sampler(checkpoint.initial)
        else:
            checkpoint, buffer, step_dir = saved
            if checkpoint.agent != self.name or checkpoint.env != cfg.env:
                raise RunDirError(
                    f"{folder.file('checkpoint.json')} is a {checkpoint.agent} run on {checkpoint.env}; "
                    f"refusing to resume it as {self.name} on {cfg.env}"
                )
            sampler = self.make_sampler(checkpoint.initial)
            sampler.load_state_dict(buffer)
            _verify_states(env, [*checkpoint.initial, *sampler.states(), sampler.best()], step_dir / "buffer.json")
            self.restore_extra(step_dir)
        history = folder.kept_rows(checkpoint.step)
        save_run_config(
            folder.file("config.json"), self.name, cfg, version=code_version(), sandbox=env.metadata.get("sandbox")
        )
        executor = make_executor(cfg.executor, cfg.env, cfg.resolved_env_kwargs(), cfg.workers, cfg.ray_address)
        return _Run(env, folder, sampler, executor, checkpoint, history, time.perf_counter() - checkpoint.wall_s)

    def _loop(self, run: _Run, progress: bool) -> RunResult:
        cfg, checkpoint = self.config, run.checkpoint
        bar = tqdm(total=cfg.steps, initial=checkpoint.step, desc=f"{self.name} {cfg.env}", disable=not progress)
        self._inner = StepProgress(progress and sys.stderr.isatty())
        self._hook(self.policy, self._inner.tick)
        try:
            while checkpoint.step < cfg.steps and not self._out_of_budget(run):
                row = self._commit(run, self._step(run))
                bar.update(1)
                bar.set_postfix(
                    best=f"{row['best_score']:.6g}", mean_r=f"{row['mean_reward']:.4g}", valid=row["valid_frac"],
                    beta=row.get("beta", "-"), kl=row.get("kl", "-"), tok_s=f"{row['tokens_per_s']:.1f}",
                )  # fmt: skip
        finally:
            self._hook(self.policy, None)
            self._inner.close()
            bar.close()
            run.executor.close()
        best = run.sampler.best()
        return RunResult(
            env=cfg.env, agent=self.name, model=self._model_name(), best=best, best_score=best["score"],
            best_reward=best["reward"], rollouts=checkpoint.rollouts, steps=checkpoint.step,
            wall_s=checkpoint.wall_s, tokens=checkpoint.tokens, out=str(run.folder.path), curve=list(checkpoint.curve),
        )  # fmt: skip

    def _step(self, run: _Run) -> StepRecord:
        """Sample and score the step's groups, put valid children in the buffer, learn."""
        index, started = run.checkpoint.step, time.perf_counter()
        reseed = getattr(self.policy, "reseed", None)
        if reseed is not None:
            reseed(derived_seed(self.config.seed, STEP_KEY, index))
        groups = self._rollouts(run)
        initial_ids = {s["id"] for s in run.checkpoint.initial}
        for group in groups:
            children = [info["next_state"] for _, info in group.outcomes if info["valid"]]
            run.sampler.update(group.parent, children, len(group.samples))
            for child in children:
                # A state found again (e.g. a start state copied back) keeps its first parent.
                if child["id"] not in initial_ids:
                    run.checkpoint.lineage.setdefault(child["id"], Lineage(child["parent_id"], child["score"], index))
        learned = self.learn(groups)
        tokens = sum(len(s.completion_ids) for g in groups for s in g.samples)
        return StepRecord(index, groups, learned, tokens, time.perf_counter() - started)

    def _commit(self, run: _Run, record: StepRecord) -> dict[str, Any]:
        """Count the step, log its rows, commit the step folder and checkpoint (see `rundir`), then best,
        metrics and plot; returns the step's metrics row."""
        checkpoint, best = run.checkpoint, run.sampler.best()
        checkpoint.rollouts += sum(len(g.samples) for g in record.groups)
        checkpoint.tokens += record.tokens
        checkpoint.step = record.index + 1
        checkpoint.wall_s = time.perf_counter() - run.started
        checkpoint.curve.append((checkpoint.rollouts, best["score"]))
        row = self._metrics_row(record, best)
        checkpoint.metrics.append(row)
        rows = _rows(record)
        run.folder.log_rollouts(rows)
        run.history.extend(rows)

        def write_step(folder: Path) -> None:
            write_json(folder / "buffer.json", run.sampler.state_dict())
            self.checkpoint_extra(folder)

        run.folder.commit_step(checkpoint, write_step)
        meta = {"env": self.config.env, "agent": self.name, "step": checkpoint.step, "score": best["score"]}
        run.folder.write_best(best, _lineage(best, checkpoint.lineage), meta)
        run.folder.write_metrics(checkpoint.metrics)
        title, score_name = f"{self.name} on {self.config.env}", run.env.metadata.get("score_name", "score")
        plot_progress(run.history, run.folder.file("progress.png"), title, score_name)
        return row

    def _out_of_budget(self, run: _Run) -> bool:
        cfg = self.config
        per_step = cfg.groups * cfg.group_size
        if cfg.max_rollouts is not None and run.checkpoint.rollouts + per_step > cfg.max_rollouts:
            return True
        return cfg.max_wall_s is not None and time.perf_counter() - run.started >= cfg.max_wall_s

    def _rollouts(self, run: _Run) -> list[Group]:
        """Propose every group of the step at once (`propose`), then evaluate; evaluations do not overlap
        generation, so the sandboxed processes and torch's threads never compete for the cores.
        Picks of one start state form one larger group (`Sampler.select_groups`)."""
        picks = list(run.sampler.select_groups(self.config.groups, self.config.group_size))
        replies = self.propose(run.env, picks)
        pending = [
            (parent, samples, [run.executor.submit(parent, s.text) for s in samples])
            for (parent, _), samples in zip(picks, replies, strict=True)
        ]
        self._inner.phase("evaluating", sum(len(futures) for _, _, futures in pending), "reply")
        return [
            Group(parent, samples, [self._inner.done(f.result()) for f in futures])
            for parent, samples, futures in pending
        ]

    def propose(self, env: gym.Env, picks: list[tuple[State, int]]) -> list[list[Any]]:
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

    @staticmethod
    def _metrics_row(record: StepRecord, best: State) -> dict[str, Any]:
        """The step's row of metrics.csv: what it found, why (valid, improving and copied replies), its cost."""
        outcomes = [(g.parent, reward, info) for g in record.groups for reward, info in g.outcomes]
        rewards = np.array([reward for _, reward, _ in outcomes], dtype=np.float64)
        valid_rewards = [reward for _, reward, info in outcomes if info["valid"]]
        scores = [info["score"] for _, _, info in outcomes if info["valid"]]
        row: dict[str, Any] = {
            "step": record.index,
            "rollouts": len(rewards),
            "valid_frac": _share([info["valid"] for _, _, info in outcomes]),
            "mean_reward": float(rewards.mean()) if rewards.size else math.nan,
            "mean_valid_reward": float(np.mean(valid_rewards)) if valid_rewards else None,
            "max_reward": float(rewards.max()) if rewards.size else math.nan,
            "improve_rate": _share([info["valid"] and reward > p["reward"] for p, reward, info in outcomes]),
            "copy_rate": _share([info["valid"] and _is_copy(p, info) for p, _, info in outcomes]),
            "step_best_score": scores[int(np.argmax(valid_rewards))] if scores else None,
            "best_score": best["score"],
            "best_reward": best["reward"],
            "tokens": record.tokens,
            "tokens_per_s": record.tokens / record.seconds if record.seconds > 0 else 0.0,
            "step_s": record.seconds,
        }
        row.update({k: round(v, 6) if isinstance(v, float) else v for k, v in record.learned.items()})
        return row

    def _model_name(self) -> str:
        cfg = self.config
        return cfg.endpoint or cfg.model or "SmolLM2-135M-Instruct (embedded)"


def _share(flags: list[bool]) -> float:
    return round(float(np.mean(flags)), 4) if flags else 0.0


def _rows(record: StepRecord) -> list[dict[str, Any]]:
    """The step's lines of rollouts.jsonl, one per reply."""
    rows = []
    for group in record.groups:
        for sample, (reward, info) in zip(group.samples, group.outcomes, strict=True):
            rows.append({
                "step": record.index, "parent_id": group.parent["id"], "reward": reward, "score": info["score"],
                "valid": info["valid"], "error": info["error"], "tokens": len(sample.completion_ids),
                "id": info["next_state"]["id"] if info["valid"] else None, "sandbox": info.get("sandbox"),
                "reply": sample.text,
            })  # fmt: skip
    return rows


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


def _lineage(state: State, lineage: dict[str, Lineage]) -> list[dict[str, Any]]:
    """The chain of ancestors of `state` back to the start state, oldest first (a cycle ends the walk)."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: str | None = state["id"]
    while current is not None and current not in seen:
        seen.add(current)
        link = lineage.get(current)
        chain.append({"id": current, "score": link.score if link else None, "step": link.step if link else None})
        current = link.parent_id if link else None
    return chain[::-1]


# Components are built from the agent's config here, and only here: a config field named like a
# `PolicyConfig` / `TrainerConfig` field fills it (tests check that every such field has a knob).


def build_policy(config: AgentConfig, trainable: bool, spec: Any = None) -> Any:
    """A local transformers model (embedded SmolLM2 by default) or an OpenAI-compatible endpoint; `spec` (the
    env's construction spec, if replies are constrained) sizes the reply budget when max_new_tokens is unset."""
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        from discover_agent.json_grammar import default_max_new_tokens

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


def _matching(config: AgentConfig, target: type) -> dict[str, Any]:
    """The fields of `config` that `target` (a dataclass) also has, by name."""
    names = {f.name for f in dataclasses.fields(target)}
    return {key: value for key, value in config.to_dict().items() if key in names}
