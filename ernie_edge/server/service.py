"""Protocol <-> engine: turns OpenAI requests into `EngineRequest`s and the engine's chunks into
OpenAI responses and server-sent events.

Mapping of ERNIE-4.5 Thinking's output (parsers.py does the splitting):
- the reasoning goes to `reasoning_content` (or `reasoning`, or both: ServeSettings.reasoning_field),
  never into `content`;
- each `<tool_call>` block becomes one entry of `tool_calls` (streamed whole, with index, id,
  type and function name/arguments), and the turn ends with finish_reason "tool_calls";
- usage counts the thinking tokens in completion_tokens_details.reasoning_tokens and the prompt
  tokens reused from an earlier request in prompt_tokens_details.cached_tokens.

tool_choice: "none" leaves the tools out of the prompt; "auto" shows them; "required" and a named
function force the answer to open a tool call (and name the function) right after `</think>`.
parallel_tool_calls=false ends the turn after the first call. response_format json_object adds an
instruction to answer with one JSON object and forces the answer to open with "{"; the finished
non-streamed answer is checked and a non-JSON answer is logged and counted in /metrics
(ernie_edge_json_invalid_total). Without constrained decoding nothing stronger is promised.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from ..engine import (FINISH_CANCELLED, FINISH_ERROR, Engine, EngineClosedError, EngineError, EngineRequest, QueueFullError,
                      RequestHandle)
from ..errors import ContextLengthError, ErnieEdgeError
from ..generate import GenerationChunk, render_prompt
from ..sampling import SamplingParams, SamplingParamsError
from .protocol import ChatCompletionRequest, CompletionRequest
from .settings import ServeSettings

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
JSON_INSTRUCTION = "Answer with a single JSON object and nothing else."
_TOOL_OPENING = "\n\n\n<tool_call>\n"
_JSON_OPENING = "\n\n<response>\n{"


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Prepared:
    """A validated request ready for the engine, with what the response needs."""

    id: str
    kind: str  # "chat" or "completion"
    request: EngineRequest
    stream: bool
    include_usage: bool
    json_mode: bool = False
    created: int = 0


class Service:
    """One loaded model behind the API. Thread-safe: `prepare_*` may run in worker threads."""

    def __init__(self, engine: Engine, settings: ServeSettings, model_id: str):
        self.engine = engine
        self.model = engine.model
        self.tokenizer = engine.tokenizer
        self.settings = settings
        self.model_id = model_id
        self.created = int(time.time())
        self.defaults = SamplingParams.from_generation_config(self.model.path)
        self.template = self.model.chat_template  # loaded now, not by racing requests (a broken one fails here)
        self.json_invalid = 0

    # ---- protocol -> engine ----------------------------------------------------------------------

    def prepare_chat(self, body: ChatCompletionRequest) -> Prepared:
        """Render the messages, pick the sampling settings and answer forcing. Raises ApiError 400."""
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []] or None
        named = None if isinstance(body.tool_choice, str | None) else body.tool_choice.function.name
        choice = "function" if named else body.tool_choice or "auto"  # none / auto / required / function
        if choice != "auto" and choice != "none" and not tools:
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        if named is not None and named not in {t["function"]["name"] for t in tools}:
            raise ApiError(400, f"tool_choice names {named!r}, which is not in tools", param="tool_choice")
        fmt = body.response_format.type if body.response_format else "text"
        if fmt == "json_schema":
            raise ApiError(400, "response_format json_schema is not supported (no constrained decoding); "
                                "use json_object", param="response_format")
        self._refuse_logprobs(body.logprobs)
        messages = [_message_dict(m) for m in body.messages]
        if fmt == "json_object":
            messages = _with_instruction(messages, JSON_INSTRUCTION)
        try:
            ids = render_prompt(self.model, messages, tools=None if choice == "none" else tools)
        except ErnieEdgeError as e:
            raise ApiError(400, str(e), param="messages") from None
        opening = _answer_opening(choice, named, fmt == "json_object", bool(tools))
        max_tokens = body.max_completion_tokens or body.max_tokens
        request = EngineRequest(
            prompt_ids=ids, params=self._sampling(body, max_tokens), reasoning_budget=body.reasoning_budget,
            answer_prefix_ids=self.tokenizer.encode(opening) if opening else (),
            max_tool_calls=1 if body.parallel_tool_calls is False else None,
            logit_bias=self._logit_bias(body.logit_bias), ignore_eos=body.ignore_eos)
        return self._prepared("chatcmpl", "chat", request, body, json_mode=fmt == "json_object")

    def prepare_completion(self, body: CompletionRequest) -> Prepared:
        """A raw prompt (text or token ids), no chat template. Raises ApiError 400."""
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        self._refuse_logprobs(body.logprobs)
        prompt = body.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], str):
            prompt = prompt[0]
        try:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        except ErnieEdgeError as e:
            raise ApiError(400, str(e), param="prompt") from None
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", param="prompt")
        request = EngineRequest(prompt_ids=ids, params=self._sampling(body, body.max_tokens),
                                logit_bias=self._logit_bias(body.logit_bias), ignore_eos=body.ignore_eos)
        return self._prepared("cmpl", "completion", request, body)

    def submit(self, p: Prepared) -> RequestHandle:
        """Queue the request. Raises ApiError: 400 (context too short: both numbers), 503 (queue
        full, with Retry-After; or shutting down)."""
        try:
            return self.engine.submit(p.request)
        except ContextLengthError as e:
            raise ApiError(400, f"This model's maximum context length is {self.engine.context} tokens: {e}",
                           param="messages" if p.kind == "chat" else "prompt",
                           code="context_length_exceeded") from None
        except QueueFullError as e:
            raise ApiError(503, str(e), type="server_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineClosedError as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        except EngineError as e:
            raise ApiError(400, str(e), param="prompt" if p.kind == "completion" else "messages") from None

    def _prepared(self, prefix: str, kind: str, request: EngineRequest, body, json_mode: bool = False) -> Prepared:
        rid = f"{prefix}-{uuid.uuid4().hex[:24]}"
        request.request_id = rid
        options = body.stream_options
        return Prepared(id=rid, kind=kind, request=request, stream=bool(body.stream),
                        include_usage=bool(body.stream and options and options.include_usage),
                        json_mode=json_mode, created=int(time.time()))

    def _sampling(self, body, max_tokens: int | None) -> SamplingParams:
        stop = body.stop
        values = dict(temperature=body.temperature, top_p=body.top_p, min_p=body.min_p,
                      top_k=0 if body.top_k == -1 else body.top_k, repetition_penalty=body.repetition_penalty,
                      presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                      seed=body.seed, max_tokens=max_tokens,
                      stop=None if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop)))
        try:
            return dataclasses.replace(self.defaults, **{k: v for k, v in values.items() if v is not None})
        except SamplingParamsError as e:
            raise ApiError(400, str(e), param=e.param) from None

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        if not bias:
            return None
        out = {}
        for key, value in bias.items():
            if not key.isdigit() or not 0 <= int(key) < self.tokenizer.vocab_size:
                raise ApiError(400, f"logit_bias: {key[:40]!r} is not a token id in [0, "
                                    f"{self.tokenizer.vocab_size})", param="logit_bias")
            out[int(key)] = value
        return out

    @staticmethod
    def _refuse_logprobs(logprobs) -> None:
        if logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs are not supported", param="logprobs")

    # ---- engine -> protocol ----------------------------------------------------------------------

    async def chat_response(self, p: Prepared, handle: RequestHandle, request) -> dict | None:
        """The whole answer as a chat.completion (None if the client went away)."""
        reasoning, content, calls, last = [], [], [], None
        async for chunk in iter_chunks(handle, request):
            reasoning.append(chunk.reasoning)
            content.append(chunk.content)
            calls.extend(chunk.tool_calls)
            last = chunk
        if last is None or last.finish_reason is None:
            return None  # the client went away
        _raise_unfinished(last.finish_reason, handle)
        message = {"role": "assistant", "content": "".join(content) or None}
        self._put_reasoning(message, "".join(reasoning) or None)
        if calls:
            message["tool_calls"] = [_call_dict(c) for c in calls]
        if p.json_mode and last.finish_reason == "stop":
            self._check_json(p, message["content"])
        choice = {"index": 0, "message": message, "finish_reason": last.finish_reason, "logprobs": None}
        return self._envelope(p, "chat.completion", [choice], usage=usage_dict(last.timings))

    async def chat_events(self, p: Prepared, handle: RequestHandle) -> AsyncIterator[str]:
        """Server-sent events of a streamed chat completion, ending with `data: [DONE]`."""
        usage = {"usage": None} if p.include_usage else {}

        def event(delta: dict, finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return sse(self._envelope(p, "chat.completion.chunk", [choice], **usage))

        yield event({"role": "assistant", "content": ""})
        n_calls = 0
        async for chunk in iter_chunks(handle):
            delta = {}
            if chunk.reasoning:
                self._put_reasoning(delta, chunk.reasoning)
            if chunk.content:
                delta["content"] = chunk.content
            if chunk.tool_calls:
                delta["tool_calls"] = [dict(index=n_calls + i, **_call_dict(c)) for i, c in enumerate(chunk.tool_calls)]
                n_calls += len(chunk.tool_calls)
            if delta:
                yield event(delta)
            if chunk.finish_reason == FINISH_ERROR:
                yield sse(_generation_error(handle.error).body())
            elif chunk.finish_reason is not None:
                yield event({}, chunk.finish_reason)
                if p.include_usage:
                    yield sse(self._envelope(p, "chat.completion.chunk", [], usage=usage_dict(chunk.timings)))
        yield "data: [DONE]\n\n"

    async def completion_response(self, p: Prepared, handle: RequestHandle, request) -> dict | None:
        text, last = [], None
        async for chunk in iter_chunks(handle, request):
            text.append(chunk.text)
            last = chunk
        if last is None or last.finish_reason is None:
            return None  # the client went away
        _raise_unfinished(last.finish_reason, handle)
        choice = {"index": 0, "text": "".join(text), "finish_reason": _completion_finish(last.finish_reason),
                  "logprobs": None}
        return self._envelope(p, "text_completion", [choice], usage=usage_dict(last.timings))

    async def completion_events(self, p: Prepared, handle: RequestHandle) -> AsyncIterator[str]:
        usage = {"usage": None} if p.include_usage else {}

        def event(text: str, finish: str | None = None) -> str:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return sse(self._envelope(p, "text_completion", [choice], **usage))

        async for chunk in iter_chunks(handle):
            if chunk.finish_reason == FINISH_ERROR:
                yield sse(_generation_error(handle.error).body())
            elif chunk.text or chunk.finish_reason:
                yield event(chunk.text, _completion_finish(chunk.finish_reason))
            if chunk.finish_reason not in (None, FINISH_ERROR) and p.include_usage:
                yield sse(self._envelope(p, "text_completion", [], usage=usage_dict(chunk.timings)))
        yield "data: [DONE]\n\n"

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "ernie-edge",
                "context_length": self.engine.context}

    def _envelope(self, p: Prepared, kind: str, choices: list, **extra) -> dict:
        return {"id": p.id, "object": kind, "created": p.created, "model": self.model_id,
                "system_fingerprint": None, "choices": choices, **extra}

    def _put_reasoning(self, target: dict, text: str | None) -> None:
        field = self.settings.reasoning_field
        if field in ("reasoning_content", "both"):
            target["reasoning_content"] = text
        if field in ("reasoning", "both"):
            target["reasoning"] = text

    def _check_json(self, p: Prepared, content: str | None) -> None:
        try:
            ok = isinstance(json.loads(content or ""), dict)
        except ValueError:
            ok = False
        if not ok:
            self.json_invalid += 1
            log.warning("%s: response_format json_object, but the answer is not a JSON object", p.id)


# ---- helpers --------------------------------------------------------------------------------------

async def iter_chunks(handle: RequestHandle, request=None,
                      poll_s: float = DISCONNECT_POLL_S) -> AsyncIterator[GenerationChunk]:
    """The handle's chunks, awaited without blocking the event loop. The request is cancelled
    when the consumer stops early (a streamed response whose client left is cancelled by
    Starlette) or, given `request`, when its client disconnects (checked every poll_s)."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    handle.set_listener(lambda: loop.call_soon_threadsafe(ready.set))
    checked = loop.time()
    try:
        while True:
            ready.clear()
            chunks = handle.poll()
            for chunk in chunks:
                yield chunk
                if chunk.finish_reason is not None:
                    return
            if request is not None and loop.time() - checked >= poll_s:
                checked = loop.time()
                if await request.is_disconnected():
                    return
            if not chunks:
                try:
                    await asyncio.wait_for(ready.wait(), poll_s)
                except TimeoutError:
                    pass
    finally:
        handle.set_listener(None)
        handle.cancel()  # a no-op once finished; stops the work when the client has gone


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage_dict(t) -> dict:
    return {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
            "total_tokens": t.prompt_tokens + t.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": t.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": getattr(t, "reasoning_tokens", 0)}}


