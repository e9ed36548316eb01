"""`ernie-edge chat`: a session piped through stdin (subprocess), line editing through a pty, and
the tool-call turn with a scripted model (in process)."""

import io
import json
import os
import pty
import select
import signal
import subprocess
import time

import numpy as np
import pytest

from cli_helpers import CLI, cli_env, interruptible, nan_checkpoint, run
from ernie_edge.terminal_chat import ChatSettings, TerminalChat, read_message

STATS = "tok/s"


def chat(model, lines, *flags, **kw):
    """A piped chat session on the HF folder `model`, run by the reference backend: what these tests
    check does not depend on the backend, and the reference starts faster than the kernels."""
    return run("chat", "--model", model, "--backend", "reference", "--max-tokens", 6, "--reasoning-budget", 2,
               "--seed", 0, *flags, input="".join(line + "\n" for line in lines), **kw)


def test_chat_session(tiny_edge_dir):
    lines = ["Hello", "/system You are terse.", "Second question", "/think", "Third", "/exit"]
    out = run("chat", "--model", tiny_edge_dir, "--max-tokens", 10, "--reasoning-budget", 3, "--seed", 0,
              input="\n".join(lines) + "\n").stdout
    assert out.count("thinking: ") == 2  # hidden for the third answer after /think
    assert out.count("answer: ") == 3
    assert "(system prompt set; new conversation)" in out and "(thinking hidden)" in out
    assert out.count(STATS) == 3


def test_an_over_long_message_is_refused_and_the_chat_goes_on(tiny_dir, tmp_path):
    saved = tmp_path / "chat.json"
    proc = chat(tiny_dir, ["Hello", "word " * 300, "Still there?", f"/save {saved}", "/exit"],
                "--ctx-size", 200)
    assert proc.returncode == 0
    assert "context holds 200. The message was not sent and the conversation is kept" in proc.stderr
    assert proc.stdout.count(STATS) == 2 and "Traceback" not in proc.stderr
    messages = json.loads(saved.read_text())
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hello", "Still there?"]


def test_multi_line_messages_and_save_load(tiny_dir, tmp_path):
    saved, again = tmp_path / "chat.json", tmp_path / "again.json"
    lines = ["first line \\", "second line", '"""', "block one", "", "block two", '"""',
             f"/save {saved}", "/exit"]
    chat(tiny_dir, lines)
    messages = json.loads(saved.read_text())
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "first line \nsecond line", "block one\n\nblock two"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    proc = chat(tiny_dir, [f"/load {saved}", "And now?", f"/save {again}", "/load missing.json", "/exit"])
    assert f"(loaded 4 messages from {saved}" in proc.stdout
    assert json.loads(again.read_text())[:4] == messages and len(json.loads(again.read_text())) == 6
    assert "error: missing.json: No such file or directory" in proc.stderr


def test_tools_file_is_rendered_into_the_prompt(tiny_dir, tmp_path):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                               "parameters": {"type": "object", "properties": {}}}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))

    def prompt_tokens(*flags):
        out = chat(tiny_dir, ["Weather in Paris?", "/tool sunny", "/exit"], *flags)
        return int(out.stdout.split("prompt ")[1].split()[0]), out.stderr

    without, _ = prompt_tokens()
    with_tools, err = prompt_tokens("--tools", tmp_path / "tools.json")
    assert with_tools > without + 20
    assert "/tool answers a tool call" in err  # the random model made no call to answer


def test_errors_from_the_model_do_not_end_the_chat(nan_dir):
    proc = run("chat", "--model", nan_dir, "--backend", "reference", "--max-tokens", 3,
               input="Hello\nAgain\n/exit\n")
    assert proc.returncode == 0
    assert proc.stderr.count("error: the logits hold NaN") == 2 and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def nan_dir(tiny_dir, tmp_path_factory):
    return nan_checkpoint(tiny_dir, tmp_path_factory.mktemp("nan") / "nan")


