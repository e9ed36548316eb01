"""The ASGI middleware in front of every route: safe-by-default checks done before any body is
parsed, in this order:

1. header limits (count and total size) -> 431;
2. Host allowlist against DNS rebinding (127.0.0.1:PORT, localhost:PORT, [::1]:PORT) -> 403;
3. Origin: browsers' cross-site requests are refused unless the origin was allowed -> 403
   (allowed origins get CORS headers for exactly that origin, never credentials);
4. API key (`Authorization: Bearer KEY`, compared in constant time) on every route but /health -> 401;
5. body size (Content-Length, and the bytes actually received) -> 413, and JSON nesting depth
   (counted on the raw bytes before any JSON parser sees them) -> 400.

It also counts responses per route and status for /metrics.
"""

from __future__ import annotations

import hmac
import json
import re
from collections import Counter

import numpy as np

from .settings import ServeSettings

PUBLIC_PATHS = frozenset({"/health"})
KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/openapi.json")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_ALLOW_HEADERS = "authorization, content-type"
_ALLOW_METHODS = "GET, POST, OPTIONS"


def json_depth(body: bytes) -> int:
    """Deepest nesting of [ and { in a JSON text (brackets inside strings do not count). Linear
    time and no recursion, whatever the input."""
    stripped = _JSON_STRING.sub(b'""', body)
    b = np.frombuffer(stripped, np.uint8)  # [N]
    step = ((b == ord("[")) | (b == ord("{"))).astype(np.int32) - ((b == ord("]")) | (b == ord("}")))
    return int(np.cumsum(step).max()) if len(step) else 0


class Guard:
    """Pure ASGI middleware (see the module docstring)."""

    def __init__(self, app, settings: ServeSettings, counts: Counter | None = None):
        self.app = app
        self.settings = settings
        self.allowed_hosts = settings.allowed_hosts()
        self.origins = frozenset(settings.allow_origins)
        self.key = settings.api_key.encode() if settings.api_key else None
        self.counts: Counter[tuple[str, int]] = Counter() if counts is None else counts  # (path, status) -> n

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = path if path in KNOWN_PATHS or path.startswith("/v1/models/") else "other"
        label = "/v1/models" if label.startswith("/v1/models/") else label

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.counts[(label, message["status"])] += 1
            await send(message)

        headers = scope["headers"]
        origin = _header(headers, b"origin")
        refusal = self._refuse(scope, headers, origin)
        if refusal is not None:
            return await _send_error(counted_send, *refusal)
        if scope["method"] == "OPTIONS" and origin is not None:
            return await _send_preflight(counted_send, origin)
        body = await self._read_body(scope, headers, receive, counted_send)
        if body is None:
            return
        outgoing = _with_cors(counted_send, origin) if origin is not None else counted_send
        await self.app(scope, _replay(body, receive), outgoing)

    def _refuse(self, scope, headers, origin: str | None):
        """(status, message, type, code, extra headers) for a request refused before its body."""
        size = sum(len(k) + len(v) for k, v in headers)
        if len(headers) > self.settings.max_headers or size > self.settings.max_header_bytes:
            return (431, f"too many or too large headers (limits: {self.settings.max_headers} headers, "
                         f"{self.settings.max_header_bytes} bytes)", "invalid_request_error", "headers_too_large")
        if self.allowed_hosts is not None:
            host = (_header(headers, b"host") or "").lower()
            if host not in self.allowed_hosts:
                return (403, "this Host header is not allowed (the API answers only to "
                             "127.0.0.1, localhost and [::1] with its port; see --allow-host)",
                        "invalid_request_error", "host_not_allowed")
        if origin is not None and origin not in self.origins and "*" not in self.origins:
            return (403, "cross-origin requests are refused; start the server with "
                         "--allow-origin ORIGIN to let a web page use it",
                    "invalid_request_error", "origin_not_allowed")
        if self.key is not None and scope["path"] not in PUBLIC_PATHS and scope["method"] != "OPTIONS":
            if not hmac.compare_digest(_bearer(headers), self.key):
                return (401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                        "authentication_error", "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        return None

    async def _read_body(self, scope, headers, receive, send) -> bytes | None:
        """The whole request body, or None after answering 413 / 400 (or a disconnect).

        A body over the limit is answered 413 after the rest of it has been read and dropped, up
        to DRAIN_FACTOR times the limit: a client still sending when the server closes the
        connection gets a reset instead of the answer (TCP drops the unread bytes and the response
        with them). A larger declared length is answered at once."""
        limit = self.settings.max_body_bytes
        declared = _header(headers, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            drainable = declared.isdigit() and int(declared) <= DRAIN_FACTOR * limit
            await _refuse_too_large(receive, send, limit, DRAIN_FACTOR * limit if drainable else 0)
            return None
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                more = message.get("more_body", False)
                await _refuse_too_large(receive, send, limit, DRAIN_FACTOR * limit - size if more else 0)
                return None
            parts.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(parts)
        if body and json_depth(body) > self.settings.max_json_depth:
            await _send_error(send, 400, f"the JSON body is nested deeper than {self.settings.max_json_depth} "
                                         "levels", "invalid_request_error", "json_too_deep")
            return None
        return body


DRAIN_FACTOR = 4  # an oversized body is read (and dropped) up to this many times the limit before the 413


async def _refuse_too_large(receive, send, limit: int, drain: int) -> None:
    """Answer 413 after reading and dropping at most `drain` more bytes of the body (`_drain`)."""
    await _drain(receive, drain)
    await _send_error(send, 413, f"the request body is larger than {limit} bytes", "invalid_request_error",
                      "body_too_large")


async def _drain(receive, budget: int) -> None:
    """Read and drop the rest of a request body, at most `budget` more bytes (or until the client
    goes away)."""
    while budget > 0:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _header(headers, name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _bearer(headers) -> bytes:
    for key, value in headers:
        if key.lower() == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:]
    return b""


def _replay(body: bytes, receive):
    """A receive() that hands the app the body already read, then passes through (disconnects)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()
    return replay


def _with_cors(send, origin: str):
    async def cors_send(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": list(message.get("headers", [])) + [
                (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]}
        await send(message)
    return cors_send


async def _send_preflight(send, origin: str) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": [
        (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
        (b"access-control-allow-methods", _ALLOW_METHODS.encode()),
        (b"access-control-allow-headers", _ALLOW_HEADERS.encode()), (b"access-control-max-age", b"600")]})
    await send({"type": "http.response.body", "body": b""})


async def _send_error(send, status: int, message: str, type_: str, code: str, headers=()) -> None:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close") if status in (413, 431) else (b"cache-control", b"no-store"), *headers]})
    await send({"type": "http.response.body", "body": body})