def _call_dict(call) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _completion_finish(reason: str | None) -> str | None:
    return "stop" if reason == "tool_calls" else reason


def _raise_unfinished(reason: str, handle: RequestHandle) -> None:
    if reason == FINISH_ERROR:
        raise _generation_error(handle.error)
    if reason == FINISH_CANCELLED:
        raise ApiError(503, "the request was cancelled: the server is shutting down", type="server_error",
                       code="cancelled")


def _generation_error(error: BaseException | None) -> ApiError:
    if isinstance(error, EngineError):
        return ApiError(500, str(error), type="server_error", code="internal_error")
    return ApiError(503, str(error), type="server_error", code="generation_failed")


def _answer_opening(choice: str, named: str | None, json_mode: bool, tools: bool) -> str:
    """Text forced right after `</think>`: a tool call's opening (with the function's name when
    one is named), or the answer's opening "{" in json_object mode ("" when nothing is forced)."""
    if choice in ("required", "function"):
        return _TOOL_OPENING + (f'{{"name": {json.dumps(named, ensure_ascii=False)}, "arguments": ' if named else "")
    if json_mode and not (tools and choice == "auto"):
        return _JSON_OPENING
    return ""


def _message_dict(m) -> dict:
    d = m.model_dump(exclude_none=True)
    if d["role"] == "developer":
        d["role"] = "system"
    return d


def _with_instruction(messages: list[dict], text: str) -> list[dict]:
    """Add an instruction to the system message (a new one at the start if there is none)."""
    first = messages[0]
    if first["role"] == "system" and isinstance(first.get("content"), str):
        return [{**first, "content": f"{first['content']}\n\n{text}"}] + messages[1:]
    return [{"role": "system", "content": text}] + messages