def test_ctrl_c_stops_the_answer_not_the_chat(tiny_edge_dir):
    """SIGINT while an answer streams prints [stopped], and the chat goes on to the next prompt."""
    proc = subprocess.Popen([*CLI, "chat", "--model", str(tiny_edge_dir), "--max-tokens", "100000", "--seed", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
                            preexec_fn=interruptible)
    seen = b""

    def read_until(marker: bytes, limit_s: float = 120.0) -> None:
        nonlocal seen
        deadline = time.monotonic() + limit_s
        while marker not in seen:
            assert proc.poll() is None, (seen, proc.stderr.read())
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no {marker!r} within {limit_s} s: {seen[-300:]!r}"
            seen += os.read(proc.stdout.fileno(), 65536)

    try:
        proc.stdin.write(b"Tell me a long story\n")
        proc.stdin.flush()
        read_until(b"thinking: ")
        proc.send_signal(signal.SIGINT)
        read_until(b"[stopped]")
        proc.stdin.write(b"/reset\n/exit\n")
        proc.stdin.flush()
        read_until(b"(new conversation)")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_line_editing_and_history_on_a_terminal(tiny_dir, tmp_path):
    """Through a pty: the left arrow moves the cursor (the edit lands mid-word), the up arrow
    recalls the last line, and the history is kept in the cache folder for the next session."""
    pytest.importorskip("readline")  # present on Linux and macOS; the test is about using it
    saved = tmp_path / "chat.json"
    master, slave = pty.openpty()
    proc = subprocess.Popen([*CLI, "chat", "--model", str(tiny_dir), "--backend", "reference", "--max-tokens", "4",
                             "--seed", "0"], stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=cli_env(home=tmp_path))
    os.close(slave)
    seen = b""

    def until(marker: bytes, count: int = 1) -> None:
        nonlocal seen
        deadline = time.monotonic() + 120
        while seen.count(marker) < count:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, seen[-300:]
            seen += os.read(master, 65536)

    try:
        until(b"you> ")
        os.write(master, b"Helo\x1b[D\x1b[Dl\r")  # "Helo", two steps left, insert "l": "Hello"
        until(b"you> ", 2)
        os.write(master, b"\x1b[A\r")  # the up arrow brings "Hello" back
        until(b"you> ", 3)
        os.write(master, f"/save {saved}\r".encode())
        until(b"(saved")
        os.write(master, b"/exit\r")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    users = [m["content"] for m in json.loads(saved.read_text()) if m["role"] == "user"]
    assert users == ["Hello", "Hello"]
    assert "Hello" in (tmp_path / "cache" / "chat_history").read_text()


# ---- in process ---------------------------------------------------------------------------------

def lines(*items):
    it = iter(items)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


@pytest.mark.parametrize("typed, message", [
    (["plain"], "plain"),
    (["one \\", "two \\", "three"], "one \ntwo \nthree"),
    (['"""', "a", "", "b", '"""'], "a\n\nb"),
    (['"""first', 'last"""'], "first\nlast"),
    (['"""inline"""'], "inline"),
    (['"""', "never closed"], "never closed"),  # end of input sends what was typed
])
def test_read_message(typed, message):
    assert read_message(lines(*typed), "you> ", "...  ") == message


class ScriptedModel:
    """Writes a fixed text, token by token, whatever the prompt (one-hot logits); the real tiny
    model's tokenizer, template and config."""

    def __init__(self, real, texts):
        self.real, self.texts = real, list(texts)
        self.config, self.path, self.tokenizer = real.config, real.path, real.tokenizer
        self.chat_template = real.chat_template
        self.script, self.step = [], 0

    def new_cache(self):
        return self.real.new_cache()

    def prefill(self, ids, cache):
        ids = [int(i) for i in ids]
        if ids[-2:] == [self.tokenizer.think_start_id, self.tokenizer.newline_id]:  # a prompt's end
            self.script = self.tokenizer.encode(self.texts.pop(0)) + [self.tokenizer.im_end_id]
            self.step = 0
        cache.length += len(ids)
        logits = np.full(self.config.vocab_size, -1e9, np.float32)
        if self.script:  # (no script yet: the chat's shared prompt prefix, whose logits go unused)
            logits[self.script[min(self.step, len(self.script) - 1)]] = 0.0
        self.step += 1
        return logits


def test_a_tool_call_is_answered_with_slash_tool(tiny_dir):
    import ernie_edge
    from ernie_edge.sampling import SamplingParams
    call = ('Need the weather.\n</think>\n\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n')
    answer = "It is sunny.\n</think>\n\n<response>\nSunny in Paris.\n</response>\n"
    model = ScriptedModel(ernie_edge.load(tiny_dir), [call, answer])
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    out = io.StringIO()
    settings = ChatSettings(params=SamplingParams(temperature=0, max_tokens=200), tools=tools, color=False)
    chat = TerminalChat(model, settings, out=out, err=out)
    chat.loop(lines("Weather in Paris?", "/tool 22 C, sunny", "/exit"))
    assert '[tool call] get_weather({"city": "Paris"})' in out.getvalue()
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
    assert chat.messages[2] == {"role": "tool", "content": "22 C, sunny",
                                "tool_call_id": chat.messages[1]["tool_calls"][0]["id"]}
    assert chat.messages[3]["content"] == "Sunny in Paris."
