"""Split what ERNIE-4.5-Thinking generates into reasoning, answer and tool calls (docs/ERNIE_SPEC.md §6-7).

The chat prompt ends with `<think>\\n`, so the output starts inside the reasoning:

    answer:     {reasoning}\\n</think>\\n\\n<response>\\n{answer}\\n</response>\\n
    tool call:  {reasoning}\\n</think>\\n\\n\\n<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>\\n

The tags are single special tokens and appear literally in the decoded text.

`parse_output` parses a whole text and is the specification; `StreamParser` gives the same result
for any split of the text into deltas (a property test checks this), holding back only what could
still turn into a tag. The rules, in order:

1. A trailing run of end-of-turn markers (`<|im_end|>`, `</s>`) is removed. Elsewhere they are text.
2. A leading `<think>` is dropped, with one "\\n" right after it (the template's formatting).
3. No `</think>`: everything is reasoning. Otherwise the reasoning is the text before the first
   `</think>`, minus exactly one trailing "\\n" (the template's formatting). Later `</think>` and
   `<think>` are plain text.
4. After `</think>`:
   - `<tool_call>` starts a block that ends at the next `</tool_call>`. Its inner text must be a
     JSON object with a non-empty string `name` and an object `arguments`. A block that is not,
     or has no `</tool_call>` before the end, goes to the content verbatim and sets `malformed`.
     (vLLM's regex `<tool_call>\\s*(\\{.*?\\})\\s*</tool_call>` is the same on well-formed text; ending
     the block at the first `</tool_call>` makes the rule decidable while streaming.)
   - `<response>` and `</response>` are removed wherever they occur; one "\\n" right after
     `<response>` and one "\\n" right before `</response>` are removed with them.
   - Text inside `<response>` is content as it is. Text outside is content too, except that
     newlines outside a response at the start and at the end of the content are dropped (the
     "\\n\\n" after `</think>`, the "\\n" after `</response>`). With `strict_response=True`
     (FastDeploy's rule) text outside `<response>` is dropped altogether.
   Empty reasoning or content is None.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Callable

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
RESPONSE_OPEN = "<response>"
RESPONSE_CLOSE = "</response>"
TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
END_MARKERS = ("<|im_end|>", "</s>")

_CONTENT_TAGS = (RESPONSE_OPEN, RESPONSE_CLOSE, TOOL_OPEN)
# Pieces of the text after </think>: response tags, terminated tool blocks, an unterminated one.
_CONTENT_PIECES = re.compile(
    "(" + "|".join([re.escape(RESPONSE_OPEN), re.escape(RESPONSE_CLOSE),
                    re.escape(TOOL_OPEN) + ".*?" + re.escape(TOOL_CLOSE),
                    re.escape(TOOL_OPEN) + ".*\\Z"]) + ")",
    re.DOTALL,
)
_NEWLINE_RUNS = re.compile(r"\n+|[^\n]+")


@dataclass
class ToolCall:
    """One function call. `arguments` is the JSON text of an object (non-ASCII kept as is)."""

    id: str
    name: str
    arguments: str


@dataclass
class ParsedOutput:
    """A whole output, split. `malformed`: a `<tool_call>` block was not a valid call."""

    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    malformed: bool = False


@dataclass
class Delta:
    """What one `StreamParser.feed` / `finish` adds. `malformed` is set on the delta whose content
    carries the raw text of an invalid tool-call block."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    malformed: bool = False


# ---- tool-call ids ------------------------------------------------------------------------------

