"""Remote mode: the app's RemoteBackend against an OpenAI-compatible server.

The server is the project's own `ernie-edge serve` when this build has it (ernie_edge.server);
otherwise `StandInOpenAIServer` below, a few dozen lines of http.server that speak the same wire
format (streaming /v1/chat/completions with `reasoning_content` deltas, tool-call deltas, a usage
chunk, the OpenAI error shape) so the client side is tested either way.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gui_helpers import tiny_edge_dir
from ernie_edge.gui.backends import (FINISH_CANCELLED, BackendError, RemoteBackend, RemoteSettings,
                                     TurnRequest, api_base)
from ernie_edge.gui.launch import GuiSettings, build_window
from ernie_edge.gui.local_server import LocalServer
from ernie_edge.gui.window import make_backend
from ernie_edge.sampling import SamplingParams

REASONING = ["The ", "user ", "greets ", "me."]
CONTENT = ["Hello", "! ", "你好", "！"]
HELLO = [{"role": "user", "content": "hi"}]


class StandInOpenAIServer:
    """A stand-in for an OpenAI-compatible server (NOT the project's server): GET /v1/models and
    streaming POST /v1/chat/completions. `key`: require `Authorization: Bearer key`. `delay_s`:
    pause before each event. `tool_call`: end with a streamed tool call. Requests are recorded."""

    def __init__(self, key: str = "", delay_s: float = 0.0, tool_call: bool = False):
        self.key, self.delay_s, self.tool_call = key, delay_s, tool_call
        self.requests: list[dict] = []
        self.events_sent = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if self._auth():
                    self._json(200, {"object": "list", "data": [{"id": "ernie-standin", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                if not self._auth():
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    for event in outer.events():
                        time.sleep(outer.delay_s)
                        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                        self.wfile.flush()
                        outer.events_sent += 1
                    self.wfile.write(b"data: [DONE]\n\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (cancel)

            def _auth(self) -> bool:
                if outer.key and self.headers.get("Authorization") != f"Bearer {outer.key}":
                    self._json(401, {"error": {"message": "Invalid API key", "type": "authentication_error",
                                               "param": None, "code": "invalid_api_key"}})
                    return False
                return True

            def _json(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def events(self):
        def chunk(delta, finish=None):
            return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "ernie-standin",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        yield chunk({"role": "assistant", "content": ""})
        for piece in REASONING:
            yield chunk({"reasoning_content": piece})
        for piece in CONTENT:
            yield chunk({"content": piece})
        if self.tool_call:
            yield chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                         "function": {"name": "get_weather", "arguments": ""}}]})
            for part in ('{"city": ', '"北京"}'):
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
        yield chunk({}, "tool_calls" if self.tool_call else "stop")
        yield {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def standin():
    server = StandInOpenAIServer()
    yield server
    server.close()


def ready(url: str, key: str = "") -> RemoteBackend:
    b = RemoteBackend(RemoteSettings(url, key))
    b.load(lambda p: None)
    return b


def test_streams_reasoning_answer_and_usage(standin):
    b = ready(standin.url)
    assert b.model == "ernie-standin"
    chunks = list(b.submit(TurnRequest(HELLO, SamplingParams(temperature=0.3, top_p=0.9, max_tokens=64))))
    assert "".join(c.reasoning for c in chunks) == "".join(REASONING)
    assert "".join(c.content for c in chunks) == "".join(CONTENT)
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.stats.completion_tokens == 9 and last.stats.prompt_tokens == 7
    sent = standin.requests[0]
    assert sent["stream"] is True and sent["messages"] == HELLO and sent["model"] == "ernie-standin"
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"]) == (0.3, 0.9, 64)


def test_tool_calls_are_assembled_from_their_pieces():
    server = StandInOpenAIServer(tool_call=True)
    try:
        chunks = list(ready(server.url).submit(TurnRequest(HELLO, SamplingParams())))
    finally:
        server.close()
    last = chunks[-1]
    assert last.finish_reason == "tool_calls"
    assert [(c.id, c.name, json.loads(c.arguments)) for c in last.tool_calls] == [
        ("call_1", "get_weather", {"city": "北京"})]


def test_api_key_is_sent_and_a_wrong_one_is_explained():
    server = StandInOpenAIServer(key="sk-right")
    try:
        assert ready(server.url, "sk-right").model == "ernie-standin"
        with pytest.raises(BackendError, match="refused the API key"):
            ready(server.url, "sk-wrong")
    finally:
        server.close()


def test_refusing_url_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendError, match="Could not connect to .* Is the server running"):
        ready(url)


def test_cancel_ends_the_stream_early():
    server = StandInOpenAIServer(delay_s=0.05)
    try:
        turn = ready(server.url).submit(TurnRequest(HELLO, SamplingParams()))
        it = iter(turn)
        next(it)
        turn.cancel()
        rest = list(it)
    finally:
        server.close()
    assert rest[-1].finish_reason == FINISH_CANCELLED
    assert len(rest) <= 2  # at most one more delta, then the end


def test_api_base_accepts_both_spellings():
    assert api_base("http://h:1") == api_base("http://h:1/v1/") == "http://h:1/v1"


# ---- the window in remote mode -------------------------------------------------------------------

@pytest.fixture
def serve_url(tmp_path_factory):
    """The project's own `ernie-edge serve` on the tiny model when this build has it, else the
    stand-in. Yields (url, is_the_real_server)."""
    if not LocalServer.available():
        server = StandInOpenAIServer()
        yield server.url, False
        server.close()
        return
    model = tiny_edge_dir(tmp_path_factory.mktemp("gui-serve"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ernie_edge.cli", "serve", "--model", str(model),
                             "--host", "127.0.0.1", "--port", str(port)])
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, f"ernie-edge serve exited with {proc.returncode}"
                assert time.monotonic() < deadline, "ernie-edge serve did not become healthy in 120 s"
                time.sleep(0.2)  # polling a starting server: there is nothing to wait on instead
        yield f"http://127.0.0.1:{port}/v1", True
    finally:
        proc.terminate()
        proc.wait(10)


def test_window_in_remote_mode(qtbot, tmp_path, serve_url):
    url, real = serve_url
    settings = GuiSettings(data_dir=tmp_path, config_dir=tmp_path, theme="light")
    w = build_window(settings, make_backend)
    qtbot.addWidget(w)
    w.show()
    w.settings.mode, w.settings.remote_url = "remote", url
    w.load_backend()
    qtbot.waitUntil(lambda: w.backend is not None, timeout=30000)
    assert w.backend.label.startswith("remote:")
    w.input.setPlainText("Hello")
    w.send()
    qtbot.waitUntil(lambda: not w.controller.busy, timeout=60000)
    answer = w.chat.widgets[1].message
    assert answer.status == "complete" and answer.stats["completion_tokens"] > 0
    if not real:
        assert answer.reasoning == "".join(REASONING) and answer.content == "".join(CONTENT)


def test_window_with_a_refusing_url_says_so(qtbot, tmp_path):
    w = build_window(GuiSettings(data_dir=tmp_path, config_dir=tmp_path), make_backend)
    qtbot.addWidget(w)
    w.show()
    w.settings.mode, w.settings.remote_url = "remote", f"http://127.0.0.1:{free_port()}/v1"
    w.load_backend()
    qtbot.waitUntil(lambda: w.banner.kind == "model", timeout=15000)
    assert "Could not connect" in w.banner.text() and w.backend is None


def test_window_shows_tool_calls(qtbot, tmp_path):
    server = StandInOpenAIServer(tool_call=True)
    w = build_window(GuiSettings(data_dir=tmp_path, config_dir=tmp_path), make_backend)
    qtbot.addWidget(w)
    w.show()
    w.settings.mode, w.settings.remote_url = "remote", server.url
    w.load_backend()
    qtbot.waitUntil(lambda: w.backend is not None, timeout=15000)
    w.input.setPlainText("weather in Beijing?")
    w.send()
    qtbot.waitUntil(lambda: not w.controller.busy, timeout=15000)
    server.close()
    answer = w.chat.widgets[1]
    labels = [answer.tools.itemAt(i).widget().text() for i in range(answer.tools.count())]
    assert labels == ['Tool call: get_weather({"city": "北京"})']
    assert answer.message.tool_calls[0]["name"] == "get_weather" and answer.message.finish_reason == "tool_calls"
