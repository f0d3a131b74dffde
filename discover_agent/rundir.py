"""A run's folder: what it writes after every step, so a crash loses at most the step in flight.

config.json          the agent, its full config (env arguments resolved), the code version and the sandbox
                     report; `discover resume` reads it back
rollouts.jsonl       one line per reply (step, parent id, reward, score, valid, error, tokens, sandbox, reply)
steps/step-NNNNNN/   the state after N steps: buffer.json (the sampler's state) and, for TTT, adapter/
                     and trainer.pt (optimiser moments); written whole, then pointed to by
checkpoint.json      steps done, counters, lineage, metrics and the step folder: the commit point of a step
best.json            the single best state found, with its lineage (+ best_construction.json / best.py)
metrics.csv          one row per step; progress.png the best score and reward distribution per step
.lock                held while a process writes the folder

Order per step: rows are appended, the step folder is written, then checkpoint.json is replaced atomically.
A crash before the last write leaves the previous checkpoint in force: the step is redone, and its logged
rows (step >= the checkpoint's) are dropped on resume; nothing is applied twice.

A folder is read back as data, never trusted: none of the files above may be a link (reading or writing
through one would reach outside the folder), checkpoint.json must have every field of the right type and
point to its own step folder (`dir` == steps/step-NNNNNN of its `step`), every logged row must have the
fields the plots read, and committed step folders without a checkpoint are refused, not started over.
"""

from __future__ import annotations

import csv
import fcntl
import importlib.metadata
import io
import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from discover_agent.storage import (
    CorruptFile,
    append_jsonl,
    atomic_write_bytes,
    read_json,
    read_jsonl,
    replace_dir,
    write_json,
)

#: Files whose presence means the folder holds a run (so `discover run` refuses it).
RUN_FILES = ("config.json", "checkpoint.json", "rollouts.jsonl")
#: Everything the folder's protocol reads or writes at its top level; none of it may be a link.
OWN_ENTRIES = (".lock", *RUN_FILES, "steps", "best.json", "best_construction.json", "best.py", "metrics.csv",
               "progress.png")  # fmt: skip


def code_version() -> str:
    """The code a run was made with: "git:<commit>" (with "+dirty" when tracked files differ from it) where the
    package lies in a git checkout, else "discover <package version>"; recorded in config.json and entries."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD") if (root / ".git").exists() else None
    if commit:
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "discover_agent", "discover_envs")
        return f"git:{commit}{'+dirty' if dirty else ''}"
    try:
        return f"discover {importlib.metadata.version('discover')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class RunDirError(ValueError):
    """A run folder that cannot be used as asked; the message names the folder or file and what to do."""


class Lineage(NamedTuple):
    """Where a state came from: its parent's id, its score and the step that found it (JSON: a 3-list)."""

    parent_id: str | None
    score: float | None
    step: int


