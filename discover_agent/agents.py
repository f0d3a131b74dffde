"""Agents behind one interface: TTT-Discover and the baselines share the loop, the budget, the logs.

One step: the sampler picks `groups` start states; the policy samples `group_size` replies for each (a group);
the executor scores them (the next group is generated while the last one is evaluated); valid children go to
the buffer; the agent learns from the groups (only TTT does); the buffer, logs and best state are saved.
A user's agent subclasses `Agent` (or `SearchAgent` to reuse the loop) and plugs into `discover bench`.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

import discover_envs  # noqa: F401 - registers the env ids
from discover_agent.config import AgentConfig, GreedyConfig, PUCTConfig, TTTConfig
from discover_agent.executor import Outcome, make_executor
from discover_agent.objective import entropic_advantages, mean_baseline_advantages
from discover_agent.plots import plot_progress
from discover_agent.rundir import RunDir
from discover_agent.sampler import FixedSampler, GreedySampler, PUCTSampler, Sampler


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


class Agent(ABC):
    """The one interface: build from a config (and optionally a ready policy), `run()` returns a RunResult."""

    name: ClassVar[str]
    config_class: ClassVar[type[AgentConfig]] = AgentConfig

    def __init__(self, config: AgentConfig, policy: Any = None) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self._policy = policy

    @abstractmethod
    def run(self, progress: bool = True) -> RunResult: ...


class SearchAgent(Agent):
    """The shared loop; subclasses choose the sampler and whether (and how) to learn."""

    @abstractmethod
    def make_sampler(self, initial: dict[str, Any]) -> Sampler: ...

    def learn(self, groups: list[Group]) -> dict[str, float]:
        """Update the policy from a step's groups; search-only agents learn nothing."""
        return {}

    @property
    def policy(self) -> Any:
        if self._policy is None:
            self._policy = build_policy(self.config, trainable=False)
        return self._policy

    def checkpoint_extra(self, run_dir: RunDir) -> None:
        """Save what besides the buffer a resume needs (TTT: the LoRA adapter)."""

    def restore_extra(self, run_dir: RunDir) -> None:
        """Load what `checkpoint_extra` saved."""

    def run(self, progress: bool = True) -> RunResult:
        cfg = self.config
        env_kwargs = cfg.resolved_env_kwargs()
        try:
            env = gym.make(cfg.env, **env_kwargs).unwrapped
        except gym.error.Error as exc:
            raise ValueError(f"unknown or broken env {cfg.env!r}: {exc} (see `discover envs`)") from None
        run_dir = RunDir(cfg.out)
        if run_dir.has_checkpoint:
            checkpoint, buffer = run_dir.load_checkpoint()
            if checkpoint["agent"] != self.name or checkpoint["env"] != cfg.env:
                raise ValueError(
                    f"{run_dir.path} holds a {checkpoint['agent']} run on {checkpoint['env']}; "
                    f"refusing to resume it as {self.name} on {cfg.env} (use another --out)"
                )
            sampler = self.make_sampler(checkpoint["initial"])
            sampler.load_state_dict(buffer)
            self.restore_extra(run_dir)
            history = run_dir.drop_rows_after(checkpoint["step"])
        else:
            history = []
            _, info = env.reset(seed=cfg.seed)
            sampler = self.make_sampler(info["state"])
            checkpoint = {
                "agent": self.name, "env": cfg.env, "step": 0, "rollouts": 0, "tokens": 0, "wall_s": 0.0,
                "initial": info["state"], "lineage": {}, "metrics": [], "curve": [],
            }  # fmt: skip
            cfg.save(run_dir.file("config.json"))
        spec = env.construction_spec if cfg.constrained and cfg.endpoint is None else None
        executor = make_executor(cfg.executor, cfg.env, env_kwargs, cfg.workers, cfg.ray_address)
        problem = env.problem
        started = time.perf_counter() - checkpoint["wall_s"]
        bar = tqdm(total=cfg.steps, initial=checkpoint["step"], desc=f"{self.name} {cfg.env}", disable=not progress)
        try:
            while checkpoint["step"] < cfg.steps and not self._out_of_budget(checkpoint, started):
                step = checkpoint["step"]
                tick = time.perf_counter()
                groups = self._rollouts(sampler, problem, spec, executor)
                gen_tokens = sum(len(s.completion_ids) for g in groups for s in g.samples)
                for group in groups:
                    children = [info["next_state"] for _, info in group.outcomes if info["valid"]]
                    sampler.update(group.parent, children)
                    for child in children:
                        # A state found again (e.g. the start state copied back) keeps its first parent.
                        if child["id"] != checkpoint["initial"]["id"]:
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
                self._save(run_dir, step, groups, sampler, checkpoint, problem, history)
                bar.update(1)
                bar.set_postfix(
                    best=f"{best['score']:.6g}", mean_r=f"{row['mean_reward']:.4g}", valid=row["valid_frac"],
                    beta=row.get("beta", "-"), kl=row.get("kl", "-"), tok_s=f"{row['tokens_per_s']:.1f}",
                )  # fmt: skip
        finally:
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

    def _rollouts(self, sampler: Sampler, problem: Any, spec: Any, executor: Any) -> list[Group]:
        """Sample group by group and submit each group's evaluations at once, so they overlap generation."""
        pending = []
        for parent in sampler.select(self.config.groups):
            samples = self.policy.sample([problem.prompt(parent)], self.config.group_size, spec)[0]
            pending.append((parent, samples, [executor.submit(parent, s.text) for s in samples]))
        return [Group(parent, samples, [f.result() for f in futures]) for parent, samples, futures in pending]

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
        scores = [info["score"] for g in groups for _, info in g.outcomes if info["valid"]]
        row: dict[str, Any] = {
            "step": step,
            "rollouts": len(rewards),
            "valid_frac": round(float(np.mean(valid)), 4) if valid else 0.0,
            "mean_reward": float(rewards.mean()) if rewards.size else math.nan,
            "max_reward": float(rewards.max()) if rewards.size else math.nan,
            "step_best_score": scores[int(np.argmax([r for g in groups for r, i in g.outcomes if i["valid"]]))]
            if scores
            else None,
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
        run_dir: RunDir,
        step: int,
        groups: list[Group],
        sampler: Sampler,
        checkpoint: dict[str, Any],
        problem: Any,
        history: list[dict[str, Any]],
    ) -> None:
        """Log the step's rollouts, then checkpoint, best, metrics and plot; `history` (the rows logged so
        far) is extended in place so the plot never re-reads the growing log."""
        rows = []
        for group in groups:
            for sample, (reward, info) in zip(group.samples, group.outcomes, strict=True):
                rows.append({
                    "step": step, "parent_id": group.parent["id"], "reward": reward, "score": info["score"],
                    "valid": info["valid"], "error": info["error"], "tokens": len(sample.completion_ids),
                    "id": info["next_state"]["id"] if info["valid"] else None, "reply": sample.text,
                })  # fmt: skip
        run_dir.log_rollouts(rows)
        history.extend(rows)
        self.checkpoint_extra(run_dir)
        run_dir.save_step(sampler.state_dict(), checkpoint)
        best = sampler.best()
        lineage = _lineage(best, checkpoint["lineage"])
        meta = {
            "env": self.config.env,
            "agent": self.name,
            "step": checkpoint["step"],
            "score": best["score"],
        }
        run_dir.write_best(best, lineage, meta)
        run_dir.write_metrics(checkpoint["metrics"])
        plot_progress(
            history,
            run_dir.file("progress.png"),
            f"{self.name} on {self.config.env}",
            getattr(problem, "figure", "score"),
        )

    def _model_name(self) -> str:
        cfg = self.config
        return cfg.endpoint or cfg.model or "SmolLM2-135M-Instruct (embedded)"


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
    """Sample from the initial state every time, keep the best: the sampling-only baseline."""

    name = "best-of-n"

    def make_sampler(self, initial: dict[str, Any]) -> Sampler:
        return FixedSampler([initial])


