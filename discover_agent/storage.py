"""Crash-safe files: a long run must never lose its buffer or its best solution to a half-written file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temp file in the same folder, fsync it, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must reach the disk
    finally:
        os.close(dir_fd)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


def append_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Append whole lines and fsync, so a crash leaves at most the unfinished step's lines to drop. A link at
    `path` is refused (OSError), not followed."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with open(fd, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class CorruptFile(ValueError):
    """A run file that cannot be read back as written; the message names the file and line."""


def read_json(path: str | Path) -> Any:
    """A JSON file written by `write_json`, with an error that names the file if it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFile(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise CorruptFile(f"{path} is not valid JSON: nested too deeply") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a JSONL file. A last line without its newline is dropped: `append_jsonl` syncs whole
    lines before a step is checkpointed, so it can only be a crashed, unfinished append. Any other bad line
    is an error naming the file and line, so no row after it is lost silently."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    lines.pop()  # "" when the file ends with a newline, else the unfinished last line
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise CorruptFile(f"{path}:{number}: not a JSON row ({why}); fix or delete that line") from None
        if not isinstance(row, dict):
            raise CorruptFile(f"{path}:{number}: a row must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def replace_dir(write: Callable[[Path], Any], target: str | Path) -> Path:
    """Run `write(tmp_dir)` and then swap `tmp_dir` in as `target`, so readers never see a half-written folder.

    The old folder (if any) is renamed aside before the new one is renamed in, then deleted.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
