"""`discover serve`: the local model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Any OpenAI client (the `openai` package, OpenEvolve, `--endpoint` agents) can then sample from the embedded
SmolLM2 or a local HF folder. `response_format` with a JSON schema of a construction (array, length, number
bounds; the `json_schema` form of OpenAI/vLLM or llama.cpp's `json_object` + `schema`) is enforced by the
same grammar `LocalPolicy` uses, so even a tiny model answers with valid constructions. One model, one
generation at a time on a worker thread, so `/v1/models` is answered while it runs; the request's `model` name
is echoed, not checked, and its `seed` is not honoured (sampling follows the server's `--seed` from start-up).
Not supported, and refused with HTTP 400: streaming, stop sequences, non-text content, schemas other than
constructions.

Bounded before the model sees it: the body (`MAX_BODY_BYTES`, else 413), strict JSON in valid Unicode, the
prompt (`max_prompt_tokens`), the reply (`max_tokens`), a schema whose shortest array cannot fit in the reply
(refused by arithmetic, before the grammar's search) and the queue (`MAX_WAITING`, else 503). A request whose
client disconnects stops generating at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from jinja2.exceptions import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect, Request

from discover_agent.json_schema import UnsupportedSchema, spec_from_schema
from discover_agent.model import EMBEDDED_NAME
from discover_agent.policy import LocalPolicy, PolicyConfig
from discover_agent.types import Sample, TokenConstraint
from discover_envs.problem import ConstructionSpec

__all__ = ["ServedPolicy", "create_app", "running", "serve"]

_log = logging.getLogger(__name__)

#: A request's temperature 0 (greedy, in OpenAI's API) is sampled at this temperature: the policy samples.
GREEDY_TEMPERATURE = 1e-5
#: Grammars kept per (spec, reply budget); building one scans the vocabulary, clients vary these little.
MAX_GRAMMARS = 32
#: Largest request body read, in bytes (a prompt of MAX_PROMPT_TOKENS tokens takes tens of KB); more is HTTP 413.
MAX_BODY_BYTES = 4 * 2**20
#: Longest prompt, in tokens of the model's tokenizer, after the chat template; more is HTTP 400.
MAX_PROMPT_TOKENS = 8192
#: Requests waiting for the model or generating at once; more are answered HTTP 503 at once.
MAX_WAITING = 16
#: How often a waiting or generating request checks that its client is still connected, in seconds.
DISCONNECT_POLL_S = 0.1


class _BadRequest(ValueError):
    """A request this server cannot honour; answered with `status` (400 unless said) in OpenAI's error shape."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _ClientGone(Exception):
    """The client disconnected: its request is dropped, and its generation stopped at the next token."""


class ServedPolicy(LocalPolicy):
    """A `LocalPolicy` for serving: prompts arrive chat-formatted (the server renders whole conversations with
    the tokenizer's template, not only one user message), and each request's max_tokens is its grammar's
    budget, so a constrained reply closes its array in time whatever the request asked for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._budgeted: dict[tuple[ConstructionSpec, int], TokenConstraint] = {}
        #: Set by the server when the client of the request being sampled has left; checked every token.
        self.gone: threading.Event | None = None
        self.progress = self._stop_if_gone

    def _stop_if_gone(self, _live: int) -> None:
        if self.gone is not None and self.gone.is_set():
            raise _ClientGone

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
        """The message text; content parts of type "text" are joined (`_check` refuses any other part)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part["text"] for part in self.content)


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


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


