"""`discover`: run an agent on a problem, resume a run, list the envs, benchmark agents, write leaderboards,
write a run's or a bench's HTML report, serve a local model over an OpenAI-compatible API.

Every user error ends the command with one line, `discover <cmd>: error: ...`, naming the flag or file, and
exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from discover_agent.config import (
    MAX_CONFIG_DEPTH,
    AgentConfig,
    ConfigError,
    ESConfig,
    GreedyConfig,
    TTTConfig,
    checked_fields,
    load_run_config,
    nests_deeper_than,
    read_mapping,
)

#: Flags `discover resume` accepts: the budgets (see `agents.RESUME_OVERRIDES`).
RESUME_FLAGS = {"steps": int, "max_rollouts": int, "max_wall_s": float, "workers": int}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`discover run: error: ...`, exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    except RecursionError:
        raise argparse.ArgumentTypeError(f"nested more than {MAX_CONFIG_DEPTH} levels deep") from None
    if nests_deeper_than(value, MAX_CONFIG_DEPTH):
        raise argparse.ArgumentTypeError(f"nested more than {MAX_CONFIG_DEPTH} levels deep")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"n\": 16}}', got {text!r}")
    return value


def _bounded_int(low: int, high: int | None = None) -> Any:
    """Parse an integer in [low, high] (high None: no upper bound), e.g. a port in 0..65535."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {text!r}")
        return value

    return parse


