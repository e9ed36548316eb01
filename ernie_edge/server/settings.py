"""`ServeSettings`: everything `ernie-edge serve` was asked to do, checked before anything starts."""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..engine import DEFAULT_CONTEXT, EngineSettings
from ..errors import ErnieEdgeError

REASONING_FIELDS = ("reasoning_content", "reasoning", "both")
WILDCARD_HOSTS = ("0.0.0.0", "::")


class ServeError(ErnieEdgeError):
    """The server cannot start with these settings."""


@dataclass(frozen=True)
class ServeSettings:
    """The server's settings (the engine's are derived by `engine_settings`).

    host/port: where to listen; anything but a loopback address needs api_key. unix_socket:
    listen on this path instead (created with mode 0600). api_key: required as
    `Authorization: Bearer KEY` on every route but /health. allow_origins: browser origins
    allowed to call the API (exact, e.g. "http://localhost:3000"; "*" allows any). allow_hosts:
    extra Host header values accepted besides 127.0.0.1/localhost/[::1] with the port.
    reasoning_field: where the reasoning goes in responses: "reasoning_content" (DeepSeek / vLLM
    style), "reasoning" (OpenRouter / Ollama style) or "both". model_name: the id served in
    /v1/models and responses (default: the model folder's name). request_read_timeout_s: a
    connection must deliver each request (headers and body) within this many seconds of opening or
    of its previous response, else it is closed (clients that hold sockets open by sending a byte
    now and then: "slowloris").
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    unix_socket: Path | None = None
    api_key: str | None = field(default=None, repr=False)
    allow_origins: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    context: int = DEFAULT_CONTEXT
    slots: int = 2
    queue_size: int = 16
    threads: int | None = None
    kv_dtype: str = "f16"
    device: str = "cpu"  # cpu | cuda | auto (ernie_edge/placement.py)
    gpu_experts: str | int | None = None  # all | none | N | None: as many as fit
    prefill_chunk: int = 256
    reasoning_field: str = "reasoning_content"
    model_name: str | None = None
    max_body_bytes: int = 8 << 20
    max_headers: int = 100
    max_header_bytes: int = 64 << 10
    max_json_depth: int = 64
    request_read_timeout_s: float = 30.0
    graceful_shutdown_s: int = 60
    log_level: str = "info"

    def check(self) -> None:
        """Refuse unsafe or impossible settings with a message saying what to do."""
        if self.reasoning_field not in REASONING_FIELDS:
            raise ServeError(f"reasoning_field must be one of {', '.join(REASONING_FIELDS)}, "
                             f"got {self.reasoning_field!r}")
        if self.unix_socket is None and not 0 <= self.port <= 65535:
            raise ServeError(f"--port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise ServeError("--api-key is empty or has surrounding spaces; give the key itself")
        if self.unix_socket is None and not is_loopback(self.host) and not self.api_key:
            raise ServeError(f"--host {self.host} exposes the API beyond this machine; that needs "
                             "--api-key KEY (or --api-key-file PATH). Leave --host out to listen on "
                             "127.0.0.1 only")
        from ..placement import check_device, parse_gpu_experts
        check_device(self.device)
        parse_gpu_experts(self.gpu_experts)
        self.engine_settings()  # checks slots, context, queue size

    def engine_settings(self) -> EngineSettings:
        return EngineSettings(slots=self.slots, context=self.context, queue_size=self.queue_size,
                              prefill_chunk=self.prefill_chunk, threads=self.threads, kv_dtype=self.kv_dtype,
                              device=self.device, gpu_experts=self.gpu_experts)

    @property
    def url(self) -> str:
        if self.unix_socket is not None:
            return f"http://localhost (unix socket {self.unix_socket})"
        host = "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def allowed_hosts(self) -> frozenset[str] | None:
        """Host header values accepted (lower case), or None for any (a unix socket, which a
        browser cannot reach, or a wildcard bind, which requires the API key)."""
        if self.unix_socket is not None or self.host in WILDCARD_HOSTS:
            return None
        names = {"127.0.0.1", "localhost", "[::1]", _bracketed(self.host.lower())}
        if self.port == 80:
            names |= {f"{n}:80" for n in names}
        else:
            names = {f"{n}:{self.port}" for n in names}
        for host in (h.lower() for h in self.allow_hosts):
            names.add(host if _has_port(host) else f"{host}:{self.port}")
        return frozenset(names)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _has_port(host: str) -> bool:
    """True for "name:80" and "[::1]:80", False for "name" and "[::1]"."""
    return ":" in (host.rpartition("]")[2] if host.startswith("[") else host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_key_file(path: str | os.PathLike) -> str:
    """The key in a file readable by its owner only (mode 0600 or stricter)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ServeError(f"--api-key-file {path}: cannot read it ({e})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ServeError(f"--api-key-file {path}: other users can read it (mode {stat.S_IMODE(mode):o}); "
                         f"run `chmod 600 {path}`")
    if not text:
        raise ServeError(f"--api-key-file {path}: the file is empty")
    return text
