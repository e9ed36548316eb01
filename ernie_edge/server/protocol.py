"""The OpenAI-compatible wire format: pydantic models of requests and responses.

Requests are validated strictly (no "10" for 10, no NaN or infinity); fields ernie-edge does not
know are ignored, as OpenAI clients send many. Every validation failure becomes a 400 in OpenAI's
error shape (app.py). Responses are built as plain dicts by service.py; the response models here
document them in the OpenAPI spec.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_MESSAGES = 10_000
MAX_TOOLS = 128
MAX_STOP = 16
MAX_LOGIT_BIAS = 1024
MAX_SEED = 2**64 - 1

Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


# ---- shared request parts --------------------------------------------------------------------------

class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCallIn(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    """system / developer (read as system) / user / assistant / tool. Content is text or a list
    of text parts; assistant turns may carry tool_calls and their reasoning."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class FunctionDef(_Request):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    """type "text" (the default) or "json_object"; "json_schema" is refused (no constrained decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _Sampling(_Request):
    """Sampling fields shared by both endpoints (None: the model's generation_config.json)."""

    temperature: Annotated[Finite, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Finite, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] | None = None
    min_p: Annotated[Finite, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[Finite, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Finite, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[Finite, Field(ge=0.01, le=10)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: Annotated[str, Field(min_length=1, max_length=1024)] | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=1024)]], Field(max_length=MAX_STOP)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    logit_bias: Annotated[dict[str, Annotated[Finite, Field(ge=-100, le=100)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    logprobs: Any = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (vLLM): generate to max_tokens whatever the model says
    model: str | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1 << 31)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=1 << 31)] | None = None
    response_format: ResponseFormat | None = None
    reasoning_budget: Annotated[int, Field(ge=0, le=1 << 31)] | None = None  # extension


class CompletionRequest(_Sampling):
    """POST /v1/completions: raw text (or token ids) in, raw text out; no chat template."""

    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                            Field(min_length=1, max_length=1)] | Annotated[
        list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=1 << 31)] | None = 16
    echo: bool | None = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None


# ---- responses (documentation; service.py builds them as dicts) ------------------------------------

class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorBody


class PromptTokensDetails(_Response):
    cached_tokens: int


class CompletionTokensDetails(_Response):
    reasoning_tokens: int


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class FunctionCallOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(_Response):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: None = None


class ChatCompletion(_Response):
    """The non-streamed answer. Streamed (`stream: true`), the endpoint sends server-sent events:
    `data: {chat.completion.chunk}` lines, then `data: [DONE]`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int | None = None


class ModelList(_Response):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Response):
    status: Literal["ok", "loading", "error"]
    message: str | None = None

