"""Helpers for the engine and server tests: the tiny model converted once per session, and a real
uvicorn server on a random loopback port in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn

from ernie_edge.server.app import ServerState, create_app
from ernie_edge.server.settings import ServeSettings

_converted: dict[str, Path] = {}


def converted_tiny(tiny_dir: Path, tmp_path_factory) -> Path:
    """The tiny synthetic model converted to an edge folder (once per test session)."""
    if "tiny" not in _converted:
        from ernie_edge.quant.convert import ConvertSettings, convert
        _converted["tiny"] = convert(ConvertSettings(source=str(tiny_dir), dest=tmp_path_factory.mktemp("serve") / "edge",
                                                     progress=False))
    return _converted["tiny"]


class RunningServer:
    """`create_app` served by uvicorn on 127.0.0.1:<free port>, in a thread, over `engine`.

    state.attach(engine) is done unless attach=False (a server whose model is "still loading")."""

    def __init__(self, engine, attach: bool = True, **settings):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = ServeSettings(model=str(engine.model.path), port=self.port, **settings)
        self.state = ServerState(self.settings)
        if attach:
            self.state.attach(engine, "tiny")
        config = uvicorn.Config(create_app(self.state), http="h11", ws="none", lifespan="off",
                                log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "RunningServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:  # uvicorn sets it once the socket accepts connections
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def wait_until(condition, timeout: float, what: str) -> float:
    """Poll condition() until it is true; returns the seconds it took. Fails after timeout."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.005)
    return time.monotonic() - t0
