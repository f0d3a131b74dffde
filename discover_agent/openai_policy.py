"""Sampling from an OpenAI-compatible server (vLLM, llama.cpp, SGLang, OpenAI) for sampling-only agents.

Stdlib HTTP only. Each prompt's group is one `/v1/chat/completions` request with `n` (repeated for the rest when
a server returns fewer choices); prompts run in parallel threads. Token ids are not available from such servers,
so samples carry text and, when the server gives them, per-token log-probs — enough to search, not to train.

With a `ConstructionSpec`, replies are constrained by the server, in the first of `CONSTRAINT_FORMS` that it
takes and enforces: the standard `response_format` json_schema (OpenAI, vLLM, SGLang, `discover serve`); a GBNF
`grammar` built from the spec (`gbnf.construction_grammar`: fence, length, bounds, decimals), which llama.cpp's
server and llama-cpp-python take; llama-cpp-python's `{"type": "json_object", "schema": ...}`, which enforces the
length only. A form is dropped for the next one when the server refuses it (HTTP 400, 422 or 500) or when a
reply breaks it without being cut at max_tokens (the server took the form but does not enforce it, as
llama.cpp's json_schema does with number bounds). Every reply is checked against the spec; the ones that break
it are counted (`out_of_spec`) and reported in a warning. `constraint_forms=("grammar",)` configures a server
known to take grammars.

A hostile or broken endpoint cannot flood the run: an answer over `MAX_RESPONSE_BYTES`, or one that is not a
completion (JSON nested too deeply, a log-prob that is not a number), is an `EndpointError`; a reply longer than
the env reads (`MAX_TEXT` characters) is cut to `MAX_TEXT` + 1, so it stays invalid and is logged short, and
the cuts are counted (`cut`) and reported in a warning.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from discover_agent.gbnf import FENCE, construction_grammar
from discover_agent.json_schema import construction_schema, out_of_spec
from discover_agent.types import Policy, Sample
from discover_envs.env import MAX_TEXT
from discover_envs.problem import ConstructionSpec, extract_block

__all__ = ["CONSTRAINT_FORMS", "EndpointError", "OpenAIPolicy", "construction_schema"]

logger = logging.getLogger(__name__)

#: Ways to ask a server for a construction, in the order tried (see the module docstring). Replies under a JSON
#: schema hold only the JSON and are wrapped in the grammar's ```json fence, so the env reads every form alike.
CONSTRAINT_FORMS = ("json_schema", "grammar", "json_object")
#: Status codes with which servers refuse a constraint form they do not know.
_REFUSED = (400, 422, 500)
#: Largest answer read, in bytes (64 replies of 8,192 tokens with log-probs take ~60 MB); more is an error.
MAX_RESPONSE_BYTES = 256 * 2**20


class EndpointError(RuntimeError):
    """The endpoint could not be reached, or answered with an error or something that is not a completion."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def response_format(spec: ConstructionSpec, form: str) -> dict[str, Any]:
    """The `response_format` asking for a construction of `spec` as a JSON schema ("json_schema" or
    llama-cpp-python's "json_object")."""
    schema = construction_schema(spec)
    if form == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "construction", "schema": schema, "strict": True}}
    if form == "json_object":
        return {"type": "json_object", "schema": schema}
    raise ValueError(f"unknown schema form {form!r}; choose json_schema or json_object")


def constraint_fields(spec: ConstructionSpec, form: str) -> dict[str, Any]:
    """The request fields asking for a construction of `spec` in one of `CONSTRAINT_FORMS`."""
    if form == "grammar":
        return {"grammar": construction_grammar(spec)}
    return {"response_format": response_format(spec, form)}


