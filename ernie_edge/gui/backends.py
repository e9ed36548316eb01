"""What the app talks to for answers: the `Backend` interface and its two implementations. No Qt.

    backend.load(progress)            # blocking (a worker thread calls it): map weights, ready kernels
    turn = backend.submit(TurnRequest(messages, params))
    for chunk in turn: ...            # TurnChunk: reasoning / content deltas, tool calls, the end
    turn.cancel()                     # from any thread: iteration ends within one engine step

- `LocalBackend`: a model loaded in this process (`ernie_edge.load`), run by an `Engine`
  (ernie_edge/engine.py) that the Local API server toggle can also serve (gui/local_server.py).
- `RemoteBackend`: any OpenAI-compatible server (`ernie-edge serve`, vLLM, FastDeploy, ...):
  streaming /v1/chat/completions with `reasoning_content` deltas.

A turn's last chunk has `finish_reason` ("stop", "length", "tool_calls" or "cancelled") and
`stats`. Errors a user can cause (bad folder, refused connection, prompt too long) raise
`BackendError` with a message for the window.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import numpy as np

from ..errors import ErnieEdgeError
from ..parsers import ToolCall
from ..sampling import SamplingParams

if TYPE_CHECKING:  # the runtime (numba) is imported once a model loads, not before the window shows
    from ..engine import Engine, EngineRequest, EngineSettings, LogitsProcessor, RequestHandle
    from ..generate import Timings

FINISH_CANCELLED = "cancelled"


class BackendError(ErnieEdgeError):
    """The backend cannot load or answer; the message says why and what to do."""


@dataclass(frozen=True)
class LoadProgress:
    stage: str  # what is happening, for the status line
    fraction: float | None = None  # 0..1 when known; None: busy, length unknown (kernel compilation)


@dataclass(frozen=True)
class TurnRequest:
    """One chat turn: OpenAI-style messages (system first if any) and the sampling settings."""

    messages: list[dict]
    params: SamplingParams
    reasoning_budget: int | None = None


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0  # request sent -> first token
    decode_tok_s: float = 0.0
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TurnChunk:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None  # last chunk only
    stats: TurnStats | None = None  # last chunk only


class Turn(Protocol):
    def __iter__(self) -> Iterator[TurnChunk]: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    label: str  # shown in the window: what answers

    def load(self, progress: Callable[[LoadProgress], None]) -> None: ...

    def submit(self, request: TurnRequest) -> Turn: ...

    def close(self) -> None: ...


class _Clock:
    """Client-side timings of a turn: first token, tokens, tokens/s."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.t_last = self.t0
        self.tokens = 0

    def token(self) -> None:
        self.t_last = time.perf_counter()
        self.t_first = self.t_first or self.t_last
        self.tokens += 1

    def stats(self, prompt_tokens: int = 0, completion_tokens: int | None = None) -> TurnStats:
        """completion_tokens: the server's count (a server may send several tokens per event);
        tokens/s then runs from the first token to the end of the stream."""
        now = time.perf_counter()
        n = completion_tokens if completion_tokens is not None else self.tokens
        end = now if completion_tokens is not None else self.t_last
        span = end - (self.t_first or end)
        return TurnStats(prompt_tokens=prompt_tokens, completion_tokens=n,
                         ttft_s=(self.t_first or self.t0) - self.t0,
                         decode_tok_s=(n - 1) / span if n > 1 and span > 0 else 0.0,
                         elapsed_s=now - self.t0)


# ---- local ------------------------------------------------------------------------------------

ENGINE_SLOTS = 2  # answers generated at once: the app's own and one from the Local API server
KEPT_CACHES = 1  # finished KV caches kept for prefix reuse: the next turn of the chat reads only its new tokens
DEFAULT_CONTEXT = 8192


