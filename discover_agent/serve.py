"""`discover serve`: the local model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Any OpenAI client (the `openai` package, OpenEvolve, `--endpoint` agents) can then sample from the embedded
SmolLM2 or a local HF folder. `response_format` with a JSON schema of a construction (array, length, number
bounds; the `json_schema` form of OpenAI/vLLM or llama.cpp's `json_object` + `schema`) is enforced by the
same grammar `LocalPolicy` uses, so even a tiny model answers with valid constructions. One model, requests
served one at a time (a lock around generation); the request's `model` name is echoed, not checked, and its
`seed` is not honoured (sampling follows the server's `--seed` from start-up). Not supported, and refused
with HTTP 400: streaming, stop sequences, non-text content, schemas other than constructions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from discover_agent.json_schema import UnsupportedSchema, spec_from_schema
from discover_agent.model import EMBEDDED_NAME
from discover_agent.policy import LocalPolicy, PolicyConfig, Sample, TokenConstraint
from discover_envs.problem import ConstructionSpec

__all__ = ["ServedPolicy", "create_app", "running", "serve"]

#: A request's temperature 0 (greedy, in OpenAI's API) is sampled at this temperature: the policy samples.
GREEDY_TEMPERATURE = 1e-5


#: Grammars kept per (spec, reply budget); building one scans the vocabulary, clients vary these little.
MAX_GRAMMARS = 32


class ServedPolicy(LocalPolicy):
    """A `LocalPolicy` for serving: prompts arrive chat-formatted (the server renders whole conversations with
    the tokenizer's template, not only one user message), and each request's max_tokens is its grammar's
    budget, so a constrained reply closes its array in time whatever the request asked for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._budgeted: dict[tuple[ConstructionSpec, int], TokenConstraint] = {}

    def chat_prompt(self, prompt: str) -> str:
        return prompt

    def constraint(self, spec: ConstructionSpec) -> TokenConstraint:
        from discover_agent.constrained import JsonArrayConstraint

        key = (spec, self.config.max_new_tokens)
        if key not in self._budgeted:
            if len(self._budgeted) >= MAX_GRAMMARS:
                self._budgeted.clear()
            self._budgeted[key] = JsonArrayConstraint(self.tokenizer, spec, max_new_tokens=key[1])
        return self._budgeted[key]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message text; content parts of type "text" are joined (other parts are refused upstream)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.get("text", "") for part in self.content)


class ChatRequest(BaseModel):
    """The fields of /v1/chat/completions this server reads; other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    messages: list[Message] = Field(min_length=1)
    n: int = Field(1, ge=1, le=64)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    stream: bool = False
    stop: str | list[str] | None = None
    response_format: dict[str, Any] | None = None


class _BadRequest(ValueError):
    """A request this server cannot honour; answered as HTTP 400 with OpenAI's error shape."""


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _constraint_spec(response_format: dict[str, Any] | None) -> ConstructionSpec | None:
    """The spec of a `response_format`: "text" or none -> None; json_schema / json_object+schema -> a spec."""
    if not response_format or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
    elif kind == "json_object":
        schema = response_format.get("schema")
        if schema is None:
            raise _BadRequest("response_format json_object needs a 'schema' here (free-form JSON is not enforced)")
    else:
        raise _BadRequest(f"unknown response_format type {kind!r}; use text, json_schema or json_object")
    try:
        return spec_from_schema(schema)
    except UnsupportedSchema as exc:
        raise _BadRequest(str(exc)) from None


def _check(request: ChatRequest) -> None:
    if request.stream:
        raise _BadRequest("stream=true is not supported by discover serve; ask without streaming")
    if request.stop:
        raise _BadRequest("stop sequences are not supported by discover serve; replies end at the model's EOS")
    for message in request.messages:
        if isinstance(message.content, list) and any(part.get("type") != "text" for part in message.content):
            raise _BadRequest("only text content parts are supported")


def create_app(policy: LocalPolicy, model_name: str, max_tokens: int = 1024) -> FastAPI:
    """The API around `policy` (its prompts must already be chat-formatted: use `ServedPolicy`)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens!r}")
    app = FastAPI(title="discover serve", description=__doc__)
    lock = threading.Lock()
    created = int(time.time())
    tokenizer = policy.tokenizer

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"invalid request: {where}: {first.get('msg', exc)}")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "discover"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions", response_model=None)
    def chat(request: ChatRequest) -> dict[str, Any] | JSONResponse:
        try:
            _check(request)
            spec = _constraint_spec(request.response_format)
        except _BadRequest as exc:
            return _error(400, str(exc))
        limit = min(request.max_completion_tokens or request.max_tokens or max_tokens, max_tokens)
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        settings = {"temperature": max(request.temperature, GREEDY_TEMPERATURE), "max_new_tokens": limit}
        with lock:  # the policy's config is per request, and one generation at a time uses the CPU best
            policy.config = dataclasses.replace(policy.config, **settings)
            if spec is not None:
                try:
                    policy.constraint(spec)
                except ValueError as exc:
                    return _error(400, f"max_tokens={limit} is too small for this schema: {exc}")
            samples = policy.sample([prompt], request.n, spec)[0]
        choices = [_choice(i, s, spec is not None, request.logprobs, policy) for i, s in enumerate(samples)]
        completion_tokens = sum(len(s.completion_ids) for s in samples)
        prompt_tokens = len(samples[0].prompt_ids)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": request.model or model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }  # fmt: skip

    return app


def _choice(index: int, sample: Sample, constrained: bool, logprobs: bool, policy: LocalPolicy) -> dict[str, Any]:
    """One OpenAI choice; a constrained reply is the bare JSON (the grammar's ```json fence is removed), and it
    has stopped (not been cut by max_tokens) once the grammar closed the array, even if no EOS fitted after it."""
    stopped = bool(sample.completion_ids) and sample.completion_ids[-1] in policy.eos_ids
    text = sample.text
    if constrained and sample.constraint is not None:
        text = text.removeprefix(sample.constraint.prefix).removesuffix(sample.constraint.suffix)
        stopped = stopped or _closed(text)
    choice: dict[str, Any] = {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "finish_reason": "stop" if stopped else "length",
        "logprobs": None,
    }
    if logprobs:
        tokens = policy.tokenizer.convert_ids_to_tokens(sample.completion_ids)
        pieces = [policy.tokenizer.convert_tokens_to_string([t]) for t in tokens]
        choice["logprobs"] = {
            "content": [
                {"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": []}
                for piece, lp in zip(pieces, sample.logprobs, strict=True)
            ]
        }
    return choice


def _closed(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def load_served_policy(model: str | Path | None, device: str = "auto", seed: int = 0) -> ServedPolicy:
    """The local model (None: the embedded SmolLM2) ready to serve."""
    return ServedPolicy.from_pretrained(model, PolicyConfig(device=device, seed=seed))


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a background thread while the block runs; yields the base URL ("http://host:port/v1").

    Port 0 picks a free port. The socket is bound before the thread starts, so the URL is ready at once.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {host}:{sock.getsockname()[1]} did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def serve(model: str | None, host: str, port: int, device: str, seed: int, name: str | None, max_tokens: int) -> None:
    """Load the model and serve it until interrupted (Ctrl-C)."""
    import uvicorn

    policy = load_served_policy(model, device, seed)
    name = name or (Path(model).name if model else EMBEDDED_NAME)
    print(f"discover serve: {name} on http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(policy, name, max_tokens), host=host, port=port, log_level="warning")
