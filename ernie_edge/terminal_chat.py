"""`ernie-edge chat`: an interactive chat in the terminal. Streams the thinking (dimmed, or hidden
with --hide-thinking) and then the answer, shows tokens/s, keeps the KV cache across turns.

Commands: /reset (new conversation), /system TEXT (set the system prompt and reset), /think
(toggle showing the thinking), /save FILE and /load FILE (the conversation as a JSON list of
messages, the format of `generate --messages`), /tool TEXT (answer the model's tool call with a
result), /help, /exit. Ctrl-C stops the current answer without leaving; Ctrl-D or /exit leaves.

Input: line editing and history (arrow keys, Ctrl-R; kept between sessions) where Python has
readline and the input is a terminal. A line ending in `\\` continues on the next line; a message
between two `\"\"\"` spans any number of lines.

An error in one turn (a message longer than the context, unreadable files, invalid numbers from
the model) is printed and the conversation goes on as it was.
"""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from .chat_template import last_turns
from .errors import ContextLengthError, ErnieEdgeError, one_line
from .generate import PromptCache, Session, render_prompt, stream_generate
from .sampling import SamplingParams

DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"
HELP = ('commands: /reset  /system TEXT  /think  /save FILE  /load FILE  /tool RESULT  /help  /exit\n'
        'a line ending in \\ continues the message; """ starts and ends a multi-line message; '
        'Ctrl-C stops an answer')
BLOCK = '"""'
HISTORY_LINES = 1000


@dataclass
class ChatSettings:
    system: str | None = None
    show_thinking: bool = True
    reasoning_budget: int | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    color: bool | None = None  # None: when the output is a terminal
    tools: list[dict] | None = None  # OpenAI-style tool definitions, rendered into every prompt
    max_context: int | None = None  # cap on prompt + answer tokens (default: the model's)
    history_file: Path | None = None  # readline history kept between sessions (None: not kept)
    # run_tool(name, arguments JSON) -> the result text to send back at once, or None to leave the
    # call to the user (/tool RESULT). The demo runs its calculator this way.
    run_tool: Callable[[str, str], str | None] | None = None
    # Send the model only the last keep_turns user turns (with what follows each); /save keeps
    # them all. For a small model trained on short conversations (the demo model); None: all.
    keep_turns: int | None = None


MAX_AUTOMATIC_TOOL_ROUNDS = 4  # tool results sent back in a row without the user


def read_message(read_line: Callable[[str], str], prompt: str, more: str) -> str:
    """One message: a line, lines joined by a trailing backslash, or a \"\"\" ... \"\"\" block.
    EOFError inside a block or after a backslash ends the message with what was read."""
    line = read_line(prompt)
    if line.lstrip().startswith(BLOCK):
        first = line.lstrip()[len(BLOCK):]
        if first.rstrip().endswith(BLOCK):  # """one line"""
            return first.rstrip()[: -len(BLOCK)]
        lines = [first] if first else []
        while True:
            try:
                line = read_line(more)
            except EOFError:
                return "\n".join(lines)
            if line.rstrip().endswith(BLOCK):
                lines.append(line.rstrip()[: -len(BLOCK)])
                return "\n".join(lines).rstrip("\n")
            lines.append(line)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        try:
            line = read_line(more)
        except EOFError:
            line = ""
            break
    parts.append(line)
    return "\n".join(parts)


def enable_line_editing(history_file: Path | None) -> Callable[[], None]:
    """Turn on readline for input() (editing, arrows, history); returns a function that saves the
    history. Without readline (some Windows Pythons) input() keeps plain line input."""
    try:
        import readline
    except ImportError:
        return lambda: None
    readline.set_history_length(HISTORY_LINES)
    if history_file is not None and history_file.is_file():
        try:
            readline.read_history_file(history_file)
        except OSError:
            pass  # an unreadable history only costs the old lines

    def save() -> None:
        if history_file is None:
            return
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history_file)
            history_file.chmod(0o600)  # what you typed to the model is private, like ~/.bash_history
        except OSError:
            pass
    return save


