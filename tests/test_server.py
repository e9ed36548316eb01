"""The HTTP API, black box: a real uvicorn server on a random loopback port (in a thread of this
process, so tests can also read the engine's state), the tiny model converted once per session,
and the official `openai` client or raw httpx / sockets.

Random test weights cannot be made to reason, answer or call a tool. Where a test needs that, it
sets `Engine.request_hook` (a Python-only test hook, unreachable from HTTP) to give the request
`forced_tokens`: the text the model is made to emit, tokenized, in place of sampled tokens. The
hook sees the rendered prompt, so a tool round trip can force a tool call on the first turn and an
answer once the prompt holds the tool's result.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest

import ernie_edge
from ernie_edge.engine import Engine, EngineSettings
from ernie_edge.generate import render_prompt
from serve_helpers import RunningServer, converted_tiny, wait_until

USER = [{"role": "user", "content": "Tell me about the sea."}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def model(tiny_dir, tmp_path_factory):
    m = ernie_edge.load(converted_tiny(tiny_dir, tmp_path_factory), threads=1)
    m.warmup()
    return m


@pytest.fixture(scope="module")
def engine(model):
    e = Engine(model, EngineSettings(slots=8, context=1024, queue_size=8))
    yield e
    e.close(drain=False)


@pytest.fixture(scope="module")
def server(engine):
    with RunningServer(engine) as s:
        yield s


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)


@contextmanager
def forcing(engine, choose):
    """Make the model emit choose(prompt text) (+ end of turn) for every request while active."""
    tok = engine.tokenizer

    def hook(request):
        text = choose(tok.decode(list(request.prompt_ids)))
        return dataclasses.replace(request, forced_tokens=tok.encode(text) + [tok.im_end_id]) if text else request
    engine.request_hook = hook
    try:
        yield
    finally:
        engine.request_hook = None


def sse(response) -> list:
    """The data payloads of a server-sent event stream (JSON decoded, "[DONE]" kept as text),
    checking the framing: every event is one `data: ...` line and a blank line."""
    raw = response.read().decode() if hasattr(response, "read") else response
    assert raw.endswith("\n\n")
    events = []
    for block in raw[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def joined(events, key) -> str:
    return "".join(e["choices"][0]["delta"].get(key) or "" for e in events if isinstance(e, dict) and e["choices"])


# ---- the openai client --------------------------------------------------------------------------------

def test_openai_client_chat_and_stream_agree(client, model):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, **GREEDY)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    reasoning = choice.message.model_extra["reasoning_content"]
    assert reasoning and choice.message.content is None  # still thinking: nothing leaks into content
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == len(render_prompt(model, USER))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    assert r.usage.completion_tokens_details.reasoning_tokens == 24

    stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices) == reasoning
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_sse_framing_and_usage_only_when_asked(http):
    body = {"model": "tiny", "messages": USER, "max_tokens": 6, "stream": True, **GREEDY}
    for include in (False, True):
        r = http.post("/v1/chat/completions", json={**body, "stream_options": {"include_usage": include}})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.text)
        assert events[-1] == "[DONE]"
        data = events[:-1]
        assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert len({e["id"] for e in data}) == 1 and all(e["object"] == "chat.completion.chunk" for e in data)
        with_usage = [e for e in data if e.get("usage")]
        assert len(with_usage) == include and (not include or with_usage[0]["choices"] == [])
        assert [e["choices"][0]["finish_reason"] for e in data if e["choices"]][-1] == "length"


def test_reasoning_and_answer_are_separated(client, engine, server):
    text = "Thinking it over.\n</think>\n\n<response>\nThe sea is wide.\n</response>\n"
    with forcing(engine, lambda prompt: text):
        r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=100)
        chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=100, stream=True))
        with RunningServer(engine, reasoning_field="reasoning") as other:
            alt = httpx.post(other.url + "/v1/chat/completions", json={"messages": USER}, timeout=30).json()
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] == "Thinking it over." and message.content == "The sea is wide."
    assert r.choices[0].finish_reason == "stop"
    think = len(engine.tokenizer.encode("Thinking it over.\n</think>"))
    assert r.usage.completion_tokens_details.reasoning_tokens == think
    assert r.usage.completion_tokens == len(engine.tokenizer.encode(text)) + 1  # + the end of turn
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "The sea is wide."
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "Thinking it over."
    assert alt["choices"][0]["message"]["reasoning"] == "Thinking it over." and "reasoning_content" not in alt["choices"][0]["message"]


def test_tool_round_trip(client, engine):
    """First turn: the hook forces a <tool_call> block (and checks the tools were rendered into
    the prompt); second turn: once the prompt holds the tool's result, it forces an answer."""
    seen = []

    def choose(prompt):
        seen.append(prompt)
        if "<tool_response>\n22 C, sunny\n</tool_response>" in prompt:
            return "The tool answered.\n</think>\n\n<response>\nIt is 22 C and sunny in Paris.\n</response>\n"
        assert '"name": "get_weather"' in prompt
        return ('I should look it up.\n</think>\n\n\n<tool_call>\n{"name": "get_weather", '
                '"arguments": {"city": "Paris"}}\n</tool_call>\n')

    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with forcing(engine, choose):
        first = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS)
        call = first.choices[0].message.tool_calls[0]
        assert first.choices[0].finish_reason == "tool_calls" and first.choices[0].message.content is None
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "22 C, sunny"}]
        second = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS)
        streamed = list(client.chat.completions.create(model="tiny", messages=messages[:1], tools=TOOLS, stream=True))
    assert second.choices[0].message.content == "It is 22 C and sunny in Paris."
    assert second.choices[0].finish_reason == "stop" and len(seen) == 3
    calls = [tc for c in streamed if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(tc.index, tc.function.name, tc.function.arguments) for tc in calls] == [
        (0, "get_weather", '{"city": "Paris"}')]
    assert calls[0].id.startswith("call_") and streamed[-1].choices[0].finish_reason == "tool_calls"