class PUCTSearch(SearchAgent):
    """PUCT reuse of the buffer without training (the paper's ablation)."""

    name = "puct"
    config_class = PUCTConfig

    def make_sampler(self, initial: dict[str, Any]) -> Sampler:
        cfg = self.config
        return PUCTSampler([initial], c=cfg.puct_c, max_size=cfg.buffer_size, seed=cfg.seed)


class Greedy(SearchAgent):
    """Epsilon-greedy restarts from the best states, no training."""

    name = "greedy"
    config_class = GreedyConfig

    def make_sampler(self, initial: dict[str, Any]) -> Sampler:
        cfg = self.config
        return GreedySampler([initial], epsilon=cfg.epsilon, seed=cfg.seed)


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
            self._policy = build_policy(self.config, trainable=True)
        return self._policy

    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            from discover_agent.trainer import Trainer, TrainerConfig

            cfg = self.config
            trainer_config = TrainerConfig(lr=cfg.lr, kl_coef=cfg.kl_coef, max_grad_norm=cfg.max_grad_norm)
            self._trainer = Trainer(self.policy, trainer_config)
        return self._trainer

    def learn(self, groups: list[Group]) -> dict[str, float]:
        samples, advantages, betas = [], [], []
        for group in groups:
            if self.config.baseline == "entropic":
                adv, beta = entropic_advantages(group.rewards, beta=self.config.beta)
                betas.append(beta)
            elif self.config.baseline == "mean":
                adv = mean_baseline_advantages(group.rewards)
            else:
                raise ValueError(f"unknown baseline {self.config.baseline!r}; choose 'entropic' or 'mean'")
            samples.extend(group.samples)
            advantages.extend(float(a) for a in adv)
        metrics = dict(self.trainer.step(samples, advantages))
        if betas:
            metrics["beta"] = float(np.mean(betas))
        return metrics

    def checkpoint_extra(self, run_dir: RunDir) -> None:
        self.policy.save_adapter(run_dir.file("adapter"))

    def restore_extra(self, run_dir: RunDir) -> None:
        if run_dir.file("adapter").exists():
            self.policy.load_adapter(run_dir.file("adapter"))


AGENTS: dict[str, type[SearchAgent]] = {cls.name: cls for cls in (TTTDiscover, BestOfN, PUCTSearch, Greedy)}


def build_policy(config: AgentConfig, trainable: bool) -> Any:
    """A local transformers model (embedded SmolLM2 by default) or an OpenAI-compatible endpoint."""
    if config.endpoint is not None:
        if trainable:
            raise ValueError("TTT trains LoRA weights locally; --endpoint only serves sampling-only agents")
        from discover_agent.openai_policy import OpenAIPolicy

        return OpenAIPolicy(
            base_url=config.endpoint, model=config.model or "default", temperature=config.temperature,
            max_tokens=config.max_new_tokens, seed=config.seed,
        )  # fmt: skip
    from discover_agent.policy import LocalPolicy, PolicyConfig

    policy_config = PolicyConfig(
        temperature=config.temperature, max_new_tokens=config.max_new_tokens, device=config.device,
        seed=config.seed,
        lora_rank=getattr(config, "lora_rank", None),
    )  # fmt: skip
    return LocalPolicy.from_pretrained(config.model, policy_config)
