"""`discover serve` on loopback with the tiny random model: the OpenAI API, schema-constrained replies, and a
sampling-only agent on --endpoint getting valid constructions only because the schema is enforced end to end."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tiny_model import build_model

from discover_agent.agents import BestOfN
from discover_agent.config import AgentConfig
from discover_agent.json_schema import UnsupportedSchema, construction_schema, out_of_spec, spec_from_schema
from discover_agent.openai_policy import OpenAIPolicy, response_format
from discover_agent.policy import PolicyConfig
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


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/chat/completions", json.dumps(body).encode(), {
        "Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
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
