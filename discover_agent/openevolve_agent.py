"""OpenEvolve (https://github.com/algorithmicsuperintelligence/openevolve) as a benchmark peer of TTT-Discover.

OpenEvolve evolves a program with an LLM; here the program is the env's ```python action (`run(**kwargs)`),
every candidate is scored by the env's verifier (`openevolve_eval`), the LLM is the same OpenAI-compatible
endpoint the other agents sample from (`--endpoint`; without one, the local model is served for the run's
length by `discover serve`'s app on loopback), and the budget is the same: each iteration is one LLM reply,
and the start program's evaluation counts as one rollout. Needs the optional extra: pip install 'discover[openevolve]'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discover_agent.agents import Agent, open_env
from discover_agent.config import AgentConfig, knob
from discover_agent.openevolve_eval import EvaluationService
from discover_agent.rundir import RunDir
from discover_agent.types import RunResult

__all__ = ["OpenEvolveAgent", "OpenEvolveConfig"]

#: The program OpenEvolve starts from when the start state has no code: it returns the start construction.
IDENTITY_PROGRAM = '''def run(construction, **kwargs):
    """Return an improved construction; this start program returns the start state's construction."""
    return construction
'''

_TASK_NOTE = (
    "\n\nYou improve the program below, which the verifier runs as the ```python answer: it must define "
    "`run(**kwargs)` and return the answer. Reply with the complete new program in one ```python block."
)


@dataclass
class OpenEvolveConfig(AgentConfig):
    """OpenEvolve's knobs that matter at small budgets; the rest keep OpenEvolve's defaults."""

    full_rewrite: bool = knob(
        True, "Ask for whole programs (False: OpenEvolve's SEARCH/REPLACE diffs, which small models rarely get right)."
    )
    islands: int = knob(2, "OpenEvolve's island populations (its default is 5; fewer suit budgets of tens).")


class OpenEvolveAgent(Agent):
    """Runs OpenEvolve's controller for `max_rollouts - 1` iterations (or steps * groups * group_size - 1)."""

    name = "openevolve"
    config_class = OpenEvolveConfig

    def run(self, progress: bool = True, resume: bool = False) -> RunResult:
        """OpenEvolve keeps no state discover can continue from, so `resume=True` (an interrupted bench) starts
        the run over: the rows the interrupted run logged are dropped, and `discover bench` counts none of its
        steps (it has no checkpoint)."""
        try:
            from openevolve import OpenEvolve
            from openevolve.config import Config
            from openevolve.controller import EvolutionFailedError
        except ImportError:
            raise ImportError(
                "the openevolve agent needs the optional extra: pip install 'discover[openevolve]'"
            ) from None
        cfg = self.config
        budget = cfg.max_rollouts if cfg.max_rollouts is not None else cfg.steps * cfg.groups * cfg.group_size
        if budget < 2:
            raise ValueError(f"openevolve needs a budget of at least 2 rollouts (start program + 1), got {budget}")
        env_kwargs = cfg.resolved_env_kwargs()
        env = open_env(cfg.env, env_kwargs)
        prompt, info = env.reset(seed=cfg.seed)
        start = info["state"]
        env.close()
        out = Path(cfg.out)
        if resume:
            (out / "rollouts.jsonl").unlink(missing_ok=True)
        program = out / "openevolve" / "initial_program.py"
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text(start.get("code") or IDENTITY_PROGRAM)
        service = EvaluationService(lambda: open_env(cfg.env, env_kwargs), start)
        started = time.perf_counter()
        with self._endpoint() as (url, model), service.serving(out / "openevolve") as evaluator:
            config = Config.from_dict(self._openevolve_config(url, model, prompt, budget - 1))
            with _process_state_restored(), contextlib.suppress(EvolutionFailedError):  # no candidate: start stays
                controller = OpenEvolve(str(program), str(evaluator), config, output_dir=str(out / "openevolve"))
                asyncio.run(controller.run(iterations=budget - 1))
        wall = time.perf_counter() - started
        return self._result(service.rows, start, wall, out)

    def _openevolve_config(self, url: str, model: str, prompt: str, iterations: int) -> dict[str, Any]:
        cfg = self.config
        return {
            "max_iterations": iterations,
            "checkpoint_interval": iterations + 1,  # discover writes the run's outputs itself
            "random_seed": cfg.seed,
            "log_level": "WARNING",
            "diff_based_evolution": not cfg.full_rewrite,
            # Workers are spawned, not forked: this process holds threads (the servers) and torch.
            "max_tasks_per_child": 1_000_000,
            "llm": {
                "api_base": url,
                "api_key": "none",
                "models": [{"name": model, "weight": 1.0}],
                "temperature": cfg.temperature,
                "max_tokens": cfg.max_new_tokens or 1024,
                "timeout": 3600,
                "retries": 0,
                "retry_delay": 1,
            },
            "prompt": {"system_message": prompt.strip() + _TASK_NOTE},
            "database": {"num_islands": cfg.islands, "random_seed": cfg.seed},
            "evaluator": {"cascade_evaluation": False, "parallel_evaluations": cfg.workers, "timeout": 3600},
        }

    @contextlib.contextmanager
    def _endpoint(self) -> Iterator[tuple[str, str]]:
        """(base URL, model name): the configured endpoint, or the local model served on loopback meanwhile."""
        cfg = self.config
        if cfg.endpoint is not None:
            yield cfg.endpoint, cfg.model or "default"
            return
        from discover_agent.serve import create_app, load_served_policy, running

        name = cfg.model or "embedded"
        with running(create_app(load_served_policy(cfg.model, cfg.device, cfg.seed), name)) as url:
            yield url, name

    def _result(self, rows: list[dict[str, Any]], start: dict[str, Any], wall: float, out: Path) -> RunResult:
        """The best verified state (the start state unless a valid program beat it), the curve, and the files
        other agents write too: rollouts.jsonl (one row per evaluation) and best.json."""
        cfg = self.config
        best, curve = start, []
        for i, row in enumerate(rows, start=1):
            if row["valid"] and row["reward"] > best["reward"]:
                best = row["state"]
            curve.append((i, best["score"]))
        run_dir = RunDir(out)
        run_dir.log_rollouts([{k: v for k, v in row.items() if k != "state"} for row in rows])
        run_dir.write_best(best, [], {"env": cfg.env, "agent": self.name, "step": len(rows), "score": best["score"]})
        return RunResult(
            env=cfg.env, agent=self.name, model=cfg.endpoint or cfg.model or "SmolLM2-135M-Instruct (embedded)",
            best=best, best_score=best["score"], best_reward=best["reward"], rollouts=len(rows), steps=len(rows),
            wall_s=wall, tokens=0, out=str(out), curve=curve,
        )  # fmt: skip


@contextlib.contextmanager
def _process_state_restored() -> Iterator[None]:
    """OpenEvolve sets the root logger's level and handlers and installs SIGINT/SIGTERM handlers for the whole
    process; put them back after the run, so later runs in the same `discover bench` are not affected."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    signals: dict[int, Any] = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
        for number, handler in signals.items():
            signal.signal(number, handler)
