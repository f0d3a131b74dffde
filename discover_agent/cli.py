"""`discover`: run an agent on a problem, resume a run, list the envs, benchmark agents, write leaderboards."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from discover_agent.config import AgentConfig, load_config


def _field_type(tp: Any) -> Any:
    """The base type of a config field annotation such as `int | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"n\": 16}}', got {text!r}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[AgentConfig], skip: Sequence[str] = ()) -> None:
    """One flag per config field, with the field's help text and default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        base = _field_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if base is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif typing.get_origin(base) is dict or base is dict:
            parser.add_argument(flag, dest=f.name, type=_json_object, default=default, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=base, default=default, help=help_text)


def _run_parser(agent: str) -> argparse.ArgumentParser:
    from discover_agent.agents import AGENTS

    parser = argparse.ArgumentParser(
        prog="discover run", description="Run one agent on one problem; writes its outputs to --out."
    )
    parser.add_argument("env", metavar="ENV_ID", help="e.g. discover/ErdosMinOverlap-v0 (see `discover envs`)")
    parser.add_argument("--agent", choices=sorted(AGENTS), default="ttt", help="which agent (default: ttt)")
    add_config_arguments(parser, AGENTS[agent].config_class, skip=("env",))
    return parser


def cmd_run(argv: list[str]) -> int:
    from discover_agent.agents import AGENTS

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--agent", default="ttt")
    known, _ = pre.parse_known_args(argv)
    if known.agent not in AGENTS:
        _run_parser("ttt").error(f"unknown agent {known.agent!r}; choose from {', '.join(sorted(AGENTS))}")
    args = vars(_run_parser(known.agent).parse_args(argv))
    agent_cls = AGENTS[args.pop("agent")]
    config = agent_cls.config_class(**args)
    return _execute(agent_cls, config)


def cmd_resume(argv: list[str]) -> int:
    from discover_agent.agents import AGENTS

    parser = argparse.ArgumentParser(prog="discover resume", description="Continue a run from its folder.")
    parser.add_argument("out", metavar="DIR", help="the --out folder of an earlier run")
    parser.add_argument("--steps", type=int, default=None, help="raise the step budget (default: as saved)")
    args = parser.parse_args(argv)
    config_path = Path(args.out, "config.json")
    if not config_path.is_file():
        parser.error(f"{config_path} not found: is {args.out!r} the --out folder of a run?")
    checkpoint = json.loads(Path(args.out, "checkpoint.json").read_text())
    config = load_config(config_path)
    config.out = args.out
    if args.steps is not None:
        config.steps = args.steps
    return _execute(AGENTS[checkpoint["agent"]], config)


def _execute(agent_cls: Any, config: AgentConfig) -> int:
    result = agent_cls(config).run()
    print(
        f"{result.agent} on {result.env}: best score {result.best_score} (reward {result.best_reward:.6g}) "
        f"after {result.rollouts} rollouts, {result.steps} steps, {result.wall_s:.1f} s -> {result.out}"
    )
    return 0


def cmd_envs(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="discover envs", description="List the registered env ids.").parse_args(argv)
    import discover_envs

    for env_id in discover_envs.env_ids():
        print(env_id)
    return 0


def _csv(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def cmd_bench(argv: list[str]) -> int:
    from discover_agent.bench import run_bench

    parser = argparse.ArgumentParser(
        prog="discover bench", description="Run every (env, agent, seed) at the same rollout budget."
    )
    parser.add_argument("--envs", type=_csv, required=True, help="comma-separated env ids")
    parser.add_argument(
        "--agents", type=_csv, default=["ttt", "best-of-n", "puct"],
        help="comma-separated: ttt, best-of-n, puct, greedy, module:Class, openai:MODEL@URL",
    )  # fmt: skip
    parser.add_argument("--rollouts", type=int, default=128, help="replies per run (the equal budget)")
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in _csv(t)], default=[0, 1, 2])
    add_config_arguments(parser, AgentConfig, skip=("env", "seed", "out", "steps", "max_rollouts"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for the runs")
    args = vars(parser.parse_args(argv))
    envs, agents, rollouts, seeds, out = (args.pop(k) for k in ("envs", "agents", "rollouts", "seeds", "out"))
    entries = run_bench(envs, agents, rollouts, seeds, out, args)
    for e in entries:
        print(f"{e['env']}  {e['agent']:<12} seed {e['seed']}: best {e['best_score']}  ({e['wall_s']} s)")
    return 0


def cmd_leaderboard(argv: list[str]) -> int:
    from discover_agent.bench import write_leaderboards

    parser = argparse.ArgumentParser(prog="discover leaderboard", description="Write leaderboards from bench runs.")
    parser.add_argument("runs", type=Path, help="the --out folder of `discover bench`")
    parser.add_argument("--write", type=Path, default=Path("leaderboards"), help="destination folder")
    args = parser.parse_args(argv)
    for path in write_leaderboards(args.runs, args.write):
        print(path)
    return 0


COMMANDS = {
    "run": cmd_run, "resume": cmd_resume, "envs": cmd_envs, "bench": cmd_bench, "leaderboard": cmd_leaderboard,
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: discover {" + ",".join(COMMANDS) + "} ...\n\n" + __doc__, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"discover {argv[0]}: error: {exc}", file=sys.stderr)
        return 2
