"""The engine: the single owner of a loaded model, serving many requests at once.

    engine = Engine.load("path/to/model", EngineSettings(slots=2, context=8192))
    handle = engine.submit(EngineRequest(prompt_ids, SamplingParams(temperature=0.0)))
    for chunk in handle:          # GenerationChunk: reasoning / content / tool_calls deltas,
        ...                       # the last one has finish_reason and timings
    handle.cancel()               # from any thread: stops within one step, frees the slot
    engine.close()                # drain (finish what was accepted) and stop the worker

Requests wait in a bounded queue; one worker thread runs them with continuous batching. Each step
the worker (1) drops cancelled requests, (2) admits queued requests into free slots, (3) runs one
chunk of at most `prefill_chunk` prompt tokens for one joining request, so running streams keep
flowing while a long prompt is read, and (4) decodes one token for every running request in one
`model.decode_batch` call. Requests join and leave between steps.

Prefix reuse: the KV caches of recently finished requests are kept (a few, least recently used
first out); a new prompt starts from the one sharing its longest prefix, as `Session` does for one
conversation, so the next turn of a chat computes only its new tokens.

Memory: the KV caches of all slots and of the prefix store, each sized for the full context, are
checked against the memory available before any is allocated (both numbers in the error).

Test hooks: `EngineRequest.forced_tokens` / `logits_processor` and `Engine.request_hook` let Python
code drive the model's output (random test weights cannot be made to call a tool otherwise). The
HTTP API never sets them; they are reachable only from Python in the same process.

Every request's output is independent of the others: a request decodes the same tokens alone or
next to others (the model's `decode_batch` is batch-invariant: row b equals `decode` of token b),
and its sampler owns its seeded RNG.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import ContextLengthError, ErnieEdgeError
from .generate import (FINISH_LENGTH, FINISH_STOP, GenerationChunk, GenerationResult, Timings,
                       _TextPipeline, check_context)
from .kv_cache import check_kv_budget, kv_bytes
from .sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

FINISH_CANCELLED = "cancelled"  # the request was cancelled (a client that went away)
FINISH_ERROR = "error"  # the model failed on this request; iterating its handle raises the error
DEFAULT_CONTEXT = 8192
_ANSWER_CUE = "\n\n<response>\n"  # what a reasoning budget inserts after </think> by default
_RATE_WINDOW = 64  # decode steps averaged for the tokens/s gauge


class EngineError(ErnieEdgeError):
    """The engine cannot take or finish a request."""


class QueueFullError(EngineError):
    """Every slot is busy and the queue is full; try again shortly."""


class EngineClosedError(EngineError):
    """The engine is shutting down and takes no new requests."""


# ---- settings and requests ------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineSettings:
    """How an engine runs its model.

    slots: requests decoded together (each holds a KV cache for up to `context` positions).
    context: positions per request, prompt plus output (capped at the model's own limit).
    queue_size: requests that may wait for a slot; more are refused (QueueFullError).
    prefill_chunk: prompt tokens read per step for a joining request (smaller: running streams
    stall less while a long prompt is read; larger: the prompt is read faster).
    prefix_cache: KV caches of finished requests kept for prefix reuse (None: as many as slots).
    kv_budget_bytes: memory the KV caches may take (None: the memory available at start).
    threads, kv_dtype, device, gpu_experts: used by `Engine.load` when it loads the model (see
    `ernie_edge.load`; device "cuda" / "auto" places it on a GPU, ernie_edge/placement.py).
    """

    slots: int = 2
    context: int = DEFAULT_CONTEXT
    queue_size: int = 16
    prefill_chunk: int = 256
    prefix_cache: int | None = None
    kv_budget_bytes: int | None = None
    threads: int | None = None
    kv_dtype: str = "f16"
    device: str = "cpu"
    gpu_experts: str | int | None = None

    def __post_init__(self):
        for name, low in (("slots", 1), ("context", 2), ("queue_size", 0), ("prefill_chunk", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise EngineError(f"engine setting {name} must be an integer >= {low}, got {value!r}")
        if self.prefix_cache is not None and (not isinstance(self.prefix_cache, int) or self.prefix_cache < 0):
            raise EngineError(f"engine setting prefix_cache must be an integer >= 0, got {self.prefix_cache!r}")

    @property
    def prefix_entries(self) -> int:
        return self.slots if self.prefix_cache is None else self.prefix_cache


LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class EngineRequest:
    """One generation. prompt_ids: the rendered prompt; params: sampling, stop strings and ids,
    max_tokens (None: until the context is full).

    reasoning_budget: at most this many tokens of thinking, then `</think>` and the answer cue are
    inserted. answer_prefix_ids: tokens forced right after `</think>` (e.g. "\\n\\n\\n<tool_call>\\n"
    to make the model call a tool); they replace the default answer cue of the reasoning budget.
    max_tool_calls: stop once this many complete tool calls were generated (1 for OpenAI's
    parallel_tool_calls=false). logit_bias: token id -> value added to its logit.
    ignore_eos: the model's end-of-turn ids do not stop generation (benchmarks).

    Test hooks, never set by the HTTP API: forced_tokens are emitted, in order, instead of
    sampled tokens; logits_processor(logits [V], generated ids [n]) -> logits [V] runs before
    sampling.
    """

    prompt_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    reasoning_budget: int | None = None
    answer_prefix_ids: Sequence[int] = ()
    max_tool_calls: int | None = None
    logit_bias: dict[int, float] | None = None
    ignore_eos: bool = False
    strict_response: bool = False
    forced_tokens: Sequence[int] = ()
    logits_processor: LogitsProcessor | None = None


@dataclass
class EngineTimings(Timings):
    """Timings plus what the engine knows: time spent queued and tokens spent thinking
    (every token up to and including `</think>`)."""

    queue_s: float = 0.0
    reasoning_tokens: int = 0


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine for /metrics, tests and the GUI."""

    slots: int
    queue_size: int
    active_ids: tuple[str, ...]
    queued_ids: tuple[str, ...]
    steps: int
    requests_total: int
    rejected_total: int
    finished: dict[str, int]
    prompt_tokens_total: int
    cached_tokens_total: int
    completion_tokens_total: int
    decode_tokens_per_s: float

    @property
    def busy_slots(self) -> int:
        return len(self.active_ids)


# ---- the per-request handle ------------------------------------------------------------------------

class RequestHandle:
    """What `Engine.submit` returns: iterate it for the request's chunks (blocking), or `poll()`
    them without blocking after a `set_listener` callback fired (async code). Thread-safe."""

    def __init__(self, engine: "Engine", request: EngineRequest, request_id: str):
        self.id = request_id
        self.request = request
        self._engine = engine
        self._cond = threading.Condition()
        self._chunks: deque[GenerationChunk] = deque()
        self._listener: Callable[[], None] | None = None
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.token_steps: list[int] = []  # the engine step that produced each generated token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop this request: a queued one is dropped at once, a running one within one step."""
        if self.finished:
            return
        self.cancelled = True
        self._engine._cancel(self)

    def set_listener(self, fn: Callable[[], None] | None) -> None:
        """fn() is called from the worker thread after new chunks arrive (and once now if some
        already have). Keep it tiny, e.g. `loop.call_soon_threadsafe(event.set)`."""
        with self._cond:
            self._listener = fn
            ready = bool(self._chunks) or self.finished
        if fn is not None and ready:
            fn()

    def poll(self) -> list[GenerationChunk]:
        """The chunks that arrived since the last call, without blocking."""
        with self._cond:
            out = list(self._chunks)
            self._chunks.clear()
        return out

    def __iter__(self) -> Iterator[GenerationChunk]:
        """The chunks in order, blocking until each arrives. Raises the request's error if the
        model failed on it (after the chunks before the failure)."""
        while True:
            with self._cond:
                while not self._chunks and not self.finished:
                    self._cond.wait()
                chunks = list(self._chunks)
                self._chunks.clear()
                done = self.finished
            yield from chunks
            if done:
                break
        if self.error is not None:
            raise self.error

    def result(self) -> GenerationResult:
        """Wait for the end and return the whole output (as `generate` does)."""
        parts: dict[str, list[str]] = {"text": [], "reasoning": [], "content": []}
        calls, ids, malformed, last = [], [], False, None
        for chunk in self:
            for key, acc in parts.items():
                acc.append(getattr(chunk, key))
            calls.extend(chunk.tool_calls)
            ids.extend(chunk.token_ids)
            malformed |= chunk.malformed
            last = chunk
        return GenerationResult(text="".join(parts["text"]), reasoning="".join(parts["reasoning"]) or None,
                                content="".join(parts["content"]) or None, tool_calls=calls,
                                finish_reason=last.finish_reason, timings=last.timings, token_ids=ids,
                                malformed=malformed)

    # -- called by the worker ------------------------------------------------------------------

    def _push(self, chunk: GenerationChunk, error: BaseException | None = None) -> None:
        with self._cond:
            self._chunks.append(chunk)
            if chunk.finish_reason is not None:
                self.error = error
                self.finish_reason = chunk.finish_reason
            self._cond.notify_all()
            listener = self._listener
        if listener is not None:
            try:
                listener()
            except RuntimeError:  # the listener's event loop is closed: nobody is reading
                pass


# ---- the prefix store ------------------------------------------------------------------------------

class PrefixStore:
    """KV caches of finished requests with the ids they hold, oldest first, at most `capacity`.

    `take(prompt)` returns a cache holding the longest stored prefix of the prompt. A cache whose
    ids are mostly reused (the next turn of its conversation) is moved out of the store; when only
    a small part matches (a shared system prompt) that part is copied and the entry stays."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: list[tuple[np.ndarray, object]] = []  # (ids [L] int64, cache)

    def take(self, prompt: np.ndarray):
        """(cache, n): a cache holding prompt[:n], n < len(prompt); (None, 0) if nothing matches."""
        best, best_n = -1, 0
        for i, (ids, _) in enumerate(self.entries):
            n = _common_prefix(ids, prompt[:-1])
            if n > best_n:
                best, best_n = i, n
        if best < 0:
            return None, 0
        ids, cache = self.entries[best]
        if 2 * best_n >= len(ids):
            del self.entries[best]
        else:
            cache = cache.clone()
        cache.truncate(cache.start + best_n)
        return cache, best_n

    def put(self, ids: np.ndarray, cache) -> None:
        if self.capacity == 0 or len(ids) == 0:
            return
        self.entries.append((ids, cache))
        del self.entries[: max(0, len(self.entries) - self.capacity)]

    def clear(self) -> None:
        self.entries.clear()


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


# ---- one running request ----------------------------------------------------------------------------

class _Sequence:
    """A request in a slot: its cache, the ids the cache holds, the prompt still to read, and its
    sampler / text pipeline."""

    def __init__(self, engine: "Engine", handle: RequestHandle, cache, cached: int):
        req, tok = handle.request, engine.tokenizer
        self.handle = handle
        self.request = req
        self.prompt = np.asarray(req.prompt_ids, dtype=np.int64)  # [P]
        self.cache = cache
        self.fed = list(self.prompt[:cached])  # ids the cache holds
        self.pending = self.prompt[cached:]  # prompt ids still to read
        self.next_token: int | None = None  # sampled, to be fed by the next decode step
        self.max_tokens = req.params.max_tokens or engine.context - len(self.prompt)
        self.sampler = Sampler(req.params, vocab_size=tok.vocab_size, prompt_ids=self.prompt)
        self.text = _TextPipeline(tok, req.params, req.strict_response)
        self.stop_ids = set(req.params.stop_token_ids) | (set() if req.ignore_eos else set(tok.stop_ids()))
        self.forced = deque(int(t) for t in req.forced_tokens)
        self.bias = _bias_row(req.logit_bias, engine.model.config.vocab_size)
        self.history = np.empty(256, dtype=np.int64)  # generated ids, grown by doubling
        self.n = 0
        self.thinking = True
        self.calls = 0
        now = time.perf_counter()
        self.t_admit, self.t_first = now, None
        self.timings = EngineTimings(prompt_tokens=len(self.prompt), cached_tokens=cached,
                                     queue_s=now - handle.submitted_at)


def _bias_row(bias: dict[int, float] | None, vocab: int) -> np.ndarray | None:
    if not bias:
        return None
    row = np.zeros(vocab, np.float32)  # [V]
    for token, value in bias.items():
        row[int(token)] += np.float32(value)
    return row


# ---- the engine -------------------------------------------------------------------------------------

class Engine:
    """Owns a model and runs requests on one worker thread (see the module docstring).

    `request_hook` (test-only, Python only): a function EngineRequest -> EngineRequest applied to
    every submitted request, so tests that go through the HTTP API can still force tokens.
    """

    def __init__(self, model, settings: EngineSettings | None = None):
        self.model = model
        self.settings = settings = settings or EngineSettings()
        self.tokenizer = model.tokenizer
        cfg = model.config
        backend_cap = getattr(getattr(model, "backend", None), "max_context", None)
        self.context = min(settings.context, cfg.max_position_embeddings, backend_cap or cfg.max_position_embeddings)
        self.kv_dtype = getattr(getattr(model, "backend", None), "kv_dtype", "f16")
        caches = settings.slots + settings.prefix_entries
        self.kv_budget_bytes = caches * kv_bytes(cfg, self.context, self.kv_dtype)
        # Refuse before any cache exists: every slot and prefix entry at the full context.
        check_kv_budget(cfg, caches * self.context, available=settings.kv_budget_bytes, kv_dtype=self.kv_dtype)
        self.request_hook: Callable[[EngineRequest], EngineRequest] | None = None
        self._decode_batch = getattr(model, "decode_batch", None) or self._decode_loop
        self._think_end = self.tokenizer.think_end_id
        self._answer_cue = self.tokenizer.encode(_ANSWER_CUE)
        self._think_close = self.tokenizer.encode("\n</think>")
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[RequestHandle] = deque()
        self._active: list[_Sequence] = []
        self._prefix = PrefixStore(settings.prefix_entries)
        self._closing = False
        self._accepted = 0  # submitted and not finished: queued, joining or in a slot
        self._clear_prefix = False
        self._step = 0
        self._counts = {"requests": 0, "rejected": 0, "prompt": 0, "cached": 0, "completion": 0}
        self._finished: dict[str, int] = {}
        self._rate = deque(maxlen=_RATE_WINDOW)  # (tokens, seconds) of recent decode steps
        self._thread = threading.Thread(target=self._run, name="ernie-edge-engine", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, path, settings: EngineSettings | None = None, *, warmup: bool = True,
             progress=None) -> "Engine":
        """Load a model (folder or cached repo id) with the settings' threads, kv_dtype and
        context, compile its kernels (progress: as Model.warmup's), and start an engine on it."""
        from . import load
        settings = settings or EngineSettings()
        model = load(path, threads=settings.threads, max_context=settings.context, kv_dtype=settings.kv_dtype,
                     device=settings.device, gpu_experts=settings.gpu_experts)
        if warmup and model.backend_name == "cpu":
            model.warmup(progress)
        return cls(model, settings)

    # ---- the public API -------------------------------------------------------------------------

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue a request; returns its handle. Raises ContextLengthError (prompt plus max_tokens
        longer than the context, both numbers in the message), QueueFullError, EngineClosedError,
        or EngineError for token ids outside the vocabulary."""
        if self.request_hook is not None:
            request = self.request_hook(request)
        self._check(request)
        handle = RequestHandle(self, request, request.request_id or uuid.uuid4().hex)
        with self._lock:
            if self._closing:
                raise EngineClosedError("the engine is shutting down")
            if self._accepted >= self.settings.slots + self.settings.queue_size:
                self._counts["rejected"] += 1
                raise QueueFullError(f"all {self.settings.slots} slots are busy and {len(self._queue)} "
                                     "requests are waiting; try again shortly")
            self._counts["requests"] += 1
            self._accepted += 1
            self._queue.append(handle)
            self._wake.notify()
        return handle

    def stats(self) -> EngineStats:
        with self._lock:
            tokens = sum(n for n, _ in self._rate)
            seconds = sum(s for _, s in self._rate)
            return EngineStats(
                slots=self.settings.slots, queue_size=self.settings.queue_size,
                active_ids=tuple(s.handle.id for s in self._active), queued_ids=tuple(h.id for h in self._queue),
                steps=self._step, requests_total=self._counts["requests"], rejected_total=self._counts["rejected"],
                finished=dict(self._finished), prompt_tokens_total=self._counts["prompt"],
                cached_tokens_total=self._counts["cached"], completion_tokens_total=self._counts["completion"],
                decode_tokens_per_s=tokens / seconds if seconds > 0 else 0.0)

    def clear_prefix_cache(self) -> None:
        """Forget the kept KV caches (the next requests compute their prompts in full)."""
        with self._lock:
            self._clear_prefix = True
            self._wake.notify()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish the accepted ones (drain) or cancel them; stop the worker."""
        with self._lock:
            self._closing = True
            handles = [] if drain else list(self._queue) + [s.handle for s in self._active]
            self._wake.notify()
        for handle in handles:
            handle.cancel()
        self._thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close(drain=False)

    # ---- checks ---------------------------------------------------------------------------------

    def _check(self, request: EngineRequest) -> None:
        ids = np.asarray(request.prompt_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise EngineError("prompt_ids must be a non-empty list of token ids")
        vocab = self.model.config.vocab_size
        for name, values in (("prompt_ids", ids), ("forced_tokens", np.asarray(request.forced_tokens, np.int64)),
                             ("answer_prefix_ids", np.asarray(request.answer_prefix_ids, np.int64))):
            bad = (values < 0) | (values >= vocab)
            if bad.any():
                raise EngineError(f"{name}: token id {int(values[np.argmax(bad)])} is outside the "
                                  f"vocabulary [0, {vocab})")
        for token in request.logit_bias or {}:
            if not 0 <= int(token) < vocab:
                raise EngineError(f"logit_bias: token id {token} is outside the vocabulary [0, {vocab})")
        max_tokens = request.params.max_tokens or max(1, self.context - len(ids))
        check_context(len(ids), max_tokens, self.context)

    # ---- the worker -----------------------------------------------------------------------------

    def _cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            queued = handle in self._queue
            if queued:
                self._queue.remove(handle)
            self._wake.notify()
        if queued:
            self._count_finish(FINISH_CANCELLED)
            handle._push(GenerationChunk(finish_reason=FINISH_CANCELLED, timings=EngineTimings()))

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._active and not self._closing:
                    self._wake.wait()
                if self._closing and not self._queue and not self._active:
                    return
                if self._clear_prefix:
                    self._prefix.clear()
                    self._clear_prefix = False
                joining = []
                while self._queue and len(self._active) + len(joining) < self.settings.slots:
                    joining.append(self._queue.popleft())
            for handle in joining:
                self._admit(handle)
            try:
                self._step_once()
            except Exception as e:  # noqa: BLE001 (a bug; the worker must survive it)
                self._fail(list(self._active), e)

    def _admit(self, handle: RequestHandle) -> None:
        """Give a queued request a slot: a cache from the prefix store, or a new one."""
        prompt = np.asarray(handle.request.prompt_ids, dtype=np.int64)
        cache, cached = self._prefix.take(prompt)
        try:
            seq = _Sequence(self, handle, cache if cache is not None else self.model.new_cache(), cached)
        except Exception as e:  # noqa: BLE001 (a bad request must not stop the worker)
            self._fail_handles([handle], e)
            return
        with self._lock:
            self._active.append(seq)
            self._counts["prompt"] += len(prompt)
            self._counts["cached"] += cached

    def _step_once(self) -> None:
        """One step: drop cancelled requests, read one prompt chunk, decode every running request."""
        for seq in [s for s in self._active if s.handle.cancelled]:
            self._finish(seq, FINISH_CANCELLED)
        decoding = [s for s in self._active if s.next_token is not None]
        reading = next((s for s in self._active if len(s.pending)), None)
        if reading is not None:
            self._prefill_chunk(reading)
        if decoding:
            self._decode(decoding)
        with self._lock:
            self._step += 1

    def _prefill_chunk(self, seq: _Sequence) -> None:
        chunk = seq.pending[: self.settings.prefill_chunk]
        try:
            logits = self.model.prefill(chunk, seq.cache)
        except Exception as e:  # noqa: BLE001
            self._fail([seq], e)
            return
        seq.fed.extend(int(t) for t in chunk)
        seq.pending = seq.pending[len(chunk):]
        if not len(seq.pending):
            seq.timings.prefill_s = time.perf_counter() - seq.t_admit
            self._next_token(seq, logits)

    def _decode(self, batch: list[_Sequence]) -> None:
        t = time.perf_counter()
        tokens = [s.next_token for s in batch]
        try:
            logits = self._decode_batch(tokens, [s.cache for s in batch])  # [B, V]
        except Exception as e:  # noqa: BLE001
            self._fail(batch, e)
            return
        for seq, token in zip(batch, tokens):
            seq.fed.append(token)
            seq.next_token = None
        with self._lock:
            self._rate.append((len(batch), time.perf_counter() - t))
        for seq, row in zip(batch, logits):
            self._next_token(seq, row)

    def _decode_loop(self, tokens: Sequence[int], caches: Sequence) -> np.ndarray:
        """decode_batch for a model without one: each sequence in turn (the same numbers)."""
        return np.stack([self.model.decode(t, c) for t, c in zip(tokens, caches)])

    # ---- one token --------------------------------------------------------------------------------

    def _choose(self, seq: _Sequence, logits: np.ndarray) -> int:
        if seq.forced:
            return seq.forced.popleft()
        history = seq.history[: seq.n]
        if seq.bias is not None:
            logits = logits + seq.bias
        if seq.request.logits_processor is not None:
            logits = seq.request.logits_processor(logits, history)
        return seq.sampler.sample(logits, history)

    def _next_token(self, seq: _Sequence, logits: np.ndarray) -> None:
        try:
            self._sample_and_emit(seq, logits)
        except Exception as e:  # noqa: BLE001 (a failing sampler or hook ends only its request)
            self._fail([seq], e)

    def _sample_and_emit(self, seq: _Sequence, logits: np.ndarray) -> None:
        """Pick the next token, stream its text, and decide whether the request is done
        (the same rules as generate.stream_generate)."""
        token = self._choose(seq, logits)
        now = time.perf_counter()
        if seq.t_first is None:
            seq.t_first = now
            seq.timings.ttft_s = now - seq.handle.submitted_at
        if seq.n == len(seq.history):
            seq.history = np.concatenate([seq.history, np.empty_like(seq.history)])
        seq.history[seq.n] = token
        seq.n += 1
        seq.timings.completion_tokens = seq.n
        seq.handle.token_steps.append(self._step)
        if seq.thinking:
            seq.timings.reasoning_tokens += 1
        if token in seq.stop_ids:
            return self._finish(seq, FINISH_STOP)
        chunk, stopped = seq.text.feed(token)
        seq.handle._push(chunk)
        seq.calls += len(chunk.tool_calls)
        if stopped or (seq.request.max_tool_calls is not None and seq.calls >= seq.request.max_tool_calls):
            return self._finish(seq, FINISH_STOP)
        if seq.n >= seq.max_tokens:
            return self._finish(seq, FINISH_LENGTH)
        self._steer(seq, token)
        seq.next_token = token

    def _steer(self, seq: _Sequence, token: int) -> None:
        """Forced answer openings: after `</think>` the request's answer_prefix_ids; at the end of
        a reasoning budget, `</think>` and then the answer opening."""
        if not seq.thinking:
            return
        req = seq.request
        if token == self._think_end:
            seq.thinking = False
            seq.forced.extendleft(reversed(list(req.answer_prefix_ids)))
        elif req.reasoning_budget is not None and seq.n >= req.reasoning_budget and not seq.forced:
            seq.forced.extend(self._think_close)
            seq.forced.extend(req.answer_prefix_ids or self._answer_cue)
            seq.thinking = False
            seq.timings.reasoning_tokens += len(self._think_close)  # the forced </think> is thinking too

    # ---- leaving ----------------------------------------------------------------------------------

    def _finish(self, seq: _Sequence, reason: str) -> None:
        now = time.perf_counter()
        seq.timings.decode_s = now - (seq.t_first or now)
        if seq.t_first is None:
            seq.timings.prefill_s = now - seq.t_admit
        chunk = seq.text.finish(reason, seq.timings)
        with self._lock:
            self._active.remove(seq)
            self._counts["completion"] += seq.n
        self._prefix.put(np.asarray(seq.fed, dtype=np.int64), seq.cache)  # `fed` is what it holds
        self._count_finish(chunk.finish_reason)
        seq.handle._push(chunk)

    def _fail(self, seqs: list[_Sequence], error: Exception) -> None:
        """The model raised on these requests: end each with the error (their caches are dropped,
        since the failed step may have half-written them)."""
        with self._lock:
            for seq in seqs:
                if seq in self._active:
                    self._active.remove(seq)
        self._fail_handles([s.handle for s in seqs], error)

    def _fail_handles(self, handles: list[RequestHandle], error: Exception) -> None:
        if not isinstance(error, ErnieEdgeError):
            log.error("the engine failed on %d request(s)", len(handles), exc_info=error)
            error = EngineError(f"internal error while generating ({type(error).__name__}); "
                                "see the server log")
        for handle in handles:
            self._count_finish(FINISH_ERROR)
            handle._push(GenerationChunk(finish_reason=FINISH_ERROR, timings=EngineTimings()), error)

    def _count_finish(self, reason: str) -> None:
        """Called once for every accepted request, when it ends."""
        with self._lock:
            self._finished[reason] = self._finished.get(reason, 0) + 1
            self._accepted -= 1


__all__ = ["Engine", "EngineSettings", "EngineRequest", "EngineStats", "EngineTimings", "RequestHandle",
           "EngineError", "QueueFullError", "EngineClosedError", "ContextLengthError", "PrefixStore",
           "FINISH_CANCELLED", "FINISH_ERROR"]