def test_named_tool_choice_and_parallel_tool_calls_false(client, engine):
    """The hook forces only the reasoning and the call's arguments: the function's name comes
    from the server's forced opening for tool_choice={"type": "function", ...}."""
    text = ('Calling it.\n</think>{"city": "Rome"}}\n</tool_call>\n<tool_call>\n'
            '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n')
    named = {"type": "function", "function": {"name": "get_weather"}}
    with forcing(engine, lambda prompt: text):
        both = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=named)
        one = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=named,
                                             parallel_tool_calls=False)
    assert [json.loads(c.function.arguments)["city"] for c in both.choices[0].message.tool_calls] == ["Rome", "Oslo"]
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    assert one.choices[0].finish_reason == "tool_calls"


def test_tool_choice_required_opens_a_call(client, engine):
    text = 'Calling.\n</think>{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    with forcing(engine, lambda prompt: text):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required")
    assert [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls] == [
        ("get_weather", '{"city": "Oslo"}')]


def test_json_object_mode_instructs_opens_and_checks_the_answer(client, engine, http):
    seen = []

    def choose(prompt):
        seen.append(prompt)
        return 'Plan.\n</think>"city": "Paris"}\n</response>\n' if len(seen) == 1 else "Plan.\n</think>oops\n</response>\n"

    fmt = {"type": "json_object"}
    with forcing(engine, choose):
        good = client.chat.completions.create(model="tiny", messages=USER, response_format=fmt)
        bad = client.chat.completions.create(model="tiny", messages=USER, response_format=fmt)
    assert json.loads(good.choices[0].message.content) == {"city": "Paris"}
    assert "Answer with a single JSON object and nothing else." in seen[0]
    assert bad.choices[0].message.content == "{oops"
    assert "ernie_edge_json_invalid_total 1" in http.get("/metrics").text


