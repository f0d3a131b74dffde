"""OpenAIPolicy against a real HTTP server on loopback (a small fake of /v1/chat/completions)."""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from discover_agent.openai_policy import EndpointError, OpenAIPolicy, construction_schema
from discover_envs.problem import ConstructionSpec, extract_block


class FakeServer:
    """Answers each POST with `respond(request_json) -> (status, body_text)`; keeps requests and headers."""

    def __init__(self, respond) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, **body})
                server.headers.append(dict(self.headers))
                status, text = respond(body)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(respond) -> FakeServer:
        servers.append(FakeServer(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def completion(contents: list[str], with_logprobs: bool = True) -> tuple[int, str]:
    choices = []
    for i, content in enumerate(contents):
        choice = {"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        if with_logprobs:
            choice["logprobs"] = {"content": [{"token": c, "logprob": -0.25 * (k + 1)} for k, c in enumerate(content)]}
        choices.append(choice)
    return 200, json.dumps({"id": "x", "object": "chat.completion", "choices": choices})


def test_group_of_n_replies_with_logprobs_from_one_request(serve):
    server = serve(lambda req: completion([f"{req['messages'][0]['content']} #{i}" for i in range(req["n"])]))
    policy = OpenAIPolicy(server.url + "/v1", "tiny", api_key="k-123", temperature=0.7, max_tokens=64, seed=3)
    groups = policy.sample(["p0", "p1"], n=3)
    assert [[s.text for s in g] for g in groups] == [["p0 #0", "p0 #1", "p0 #2"], ["p1 #0", "p1 #1", "p1 #2"]]
    assert groups[0][0].logprobs == [-0.25, -0.5, -0.75, -1.0, -1.25]
    assert groups[0][0].completion_ids == [] and groups[0][0].temperature == 0.7
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["model"] == "tiny" and request["n"] == 3 and request["max_tokens"] == 64
    assert request["temperature"] == 0.7 and request["logprobs"] is True and isinstance(request["seed"], int)
    assert server.headers[0]["Authorization"] == "Bearer k-123"


def test_server_that_ignores_n_is_asked_again_with_fresh_seeds(serve):
    server = serve(lambda req: completion([f"reply {req['seed']}"], with_logprobs=False))
    [group] = OpenAIPolicy(server.url, "m", seed=0).sample(["p"], n=3)
    assert len(group) == 3 and all(s.logprobs == [] for s in group)
    assert [r["n"] for r in server.requests] == [3, 2, 1]
    assert len({s.text for s in group}) == 3  # distinct seeds per request


def test_constraint_spec_asks_for_a_json_schema_and_fences_the_reply(serve):
    server = serve(lambda req: completion(["[0.5, 0.25]"]))
    spec = ConstructionSpec("tuples", 1, 4, 0.0, 1.0, arity=2)
    [[sample]] = OpenAIPolicy(server.url, "m").sample(["p"], n=1, constraint_spec=spec)
    assert extract_block(sample.text, ("json",)) == ("json", "[0.5, 0.25]\n")
    schema = server.requests[0]["response_format"]["json_schema"]["schema"]
    assert schema == construction_schema(spec)
    assert schema["items"] == {
        "type": "array", "items": {"type": "number", "minimum": 0.0, "maximum": 1.0}, "minItems": 2, "maxItems": 2,
    }  # fmt: skip


def test_http_error_names_status_and_body(serve):
    server = serve(lambda req: (500, '{"error": "model overloaded"}'))
    with pytest.raises(EndpointError, match=r"HTTP 500.*model overloaded"):
        OpenAIPolicy(server.url, "m").sample(["p"], n=1)


@pytest.mark.parametrize(
    ("body", "message"),
    [("this is not json", "invalid JSON"), ('{"choices": []}', "without any choices"), ("[1, 2]", "not an object")],
)
def test_unusable_answers_are_reported(serve, body, message):
    server = serve(lambda req: (200, body))
    with pytest.raises(EndpointError, match=message):
        OpenAIPolicy(server.url, "m").sample(["p"], n=1)


def test_connection_refused_is_reported():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(EndpointError, match=re.escape(f"cannot reach http://127.0.0.1:{port}/v1/chat/completions")):
        OpenAIPolicy(f"http://127.0.0.1:{port}", "m", timeout_s=5).sample(["p"], n=1)


def test_base_url_must_be_http():
    with pytest.raises(ValueError, match="http://"):
        OpenAIPolicy("localhost:8000", "m")
    assert OpenAIPolicy("http://h:1/v1/chat/completions/", "m").url == "http://h:1/v1/chat/completions"
