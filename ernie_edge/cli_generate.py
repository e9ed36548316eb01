"""`ernie-edge generate`: one chat turn, printed as it is generated, or one JSON object at the end.

Text: the answer streams to stdout token by token; the thinking is shown before it, dimmed, when
stdout is a terminal (--hide-thinking hides it), and plain only with --show-thinking otherwise, so
that `answer=$(ernie-edge generate ...)` gets the answer alone. Tool calls print as
`[tool call] NAME(ARGUMENTS)` lines.

JSON (--json): the object of GenerationResult.to_dict(): reasoning (also as reasoning_content),
content, tool_calls (null when none), finish_reason, usage, timings.

Ctrl-C stops the generation and keeps what it produced: the text stays printed, or the JSON is
printed with finish_reason "cancelled"; the command then exits with 130 (128 + SIGINT).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from .generate import (FINISH_CANCELLED, GenerationChunk, GenerationResult, Session, Timings, render_prompt,
                       stream_generate)
from .sampling import SamplingParams

DIM, RESET = "\x1b[2m", "\x1b[0m"
EXIT_CANCELLED = 130


@dataclass(frozen=True)
class GenerateSettings:
    params: SamplingParams
    tools: list[dict] | None = None
    reasoning_budget: int | None = None
    max_context: int | None = None  # cap on prompt + answer tokens (default: the model's)
    json: bool = False
    show_thinking: bool = False
    color: bool = False  # dim the thinking with terminal escapes


def wants_color(stream: TextIO) -> bool:
    """Terminal escapes only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def run_generate(model, messages: list[dict], s: GenerateSettings, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr) -> int:
    """Generate the reply to `messages`, printing it; returns the exit code (0, or 130 after Ctrl-C)."""
    ids = render_prompt(model, messages, tools=s.tools)
    stream = stream_generate(model, ids, s.params, session=Session(model, max_context=s.max_context),
                             reasoning_budget=s.reasoning_budget)
    collected = Collected(prompt_tokens=len(ids))
    view = None if s.json else StreamView(out, s.show_thinking, s.color)
    try:
        for chunk in stream:
            collected.add(chunk)
            if view is not None:
                view.show(chunk)
    except KeyboardInterrupt:
        stream.close()
    result = collected.result()
    if s.json:
        out.write(json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n")
    else:
        view.finish(result, err)
    out.flush()
    return EXIT_CANCELLED if result.finish_reason == FINISH_CANCELLED else 0


class Collected:
    """The chunks of a stream gathered into a GenerationResult, also when the stream was cut short
    (no last chunk: finish_reason "cancelled", timings measured here)."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.t0, self.t_first = time.perf_counter(), None
        self.text, self.reasoning, self.content, self.calls, self.ids = [], [], [], [], []
        self.malformed = False
        self.last: GenerationChunk | None = None

    def add(self, chunk: GenerationChunk) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.text.append(chunk.text)
        self.reasoning.append(chunk.reasoning)
        self.content.append(chunk.content)
        self.calls.extend(chunk.tool_calls)
        self.ids.extend(chunk.token_ids)
        self.malformed |= chunk.malformed
        self.last = chunk

    def result(self) -> GenerationResult:
        if self.last is not None and self.last.finish_reason is not None:
            finish, timings = self.last.finish_reason, self.last.timings
        else:
            finish, timings = FINISH_CANCELLED, self._timings()
        return GenerationResult(text="".join(self.text), reasoning="".join(self.reasoning) or None,
                                content="".join(self.content) or None, tool_calls=self.calls,
                                finish_reason=finish, timings=timings, token_ids=self.ids,
                                malformed=self.malformed)

    def _timings(self) -> Timings:
        now = time.perf_counter()
        first = self.t_first if self.t_first is not None else now
        return Timings(prompt_tokens=self.prompt_tokens, completion_tokens=len(self.ids),
                       prefill_s=first - self.t0, ttft_s=first - self.t0, decode_s=now - first)


class StreamView:
    """Prints chunks as they come: thinking (dimmed on a terminal), a blank line, the answer."""

    def __init__(self, out: TextIO, show_thinking: bool, color: bool):
        self.out, self.show_thinking, self.color = out, show_thinking, color
        self.phase: str | None = None  # "thinking" or "answer": what was printed last
        self.line_open = False  # the last character printed was not a newline

    def write(self, text: str, dim: bool = False) -> None:
        if not text:
            return
        self.out.write(f"{DIM}{text}{RESET}" if dim and self.color else text)
        self.out.flush()
        self.line_open = not text.endswith("\n")

    def end_line(self) -> None:
        if self.line_open:
            self.write("\n")

    def show(self, chunk: GenerationChunk) -> None:
        if chunk.reasoning and self.show_thinking:
            self.write(chunk.reasoning, dim=True)
            self.phase = "thinking"
        if chunk.content:
            if self.phase == "thinking":
                self.end_line()
                self.write("\n")
            self.phase = "answer"
            self.write(chunk.content)
        for call in chunk.tool_calls:
            self.end_line()
            self.write(f"[tool call] {call.name}({call.arguments})\n")

    def finish(self, result: GenerationResult, err: TextIO) -> None:
        self.end_line()
        t = result.timings
        if result.finish_reason == FINISH_CANCELLED:
            err.write(f"(cancelled after {t.completion_tokens} tokens)\n")
        elif result.content is None and not result.tool_calls:
            err.write(f"(no answer: the model was still thinking when it stopped ({result.finish_reason}); "
                      "raise --max-tokens or set --reasoning-budget)\n")
        err.flush()