def test_completions_stream_matches_non_stream(http, model):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 10, **GREEDY}
    r = http.post("/v1/completions", json=body).json()
    assert r["object"] == "text_completion" and r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 10
    events = sse(http.post("/v1/completions", json={**body, "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == r["choices"][0]["text"]
    ids = model.tokenizer.encode("Once upon a time")
    by_ids = http.post("/v1/completions", json={**body, "prompt": ids}).json()
    assert by_ids["choices"][0]["text"] == r["choices"][0]["text"]


# ---- concurrency --------------------------------------------------------------------------------------

def stream_chat(url: str, body: dict, keep: int | None = None, on_first=None) -> tuple[str, str | None]:
    """(reasoning text, finish reason) of a streamed chat; with keep=N, disconnect after N events."""
    events = []
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if on_first is not None and len(events) == 1:
                    on_first(events[0]["id"])
                if keep is not None and len(events) >= keep:
                    break  # leaving the block closes the connection mid-stream
    finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
    return joined(events, "reasoning_content"), finish


def test_eight_streams_two_disconnecting(server, engine):
    bodies = [{"messages": [{"role": "user", "content": f"Stream number {i}, please."}], "stream": True,
               "ignore_eos": True, "max_tokens": 40, **(GREEDY if i % 2 else {"temperature": 0.8, "seed": i})}
              for i in range(8)]
    for b in bodies[6:]:
        b["max_tokens"] = 400  # would run long: these two disconnect early
    solo = []
    for b in bodies[:6]:
        engine.clear_prefix_cache()  # every run computes its whole prompt
        solo.append(stream_chat(server.url, b))
    engine.clear_prefix_cache()
    results: dict[int, tuple] = {}
    left: dict[int, tuple[str, float]] = {}

    def run(i):
        if i < 6:
            results[i] = stream_chat(server.url, bodies[i])
        else:
            ids = []
            stream_chat(server.url, bodies[i], keep=4, on_first=ids.append)
            left[i] = (ids[0], time.monotonic())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for i in (6, 7):
        wait_until(lambda: i in left, 30, f"stream {i} disconnecting")
        rid, t_left = left[i]
        wait_until(lambda: rid not in engine.stats().active_ids, 1.0, f"the slot of stream {i}")
        assert time.monotonic() - t_left < 1.0
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(6)] == solo
    assert all(finish == "length" for _, finish in solo)
    assert engine.stats().finished.get("cancelled", 0) >= 2


def test_a_non_streamed_request_whose_client_leaves_is_cancelled(server, engine):
    body = json.dumps({"messages": MSG, "max_tokens": 900, "ignore_eos": True}).encode()
    cancelled = engine.stats().finished.get("cancelled", 0)
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: "
                  f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: engine.stats().busy_slots == 1, 10, "the request running")
    wait_until(lambda: engine.stats().busy_slots == 0, 1.0, "the slot freed after the disconnect")
    assert engine.stats().finished.get("cancelled", 0) == cancelled + 1


def test_queue_full_answers_503_with_retry_after(model):
    gate = threading.Event()

    def hold(logits, history):  # keeps the worker busy until the test has filled the queue
        gate.wait(20)
        return logits

    small = Engine(model, EngineSettings(slots=1, queue_size=1, context=256))
    small.request_hook = lambda r: dataclasses.replace(r, logits_processor=hold)
    statuses = []
    body = {"messages": USER, "max_tokens": 3}
    try:
        with RunningServer(small) as s:
            post = lambda: statuses.append(httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60).status_code)  # noqa: E731
            first = threading.Thread(target=post)
            first.start()
            wait_until(lambda: small.stats().busy_slots == 1, 10, "the first request running")
            second = threading.Thread(target=post)
            second.start()
            wait_until(lambda: len(small.stats().queued_ids) == 1, 10, "the second request queued")
            t = time.monotonic()
            r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=10)
            assert time.monotonic() - t < 1.0
            assert r.status_code == 503 and r.headers["retry-after"] == "2"
            assert r.json()["error"]["code"] == "queue_full" and "1 slots are busy" in r.json()["error"]["message"]
            gate.set()
            first.join(30), second.join(30)
            assert statuses == [200, 200]
    finally:
        gate.set()
        small.close(drain=False)