def random_tool_call_id() -> str:
    """An OpenAI-style id, `call_` + 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


def counter_tool_call_ids(prefix: str = "call_") -> Callable[[], str]:
    """A deterministic id source (`call_000000000000000000000000`, `..01`, ...) for tests and replays."""
    counter = itertools.count()
    return lambda: f"{prefix}{next(counter):024x}"


# ---- whole-text parsing (the specification) -----------------------------------------------------

def parse_output(text: str, *, strict_response: bool = False,
                 new_id: Callable[[], str] = random_tool_call_id) -> ParsedOutput:
    """Parse a whole generated text (see the module docstring for the rules). Never raises on
    model output: invalid tool calls end up in `content` with `malformed=True`."""
    text = strip_end_markers(text)
    if text.startswith(THINK_OPEN):
        text = text[len(THINK_OPEN):]
        if text.startswith("\n"):
            text = text[1:]
    reasoning, found, rest = text.partition(THINK_CLOSE)
    if not found:
        return ParsedOutput(reasoning or None, None)
    if reasoning.endswith("\n"):
        reasoning = reasoning[:-1]
    content, calls, malformed = _parse_content(rest, strict_response, new_id)
    return ParsedOutput(reasoning or None, content or None, calls, malformed)


def strip_end_markers(text: str) -> str:
    """Remove a trailing run of `<|im_end|>` / `</s>` markers."""
    stripped = True
    while stripped:
        stripped = False
        for marker in END_MARKERS:
            if text.endswith(marker):
                text = text[: -len(marker)]
                stripped = True
    return text


def _parse_content(rest: str, strict: bool, new_id) -> tuple[str, list[ToolCall], bool]:
    """The text after </think> -> (content, tool calls, malformed)."""
    parts = _CONTENT_PIECES.split(rest)  # even index: text, odd index: tag or tool block
    segments: list[tuple[str, bool]] = []  # (text, droppable newline run)
    calls: list[ToolCall] = []
    malformed = False
    inside = False
    for j, part in enumerate(parts):
        if j % 2 == 0:
            if j > 0 and parts[j - 1] == RESPONSE_OPEN and part.startswith("\n"):
                part = part[1:]
            if j + 1 < len(parts) and parts[j + 1] == RESPONSE_CLOSE and part.endswith("\n"):
                part = part[:-1]
            if inside:
                segments.append((part, False))
            elif not strict:
                segments += [(run, run[0] == "\n") for run in _NEWLINE_RUNS.findall(part)]
        elif part == RESPONSE_OPEN:
            inside = True
        elif part == RESPONSE_CLOSE:
            inside = False
        else:
            call = None
            if part.endswith(TOOL_CLOSE):
                call = parse_tool_call(part[len(TOOL_OPEN): -len(TOOL_CLOSE)], new_id)
            if call is None:
                segments.append((part, False))
                malformed = True
            else:
                calls.append(call)
    segments = [s for s in segments if s[0]]
    while segments and segments[0][1]:
        segments.pop(0)
    while segments and segments[-1][1]:
        segments.pop()
    return "".join(s for s, _ in segments), calls, malformed


def parse_tool_call(inner: str, new_id: Callable[[], str] = random_tool_call_id) -> ToolCall | None:
    """The text between `<tool_call>` and `</tool_call>` -> a ToolCall, or None if it is not a JSON
    object with a non-empty string `name` and an object `arguments` (NaN/Infinity refused)."""
    try:
        obj = json.loads(inner, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    name, arguments = obj.get("name"), obj.get("arguments")
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ToolCall(new_id(), name, json.dumps(arguments, ensure_ascii=False))


def _refuse_constant(constant: str):
    raise ValueError(f"{constant} is not JSON")


# ---- streaming ----------------------------------------------------------------------------------

def _held_suffix(buf: str, tags: tuple[str, ...], newline_tags: tuple[str, ...] = ()) -> int:
    """Length of the longest suffix of `buf` that may still become one of `tags` (a proper prefix
    of one), or "\\n" + a proper prefix of one of `newline_tags` (the "\\n" the tag would remove)."""
    best = 0
    for pattern in tags + tuple("\n" + t for t in newline_tags):
        for n in range(min(len(pattern) - 1, len(buf)), best, -1):
            if buf.endswith(pattern[:n]):
                best = n
                break
    return best


def _trailing_end_run(text: str) -> int:
    """Length of the longest suffix made of whole end markers followed by part of one: the text
    that may still turn out to be the trailing run `strip_end_markers` removes."""
    end = len(text) - _held_suffix(text, END_MARKERS)
    shrunk = True
    while shrunk:
        shrunk = False
        for marker in END_MARKERS:
            if text.endswith(marker, 0, end):
                end -= len(marker)
                shrunk = True
    return len(text) - end


class StreamParser:
    """Incremental `parse_output`: feed decoded text deltas, get reasoning / content / tool calls.

    Concatenating every `Delta` from `feed` and `finish` gives exactly `parse_output` of the
    concatenated text, whatever the split. Text is held back only while it could still be (part of)
    a tag, a formatting newline or a trailing end marker; a tool call is emitted whole when its
    `</tool_call>` arrives. Call `finish()` once at the end of generation.
    """

    def __init__(self, *, strict_response: bool = False,
                 new_id: Callable[[], str] = random_tool_call_id):
        self.strict_response = strict_response
        self.new_id = new_id
        self.malformed = False       # an invalid tool-call block was seen
        self.reasoning_done = False  # </think> was seen
        self._tail = ""              # text held back as a possible trailing end-marker run
        self._buf = ""               # text not yet parsed
        self._phase = "start"        # start | reasoning | content | tool
        self._inside = False         # inside <response>...</response>
        self._skip_newline = False   # just after <response>: one "\n" to drop
        self._pending_newlines = 0   # newlines outside a response, dropped if at either end
        self._content_started = False

    def feed(self, delta: str) -> Delta:
        """Add decoded text; return what can be emitted now."""
        text = self._tail + delta
        held = _trailing_end_run(text)
        self._tail = text[len(text) - held:]
        self._buf += text[: len(text) - held]
        return self._run(final=False)

    def finish(self) -> Delta:
        """End of generation: flush held text. An unterminated tool call becomes malformed content."""
        self._buf += strip_end_markers(self._tail)
        self._tail = ""
        return self._run(final=True)

    def _run(self, final: bool) -> Delta:
        out = Delta()
        steps = {"start": self._step_start, "reasoning": self._step_reasoning,
                 "content": self._step_content, "tool": self._step_tool}
        while steps[self._phase](out, final):
            pass
        return out

    # Each step consumes from self._buf and returns True if it made progress.

    def _step_start(self, out: Delta, final: bool) -> bool:
        buf = self._buf
        if not final and (THINK_OPEN + "\n").startswith(buf):
            return False  # may still become the leading "<think>\n"
        if buf.startswith(THINK_OPEN + "\n"):
            self._buf = buf[len(THINK_OPEN) + 1:]
        elif buf.startswith(THINK_OPEN):
            self._buf = buf[len(THINK_OPEN):]
        self._phase = "reasoning"
        return True

    def _step_reasoning(self, out: Delta, final: bool) -> bool:
        buf = self._buf
        i = buf.find(THINK_CLOSE)
        if i >= 0:
            text = buf[:i]
            out.reasoning += text[:-1] if text.endswith("\n") else text
            self._buf = buf[i + len(THINK_CLOSE):]
            self._phase = "content"
            self.reasoning_done = True
            return True
        keep = 0 if final else _held_suffix(buf, (THINK_CLOSE,), (THINK_CLOSE,))
        out.reasoning += buf[: len(buf) - keep]
        self._buf = buf[len(buf) - keep:]
        return False

    def _step_content(self, out: Delta, final: bool) -> bool:
        buf = self._buf
        if self._skip_newline:
            if not buf:
                return False
            self._buf = buf[1:] if buf[0] == "\n" else buf
            self._skip_newline = False
            return True
        found = [(buf.find(tag), tag) for tag in _CONTENT_TAGS]
        found = [(i, tag) for i, tag in found if i >= 0]
        if found:
            i, tag = min(found)
            text = buf[:i]
            if tag == RESPONSE_CLOSE and text.endswith("\n"):
                text = text[:-1]
            self._emit_text(out, text)
            self._buf = buf[i + len(tag):]
            if tag == TOOL_OPEN:
                self._phase = "tool"
            else:
                self._inside = tag == RESPONSE_OPEN
                self._skip_newline = self._inside
            return True
        keep = 0 if final else _held_suffix(buf, _CONTENT_TAGS, (RESPONSE_CLOSE,))
        self._emit_text(out, buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        return False

    def _step_tool(self, out: Delta, final: bool) -> bool:
        buf = self._buf
        i = buf.find(TOOL_CLOSE)
        if i < 0 and not final:
            return False  # a call is emitted whole, once </tool_call> arrives
        call = parse_tool_call(buf[:i], self.new_id) if i >= 0 else None
        if call is not None:
            out.tool_calls.append(call)
        else:
            raw = TOOL_OPEN + (buf[: i + len(TOOL_CLOSE)] if i >= 0 else buf)
            self.malformed = out.malformed = True
            self._emit_solid(out, raw)
        self._buf = buf[i + len(TOOL_CLOSE):] if i >= 0 else ""
        self._phase = "content"
        return True

    def _emit_text(self, out: Delta, text: str) -> None:
        """Content text between tags: kept inside a response; outside one, newline runs wait until
        we know they are not at either end of the content (strict mode drops it all)."""
        if self._inside:
            self._emit_solid(out, text)
        elif not self.strict_response:
            for run in _NEWLINE_RUNS.findall(text):
                if run[0] == "\n":
                    self._pending_newlines += len(run)
                else:
                    self._emit_solid(out, run)

    def _emit_solid(self, out: Delta, text: str) -> None:
        if not text:
            return
        if self._content_started:
            out.content += "\n" * self._pending_newlines
        self._pending_newlines = 0
        out.content += text
        self._content_started = True
