"""OpenEvolve's evaluator interface over a discover env, with every evaluation run in the agent's process.

OpenEvolve calls `evaluate(program_path)` from an evaluator file in its worker processes. The file written
here forwards the program's text to an `EvaluationService` in the process that started the run (over a
small JSON-over-HTTP server on loopback, with a random key), which steps the env with it as a ```python action.
So the env's verifier is the only judge, `discover bench` counts OpenEvolve's env steps like any agent's, and
every evaluation lands in one log. This module stays light (no torch): spawned workers import it.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["EvaluationService", "remote_evaluator"]

_KEY_HEADER = "X-Discover-Key"


class EvaluationService:
    """Steps a fresh env per thread (`make_env()`) from `state` with each program; keeps one row per call."""

    def __init__(self, make_env: Callable[[], Any], state: dict[str, Any]) -> None:
        self.make_env = make_env
        self.state = state
        self.rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._local = threading.local()

    def evaluate(self, code: str) -> dict[str, Any]:
        """Metrics: combined_score (the env's reward; its failure reward for an invalid program, what OpenEvolve
        maximises), valid (1/0) and, for valid programs, score (the problem's figure). The verifier's error
        goes back to the model as an artifact."""
        env = getattr(self._local, "env", None)
        if env is None:
            env = self._local.env = self.make_env()
        env.reset(options={"state": self.state})
        _, reward, _, _, info = env.step(f"```python\n{code.strip()}\n```")
        metrics = {"combined_score": float(reward), "valid": float(info["valid"])}
        if info["valid"]:
            metrics["score"] = float(info["score"])
        with self._lock:
            self.rows.append({
                "step": len(self.rows), "reward": float(reward), "score": info["score"], "valid": info["valid"],
                "error": info["error"], "state": info["next_state"], "reply": code, "time": time.time(),
            })  # fmt: skip
        return {"metrics": metrics, "artifacts": {"verifier_error": info["error"]} if info["error"] else {}}

    @contextmanager
    def serving(self, folder: Path) -> Iterator[Path]:
        """Serve `evaluate` on loopback while the block runs; yields the evaluator file for OpenEvolve."""
        key = secrets.token_hex(32)
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if not hmac.compare_digest(self.headers.get(_KEY_HEADER, ""), key):
                    self.send_error(403, "wrong key")
                    return
                code = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode("utf-8", "replace")
                body = json.dumps(service.evaluate(code)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=httpd.serve_forever, args=(0.1,), daemon=True)
        thread.start()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "evaluator.py"
        path.touch(0o600)  # the key lets a process run code through the sandbox
        path.write_text(
            '"""Written by discover: OpenEvolve\'s programs are scored by the env in the process that runs it."""\n'
            "from discover_agent.openevolve_eval import remote_evaluator\n\n"
            f"evaluate = remote_evaluator('http://127.0.0.1:{httpd.server_address[1]}/', {key!r})\n"
        )
        try:
            yield path
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)


def remote_evaluator(url: str, key: str, timeout_s: float = 3600.0) -> Callable[[str], Any]:
    """OpenEvolve's `evaluate(program_path)`, forwarding the program to an `EvaluationService` at `url`."""

    def evaluate(program_path: str) -> Any:
        from openevolve.evaluation_result import EvaluationResult

        request = urllib.request.Request(url, Path(program_path).read_bytes(), {_KEY_HEADER: key}, method="POST")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = json.loads(response.read())
        return EvaluationResult(metrics=answer["metrics"], artifacts=answer["artifacts"])

    return evaluate
