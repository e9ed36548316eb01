"""Generation, layered as in mlx-lm: `generate_step` (token ids) -> `stream_generate` (chunks with
text, reasoning/content/tool-call deltas and timings) -> `generate` (one result).

A `Session` owns a KV cache and the ids it holds; a new prompt that shares a prefix with them
(the next turn of a chat) reuses those positions instead of recomputing them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .errors import ContextLengthError, ErnieEdgeError
from .parsers import StreamParser, ToolCall
from .sampling import Sampler, SamplingParams, StopChecker

FINISH_STOP, FINISH_LENGTH, FINISH_TOOLS = "stop", "length", "tool_calls"
FINISH_CANCELLED = "cancelled"  # the caller stopped the stream (Ctrl-C in the command line)
DEFAULT_MAX_TOKENS = 4096


@dataclass
class Timings:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the session's KV cache
    completion_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # request start -> first generated token
    decode_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = self.completion_tokens - 1  # the first token comes out of prefill
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tok_s"] = round(self.prefill_tok_s, 3)
        d["decode_tok_s"] = round(self.decode_tok_s, 3)
        return d


@dataclass
class GenerationChunk:
    """One step of a stream. Deltas may be empty (e.g. a token held back mid-tag)."""
    text: str = ""  # raw text delta, tags included
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # set on the last chunk only
    malformed: bool = False  # a tool-call block was invalid and went to content
    timings: Timings | None = None


@dataclass
class GenerationResult:
    text: str
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str
    timings: Timings
    token_ids: list[int]
    malformed: bool = False

    @property
    def usage(self) -> dict:
        t = self.timings
        return {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
                "total_tokens": t.prompt_tokens + t.completion_tokens,
                "cached_tokens": t.cached_tokens}

    def to_dict(self) -> dict:
        """The `generate --json` object. `reasoning_content` (the server's and OpenAI-style clients'
        name) repeats `reasoning`; `tool_calls` is null when there are none, as in the server."""
        calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in self.tool_calls]
        return {"reasoning": self.reasoning, "reasoning_content": self.reasoning, "content": self.content,
                "tool_calls": calls or None, "finish_reason": self.finish_reason, "usage": self.usage,
                "timings": self.timings.to_dict()}


class PromptCache:
    """The KV cache of a prompt prefix that every conversation shares (the chat template's opening
    system block up to the user's text), computed once; new Sessions start from a copy of it, so
    the first answer only computes the user's own tokens."""

    def __init__(self, model, ids: Sequence[int]):
        self.ids = [int(i) for i in ids]
        self.cache = model.new_cache()
        if self.ids:
            model.prefill(self.ids, self.cache)

    @classmethod
    def for_chat(cls, model, system: str | None = None, tools: list[dict] | None = None) -> "PromptCache":
        """The tokens two different one-message chats share, found by rendering both."""
        head = [{"role": "system", "content": system}] if system else []
        a = render_prompt(model, head + [{"role": "user", "content": "a"}], tools=tools)
        b = render_prompt(model, head + [{"role": "user", "content": "b"}], tools=tools)
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return cls(model, a[:n])


class Session:
    """A KV cache plus the token ids it holds, reused across the turns of one conversation."""

    def __init__(self, model, max_context: int | None = None, prefix: PromptCache | None = None):
        self.model = model
        self.max_context = min(max_context or model.config.max_position_embeddings,
                               model.config.max_position_embeddings)
        self.prefix = prefix
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (keeping the shared prompt prefix, if any)."""
        if self.prefix is not None:
            self.cache = self.prefix.cache.clone()
            self.ids = list(self.prefix.ids)
        else:
            self.cache = self.model.new_cache()
            self.ids = []

    def reuse_prefix(self, prompt: Sequence[int]) -> int:
        """Keep the longest cached prefix of `prompt` (at least one token is left to compute, since
        its logits are needed); returns how many positions were kept."""
        # An interrupted step (Ctrl-C mid-forward) may have left the cache ahead of `ids`.
        self.cache.truncate(len(self.ids))
        n = 0
        limit = min(len(self.ids), len(prompt) - 1)
        while n < limit and self.ids[n] == prompt[n]:
            n += 1
        if n < len(self.ids):
            self.cache.truncate(n)
            del self.ids[n:]
        return n

    def feed(self, ids: Sequence[int]) -> np.ndarray:
        """Run new tokens; returns the logits after the last one [V]."""
        logits = self.model.prefill(list(ids), self.cache)
        self.ids.extend(int(i) for i in ids)
        return logits


def check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    if prompt_tokens >= context:
        raise ContextLengthError(f"the prompt is {prompt_tokens} tokens; the context holds {context}")
    if prompt_tokens + max_tokens > context:
        raise ContextLengthError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
                                 f"{prompt_tokens + max_tokens} tokens; the context holds {context}. "
                                 f"Lower max_tokens to at most {context - prompt_tokens}")


def generate_step(session: Session, prompt: Sequence[int], sampler: Sampler,
                  forced: list[int] | None = None) -> Iterator[int]:
    """Yield generated token ids forever (the caller stops). `forced` is a queue the caller may
    fill with ids to emit next instead of sampling (used for the reasoning budget)."""
    logits = session.feed(prompt[session.reuse_prefix(prompt):])
    history = np.empty(256, dtype=np.int64)  # generated ids, grown by doubling (no per-token list)
    n = 0
    while True:
        token = forced.pop(0) if forced else sampler.sample(logits, history[:n])
        if n == len(history):
            history = np.concatenate([history, np.empty_like(history)])
        history[n] = token
        n += 1
        yield token
        logits = session.feed([token])


def render_prompt(model, messages: list[dict] | None = None, prompt: str | None = None,
                  tools: list[dict] | None = None) -> list[int]:
    """Chat messages (or a single user prompt) -> token ids, through the model's chat template."""
    if messages is None:
        if prompt is None:
            raise ErnieEdgeError("give either messages or a prompt")
        messages = [{"role": "user", "content": prompt}]
    text = model.chat_template.render(messages, tools=tools, add_generation_prompt=True)
    return model.tokenizer.encode(text)


class _TextPipeline:
    """Token ids -> text: detokenizer, then stop strings, then the reasoning/tool-call parser."""

    def __init__(self, tok, params: SamplingParams, strict_response: bool):
        self.detok = tok.stream_detokenizer()
        self.stops = StopChecker(list(params.stop))
        self.parser = StreamParser(strict_response=strict_response)
        self.any_calls = False

    def feed(self, token: int) -> tuple[GenerationChunk, bool]:
        """The chunk for one token, and whether a stop string ended the text."""
        text, stopped = self.stops.feed(self.detok.feed(token))
        d = self.parser.feed(text)
        self.any_calls |= bool(d.tool_calls)
        chunk = GenerationChunk(text=text, reasoning=d.reasoning, content=d.content,
                                tool_calls=d.tool_calls, token_ids=[token], malformed=d.malformed)
        return chunk, stopped

    def finish(self, finish: str, timings: Timings) -> GenerationChunk:
        """The last chunk: flush what was held back; a turn that called tools ends `tool_calls`."""
        tail, _ = self.stops.feed(self.detok.flush())
        tail += self.stops.flush()
        last, end = self.parser.feed(tail), self.parser.finish()
        calls = last.tool_calls + end.tool_calls
        if finish == FINISH_STOP and (calls or self.any_calls):
            finish = FINISH_TOOLS
        return GenerationChunk(text=tail, reasoning=last.reasoning + end.reasoning,
                               content=last.content + end.content, tool_calls=calls,
                               finish_reason=finish, malformed=last.malformed or end.malformed,
                               timings=timings)


def stream_generate(model, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                    session: Session | None = None, reasoning_budget: int | None = None,
                    strict_response: bool = False) -> Iterator[GenerationChunk]:
    """Generate from prompt token ids, streaming. The last chunk has finish_reason and timings.

    reasoning_budget: at most this many tokens of thinking; then `</think>` and `<response>` are
    inserted so the model answers (like llama.cpp's --reasoning-budget)."""
    t0 = time.perf_counter()
    params = params or SamplingParams.from_generation_config(model.path)
    tok = model.tokenizer
    session = session or Session(model)
    prompt_ids = [int(i) for i in prompt_ids]
    max_tokens = params.max_tokens or min(DEFAULT_MAX_TOKENS, session.max_context - len(prompt_ids))
    check_context(len(prompt_ids), max_tokens, session.max_context)

    sampler = Sampler(params, vocab_size=tok.vocab_size, prompt_ids=prompt_ids)
    stop_ids = set(tok.stop_ids()) | set(params.stop_token_ids)
    text = _TextPipeline(tok, params, strict_response)
    timings = Timings(prompt_tokens=len(prompt_ids), cached_tokens=session.reuse_prefix(prompt_ids))
    forced: list[int] = []  # ids to emit instead of sampling (the reasoning budget's answer cue)
    thinking, finish, t_first = True, FINISH_LENGTH, None

    steps = generate_step(session, prompt_ids, sampler, forced)
    for n, token in enumerate(steps, start=1):
        if t_first is None:
            t_first = time.perf_counter()
            timings.prefill_s = timings.ttft_s = t_first - t0
        timings.completion_tokens = n
        if token in stop_ids:
            finish = FINISH_STOP
            break
        thinking = thinking and token != tok.think_end_id
        chunk, stopped = text.feed(token)
        yield chunk
        if stopped:
            finish = FINISH_STOP
            break
        if n >= max_tokens:
            break
        if thinking and reasoning_budget is not None and n >= reasoning_budget and not forced:
            forced.extend(tok.encode("\n</think>\n\n<response>\n"))
            thinking = False
    steps.close()
    timings.decode_s = time.perf_counter() - (t_first or t0)
    yield text.finish(finish, timings)


def generate(model, prompt_ids: Sequence[int], params: SamplingParams | None = None,
             **kwargs) -> GenerationResult:
    """Generate to the end and return one result (see stream_generate for the options)."""
    text, reasoning, content, calls, ids = [], [], [], [], []
    malformed = False
    last = None
    for chunk in stream_generate(model, prompt_ids, params, **kwargs):
        text.append(chunk.text)
        reasoning.append(chunk.reasoning)
        content.append(chunk.content)
        calls.extend(chunk.tool_calls)
        ids.extend(chunk.token_ids)
        malformed |= chunk.malformed
        last = chunk
    return GenerationResult(text="".join(text), reasoning="".join(reasoning) or None,
                            content="".join(content) or None, tool_calls=calls,
                            finish_reason=last.finish_reason, timings=last.timings,
                            token_ids=ids, malformed=malformed)
