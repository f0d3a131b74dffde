"""A run's folder: what it writes after every step, so a crash loses at most the step in flight.

rollouts.jsonl  one line per reply (step, parent id, reward, score, valid, error, tokens)
buffer.json     the sampler's state (its buffer of states), written atomically
checkpoint.json step reached, lineage of every valid state, counters; with buffer.json enough to resume
best.json       the single best state found, with its lineage (+ best_construction.json / best.py)
metrics.csv     one row per step; progress.png the best score and reward distribution per step
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from discover_agent.storage import append_jsonl, atomic_write_bytes, read_jsonl, write_json


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def has_checkpoint(self) -> bool:
        return self.file("checkpoint.json").exists() and self.file("buffer.json").exists()

    def load_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]]:
        checkpoint = json.loads(self.file("checkpoint.json").read_text())
        buffer = json.loads(self.file("buffer.json").read_text())
        return checkpoint, buffer

    def drop_rows_after(self, step: int) -> list[dict[str, Any]]:
        """On resume, forget log lines of steps that did not finish (they are redone); returns the rest."""
        kept = [row for row in read_jsonl(self.file("rollouts.jsonl")) if row["step"] < step]
        atomic_write_bytes(self.file("rollouts.jsonl"), "".join(json.dumps(r) + "\n" for r in kept).encode())
        return kept

    def log_rollouts(self, rows: list[dict[str, Any]]) -> None:
        append_jsonl(self.file("rollouts.jsonl"), rows)

    def save_step(self, buffer: dict[str, Any], checkpoint: dict[str, Any]) -> None:
        """Buffer first, then the checkpoint that points past it: a crash between them only redoes a step."""
        write_json(self.file("buffer.json"), buffer)
        write_json(self.file("checkpoint.json"), checkpoint)

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
