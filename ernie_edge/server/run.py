"""Running the API server.

`serve` is `ernie-edge serve`: bind, load the model in the background (/health answers 503
meanwhile), serve until Ctrl-C, then drain: no new connections, running requests finish (up to
ServeSettings.graceful_shutdown_s), the engine stops.

`serve_engine` serves an engine that is already loaded, from a background thread of this process
(the desktop app's "Local API server" toggle): the engine stays its owner's, so `stop()` stops
only the server.

    server = serve_engine(engine, ServeSettings(model=str(engine.model.path), port=0))
    print(server.url)             # http://127.0.0.1:PORT (port 0: a free one was picked)
    server.stop()                 # the port is free again; the engine still runs
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import stat
import sys
import threading
from pathlib import Path
from typing import TextIO

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import ErnieConfig
from ..engine import Engine
from ..errors import ErnieEdgeError
from ..kv_cache import check_kv_budget, kv_bytes
from ..model_dir import resolve
from .app import ServerState, create_app
from .settings import ServeError, ServeSettings

log = logging.getLogger(__name__)
_START_TIMEOUT_S = 30.0


def _compile_note(p, out: TextIO) -> None:
    """A line on the first kernel a cold start compiles and on every 10th (kernel_warmup.WarmupProgress)."""
    if p.compiled == 1 or p.compiled % 10 == 0:
        total = f" of about {p.expected}" if p.expected else ""
        print(f"ernie-edge serve: compiling kernels (first run only): {p.compiled}{total} done, {p.elapsed_s:.0f} s",
              file=out, flush=True)


def serve(settings: ServeSettings, out: TextIO = sys.stdout) -> int:
    """Run the server until interrupted; returns the exit code. Raises ErnieEdgeError for settings
    or a model that cannot be served (before anything listens)."""
    settings.check()
    location = resolve(settings.model)
    cfg = ErnieConfig.from_file(location.path / "config.json")
    engine_settings = settings.engine_settings()
    context = min(engine_settings.context, cfg.max_position_embeddings)
    caches = engine_settings.slots + engine_settings.prefix_entries
    check_kv_budget(cfg, caches * context, kv_dtype=engine_settings.kv_dtype)  # before loading anything

    sock, settings = listen(settings)
    state = ServerState(settings)
    model_id = settings.model_name or location.repo_id or location.path.name
    server = _uvicorn_server(state)
    print(f"ernie-edge serve: listening on {settings.url}; loading {location.path} ...", file=out, flush=True)

    def load() -> None:
        try:
            engine = Engine.load(location.path, engine_settings, progress=lambda p: _compile_note(p, out))
        except Exception as e:  # noqa: BLE001 (reported, then the server stops)
            state.fail(str(e))
            log.error("the model failed to load: %s", e, exc_info=not isinstance(e, ErnieEdgeError))
            server.should_exit = True
            return
        state.attach(engine, model_id)
        print(banner(settings, engine, model_id), file=out, flush=True)

    threading.Thread(target=load, name="ernie-edge-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has drained
        print("ernie-edge serve: stopped", file=out, flush=True)
    finally:
        if state.service is not None:
            state.service.engine.close(drain=False, timeout=10)
        _remove_unix_socket(settings)
    if state.load_error is not None:
        print(f"ernie-edge serve: error: the model failed to load: {state.load_error}", file=sys.stderr)
        return 2
    return 0


def serve_engine(engine: Engine, settings: ServeSettings, model_id: str | None = None) -> "RunningServer":
    """Serve an engine that is already loaded, from a daemon thread of this process; returns once
    the server accepts connections. settings: where to listen (port 0: a free one is picked) and
    how to answer; its engine fields are unused. Raises ServeError for unsafe settings or an
    address in use. `RunningServer.stop()` stops the server only: the engine stays the caller's."""
    settings.check()
    sock, settings = listen(settings)
    state = ServerState(settings)
    state.attach(engine, model_id)
    server = RunningServer(state, sock)
    server.start()
    return server