async def _body(http: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    too_big = _BadRequest(f"the request body has more than {limit} bytes; this server reads at most that", 413)
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_big
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse(body: bytes) -> ChatRequest:
    """The request from its JSON body: strict JSON (no NaN/Infinity), valid Unicode, bounded nesting."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # a lone surrogate ("\ud800") fails here
    except UnicodeError as exc:
        raise _BadRequest(f"the request is not valid Unicode text ({getattr(exc, 'reason', exc)})") from None
    except ValueError as exc:
        raise _BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _BadRequest("the request body is nested too deeply") from None
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        raise _BadRequest(f"invalid request: {where}: {errors[0]['msg'] if errors else exc}") from None


def _constraint_spec(response_format: dict[str, Any] | None) -> ConstructionSpec | None:
    """The spec of a `response_format`: "text" or none -> None; json_schema / json_object+schema -> a spec."""
    if not response_format or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        wrapper = response_format.get("json_schema")
        if not isinstance(wrapper, dict):
            raise _BadRequest("response_format.json_schema must be an object holding the 'schema'")
        schema = wrapper.get("schema")
    elif kind == "json_object":
        schema = response_format.get("schema")
        if schema is None:
            raise _BadRequest("response_format json_object needs a 'schema' here (free-form JSON is not enforced)")
    else:
        raise _BadRequest(f"unknown response_format type {kind!r:.40}; use text, json_schema or json_object")
    try:
        return spec_from_schema(schema)
    except UnsupportedSchema as exc:
        raise _BadRequest(str(exc)) from None


def _check(request: ChatRequest) -> None:
    if request.stream:
        raise _BadRequest("stream=true is not supported by discover serve; ask without streaming")
    if request.stop:
        raise _BadRequest("stop sequences are not supported by discover serve; replies end at the model's EOS")
    for i, message in enumerate(request.messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
            if part.get("type") != "text":
                raise _BadRequest("only text content parts are supported")
            if not isinstance(part.get("text"), str):
                raise _BadRequest(f"messages.{i}.content.{j}.text must be a string, got {part.get('text')!r:.40}")


def create_app(
    policy: ServedPolicy,
    model_name: str,
    max_tokens: int = 1024,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_waiting: int = MAX_WAITING,
) -> FastAPI:
    """The API around `policy`. Requests are parsed and checked on the event loop, then generated one at a
    time on a worker thread, so `/v1/models` is answered at once whatever runs; at most `max_waiting`
    requests wait or run (more get HTTP 503), and a request whose client disconnects stops generating."""
    for name, value in (("max_tokens", max_tokens), ("max_prompt_tokens", max_prompt_tokens),
                        ("max_body_bytes", max_body_bytes), ("max_waiting", max_waiting)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    app = FastAPI(title="discover serve", description=__doc__)
    lock = threading.Lock()
    created = int(time.time())
    waiting = 0

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "discover"}
        return {"object": "list", "data": [entry]}

    def generate(request: ChatRequest, spec: ConstructionSpec | None, limit: int, gone: threading.Event) -> dict:
        """The completion, on a worker thread holding the model (tokenizing and grammars included)."""
        with lock:
            if gone.is_set():
                raise _ClientGone
            messages = [{"role": m.role, "content": m.text()} for m in request.messages]
            try:
                prompt = str(policy.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            except TemplateError as exc:  # e.g. templates that require alternating user/assistant roles
                raise _BadRequest(f"the model's chat template refused these messages: {exc}") from None
            tokens = len(policy.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if tokens > max_prompt_tokens:
                raise _BadRequest(f"the prompt has {tokens} tokens; this server takes at most {max_prompt_tokens}")
            temperature = max(request.temperature, GREEDY_TEMPERATURE)
            policy.config = dataclasses.replace(policy.config, temperature=temperature, max_new_tokens=limit)
            if spec is not None:
                try:
                    policy.constraint(spec)
                except ValueError as exc:
                    raise _BadRequest(f"this schema cannot be enforced with max_tokens={limit}: {exc}") from None
            policy.gone = gone
            try:
                samples = policy.sample([prompt], request.n, spec)[0]
            finally:
                policy.gone = None
            choices = [_choice(i, s, spec is not None, request.logprobs, policy) for i, s in enumerate(samples)]
        prompt_tokens, completion_tokens = len(samples[0].prompt_ids), sum(len(s.completion_ids) for s in samples)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": request.model or model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }  # fmt: skip

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(http: Request) -> dict[str, Any] | JSONResponse:
        nonlocal waiting
        try:
            request = _parse(await _body(http, max_body_bytes))
            _check(request)
            spec = _constraint_spec(request.response_format)
        except _BadRequest as exc:
            return _error(exc.status, str(exc))
        except ClientDisconnect:
            return _error(499, "the client disconnected")
        if waiting >= max_waiting:
            return _error(503, f"{waiting} requests are waiting for the model; retry later", "server_busy")
        limit = min(request.max_completion_tokens or request.max_tokens or max_tokens, max_tokens)
        gone = threading.Event()
        waiting += 1
        try:
            job = asyncio.create_task(asyncio.to_thread(generate, request, spec, limit, gone))
            while not job.done():
                await asyncio.wait([job], timeout=DISCONNECT_POLL_S)
                if not job.done() and await http.is_disconnected():
                    gone.set()
            return job.result()
        except _BadRequest as exc:
            return _error(exc.status, str(exc))
        except _ClientGone:
            _log.info("the client of a chat request disconnected; its generation was stopped")
            return _error(499, "the client disconnected")
        finally:
            gone.set()  # also when this handler is cancelled (server shutdown): the thread stops at the next token
            waiting -= 1

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


def serve(
    model: str | None,
    host: str,
    port: int,
    device: str,
    seed: int,
    name: str | None,
    max_tokens: int,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
) -> None:
    """Load the model and serve it until interrupted (Ctrl-C)."""
    import uvicorn

    policy = load_served_policy(model, device, seed)
    name = name or (Path(model).name if model else EMBEDDED_NAME)
    app = create_app(policy, name, max_tokens, max_prompt_tokens)
    print(f"discover serve: {name} on http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
