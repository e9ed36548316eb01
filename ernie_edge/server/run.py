"""`ernie-edge serve`: bind, load the model in the background (/health answers 503 meanwhile), serve
until Ctrl-C, then drain: no new connections, running requests finish (up to
ServeSettings.graceful_shutdown_s), the engine stops."""

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

from ..config import ErnieConfig
from ..engine import Engine
from ..errors import ErnieEdgeError
from ..kv_cache import check_kv_budget, kv_bytes
from ..model_dir import resolve
from .settings import ServeError, ServeSettings

log = logging.getLogger(__name__)


def serve(settings: ServeSettings, out: TextIO = sys.stdout) -> int:
    """Run the server until interrupted; returns the exit code. Raises ErnieEdgeError for settings
    or a model that cannot be served (before anything listens)."""
    import uvicorn

    from .app import ServerState, create_app
    settings.check()
    location = resolve(settings.model)
    cfg = ErnieConfig.from_file(location.path / "config.json")
    engine_settings = settings.engine_settings()
    context = min(engine_settings.context, cfg.max_position_embeddings)
    caches = engine_settings.slots + engine_settings.prefix_entries
    check_kv_budget(cfg, caches * context, kv_dtype=engine_settings.kv_dtype)  # before loading anything

    sock = bind(settings)
    if settings.unix_socket is None:
        settings = dataclasses.replace(settings, port=sock.getsockname()[1])  # --port 0: the one picked
    state = ServerState(settings)
    model_id = settings.model_name or location.repo_id or location.path.name
    config = uvicorn.Config(create_app(state), http="h11", ws="none", lifespan="off", proxy_headers=False,
                            server_header=False, access_log=False, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.graceful_shutdown_s,
                            h11_max_incomplete_event_size=settings.max_header_bytes + 4096)
    server = uvicorn.Server(config)
    print(f"ernie-edge serve: listening on {settings.url}; loading {location.path} ...", file=out, flush=True)

    def load() -> None:
        try:
            engine = Engine.load(location.path, engine_settings)
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
        if settings.unix_socket is not None:
            Path(settings.unix_socket).unlink(missing_ok=True)
    if state.load_error is not None:
        print(f"ernie-edge serve: error: the model failed to load: {state.load_error}", file=sys.stderr)
        return 2
    return 0


def bind(settings: ServeSettings) -> socket.socket:
    """The listening socket: TCP on host:port, or a unix socket created with mode 0600."""
    if settings.unix_socket is not None:
        return _bind_unix(Path(settings.unix_socket))
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        return socket.create_server((settings.host, settings.port), family=family)
    except OSError as e:
        raise ServeError(f"cannot listen on {settings.host}:{settings.port} ({e.strerror}); is another "
                         "server running there? Choose another --port") from None


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