class RunningServer:
    """What `serve_engine` returns: uvicorn serving `state` in a daemon thread.

    url: http://HOST:PORT (the OpenAI base URL is url + "/v1"); settings: with the port listened on."""

    def __init__(self, state: ServerState, sock: socket.socket):
        self.state = state
        self.settings: ServeSettings = state.settings
        self.url = self.settings.url
        self._sock = sock
        self._startup_over = threading.Event()
        self._server = _uvicorn_server(state, console_logs=False, startup_over=self._startup_over)
        self._thread = threading.Thread(target=self._run, name="ernie-edge-api", daemon=True)

    def start(self, timeout: float = _START_TIMEOUT_S) -> None:
        """Start the server thread; return once it accepts connections (ServeError if it does not)."""
        self._thread.start()
        self._startup_over.wait(timeout)
        if not self._server.started:
            self.stop()
            raise ServeError(f"the API server at {self.url} did not start within {timeout:.0f} s; see the log")

    def stop(self, timeout: float | None = None) -> None:
        """Stop listening (the port is free once this returns), let running requests finish for up
        to settings.graceful_shutdown_s (then they are cancelled), and end the server thread. The
        engine keeps running."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()  # uvicorn closes it as it stops; this covers a server that never started
        _remove_unix_socket(self.settings)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self._startup_over.set()  # also when it failed before its startup began


class _Server(uvicorn.Server):
    """uvicorn's server, setting an event when its startup is over (whether it started or not)."""

    def __init__(self, config: uvicorn.Config, startup_over: threading.Event | None):
        super().__init__(config)
        self.startup_over = startup_over

    async def startup(self, sockets=None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            if self.startup_over is not None:
                self.startup_over.set()


class _ReadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for reading each request: armed when the connection
    opens and after each response, cleared once the whole request (headers and body) is in; when it
    passes, the connection is closed. uvicorn alone only times out idle keep-alive connections, and
    any byte received cancels that timer."""

    read_timeout_s: float = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = self.loop.call_later(self.read_timeout_s, self._read_deadline_passed)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._deadline.cancel()  # the request is in (or the connection is ending)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._deadline.cancel()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.read_timeout_s, self._read_deadline_passed)

    def connection_lost(self, exc) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)

    def _read_deadline_passed(self) -> None:
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            log.info("closed a connection that sent no complete request within %.0f s", self.read_timeout_s)
            self.transport.close()


def _uvicorn_server(state: ServerState, console_logs: bool = True,
                    startup_over: threading.Event | None = None) -> uvicorn.Server:
    """The server for `state`'s app and settings. console_logs: uvicorn configures logging to the
    console (`ernie-edge serve`); False leaves logging to the host application (the desktop app)."""
    settings = state.settings
    logging_config = {} if console_logs else {"log_config": None}
    protocol = type("ReadDeadlineH11", (_ReadDeadlineH11,), {"read_timeout_s": settings.request_read_timeout_s})
    config = uvicorn.Config(create_app(state), http=protocol, ws="none", lifespan="off", proxy_headers=False,
                            server_header=False, access_log=False, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.graceful_shutdown_s,
                            h11_max_incomplete_event_size=settings.max_header_bytes + 4096, **logging_config)
    return _Server(config, startup_over)


def listen(settings: ServeSettings) -> tuple[socket.socket, ServeSettings]:
    """The listening socket, and the settings with the port it got (port 0 picks a free one)."""
    sock = bind(settings)
    if settings.unix_socket is None:
        settings = dataclasses.replace(settings, port=sock.getsockname()[1])
    return sock, settings


def _remove_unix_socket(settings: ServeSettings) -> None:
    if settings.unix_socket is not None:
        Path(settings.unix_socket).unlink(missing_ok=True)


def bind(settings: ServeSettings) -> socket.socket:
    """The listening socket: TCP on host:port, or a unix socket created with mode 0600."""
    if settings.unix_socket is not None:
        return _bind_unix(Path(settings.unix_socket))
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        return socket.create_server((settings.host, settings.port), family=family)
    except OSError as e:
        raise ServeError(f"cannot listen on {settings.host}:{settings.port} ({e.strerror}); is another "
                         "server running there? Choose another port") from None


def _bind_unix(path: Path) -> socket.socket:
    if path.is_symlink() or path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ServeError(f"--unix-socket {path}: exists and is not a socket; choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise ServeError(f"--unix-socket {path}: another server is listening there")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # left over from a server that is gone
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600: only this user may connect
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise ServeError(f"--unix-socket {path}: cannot create it ({e.strerror})") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def memory_estimate(engine: Engine) -> str:
    weights = sum(f.stat().st_size for f in Path(engine.model.path).glob("*.safetensors"))
    s = engine.settings
    per_slot = kv_bytes(engine.model.config, engine.context, engine.kv_dtype)
    return (f"weights {weights / 2**30:.2f} GiB (memory-mapped) + KV cache up to "
            f"{engine.kv_budget_bytes / 2**30:.2f} GiB ({s.slots} slots + {s.prefix_entries} kept for prefix "
            f"reuse, {per_slot / 2**20:.0f} MiB each at {engine.context} positions, {engine.kv_dtype})")


def banner(settings: ServeSettings, engine: Engine, model_id: str) -> str:
    """What the user needs after start-up: where, what, how much memory, and how to call it."""
    url = settings.url
    auth = ' -H "Authorization: Bearer $ERNIE_EDGE_API_KEY"' if settings.api_key else ""
    transport = f"--unix-socket {settings.unix_socket} http://localhost" if settings.unix_socket else url
    lines = [
        f"ernie-edge serve: ready at {url}",
        f"  model:  {model_id} ({engine.model.path})",
        f"  memory: {memory_estimate(engine)}",
        f"  slots:  {engine.settings.slots}, context {engine.context} tokens, queue {engine.settings.queue_size}",
        "  try it" + (" (with the key in $ERNIE_EDGE_API_KEY)" if settings.api_key else "") + ":",
        f"    curl {transport}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\",
        f"      -d '{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
    ]
    if settings.unix_socket is None:
        lines.append(
            "    python -c 'import os; from openai import OpenAI; c = OpenAI(base_url=\"" + url + "/v1\", "
            "api_key=os.environ.get(\"ERNIE_EDGE_API_KEY\", \"none\")); print(c.chat.completions.create(model=\""
            + model_id + "\", messages=[{\"role\": \"user\", \"content\": \"Hello\"}]).choices[0].message.content)'")
    lines.append("  Ctrl-C stops the server (running requests finish first; twice to stop at once).")
    return "\n".join(lines)
