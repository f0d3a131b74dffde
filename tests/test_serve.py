"""`discover serve` on loopback with the tiny random model: the OpenAI API, schema-constrained replies, and a
sampling-only agent on --endpoint getting valid constructions only because the schema is enforced end to end."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from tiny_model import build_model, build_tokenizer

from discover_agent.config import AgentConfig
from discover_agent.json_schema import UnsupportedSchema, construction_schema, out_of_spec, spec_from_schema
from discover_agent.openai_policy import OpenAIPolicy, response_format
from discover_agent.policy import PolicyConfig
from discover_agent.search import BestOfN
from discover_agent.serve import ServedPolicy, create_app, running
from discover_agent.storage import read_jsonl
from discover_envs.problem import ConstructionSpec

ERDOS = ConstructionSpec("sequence", 16, 16, 0.0, 1.0)
PACKING = ConstructionSpec("tuples", 3, 3, 0.0, 1.0, arity=3)


@pytest.fixture
def server(tiny_tokenizer, one_thread):
    """The tiny model served on a free loopback port; yields the base URL (".../v1")."""
    policy = ServedPolicy(build_model(tiny_tokenizer), tiny_tokenizer, PolicyConfig(device="cpu", seed=0))
    with running(create_app(policy, "tiny", max_tokens=256)) as url:
        yield url


def post(url: str, body: dict | bytes, timeout: float = 60) -> tuple[int, dict]:
    """POST a request (a dict, or raw bytes sent as they are); (status, answer)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/chat/completions", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Give numbers."}], **fields}


def test_models_lists_the_served_model(server):
    with urllib.request.urlopen(server + "/models", timeout=30) as response:
        models = json.loads(response.read())
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_group_of_n_replies_with_per_token_logprobs_and_usage(server):
    status, answer = post(server, chat(n=3, max_tokens=8, logprobs=True))
    assert status == 200 and len(answer["choices"]) == 3
    for choice in answer["choices"]:
        tokens = choice["logprobs"]["content"]
        assert 1 <= len(tokens) <= 8 and all(t["logprob"] <= 0 for t in tokens)
        assert choice["finish_reason"] in ("stop", "length")
    assert answer["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in answer["choices"])


@pytest.mark.parametrize("form", ["json_schema", "json_object"])
@pytest.mark.parametrize("spec", [ERDOS, PACKING], ids=["sequence", "tuples"])
def test_schema_in_either_form_is_enforced_by_the_grammar(server, form, spec):
    status, answer = post(server, chat(n=4, max_tokens=200, response_format=response_format(spec, form)))
    assert status == 200
    replies = [json.loads(c["message"]["content"]) for c in answer["choices"]]
    assert len(replies) == 4 and not any(out_of_spec(r, spec) for r in replies)


def test_each_requests_max_tokens_is_the_grammars_budget(server):
    """A short budget still ends in a closed array (the grammar steers to short numbers in time), whatever
    budget an earlier request had; a budget that cannot hold any array is a 400 naming the minimum."""
    for max_tokens in (200, 60, 200):
        status, answer = post(
            server, chat(n=4, max_tokens=max_tokens, response_format=response_format(ERDOS, "json_schema"))
        )
        assert status == 200, answer
        replies = [json.loads(c["message"]["content"]) for c in answer["choices"]]
        assert not any(out_of_spec(r, ERDOS) for r in replies)
        assert all(c["finish_reason"] == "stop" for c in answer["choices"])
    status, answer = post(server, chat(max_tokens=5, response_format=response_format(ERDOS, "json_schema")))
    assert status == 400 and "max_tokens=5" in answer["error"]["message"] and "at least" in answer["error"]["message"]


def test_whole_conversations_are_rendered_with_the_chat_template(server, tiny_tokenizer):
    messages = [
        {"role": "system", "content": "You write JSON."},
        {"role": "user", "content": [{"type": "text", "text": "Numbers"}, {"type": "text", "text": "?"}]},
    ]
    status, answer = post(server, {"model": "x", "messages": messages, "max_tokens": 4})
    assert status == 200 and answer["model"] == "x"
    flat = [messages[0], {"role": "user", "content": "Numbers?"}]
    rendered = tiny_tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    assert answer["usage"]["prompt_tokens"] == len(tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}}, "array"),
        ({"response_format": {"type": "json_object"}}, "needs a 'schema'"),
        ({"response_format": {"type": "xml"}}, "unknown response_format"),
        ({"stream": True}, "stream"),
        ({"stop": ["\n"]}, "stop sequences"),
        ({"n": 0}, "invalid request: n: "),
        ({"messages": []}, "invalid request: messages: "),
        ({"temperature": -1}, "invalid request: temperature: "),
    ],
)
def test_requests_it_cannot_honour_get_a_400_that_says_why(server, fields, message):
    status, answer = post(server, chat(**fields))
    assert status == 400 and message in answer["error"]["message"]