@dataclass(frozen=True)
class LocalSettings:
    path: str
    threads: int = 0  # 0: all cores
    context: int = 0  # tokens per conversation (KV cache size); 0: DEFAULT_CONTEXT
    backend: str = "auto"  # ernie_edge.load's backend: "auto", "cpu" or "reference"

    def engine_settings(self) -> "EngineSettings":
        from ..engine import EngineSettings
        return EngineSettings(slots=ENGINE_SLOTS, prefix_cache=KEPT_CACHES, context=self.context or DEFAULT_CONTEXT,
                              threads=self.threads or None)


class LocalBackend:
    """A model in this process, run by an `Engine` (ernie_edge/engine.py) that the Local API server
    toggle serves too: the app's turns and API requests share the model and take turns in its
    slots.

    `forced` is a test-only hook: a function from the request to the text the turn must produce.
    The model still runs every step; the request's logits processor replaces its logits by a
    one-hot row on the next token of that text, so the real sampler, detokenizer and parser see it
    (random test weights would otherwise write random text)."""

    def __init__(self, settings: LocalSettings, *, model=None,
                 forced: Callable[[TurnRequest], str] | None = None):
        self.settings = settings
        self.model = model
        self.forced = forced
        self.engine: "Engine | None" = None
        self.label = f"local: {Path(settings.path).name}"

    def load(self, progress: Callable[[LoadProgress], None]) -> None:
        from .. import load
        from ..engine import Engine
        engine_settings = self.settings.engine_settings()
        if self.model is None:
            progress(LoadProgress(f"Opening {self.settings.path}"))
            try:
                self.model = load(self.settings.path, backend=self.settings.backend,
                                  threads=engine_settings.threads, max_context=engine_settings.context)
            except ErnieEdgeError as e:
                raise BackendError(f"Could not load the model: {e}") from None
        if self.model.backend_name == "cpu":
            progress(LoadProgress("Preparing kernels (the first run compiles them, once; "
                                  "later runs load them in seconds)"))

            def compiling(p) -> None:
                total = f" of about {p.expected}" if p.expected else ""
                progress(LoadProgress(f"Compiling kernels (first run only): {p.compiled}{total}, {p.elapsed_s:.0f} s",
                                      min(0.95, p.compiled / p.expected) if p.expected else None))

            self.model.warmup(compiling)
        try:
            self.engine = Engine(self.model, engine_settings)
        except ErnieEdgeError as e:
            raise BackendError(f"Could not start the model: {e} (in this app: Settings → Context)") from None
        progress(LoadProgress("Ready", 1.0))

    def submit(self, request: TurnRequest) -> "LocalTurn":
        if self.engine is None:
            raise BackendError("No model is loaded yet")
        return LocalTurn(self, request)

    def close(self) -> None:
        """Stop the engine (a turn still running ends as cancelled)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close(drain=False)
        self.model = None


class LocalTurn:
    """One turn on the backend's engine. The prompt is rendered and submitted when iteration
    starts (on the turn's worker thread, not the UI's)."""

    def __init__(self, backend: LocalBackend, request: TurnRequest):
        self.engine = backend.engine
        self.forced = backend.forced
        self.request = request
        self.handle: "RequestHandle | None" = None
        self._cancel = threading.Event()

    @property
    def steps(self) -> int:
        """Tokens the engine has generated for this turn (one per engine step; tests check that
        Stop costs at most one more)."""
        return len(self.handle.token_steps) if self.handle is not None else 0

    def cancel(self) -> None:
        self._cancel.set()
        if self.handle is not None:
            self.handle.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[TurnChunk]:
        clock = _Clock()
        self.handle = self._submit(self._engine_request())
        if self._cancel.is_set():  # cancelled before there was a handle to cancel
            self.handle.cancel()
        last = None
        try:
            for chunk in self.handle:
                last = chunk
                if not self._cancel.is_set() and chunk.finish_reason is None:
                    yield TurnChunk(chunk.reasoning, chunk.content, list(chunk.tool_calls))
        except ErnieEdgeError as e:
            raise BackendError(f"The model stopped with an error: {e}") from None
        finally:
            self.handle.cancel()  # the consumer left early (a no-op once the request ended)
        stats = _turn_stats(last.timings, clock)
        if self._cancel.is_set():  # what was shown so far is the answer; later deltas are dropped
            yield TurnChunk(finish_reason=FINISH_CANCELLED, stats=stats)
            return
        yield TurnChunk(last.reasoning, last.content, list(last.tool_calls), last.finish_reason, stats)

    def _engine_request(self) -> "EngineRequest":
        """The turn as an engine request: the rendered prompt, and max_tokens capped to the room
        left (no max_tokens: answer until the context is full)."""
        from ..engine import EngineRequest
        from ..generate import render_prompt
        req, context = self.request, self.engine.context
        try:
            ids = render_prompt(self.engine.model, req.messages)
        except ErnieEdgeError as e:
            raise BackendError(f"Could not build the prompt: {e}") from None
        room = context - len(ids)
        if room < 1:
            raise BackendError(f"The conversation ({len(ids)} tokens) fills the context of {context} tokens; "
                               "start a new chat or raise Context in Settings")
        params = req.params
        if params.max_tokens is None or params.max_tokens > room:
            params = dataclasses.replace(params, max_tokens=room)
        forced = None if self.forced is None else _forced_logits(self.engine.tokenizer, self.forced(req))
        return EngineRequest(ids, params, reasoning_budget=req.reasoning_budget, logits_processor=forced)

    def _submit(self, request: "EngineRequest") -> "RequestHandle":
        from ..engine import EngineClosedError, QueueFullError
        try:
            return self.engine.submit(request)
        except EngineClosedError:
            raise BackendError("The model was closed; load it again") from None
        except QueueFullError:
            raise BackendError("The model is busy with requests from the Local API server; try again shortly") from None
        except ErnieEdgeError as e:
            raise BackendError(f"The model cannot take this turn: {e}") from None


def _turn_stats(t: "Timings | None", clock: _Clock) -> TurnStats:
    elapsed = clock.stats().elapsed_s
    if t is None:
        return TurnStats(elapsed_s=elapsed)
    return TurnStats(t.prompt_tokens, t.completion_tokens, t.ttft_s, t.decode_tok_s, elapsed)


def _forced_logits(tok, text: str) -> "LogitsProcessor":
    """A logits processor (test hook) that makes the model write `text`, then end its turn: a
    one-hot row on the next token of the text, found from how many tokens were generated."""
    ids = tok.encode(text) + [tok.im_end_id]

    def one_hot(logits: np.ndarray, generated: np.ndarray) -> np.ndarray:  # [V], [n] -> [V]
        out = np.full_like(logits, -np.inf)
        out[ids[min(len(generated), len(ids) - 1)]] = 0.0
        return out
    return one_hot


# ---- remote -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteSettings:
    url: str  # http://host:port or http://host:port/v1
    api_key: str = ""
    model: str = ""  # "": the first model the server lists
    timeout_s: float = 600.0


def api_base(url: str) -> str:
    base = url.strip().rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class RemoteBackend:
    def __init__(self, settings: RemoteSettings):
        import httpx
        self.settings = settings
        self.base = api_base(settings.url)
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(settings.timeout_s, connect=5.0))
        self.model = settings.model
        self.label = f"remote: {self.base}"

    def load(self, progress: Callable[[LoadProgress], None]) -> None:
        """Check that the server answers, and pick its first model when none is set."""
        progress(LoadProgress(f"Connecting to {self.base}"))
        data = self._json(self._request("GET", "/models"))
        if not self.model:
            models = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
            if not models:
                raise BackendError(f"{self.base}/models lists no model; set the model name in Model → Remote")
            self.model = models[0]
        self.label = f"remote: {self.model} at {self.base}"
        progress(LoadProgress("Ready", 1.0))

    def submit(self, request: TurnRequest) -> "RemoteTurn":
        return RemoteTurn(self, request)

    def close(self) -> None:
        self.client.close()

    def _request(self, method: str, path: str, **kwargs):
        import httpx
        try:
            resp = self.client.request(method, self.base + path, **kwargs)
        except httpx.HTTPError as e:
            raise BackendError(_connect_error(self.base, e)) from None
        _check_status(self.base + path, resp.status_code, resp.text)
        return resp

    @staticmethod
    def _json(resp) -> dict:
        try:
            data = resp.json()
        except ValueError:
            raise BackendError(f"{resp.url}: the answer is not JSON; is this an OpenAI-compatible server?") from None
        return data if isinstance(data, dict) else {}


class RemoteTurn:
    def __init__(self, backend: RemoteBackend, request: TurnRequest):
        self.backend = backend
        self.request = request
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    def body(self) -> dict:
        p = self.request.params
        body = {"model": self.backend.model, "messages": self.request.messages, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": p.temperature, "top_p": p.top_p}
        if p.max_tokens:
            body["max_tokens"] = p.max_tokens
        if p.seed is not None:
            body["seed"] = p.seed
        return body

    def __iter__(self) -> Iterator[TurnChunk]:
        import httpx
        b = self.backend
        clock, calls, finish, usage = _Clock(), {}, "stop", {}
        url = b.base + "/chat/completions"
        try:
            with b.client.stream("POST", url, json=self.body()) as resp:
                if resp.status_code != 200:
                    _check_status(url, resp.status_code, resp.read().decode("utf-8", "replace"))
                for data in _sse_events(resp.iter_lines()):
                    if self._cancel.is_set():
                        break
                    if data.get("usage"):
                        usage = data["usage"]
                    for choice in data.get("choices") or []:
                        delta = choice.get("delta") or {}
                        reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                        content = delta.get("content") or ""
                        _merge_tool_calls(calls, delta.get("tool_calls") or [])
                        if reasoning or content:
                            clock.token()
                            yield TurnChunk(reasoning=reasoning, content=content)
                        finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as e:
            if not self._cancel.is_set():
                raise BackendError(_connect_error(b.base, e)) from None
        stats = clock.stats(usage.get("prompt_tokens", 0), usage.get("completion_tokens"))
        if self._cancel.is_set():
            yield TurnChunk(finish_reason=FINISH_CANCELLED, stats=stats)
            return
        tool_calls = [ToolCall(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())]
        yield TurnChunk(tool_calls=tool_calls, finish_reason=finish, stats=stats)


def _sse_events(lines) -> Iterator[dict]:
    """`data: {json}` lines of a server-sent event stream, until `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            data = json.loads(payload)
        except ValueError:
            raise BackendError(f"the server sent an event that is not JSON: {payload[:120]!r}") from None
        if isinstance(data, dict) and data.get("error"):
            err = data["error"]
            raise BackendError(f"the server stopped the answer: {err.get('message', err) if isinstance(err, dict) else err}")
        if isinstance(data, dict):
            yield data


def _merge_tool_calls(calls: dict[int, dict], deltas: list[dict]) -> None:
    """OpenAI streams a tool call in pieces keyed by index: the id and name first, then the
    arguments text in fragments."""
    for d in deltas:
        c = calls.setdefault(d.get("index", len(calls)), {"id": "", "name": "", "arguments": ""})
        c["id"] = d.get("id") or c["id"]
        fn = d.get("function") or {}
        c["name"] += fn.get("name") or ""
        c["arguments"] += fn.get("arguments") or ""


def _connect_error(base: str, e: Exception) -> str:
    import httpx
    if isinstance(e, httpx.ConnectError):
        return (f"Could not connect to {base} ({e}). Is the server running, and is the URL right? "
                "Change it in Model → Remote server.")
    if isinstance(e, httpx.TimeoutException):
        return f"{base} did not answer in time ({type(e).__name__}); is the server overloaded?"
    return f"The connection to {base} failed: {e}"


def _check_status(url: str, status: int, text: str) -> None:
    if status == 200:
        return
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:300]
    if status in (401, 403):
        raise BackendError(f"{url} refused the API key (HTTP {status}): {message}. Check the key in Model → Remote server.")
    raise BackendError(f"{url} answered HTTP {status}: {message}")