@dataclass
class Checkpoint:
    """checkpoint.json: the commit point of a step (steps done, counters, lineage, per-step metrics, the best-so-far
    curve, the start states); `dir` names the step folder holding the sampler's buffer (and TTT's adapter)."""

    agent: str
    env: str
    initial: list[dict[str, Any]]
    step: int = 0
    rollouts: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    lineage: dict[str, Lineage] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def dir(self) -> str:
        return f"steps/step-{self.step:06d}"

    def to_json(self) -> dict[str, Any]:
        return {
            "agent": self.agent, "env": self.env, "step": self.step, "rollouts": self.rollouts,
            "tokens": self.tokens, "wall_s": self.wall_s, "initial": self.initial,
            "lineage": {state: list(link) for state, link in self.lineage.items()}, "metrics": self.metrics,
            "curve": [list(point) for point in self.curve], "dir": self.dir,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Any, path: Path) -> Checkpoint:
        """The checkpoint in `data` (read from `path`), checked field by field: `CorruptFile` names the first
        field that is not as the loop writes it."""
        _check_checkpoint(data, path)
        return cls(
            agent=data["agent"], env=data["env"], initial=data["initial"], step=data["step"],
            rollouts=data["rollouts"], tokens=data["tokens"], wall_s=float(data["wall_s"]),
            lineage={state: Lineage(*link) for state, link in data["lineage"].items()}, metrics=data["metrics"],
            curve=[(int(x), float(y)) for x, y in data["curve"]],
        )  # fmt: skip


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def holds_run(self) -> bool:
        return any(self.file(name).exists() for name in RUN_FILES)

    @contextmanager
    def locked(self) -> Iterator[RunDir]:
        """Create the folder and hold its lock: a second process writing the same folder is refused, and so is
        a folder whose own files are links."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.refuse_links(self.file(name) for name in OWN_ENTRIES)
            fd = os.open(self.file(".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise RunDirError(f"cannot write the run folder {self.path}: {exc.strerror or exc}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock = self.file(".lock")
                raise RunDirError(f"another discover process is writing {self.path} (it holds {lock})") from None
            yield self
        finally:
            os.close(fd)  # closing releases the lock

    def load_checkpoint(self) -> tuple[Checkpoint, dict[str, Any], Path] | None:
        """(checkpoint, buffer, step folder), or None when no step finished yet (a crash in the first step).

        A checkpoint whose step folder or buffer is missing is refused, never taken for a fresh start; so are
        committed step folders without a checkpoint (starting over would drop their logged rows)."""
        checkpoint = self.checkpoint()
        if checkpoint is None:
            return None
        path, step_dir = self.file("checkpoint.json"), self.path / checkpoint.dir
        buffer_path = step_dir / "buffer.json"
        if not buffer_path.is_file():
            raise RunDirError(f"{path} points to {buffer_path}, which is missing; refusing to start {self.path} over")
        inside = (Path(top, name) for top, dirs, files in os.walk(step_dir) for name in dirs + files)
        self.refuse_links([step_dir, *inside])
        return checkpoint, read_json(buffer_path), step_dir

    def checkpoint(self) -> Checkpoint | None:
        """checkpoint.json, checked field by field (`CorruptFile` names the first bad one); None before the
        first step was committed."""
        path = self.file("checkpoint.json")
        if not path.exists():
            if self.file("buffer.json").exists():
                raise RunDirError(f"{self.file('buffer.json')} exists without {path}: not a folder this version wrote")
            steps = self.file("steps")
            if steps.is_dir() and any(p.name.startswith("step-") for p in steps.iterdir()):
                raise RunDirError(
                    f"{steps} holds committed steps but {path} is missing; refusing to start over, which would drop "
                    f"their logged rows (restore {path.name}, or delete {steps} and rollouts.jsonl to start over)"
                )
            return None
        self.refuse_links([path])
        return Checkpoint.from_json(read_json(path), path)

    def kept_rows(self, step: int) -> list[dict[str, Any]]:
        """The logged rows of steps before `step`; rows of an unfinished step are removed from the log."""
        path = self.file("rollouts.jsonl")
        rows = read_jsonl(path)
        for number, row in enumerate(rows, start=1):
            if not _is_row(row):
                raise CorruptFile(
                    f"{path}:{number}: a row needs an integer 'step' >= 0, a boolean 'valid', a number 'reward' and "
                    "a number or null 'score'"
                )
        kept = [row for row in rows if row["step"] < step]
        if path.exists():
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        return kept

    def log_rollouts(self, rows: list[dict[str, Any]]) -> None:
        append_jsonl(self.file("rollouts.jsonl"), rows)

    def commit_step(self, checkpoint: Checkpoint, write: Callable[[Path], None]) -> Path:
        """Write the step folder with `write(folder)` (whole, via a temporary folder), then the checkpoint that
        points to it, then drop older step folders. Returns the new step folder."""
        self.refuse_links([self.file("steps")])
        step_dir = replace_dir(write, self.path / checkpoint.dir)
        write_json(self.file("checkpoint.json"), checkpoint.to_json())
        for old in self.file("steps").iterdir():
            if old.is_symlink():
                old.unlink()  # the link only: its target is not the run's
            elif old.name != step_dir.name:
                shutil.rmtree(old, ignore_errors=True)
        return step_dir

    def refuse_links(self, paths: Iterable[Path]) -> None:
        """`RunDirError` if any of `paths` (the folder's own files) is a symbolic link."""
        for path in paths:
            if path.is_symlink():
                raise RunDirError(
                    f"{path} is a symbolic link; a run folder's files must be its own, refusing to read or write "
                    f"through it (was {self.path} tampered with?)"
                )

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        fields = list(dict.fromkeys(key for row in rows for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.file("metrics.csv"), text.getvalue().encode())

    def write_best(self, best: dict[str, Any], lineage: list[dict[str, Any]], meta: dict[str, Any]) -> None:
        write_json(self.file("best.json"), {**meta, "state": best, "lineage": lineage})
        if best.get("construction") is not None:
            write_json(self.file("best_construction.json"), best["construction"])
        if best.get("code"):
            atomic_write_bytes(self.file("best.py"), best["code"].encode())


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _is_row(row: dict[str, Any]) -> bool:
    """A logged reply with the fields resume and the plots read."""
    score = row.get("score")
    return (
        _is_count(row.get("step")) and type(row.get("valid")) is bool and _is_number(row.get("reward"))
        and (score is None or _is_number(score))
    )  # fmt: skip


def _check_checkpoint(checkpoint: Any, path: Path) -> None:
    """`CorruptFile` naming the first field of `checkpoint` that is not as `SearchAgent` writes it."""
    if not isinstance(checkpoint, dict):
        raise CorruptFile(f"{path} is not a JSON object: not a checkpoint this version wrote")
    step = checkpoint.get("step")
    lineage, curve, metrics = checkpoint.get("lineage"), checkpoint.get("curve"), checkpoint.get("metrics")
    rules = {
        "agent": ("a string", isinstance(checkpoint.get("agent"), str)),
        "env": ("a string", isinstance(checkpoint.get("env"), str)),
        "step": ("an integer >= 0", _is_count(step)),
        "rollouts": ("an integer >= 0", _is_count(checkpoint.get("rollouts"))),
        "tokens": ("an integer >= 0", _is_count(checkpoint.get("tokens"))),
        "wall_s": ("a number >= 0", _is_number(checkpoint.get("wall_s")) and checkpoint["wall_s"] >= 0),
        "dir": (
            "the folder of its step, steps/step-NNNNNN",
            _is_count(step) and checkpoint.get("dir") == f"steps/step-{step:06d}",
        ),
        "initial": (
            "a non-empty list of states",
            isinstance(checkpoint.get("initial"), list) and checkpoint["initial"]
            and all(isinstance(s, dict) for s in checkpoint["initial"]),
        ),
        "lineage": (
            "an object of id: [parent id, score, step]",
            isinstance(lineage, dict) and all(
                isinstance(link, list) and len(link) == 3 and isinstance(link[0], str | None)
                and (link[1] is None or _is_number(link[1])) and _is_count(link[2])
                for link in lineage.values()
            ),
        ),
        "curve": (
            "a list of [rollouts, score] pairs",
            isinstance(curve, list)
            and all(isinstance(p, list) and len(p) == 2 and _is_count(p[0]) and _is_number(p[1]) for p in curve),
        ),
        "metrics": (
            "a list of per-step rows with a number 'mean_reward'",
            isinstance(metrics, list)
            and all(isinstance(r, dict) and type(r.get("mean_reward")) in (int, float) for r in metrics),
        ),
    }  # fmt: skip
    for name, (what, ok) in rules.items():
        if not ok:
            shown = json.dumps(checkpoint.get(name))
            raise CorruptFile(f"{path}: {name!r} must be {what}, got {shown[:80]}")