class TerminalChat:
    def __init__(self, model, settings: ChatSettings, out: TextIO = sys.stdout, err: TextIO = sys.stderr):
        self.model = model
        self.s = settings
        self.out = out
        self.err = err
        self.color = settings.color if settings.color is not None else out.isatty()
        self.messages: list[dict] = []
        self.editing = False  # readline is on (set by run)
        self.new_session()

    def new_session(self) -> None:
        """A fresh KV cache; the template's opening block (system prompt, tools) is computed once."""
        prefix = PromptCache.for_chat(self.model, self.s.system, self.s.tools)
        self.session = Session(self.model, max_context=self.s.max_context, prefix=prefix)

    def style(self, text: str, code: str) -> str:
        return f"{code}{text}{RESET}" if self.color else text

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def error(self, message: str) -> None:
        self.out.flush()
        self.err.write(f"error: {message}\n")
        self.err.flush()

    # ---- commands ----------------------------------------------------------------------------

    def handle_command(self, line: str) -> bool:
        """Run a /command; returns False when the user wants to leave."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit"):
            return False
        actions = {"/reset": self.reset, "/system": self.set_system, "/think": self.toggle_thinking,
                   "/save": self.save, "/load": self.load, "/tool": self.tool_result}
        action = actions.get(cmd)
        if action is None:
            self.write(HELP + "\n")
        else:
            action(arg)
        return True

    def reset(self, _arg: str = "") -> None:
        self.messages.clear()
        self.write("(new conversation)\n")

    def set_system(self, text: str) -> None:
        self.s.system = text or None
        self.messages.clear()
        self.new_session()
        self.write(f"(system prompt {'set' if self.s.system else 'cleared'}; new conversation)\n")

    def toggle_thinking(self, _arg: str = "") -> None:
        self.s.show_thinking = not self.s.show_thinking
        self.write(f"(thinking {'shown' if self.s.show_thinking else 'hidden'})\n")

    def save(self, name: str) -> None:
        if not name:
            raise ErnieEdgeError("/save needs a file name: /save chat.json")
        path = Path(name).expanduser()
        system = [{"role": "system", "content": self.s.system}] if self.s.system else []
        path.write_text(json.dumps(system + self.messages, ensure_ascii=False, indent=2) + "\n",
                        encoding="utf-8")
        self.write(f"(saved {len(system + self.messages)} messages to {path})\n")

    def load(self, name: str) -> None:
        from .chat_template import validate_messages
        if not name:
            raise ErnieEdgeError("/load needs a file name: /load chat.json")
        path = Path(name).expanduser()
        try:
            messages = validate_messages(json.loads(path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ErnieEdgeError(f"{path}: not a JSON list of messages ({e})") from None
        except ErnieEdgeError as e:
            raise ErnieEdgeError(f"{path}: {e}") from None
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        self.messages = messages[1:] if system is not None else messages
        self.s.system = system
        self.new_session()
        self.write(f"(loaded {len(messages)} messages from {path}; the next answer continues it)\n")

    def tool_result(self, text: str) -> None:
        """Answer the last tool call with `text`, then let the model go on."""
        last = self.messages[-1] if self.messages else {}
        calls = last.get("tool_calls") if last.get("role") == "assistant" else None
        if not calls:
            raise ErnieEdgeError("/tool answers a tool call, and the model's last answer made none")
        self.converse({"role": "tool", "content": text, "tool_call_id": calls[-1]["id"]})

    # ---- one turn ----------------------------------------------------------------------------

    def answer(self, user_text: str) -> None:
        self.converse({"role": "user", "content": user_text})

    def converse(self, message: dict, rounds: int = 0) -> None:
        """Generate the reply to `message`; the conversation keeps both only when generation ran
        (an error before it, e.g. a message longer than the context, leaves it unchanged). A tool
        call that settings.run_tool answers is answered at once (up to MAX_AUTOMATIC_TOOL_ROUNDS)."""
        system = [{"role": "system", "content": self.s.system}] if self.s.system else []
        ids = render_prompt(self.model, system + self.recent(self.messages + [message]), tools=self.s.tools)
        stream = stream_generate(self.model, ids, self.s.params, session=self.session,
                                 reasoning_budget=self.s.reasoning_budget)
        try:
            first = next(stream)  # checks that the prompt fits, then reads it (prefill)
        except ContextLengthError as e:
            raise ContextLengthError(f"{e}. The message was not sent and the conversation is kept; "
                                     "send a shorter one, or /save it and /reset") from None
        except KeyboardInterrupt:
            stream.close()
            self.write("\n[stopped before the answer began; the message was not sent]\n")
            return
        self.messages.append(message)
        reply = self.stream_reply(first, stream)
        self.messages.append(reply)
        calls = reply.get("tool_calls")
        if not calls:
            return
        call, result = calls[-1], None
        if self.s.run_tool is not None and rounds < MAX_AUTOMATIC_TOOL_ROUNDS:
            result = self.s.run_tool(call["function"]["name"], call["function"]["arguments"])
        if result is None:
            self.write("(answer it with /tool RESULT)\n")
            return
        self.write(self.style(f"[tool result] {result}", DIM) + "\n")
        self.converse({"role": "tool", "content": result, "tool_call_id": call["id"]}, rounds + 1)

    def recent(self, messages: list[dict]) -> list[dict]:
        """What the model is sent of messages: the last keep_turns user turns (all when None)."""
        return last_turns(messages, self.s.keep_turns)

    def stream_reply(self, first, stream) -> dict:
        """Print the chunks as they come; returns the assistant message (partial after Ctrl-C)."""
        reasoning, content, calls, phase, last = [], [], [], None, None
        try:
            for chunk in _chain(first, stream):
                last = chunk
                reasoning.append(chunk.reasoning)
                content.append(chunk.content)
                calls += chunk.tool_calls
                phase = self.show(chunk, phase)
        except KeyboardInterrupt:
            stream.close()
            self.write("\n[stopped]\n")
            last = None
        message = {"role": "assistant", "content": "".join(content), "reasoning_content": "".join(reasoning)}
        if calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        if last is not None and last.timings is not None:
            self.show_stats(last)
        return message

    def show(self, chunk, phase: str | None) -> str | None:
        if chunk.reasoning and self.s.show_thinking:
            if phase != "thinking":
                self.write(self.style("thinking: ", BOLD))
                phase = "thinking"
            self.write(self.style(chunk.reasoning, DIM))
        if chunk.content:
            if phase != "answer":
                self.write(("\n" if phase else "") + self.style("answer: ", BOLD))
                phase = "answer"
            self.write(chunk.content)
        for call in chunk.tool_calls:
            self.write(f"\n[tool call] {call.name}({call.arguments})")
        return phase

    def show_stats(self, last) -> None:
        t = last.timings
        self.write("\n" + self.style(
            f"[{t.completion_tokens} tokens, {t.decode_tok_s:.1f} tok/s, prompt {t.prompt_tokens} "
            f"({t.cached_tokens} cached), first token {t.ttft_s:.2f} s, {last.finish_reason}]", DIM) + "\n")

    # ---- the loop ----------------------------------------------------------------------------

    def run(self, read_line: Callable[[str], str] | None = None) -> None:
        """Read messages until /exit or end of input. Without `read_line`, input() is used, with
        line editing and history when the input is a terminal."""
        save_history = lambda: None  # noqa: E731
        if read_line is None:
            if sys.stdin.isatty():
                save_history = enable_line_editing(self.s.history_file)
                self.editing = True
            read_line = input
        self.write(f"ernie-edge chat: {self.model.path}\n{HELP}\n")
        try:
            self.loop(read_line)
        finally:
            save_history()

    def loop(self, read_line: Callable[[str], str]) -> None:
        prompt, more = self.prompt("you> "), self.prompt("...  ")
        while True:
            try:
                line = read_message(read_line, prompt, more).strip()
            except EOFError:
                self.write("\n")
                return
            except KeyboardInterrupt:
                self.write("\n")
                continue
            if not line:
                continue
            try:
                if line.startswith("/") and not self.handle_command(line):
                    return
                if not line.startswith("/"):
                    self.answer(line)
            except (ErnieEdgeError, FloatingPointError, OSError) as e:
                self.error(one_line(e))
            except Exception:  # a bug: show it, but keep the conversation
                traceback.print_exc(file=self.err)
                self.error("internal error (a bug: please report the traceback above); "
                           "the conversation is kept")

    def prompt(self, text: str) -> str:
        if not self.color:
            return text
        if self.editing:  # \001 and \002 tell readline that the escapes take no room on the line
            return f"\001{BOLD}\002{text}\001{RESET}\002"
        return self.style(text, BOLD)


def _chain(first, rest):
    yield first
    yield from rest