def _chat_url(base_url: str) -> str:
    """Accepts "http://host:port", ".../v1" (the OpenAI clients' convention) or the full endpoint URL."""
    url = base_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class OpenAIPolicy(Policy):
    """`n` replies per prompt from a chat-completions endpoint; `seed` makes servers that honour it repeatable."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        temperature: float = 1.0,
        max_tokens: int = 256,
        seed: int | None = None,
        logprobs: bool = True,
        timeout_s: float = 600.0,
        max_workers: int = 4,
        constraint_forms: tuple[str, ...] = CONSTRAINT_FORMS,
    ) -> None:
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if max_tokens < 1 or max_workers < 1:
            raise ValueError(f"max_tokens and max_workers must be >= 1, got {max_tokens!r}, {max_workers!r}")
        unknown = [form for form in constraint_forms if form not in CONSTRAINT_FORMS]
        if unknown or not constraint_forms:
            raise ValueError(f"constraint_forms must be some of {CONSTRAINT_FORMS}, got {constraint_forms!r}")
        self.url = _chat_url(base_url)
        self.model = model
        self.api_key = api_key
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self.logprobs = logprobs
        self.timeout_s = timeout_s
        self.max_workers = max_workers
        self._calls = 0
        #: The constraint forms still to try, the one in use first (see the module docstring).
        self.forms = list(constraint_forms)
        #: Constrained replies so far, and how many of them broke the spec (the server did not enforce it).
        self.constrained = 0
        self.out_of_spec = 0
        #: Replies longer than `MAX_TEXT` characters, cut to `MAX_TEXT` + 1.
        self.cut = 0
        #: Forms the server has answered in: a later refusal is a real error, not "unknown form".
        self._answered: set[str] = set()
        self._lock = threading.Lock()

    def reseed(self, seed: int) -> None:
        """Restart the per-request seeds from `seed` (agents reseed every step from the run seed and step)."""
        self.seed, self._calls = seed, 0

    @property
    def schema_form(self) -> str:
        """The constraint form in use, or next to try: one of `CONSTRAINT_FORMS` (the name predates grammars)."""
        return self.forms[0]

    def sample(self, prompts: list[str], n: int, constraint_spec: ConstructionSpec | None = None) -> list[list[Sample]]:
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a non-empty list of strings")
        if n < 1:
            raise ValueError(f"n (replies per prompt) must be >= 1, got {n!r}")
        call = self._calls
        self._calls += 1
        broken, cut = self.out_of_spec, self.cut
        if constraint_spec is not None and not self._answered:
            # Learn the server's form on the first prompt alone, so parallel requests do not all get refused.
            first = [self._group(prompts[0], n, constraint_spec, (call, 0))]
            rest = list(enumerate(prompts))[1:]
        else:
            first, rest = [], list(enumerate(prompts))
        with ThreadPoolExecutor(max(1, min(self.max_workers, len(rest)))) as pool:
            futures = [pool.submit(self._group, p, n, constraint_spec, (call, i)) for i, p in rest]
            groups = first + [f.result() for f in futures]
        if self.out_of_spec > broken:
            logger.warning(
                "%d of %d replies from %s broke the construction spec (the %s constraint was not enforced, or "
                "replies hit max_tokens); %d of %d so far",
                self.out_of_spec - broken, len(prompts) * n, self.url, self.schema_form, self.out_of_spec,
                self.constrained,
            )  # fmt: skip
        if self.cut > cut:
            logger.warning(
                "%d of %d replies from %s were longer than %d characters; each was cut to %d, which the env "
                "refuses as too long (%d so far)", self.cut - cut, len(prompts) * n, self.url, MAX_TEXT, MAX_TEXT + 1,
                self.cut,
            )  # fmt: skip
        return groups

    def _group(self, prompt: str, n: int, spec: ConstructionSpec | None, key: tuple[int, int]) -> list[Sample]:
        samples: list[Sample] = []
        while len(samples) < n:
            payload: dict[str, Any] = {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "n": n - len(samples),
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
            if self.logprobs:
                payload["logprobs"] = True
            if self.seed is not None:
                # A distinct seed per request: a server that ignores `n` must not return one reply n times.
                seed_seq = np.random.SeedSequence([self.seed, *key, len(samples)])
                payload["seed"] = int(seed_seq.generate_state(1)[0] >> 1)
            answer, form = self._post_constrained(payload, spec) if spec is not None else (self._post(payload), None)
            choices = answer.get("choices")
            if not isinstance(choices, list) or not choices:
                raise EndpointError(f"{self.url} answered without any choices")
            samples.extend(self._sample(c, spec, form) for c in choices[: n - len(samples)])
        return samples

    def _post_constrained(self, payload: dict[str, Any], spec: ConstructionSpec) -> tuple[dict[str, Any], str]:
        """(answer, form) of a POST in the form in use; a form the server refuses before it ever answered in it
        is dropped for the next one."""
        while True:
            form = self.schema_form
            fields = constraint_fields(spec, form)
            if form == "grammar":  # the server writes the fence too
                fields["max_tokens"] = payload["max_tokens"] + len("".join(FENCE))
            try:
                answer = self._post({**payload, **fields})
            except EndpointError as exc:
                if form in self._answered or exc.status not in _REFUSED or not self._drop(form, f"refused it ({exc})"):
                    raise
                continue
            self._answered.add(form)
            return answer, form

    def _drop(self, form: str, why: str) -> bool:
        """Move on from `form` to the next constraint form; False when it is the last one."""
        with self._lock:
            if form != self.forms[0]:
                return True  # another request dropped it already
            if len(self.forms) == 1:
                return False
            self.forms.pop(0)
            logger.warning("%s %s: constraint form %s dropped, trying %s", self.url, why, form, self.forms[0])
            return True

    def _sample(self, choice: Any, spec: ConstructionSpec | None, form: str | None) -> Sample:
        try:
            content = choice["message"]["content"]
        except (KeyError, TypeError):
            raise EndpointError(f"{self.url} answered a choice without message.content: {choice!r:.300}") from None
        if not isinstance(content, str):
            raise EndpointError(f"{self.url} answered a non-text message.content: {content!r:.300}")
        if len(content) > MAX_TEXT:
            content = content[: MAX_TEXT + 1]
            with self._lock:
                self.cut += 1
        text = content
        if spec is not None and form is not None:
            if form != "grammar":  # a JSON schema's reply is the bare JSON
                text = FENCE[0] + content.strip() + FENCE[1]
            self._count(text, spec, form, cut=choice.get("finish_reason") == "length")
        return Sample(text=text, prompt_ids=[], completion_ids=[], logprobs=self._logprobs(choice),
                      temperature=self.temperature)  # fmt: skip

    def _logprobs(self, choice: dict[str, Any]) -> list[float]:
        """The per-token log-probs of a choice (OpenAI's `logprobs.content[].logprob`), [] when not given."""
        given = choice.get("logprobs")
        tokens = given.get("content") if isinstance(given, dict) else None
        if not isinstance(tokens, list):
            return []
        try:
            return [float(t["logprob"]) for t in tokens if isinstance(t, dict) and "logprob" in t]
        except (TypeError, ValueError):
            raise EndpointError(f"{self.url} answered a logprob that is not a number") from None

    def _count(self, text: str, spec: ConstructionSpec, form: str, cut: bool) -> None:
        """Count a constrained reply, and drop its form if the reply shows the server does not enforce it."""
        block = extract_block(text, ("json",))
        try:
            broken = block is None or out_of_spec(json.loads(block[1]), spec)
        except (json.JSONDecodeError, RecursionError):
            broken = True
        with self._lock:
            self.constrained += 1
            self.out_of_spec += broken
        unfenced = form == "grammar" and not (text.startswith(FENCE[0]) and text.endswith(FENCE[1]))
        if (broken or unfenced) and not cut:
            self._drop(form, "sent a reply that breaks it")

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(payload).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                data = self._read(response)
        except urllib.error.HTTPError as exc:
            detail = exc.read(2000).decode("utf-8", errors="replace")[:500]
            raise EndpointError(f"{self.url} answered HTTP {exc.code} {exc.reason}: {detail}", exc.code) from None
        except urllib.error.URLError as exc:
            raise EndpointError(f"cannot reach {self.url}: {exc.reason}") from None
        except TimeoutError:
            raise EndpointError(f"{self.url} did not answer within {self.timeout_s:g} s") from None
        body = data.decode("utf-8", errors="replace")
        try:
            answer = json.loads(body)
        except json.JSONDecodeError as exc:
            raise EndpointError(f"{self.url} answered invalid JSON ({exc.msg}): {body[:200]!r}") from None
        except RecursionError:
            raise EndpointError(f"{self.url} answered JSON nested too deeply: {body[:200]!r}") from None
        if not isinstance(answer, dict):
            raise EndpointError(f"{self.url} answered JSON that is not an object: {body[:200]!r}")
        return answer

    def _read(self, response: Any) -> bytes:
        """The answer's body, read in 1 MiB pieces up to `MAX_RESPONSE_BYTES`."""
        chunks, size = [], 0
        while chunk := response.read(2**20):
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise EndpointError(
                    f"{self.url} answered more than {MAX_RESPONSE_BYTES} bytes; discover reads at most that"
                )
            chunks.append(chunk)
        return b"".join(chunks)