def _list_of(item: type) -> Any:
    """Parse a comma-separated list of `item` values, e.g. "0.9,0.95"."""

    def parse(text: str) -> list[Any]:
        try:
            return [item(part) for part in _csv(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, got {text!r}") from None

    return parse


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type[AgentConfig], skip: Sequence[str] = (), suppress: bool = False
) -> None:
    """One flag per config field, with the field's help text and default (`suppress`: a flag not given is
    absent from the parsed namespace, so the agent's own default applies)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        base = _field_type(hints[f.name])
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS if suppress else default,
            "help": f"{f.metadata.get('help', '')} (default: {default})",
        }
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            origin = typing.get_origin(base) or base
            if origin is list:
                kwargs["type"] = _list_of(typing.get_args(base)[0])
            else:
                kwargs["type"] = _json_object if origin is dict else base
        parser.add_argument(flag(f.name), **kwargs)


def _config_file(argv: list[str], parser: Parser, *classes: type[AgentConfig]) -> dict[str, Any]:
    """The fields of `--config FILE` in `argv` (JSON or YAML), checked against `classes`; {} without one."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return {}
    try:
        return checked_fields(read_mapping(known.config), f"--config {known.config}", *classes)
    except ConfigError as exc:
        parser.error(str(exc))


def build_config(cls: type[AgentConfig], fields: dict[str, Any]) -> AgentConfig:
    """`cls(**fields)`, with a value error naming its flag."""
    try:
        return cls(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{flag(exc.field)}: {exc}" if exc.field else str(exc), exc.field) from None


def _run_parser(agent_cls: Any, agents: Iterable[str]) -> Parser:
    parser = Parser(
        prog="discover run",
        description="Run one agent on one problem into a new --out folder (`discover resume` continues one).",
    )
    parser.add_argument(
        "env", metavar="ENV_ID", nargs="?", default=argparse.SUPPRESS,
        help="e.g. discover/ErdosMinOverlap-v0 (see `discover envs`) or mymodule:my/Env-v0 for a Gymnasium "
        f"text env of your own (default: {AgentConfig.env})",
    )  # fmt: skip
    parser.add_argument("--agent", choices=sorted(agents), default="ttt", help="which agent (default: ttt)")
    parser.add_argument("--config", type=Path, help="JSON or YAML file of config fields; flags override it")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    add_config_arguments(parser, agent_cls.config_class, skip=("env",))
    return parser


def cmd_run(argv: list[str]) -> int:
    from discover_agent.registry import AGENTS

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--agent", default="ttt")
    known, _ = pre.parse_known_args(argv)
    if known.agent not in AGENTS:
        Parser(prog="discover run").error(f"unknown agent {known.agent!r}; choose from {', '.join(sorted(AGENTS))}")
    agent_cls = AGENTS[known.agent]
    parser = _run_parser(agent_cls, AGENTS)
    parser.set_defaults(**_config_file(argv, parser, agent_cls.config_class))
    args = vars(parser.parse_args(argv))
    quiet, report = args.pop("quiet"), not args.pop("no_report")
    del args["agent"], args["config"]
    return _execute(agent_cls, build_config(agent_cls.config_class, args), resume=False, quiet=quiet, report=report)


def cmd_resume(argv: list[str]) -> int:
    from discover_agent.registry import AGENTS
    from discover_agent.rundir import RunDir

    parser = Parser(
        prog="discover resume",
        description="Continue a run from its folder with its saved config; only the budgets may change.",
    )
    parser.add_argument("out", metavar="DIR", help="the --out folder of an earlier run")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    for name, kind in RESUME_FLAGS.items():
        parser.add_argument(flag(name), dest=name, type=kind, default=None, help=f"new {name} (default: as saved)")
    args = vars(parser.parse_args(argv))
    out, quiet, report = args.pop("out"), args.pop("quiet"), not args.pop("no_report")
    config_path = Path(out, "config.json")
    RunDir(out).refuse_links([config_path])
    if not config_path.is_file():
        parser.error(f"{config_path} not found: is {out!r} the --out folder of a run?")
    agent, saved = load_run_config(config_path)
    if agent not in AGENTS:
        parser.error(f"{config_path} names the agent {agent!r}, which is not one of {', '.join(sorted(AGENTS))}")
    overrides = {key: value for key, value in args.items() if value is not None}
    config = build_config(type(saved), {**saved.to_dict(), **overrides, "out": out})
    return _execute(AGENTS[agent], config, resume=True, quiet=quiet, report=report)


def _execute(agent_cls: Any, config: AgentConfig, resume: bool, quiet: bool, report: bool) -> int:
    result = agent_cls(config).run(progress=not quiet, resume=resume)
    print(
        f"{result.agent} on {result.env}: best score {result.best_score} (reward {result.best_reward:.6g}) "
        f"after {result.rollouts} rollouts, {result.steps} steps, {result.wall_s:.1f} s -> {result.out}"
    )
    if report:
        _report("resume" if resume else "run", result.out)
    return 0


def _report(command: str, folder: str | Path) -> None:
    """Write the folder's report.html and name it. The run or bench is saved already, so a failure here is a
    warning with the command that retries it, not a failed command."""
    from discover_agent.report import write_report

    try:
        print(f"report: {write_report(folder)}")
    except Exception as exc:
        print(f"discover {command}: warning: report not written ({type(exc).__name__}: {exc}); retry with "
              f"`discover report {folder}`", file=sys.stderr)  # fmt: skip


def cmd_envs(argv: list[str]) -> int:
    Parser(prog="discover envs", description="List the registered env ids.").parse_args(argv)
    import discover_envs

    for env_id in discover_envs.env_ids():
        print(env_id)
    return 0


def _csv(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _agent_list(text: str) -> list[str]:
    """Comma-separated agent specs; commas inside an agent's brackets (`es[groups=1,group_size=1]`) stay in it."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            raise argparse.ArgumentTypeError(f"unbalanced ']' in {text!r}")
        if char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise argparse.ArgumentTypeError(f"unclosed '[' in {text!r}")
    if not any(items):
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return [item for item in items if item]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    return seeds


def cmd_bench(argv: list[str]) -> int:
    from discover_agent.bench import run_bench

    parser = Parser(prog="discover bench", description="Run every (env, agent, seed) at the same rollout budget.")
    parser.add_argument("--envs", type=_csv, required=True, help="comma-separated env ids")
    parser.add_argument(
        "--agents", type=_agent_list, default=["ttt", "best-of-n", "puct"],
        help="comma-separated: ttt, best-of-n, puct, greedy, random-search, es, openevolve, module:Class, "
        "openai:MODEL@URL; NAME[key=value,...] sets that agent's own fields",
    )  # fmt: skip
    parser.add_argument("--rollouts", type=int, default=128, help="replies per run (the equal budget)")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--config", type=Path, help="JSON or YAML file of config fields; flags override it")
    skip = ("env", "seed", "out", "steps", "max_rollouts")
    # Every agent's knobs; each run takes the ones its agent's config has.
    add_config_arguments(parser, TTTConfig, skip=skip, suppress=True)
    shared = (*skip, *(f.name for f in dataclasses.fields(AgentConfig)))
    for cls in (GreedyConfig, ESConfig):
        add_config_arguments(parser, cls, skip=shared, suppress=True)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for the runs")
    parser.add_argument("--no-report", action="store_true", help="do not write OUT/report.html at the end")
    from_file = _config_file(argv, parser, TTTConfig, GreedyConfig, ESConfig)
    args = vars(parser.parse_args(argv))
    envs, agents, rollouts, seeds, out = (args.pop(k) for k in ("envs", "agents", "rollouts", "seeds", "out"))
    args.pop("config")
    report = not args.pop("no_report")
    if rollouts < 1:
        parser.error(f"--rollouts must be >= 1, got {rollouts}")
    entries = run_bench(envs, agents, rollouts, seeds, out, {**from_file, **args})
    for e in entries:
        print(f"{e['env']}  {e['agent']:<12} seed {e['seed']}: best {e['best_score']}  ({e['wall_s']} s)")
    if report:
        _report("bench", out)
    return 0


def cmd_leaderboard(argv: list[str]) -> int:
    from discover_agent.leaderboard import write_leaderboards

    parser = Parser(prog="discover leaderboard", description="Write leaderboards from bench runs.")
    parser.add_argument("runs", type=Path, help="the --out folder of `discover bench`")
    parser.add_argument("--write", type=Path, default=Path("leaderboards"), help="destination folder")
    args = parser.parse_args(argv)
    for path in write_leaderboards(args.runs, args.write):
        print(path)
    return 0


def cmd_report(argv: list[str]) -> int:
    from discover_agent.report import write_report

    parser = Parser(
        prog="discover report",
        description="Write one self-contained HTML page (pictures inlined, no network) of a run or bench folder.",
    )
    parser.add_argument("folder", type=Path, help="the --out folder of `discover run` or `discover bench`")
    parser.add_argument("--out", type=Path, default=None, help="HTML file to write (default: FOLDER/report.html)")
    args = parser.parse_args(argv)
    print(write_report(args.folder, args.out))
    return 0


def cmd_serve(argv: list[str]) -> int:
    from discover_agent.serve import MAX_PROMPT_TOKENS, serve

    parser = Parser(
        prog="discover serve",
        description="Serve a local model over an OpenAI-compatible API (/v1/models, /v1/chat/completions); "
        "response_format JSON schemas of constructions are enforced by the construction grammar.",
    )
    parser.add_argument("--model", default=None, help="local HF model folder (default: the embedded SmolLM2)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback)")
    parser.add_argument("--port", type=_bounded_int(0, 65535), default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--name", default=None, help="model id shown by /v1/models (default: from --model)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling sequence (default: 0)")
    parser.add_argument(
        "--max-tokens", type=_bounded_int(1), default=1024, help="cap on a request's max_tokens (default: 1024)"
    )
    parser.add_argument(
        "--max-prompt-tokens", type=_bounded_int(1), default=MAX_PROMPT_TOKENS,
        help=f"longest prompt in tokens, after the chat template; longer get HTTP 400 (default: {MAX_PROMPT_TOKENS})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    serve(args.model, args.host, args.port, args.device, args.seed, args.name, args.max_tokens, args.max_prompt_tokens)
    return 0


COMMANDS = {
    "run": cmd_run, "resume": cmd_resume, "envs": cmd_envs, "bench": cmd_bench, "leaderboard": cmd_leaderboard,
    "report": cmd_report, "serve": cmd_serve,
}  # fmt: skip


#: Commands that run a local model: torch's threads follow the cores other processes leave free (`threads`).
GOVERNED = ("run", "resume", "bench", "serve")


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause (a bad value, file, folder, endpoint), as opposed to a bug worth a traceback."""
    from discover_agent.openai_policy import EndpointError

    return (ValueError, OSError, ImportError, EndpointError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: discover {" + ",".join(COMMANDS) + "} ...\n\n" + __doc__, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        if argv[0] in GOVERNED:
            from discover_agent.threads import govern

            govern()
        return COMMANDS[argv[0]](argv[1:])
    except _user_errors() as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"discover {argv[0]}: error: {message}", file=sys.stderr)
        return 2
