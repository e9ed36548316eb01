"""`serve_engine` (ernie_edge/server/run.py): the API over an engine that is already loaded, in a
thread of this process (the desktop app's Local API server). It listens on the port asked for (0:
a free one) before it returns; `stop()` frees the port, cancels requests still running once the
grace period is over, and leaves the engine to its owner."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time

import httpx
import openai
import pytest

import ernie_edge
from ernie_edge.engine import Engine, EngineRequest, EngineSettings
from ernie_edge.generate import render_prompt
from ernie_edge.sampling import SamplingParams
from ernie_edge.server.run import serve_engine
from ernie_edge.server.settings import ServeError, ServeSettings
from serve_helpers import converted_tiny, wait_until

USER = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def model(tiny_dir, tmp_path_factory):
    m = ernie_edge.load(converted_tiny(tiny_dir, tmp_path_factory), threads=1)
    m.warmup()
    return m


@pytest.fixture
def engine(model):
    e = Engine(model, EngineSettings(slots=2, context=1024))
    yield e
    e.close(drain=False)


def settings_for(engine, **kw) -> ServeSettings:
    return ServeSettings(model=str(engine.model.path), **{"port": 0, **kw})


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_serves_on_a_free_port_and_stops_without_closing_the_engine(engine, model):
    server = serve_engine(engine, settings_for(engine), model_id="tiny")
    port = server.settings.port
    assert port != 0 and server.url == f"http://127.0.0.1:{port}" and server.running
    assert server.state.service.engine is engine
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # listening once it returned
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, temperature=0.0)
    assert r.model == "tiny" and r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"

    server.stop()
    assert not server.running and refused(port)
    socket.create_server(("127.0.0.1", port)).close()  # the port is free for anyone
    result = engine.submit(EngineRequest(render_prompt(model, USER), SamplingParams(max_tokens=3))).result()
    assert result.timings.completion_tokens == 3  # the engine still runs


def test_stop_cancels_a_stream_still_running_after_the_grace_period(engine, model):
    """The worker is held on the request's third token, so the stream cannot end by itself."""
    gate = threading.Event()

    def hold(logits, generated):
        if len(generated) >= 2:
            gate.wait()
        return logits
    engine.request_hook = lambda req: dataclasses.replace(req, logits_processor=hold)
    server = serve_engine(engine, settings_for(engine, graceful_shutdown_s=1))
    first = threading.Event()

    def stream():
        body = {"messages": USER, "stream": True, "max_tokens": 500}
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        first.set()
        except httpx.HTTPError:
            pass  # the server closed the connection as it stopped
    client = threading.Thread(target=stream, daemon=True)
    client.start()
    assert first.wait(30)
    t0 = time.monotonic()
    server.stop(timeout=30)
    took = time.monotonic() - t0
    gate.set()
    assert not server.running and 1.0 <= took < 10, took
    wait_until(lambda: not engine.stats().active_ids, 30, "the cancelled request leaving its slot")
    assert engine.stats().finished == {"cancelled": 1}
    client.join(30)
    assert not client.is_alive()
    engine.request_hook = None
    result = engine.submit(EngineRequest(render_prompt(model, USER), SamplingParams(max_tokens=2))).result()
    assert result.finish_reason == "length"


def test_a_taken_port_or_unsafe_settings_are_refused(engine):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve_engine(engine, settings_for(engine, port=port))
    with pytest.raises(ServeError, match="--api-key"):
        serve_engine(engine, settings_for(engine, host="0.0.0.0"))


def test_connections_that_never_complete_a_request_are_closed_and_streams_are_not(engine):
    """Slow clients ("slowloris"): a connection that sends its headers, or its body, a byte now and
    then holds a socket forever in plain uvicorn. Here each request must be in within
    request_read_timeout_s; a response that streams for longer than that is not cut."""
    gate = threading.Event()

    def hold(logits, generated):  # the stream waits on its 2nd token until the slow sockets are closed
        if len(generated) == 1:
            gate.wait(30)
        return logits
    engine.request_hook = lambda req: dataclasses.replace(req, logits_processor=hold)
    server = serve_engine(engine, settings_for(engine, request_read_timeout_s=0.5))
    port = server.settings.port
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    chunks: list[str] = []

    def stream():
        body = {"messages": USER, "stream": True, "max_tokens": 3}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            chunks.extend(line for line in r.iter_lines() if line.startswith("data:"))
    client = threading.Thread(target=stream, daemon=True)
    try:
        client.start()
        wait_until(lambda: engine.stats().active_ids, 30, "the stream starting")
        half_headers = socket.create_connection(("127.0.0.1", port))
        half_headers.sendall(b"POST /v1/completions HTTP/1.1\r\n" + host)
        half_body = socket.create_connection(("127.0.0.1", port))
        half_body.sendall(b"POST /v1/completions HTTP/1.1\r\n" + host +
                          b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        for sock in (half_headers, half_body):
            sock.settimeout(20)
            assert sock.recv(1) == b"", "the server should close the connection"
            sock.close()
        assert client.is_alive()  # the stream outlived the deadline, held on its 2nd token
        gate.set()
        client.join(30)
        assert chunks[-1] == "data: [DONE]" and len(chunks) >= 4
        # A kept-alive connection gets a new deadline after each response.
        with socket.create_connection(("127.0.0.1", port)) as keep:
            keep.sendall(b"GET /health HTTP/1.1\r\n" + host + b"\r\n")
            keep.settimeout(20)
            assert keep.recv(4096).startswith(b"HTTP/1.1 200")
            keep.sendall(b"GET /health HTTP/1.1\r\n")
            while keep.recv(4096):
                pass  # until the server closes it
    finally:
        gate.set()
        engine.request_hook = None
        server.stop(timeout=30)