def test_the_openai_client_package_talks_to_it(server):
    openai = pytest.importorskip("openai", reason="the openai package is not installed")
    client = openai.OpenAI(base_url=server, api_key="unused")
    completion = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Numbers?"}], max_tokens=200,
        response_format=response_format(ERDOS, "json_schema"),
    )  # fmt: skip
    assert not out_of_spec(json.loads(completion.choices[0].message.content), ERDOS)


def schema_format(items: dict, **array) -> dict:
    """A json_schema response_format of an array of `items` with the given array keywords."""
    return {"type": "json_schema", "json_schema": {"schema": {"type": "array", "items": items, **array}}}


UNIT = {"type": "number", "minimum": 0, "maximum": 1}


@pytest.mark.parametrize(
    "schema",
    [
        schema_format(UNIT, minItems=10**9, maxItems=10**9),
        schema_format(UNIT, minItems=100_000),
        schema_format({"type": "array", "items": UNIT, "minItems": 10**6, "maxItems": 10**6}),
    ],
    ids=["1e9-numbers", "1e5-numbers", "1e6-arity"],
)
def test_a_schema_no_reply_can_hold_is_refused_by_arithmetic_before_any_search(server, schema):
    """Red-team: minItems = maxItems = 10**9 searched for minutes until memory ran out and the server died;
    minItems = 100000 took 7 s. The refusal counts characters, so no grammar search ran."""
    status, answer = post(server, chat(max_tokens=200, response_format=schema), timeout=30)
    assert status == 400 and "cannot hold" in answer["error"]["message"]
    assert "characters" in answer["error"]["message"]
    assert post(server, chat(max_tokens=4))[0] == 200


def test_bounds_that_exclude_short_numbers_are_enforced(server):
    """[1e7, 9e7] made the grammar's closing search visit every integer prefix (10**7 states)."""
    spec = ConstructionSpec("sequence", 2, 2, 1e7, 9e7)
    status, answer = post(server, chat(n=2, max_tokens=60, response_format=response_format(spec, "json_schema")))
    assert status == 200
    assert not any(out_of_spec(json.loads(c["message"]["content"]), spec) for c in answer["choices"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), "text must be a string"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "not valid Unicode"),
        (b'{"model": "\\udfff", "messages": [{"role": "user", "content": "x"}]}', "not valid Unicode"),
        (chat(response_format=schema_format({"type": "number", "minimum": 10**400})), "must lie within"),
        (chat(response_format=schema_format({"type": "number", "minimum": 1.7e308, "maximum": 1.79e308})), "within"),
        (chat(response_format={"type": "json_schema", "json_schema": [{"schema": {}}]}), "must be an object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "not valid JSON"),
    ],
    ids=["number-text", "surrogate-content", "surrogate-model", "1e400", "1.8e308", "list-json_schema", "deep", "nan"],
)
def test_malformed_requests_get_a_400_that_says_why_not_a_500(server, body, message):
    status, answer = post(server, body)
    assert status == 400 and message in answer["error"]["message"]


def address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname, parts.port


