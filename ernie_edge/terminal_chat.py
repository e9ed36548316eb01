"""`ernie-edge chat`: an interactive chat in the terminal. Streams the thinking (dimmed, or hidden
with --hide-thinking) and then the answer, shows tokens/s, keeps the KV cache across turns.

Commands: /reset (new conversation), /system TEXT (set the system prompt and reset), /think
(toggle showing the thinking), /help, /exit. Ctrl-C stops the current answer without leaving;
Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, TextIO

from .generate import PromptCache, Session, render_prompt, stream_generate
from .sampling import SamplingParams

DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"
HELP = "commands: /reset  /system TEXT  /think  /help  /exit   (Ctrl-C stops an answer)"


@dataclass
class ChatSettings:
    system: str | None = None
    show_thinking: bool = True
    reasoning_budget: int | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    color: bool | None = None  # None: when the output is a terminal


class TerminalChat:
    def __init__(self, model, settings: ChatSettings, out: TextIO = sys.stdout):
        self.model = model
        self.s = settings
        self.out = out
        self.color = settings.color if settings.color is not None else out.isatty()
        # The template's opening block is computed once, before the first question.
        self.session = Session(model, prefix=PromptCache.for_chat(model, settings.system))
        self.messages: list[dict] = []

    def style(self, text: str, code: str) -> str:
        return f"{code}{text}{RESET}" if self.color else text

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def handle_command(self, line: str) -> bool:
        """Run a /command; returns False when the user wants to leave."""
        cmd, _, arg = line.partition(" ")
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/reset":
            self.messages.clear()
            self.write("(new conversation)\n")
        elif cmd == "/system":
            self.s.system = arg.strip() or None
            self.messages.clear()
            self.session = Session(self.model, prefix=PromptCache.for_chat(self.model, self.s.system))
            self.write(f"(system prompt {'set' if self.s.system else 'cleared'}; new conversation)\n")
        elif cmd == "/think":
            self.s.show_thinking = not self.s.show_thinking
            self.write(f"(thinking {'shown' if self.s.show_thinking else 'hidden'})\n")
        else:
            self.write(HELP + "\n")
        return True

    def answer(self, user_text: str) -> None:
        self.messages.append({"role": "user", "content": user_text})
        system = [{"role": "system", "content": self.s.system}] if self.s.system else []
        ids = render_prompt(self.model, system + self.messages)
        reasoning, content, phase = [], [], None
        stream = stream_generate(self.model, ids, self.s.params, session=self.session,
                                 reasoning_budget=self.s.reasoning_budget)
        last = None
        try:
            for chunk in stream:
                last = chunk
                if chunk.reasoning:
                    reasoning.append(chunk.reasoning)
                    if self.s.show_thinking:
                        if phase != "thinking":
                            self.write(self.style("thinking: ", BOLD))
                            phase = "thinking"
                        self.write(self.style(chunk.reasoning, DIM))
                if chunk.content:
                    if phase != "answer":
                        self.write(("\n" if phase else "") + self.style("answer: ", BOLD))
                        phase = "answer"
                    content.append(chunk.content)
                    self.write(chunk.content)
                for call in chunk.tool_calls:
                    self.write(f"\n[tool call] {call.name}({call.arguments})")
        except KeyboardInterrupt:
            stream.close()
            self.write("\n[stopped]\n")
            last = None
        self.messages.append({"role": "assistant", "content": "".join(content),
                              "reasoning_content": "".join(reasoning)})
        if last is not None and last.timings is not None:
            t = last.timings
            self.write("\n" + self.style(
                f"[{t.completion_tokens} tokens, {t.decode_tok_s:.1f} tok/s, prompt {t.prompt_tokens} "
                f"({t.cached_tokens} cached), first token {t.ttft_s:.2f} s, {last.finish_reason}]", DIM) + "\n")

    def run(self, read_line: Callable[[str], str] = input) -> None:
        self.write(f"ernie-edge chat: {self.model.path}\n{HELP}\n")
        while True:
            try:
                line = read_line(self.style("you> ", BOLD)).strip()
            except EOFError:
                self.write("\n")
                return
            except KeyboardInterrupt:
                self.write("\n")
                continue
            if not line:
                continue
            if line.startswith("/"):
                if not self.handle_command(line):
                    return
                continue
            self.answer(line)
