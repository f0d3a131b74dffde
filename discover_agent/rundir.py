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
"""

from __future__ import annotations

import csv
import fcntl
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from discover_agent.storage import CorruptFile, append_jsonl, atomic_write_bytes, read_json, read_jsonl, write_json

#: Files whose presence means the folder holds a run (so `discover run` refuses it).
RUN_FILES = ("config.json", "checkpoint.json", "rollouts.jsonl")


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
        """Create the folder and hold its lock: a second process writing the same folder is refused."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.file(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
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

    def load_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any], Path] | None:
        """(checkpoint, buffer, step folder), or None when no step finished yet (a crash in the first step).

        A checkpoint whose step folder or buffer is missing is refused, never taken for a fresh start."""
        path = self.file("checkpoint.json")
        if not path.exists():
            if self.file("buffer.json").exists():
                raise RunDirError(f"{self.file('buffer.json')} exists without {path}: not a folder this version wrote")
            return None
        checkpoint = read_json(path)
        if not isinstance(checkpoint, dict) or not {"step", "dir", "agent", "env"} <= set(checkpoint):
            raise CorruptFile(f"{path} lacks step, dir, agent or env: not a checkpoint this version wrote")
        step_dir = self.path / checkpoint["dir"]
        buffer_path = step_dir / "buffer.json"
        if not buffer_path.is_file():
            raise RunDirError(f"{path} points to {buffer_path}, which is missing; refusing to start {self.path} over")
        return checkpoint, read_json(buffer_path), step_dir

    def kept_rows(self, step: int) -> list[dict[str, Any]]:
        """The logged rows of steps before `step`; rows of an unfinished step are removed from the log."""
        path = self.file("rollouts.jsonl")
        rows = read_jsonl(path)
        for number, row in enumerate(rows, start=1):
            if not isinstance(row.get("step"), int):
                raise CorruptFile(f"{path}: row {number} has no integer 'step'")
        kept = [row for row in rows if row["step"] < step]
        if path.exists():
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        return kept

    def log_rollouts(self, rows: list[dict[str, Any]]) -> None:
        append_jsonl(self.file("rollouts.jsonl"), rows)

    def commit_step(self, checkpoint: dict[str, Any], write: Callable[[Path], None]) -> Path:
        """Write the step folder with `write(folder)` (whole, via a temporary folder), then the checkpoint that
        points to it, then drop older step folders. Returns the new step folder."""
        from discover_agent.model import replace_dir

        name = f"steps/step-{checkpoint['step']:06d}"
        step_dir = replace_dir(write, self.path / name)
        write_json(self.file("checkpoint.json"), {**checkpoint, "dir": name})
        for old in self.file("steps").iterdir():
            if old.name != step_dir.name:
                shutil.rmtree(old, ignore_errors=True)
        return step_dir

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