# ---- bad input ------------------------------------------------------------------------------------------

MSG = [{"role": "user", "content": "hi"}]
BAD_BODIES = [
    ("not json{{{", None, "invalid_json"), ("[]", None, None), ("42", None, None), ("null", None, None),
    ({"messages": None}, "messages", None), ({"messages": "x"}, "messages", None),
    ({"messages": [123]}, "messages.0", None), ({"messages": [{}]}, "messages.0.role", None),
    ({"messages": [{"role": 123}]}, "messages.0.role", None), ({"messages": []}, "messages", None),
    ({"messages": MSG, "max_tokens": -1}, "max_tokens", None), ({"messages": MSG, "max_tokens": 0}, "max_tokens", None),
    ({"messages": MSG, "max_tokens": "10"}, "max_tokens", None), ({"messages": MSG, "max_tokens": 2**63}, "max_tokens", None),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature", None),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e309}', "temperature", None),
    ({"messages": MSG, "temperature": -1}, "temperature", None), ({"messages": MSG, "n": 10**6}, "n", None),
    ({"messages": MSG, "stop": ["s"] * 10**5}, "stop", None), ({"messages": MSG, "logit_bias": {"999999": 1}}, "logit_bias", None),
    ({"messages": MSG, "seed": -1}, "seed", None), ({"messages": MSG, "top_k": "5"}, "top_k", None),
    ({"messages": MSG, "tool_choice": "required"}, "tool_choice", None),
    ({"messages": MSG, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", None),
    ({"messages": MSG, "response_format": {"type": "json_schema"}}, "response_format", None),
    ({"messages": MSG, "logprobs": True}, "logprobs", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content", None),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages", None),
]


@pytest.mark.parametrize("body, param, code", BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_bad_bodies_get_400_naming_the_field(http, engine, body, param, code):
    before = engine.stats().requests_total
    content = body if isinstance(body, str) else json.dumps(body)
    t = time.monotonic()
    r = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert time.monotonic() - t < 1.0
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert code is None or error["code"] == code
    assert engine.stats().requests_total == before  # refused before the engine saw it


def test_over_long_prompts_are_refused_before_any_sse_byte(http, engine):
    long = [{"role": "user", "content": "word " * 1000}]
    for extra in ({}, {"stream": True}):
        r = http.post("/v1/chat/completions", json={"messages": long, **extra})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert "context holds 1024" in error["message"] and "the prompt is " in error["message"]
    r = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 1000})
    assert r.json()["error"]["code"] == "context_length_exceeded" and "max_tokens (1000)" in r.json()["error"]["message"]
    assert engine.stats().busy_slots == 0


def raw_request(port: int, head: str, body: bytes = b"") -> str:
    """Send raw bytes; return the status line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head.encode() + body)
        return s.recv(65536).decode("latin-1").split("\r\n")[0]


def test_oversized_and_hostile_requests_get_4xx_and_the_server_keeps_serving(server, http):
    port = server.port
    t = time.monotonic()
    status = raw_request(port, f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                               "Content-Type: application/json\r\nContent-Length: 2147483648\r\n\r\n")
    assert status.split()[1] == "413" and time.monotonic() - t < 1.0
    for _ in range(3):  # the server reads the rest of the body before it answers: never a reset
        assert http.post("/v1/chat/completions", content=b"x" * (9 << 20)).status_code == 413
    chunked = (b"x" * (1 << 20) for _ in range(9))  # no Content-Length: counted as it arrives
    assert http.post("/v1/chat/completions", content=chunked).status_code == 413
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = http.post("/v1/chat/completions", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_too_deep"
    assert http.get("/v1/models", headers=[(f"x-h{i}", "1") for i in range(300)]).status_code == 431
    assert http.get("/v1/models", headers={"x-big": "a" * (8 << 20)}).status_code in (400, 431)
    assert http.get("/nope").json()["error"]["code"] == "not_found"
    assert http.get("/v1/chat/completions").json()["error"]["code"] == "method_not_allowed"
    r = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, "unknown_field": {"x": 1}})
    assert r.status_code == 200  # unknown fields are ignored


@pytest.mark.parametrize("host", ["evil.example", "evil.localhost", "x.local", "x.internal", "127.0.0.1.nip.io",
                                  socket.gethostname(), "", "127.0.0.1:1", "localhost"])
def test_foreign_host_headers_are_refused(server, engine, host):
    before = engine.stats().requests_total
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG}, headers={"host": host})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert engine.stats().requests_total == before


def test_allowed_hosts_pass(server):
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", f"[::1]:{server.port}", f"LOCALHOST:{server.port}"):
        assert httpx.get(server.url + "/health", headers={"host": host}).status_code == 200


def test_origins_are_refused_unless_allowed(server, engine):
    for origin in ("https://evil.example", "null", "http://localhost:1234"):
        for method in ("OPTIONS", "POST"):
            r = httpx.request(method, server.url + "/v1/chat/completions", json={"messages": MSG},
                              headers={"origin": origin, "access-control-request-method": "POST"})
            assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    with RunningServer(engine, allow_origins=("http://localhost:3000",)) as s:
        pre = httpx.options(s.url + "/v1/chat/completions", headers={"origin": "http://localhost:3000",
                                                                     "access-control-request-method": "POST"})
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2},
                       headers={"origin": "http://localhost:3000"}, timeout=30)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "access-control-allow-credentials" not in r.headers
        assert httpx.get(s.url + "/v1/models", headers={"origin": "http://localhost:3001"}).status_code == 403


def test_api_key(engine):
    with RunningServer(engine, api_key="s3cret-key") as s:
        url = s.url + "/v1/models"
        for headers, params in (({}, {}), ({"authorization": "Bearer wrong"}, {}),
                                ({"authorization": "Bearer s3cret-key2"}, {}), ({"authorization": "Bearer s3cret-ke"}, {}),
                                ({}, {"api_key": "s3cret-key"}),
                                ({"x-api-key": "s3cret-key"}, {}), ({"authorization": "s3cret-key"}, {})):
            r = httpx.get(url, headers=headers, params=params)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url, headers={"authorization": "Bearer s3cret-key"}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200  # the one public route
        assert httpx.get(s.url + "/metrics").status_code == 401
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret-key", max_retries=0)
        assert c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).usage.completion_tokens == 2


# ---- health, models, metrics, spec ------------------------------------------------------------------------

def test_health_is_503_while_loading(engine):
    with RunningServer(engine, attach=False) as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": MSG})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]
        assert "ernie_edge_model_loaded 0" in httpx.get(s.url + "/metrics").text
        s.state.attach(engine, "tiny")
        assert httpx.get(s.url + "/health").json() == {"status": "ok"}


def test_models_metrics_and_openapi(http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert http.get("/v1/models/tiny").json()["context_length"] == 1024
    assert http.get("/v1/models/other").status_code == 404
    http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
    text = http.get("/metrics").text
    for line in ("ernie_edge_slots 8", "ernie_edge_queue_depth 0", "ernie_edge_slots_busy 0", "ernie_edge_model_loaded 1",
                 'ernie_edge_http_responses_total{path="/v1/chat/completions",status="200"}'):
        assert line in text
    for name in ("requests_total", "generation_tokens_total", "prompt_tokens_total", "decode_tokens_per_second"):
        assert f"# TYPE ernie_edge_{name} " in text
    spec = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(spec["paths"])