def test_a_body_over_the_cap_is_refused_before_it_is_read(server):
    """Red-team: a 100 MB body was read and parsed. Here only its Content-Length is sent: a server waiting for
    the body times this client out."""
    connection = http.client.HTTPConnection(*address(server), timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(100 * 2**20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "at most" in json.loads(response.read())["error"]["message"]
    connection.close()


def test_prompts_and_bodies_over_the_servers_caps_are_refused(tiny_tokenizer, one_thread):
    policy = ServedPolicy(build_model(tiny_tokenizer), tiny_tokenizer, PolicyConfig(device="cpu", seed=0))
    with running(create_app(policy, "tiny", max_tokens=8, max_prompt_tokens=64, max_body_bytes=4000)) as url:
        status, answer = post(url, chat(messages=[{"role": "user", "content": "0 1 2 3 " * 40}]))
        assert status == 400 and "this server takes at most 64" in answer["error"]["message"]
        assert post(url, chat(messages=[{"role": "user", "content": "x" * 5000}]))[0] == 413
        connection = http.client.HTTPConnection(*address(url), timeout=30)  # chunked: no Content-Length
        chunks = iter([b'{"messages": [{"role": "user", "content": "', b"x" * 3000, b"y" * 3000, b'"}]}'])
        connection.request("POST", "/v1/chat/completions", chunks, {"Content-Type": "application/json"},
                           encode_chunked=True)  # fmt: skip
        assert connection.getresponse().status == 413
        connection.close()
        assert post(url, chat(max_tokens=4))[0] == 200


def test_messages_the_chat_template_refuses_get_a_400(one_thread):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    policy = ServedPolicy(build_model(tokenizer), tokenizer, PolicyConfig(device="cpu", seed=0))
    with running(create_app(policy, "tiny", max_tokens=8)) as url:
        status, answer = post(url, chat())
    assert status == 400 and "roles must alternate" in answer["error"]["message"]


class HeldPolicy(ServedPolicy):
    """Holds every generation until `release` is set, like one very long request."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.release, self.holding = threading.Event(), threading.Event()

    def sample(self, *args, **kwargs):
        self.holding.set()
        assert self.release.wait(120)
        return super().sample(*args, **kwargs)


def test_a_long_request_starves_neither_models_nor_the_bounded_queue(tiny_tokenizer, one_thread):
    """Red-team: one long request must not starve /v1/models. With a worker thread per waiting request, 40
    waiting requests took every worker and /v1/models waited too; here at most MAX_WAITING requests wait (the
    rest get 503 at once) and /v1/models is answered on the event loop."""
    from discover_agent.serve import MAX_WAITING

    policy = HeldPolicy(build_model(tiny_tokenizer), tiny_tokenizer, PolicyConfig(device="cpu", seed=0))
    extra, statuses = 30, []
    with running(create_app(policy, "tiny", max_tokens=8)) as url:
        clients = [
            threading.Thread(target=lambda: statuses.append(post(url, chat(max_tokens=2), timeout=120)[0]))
            for _ in range(MAX_WAITING + extra)
        ]  # fmt: skip
        for client in clients:
            client.start()
        assert policy.holding.wait(60)
        for _ in range(600):
            if statuses.count(503) >= extra:
                break
            time.sleep(0.1)
        with urllib.request.urlopen(url + "/models", timeout=10) as response:
            assert json.loads(response.read())["data"][0]["id"] == "tiny"
        policy.release.set()
        for client in clients:
            client.join(120)
    assert sorted(statuses) == [200] * MAX_WAITING + [503] * extra


class WatchedPolicy(ServedPolicy):
    """Counts the token steps of each generation; the first step waits until the server marks its client gone
    (`gone`), so a disconnect lands mid-reply whatever the machine's speed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[int] = []
        self.first_step = threading.Event()
        stop_if_gone = self.progress

        def progress(live: int) -> None:
            self.steps[-1] += 1
            if self.steps == [1]:
                self.first_step.set()
                for _ in range(3000):
                    if getattr(self, "gone", None) is not None and self.gone.is_set():
                        break
                    time.sleep(0.01)
            if stop_if_gone is not None:
                stop_if_gone(live)

        self.progress = progress

    def sample(self, *args, **kwargs):
        self.steps.append(0)
        return super().sample(*args, **kwargs)


def test_generation_stops_when_the_client_disconnects(tiny_tokenizer, one_thread):
    policy = WatchedPolicy(build_model(tiny_tokenizer), tiny_tokenizer, PolicyConfig(device="cpu", seed=0))
    with running(create_app(policy, "tiny", max_tokens=200)) as url:
        connection = http.client.HTTPConnection(*address(url), timeout=60)
        body = chat(max_tokens=200, response_format=response_format(ERDOS, "json_schema"))  # >= 17 tokens
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        assert policy.first_step.wait(60)
        connection.close()
        status, _ = post(url, chat(max_tokens=2))  # the model is free again only once that generation ended
    assert status == 200 and policy.steps[0] == 1


def endpoint_run(url: str, out: Path, constrained: bool) -> list[dict]:
    config = AgentConfig(
        env="discover/AC1-v0", env_kwargs={"n": 16}, endpoint=url, model="tiny", steps=2, groups=1,
        group_size=8, out=str(out), max_new_tokens=200, workers=1, constrained=constrained,
    )  # fmt: skip
    BestOfN(config).run(progress=False)
    return read_jsonl(out / "rollouts.jsonl")


def test_sampling_only_agent_on_the_endpoint_gets_valid_constructions(server, tmp_path):
    """AC1's rules are exactly its schema (16 heights in bounds), so every enforced reply is valid; Erdős adds a
    rule no schema states (h <= 1 after rescaling to integral 1), which a random model breaks ~20% of the time."""
    rows = endpoint_run(server, tmp_path / "on", constrained=True)
    assert len(rows) == 16 and sum(r["valid"] for r in rows) / len(rows) >= 0.9
    unconstrained = endpoint_run(server, tmp_path / "off", constrained=False)
    assert sum(r["valid"] for r in unconstrained) / len(unconstrained) < 0.5  # a random model writes no JSON


def test_client_counts_replies_that_break_the_schema(server):
    client = OpenAIPolicy(server, "tiny", max_tokens=200, seed=0)
    client.sample(["p", "q"], n=2, constraint_spec=ERDOS)
    assert (client.schema_form, client.constrained, client.out_of_spec) == ("json_schema", 4, 0)
    assert construction_schema(ERDOS)["items"] == {"type": "number", "minimum": 0.0, "maximum": 1.0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_discover_serve_command_serves_a_model_folder(tiny_model_dir):
    port = free_port()
    command = [sys.executable, "-c", "from discover_agent.cli import main; raise SystemExit(main())", "serve",
               "--model", str(tiny_model_dir),
               "--port", str(port), "--device", "cpu", "--name", "tiny"]  # fmt: skip
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        for _ in range(600):
            try:
                status, answer = post(url, chat(max_tokens=100, response_format=response_format(ERDOS, "json_object")))
                break
            except urllib.error.URLError:
                assert process.poll() is None, "discover serve exited early"
                time.sleep(0.1)
        else:
            pytest.fail("discover serve did not answer within 60 s")
        assert status == 200 and not out_of_spec(json.loads(answer["choices"][0]["message"]["content"]), ERDOS)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("spec", [ERDOS, PACKING, ConstructionSpec("sequence", 1, 9, -2.5, 3.0)])
def test_schema_round_trips_to_the_spec(spec):
    assert spec_from_schema(construction_schema(spec)) == spec


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "object"}, "must be an array schema"),
        ({"type": "array", "items": {"type": "string"}}, "must be {'type': 'number'"),
        ({"type": "array", "items": {"type": "number", "exclusiveMaximum": 1}}, "exclusiveMaximum"),
        ({"type": "array", "items": {"type": "number"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "array", "items": {"type": "array", "items": {"type": "number"}, "minItems": 2}}, "minItems =="),
        ({"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 2}, "minItems <= maxItems"),
    ],
)
def test_schemas_the_grammar_cannot_enforce_are_refused_by_keyword(schema, message):
    with pytest.raises(UnsupportedSchema, match=re.escape(message)):
        spec_from_schema(schema)
