"""The command line as a user runs it (subprocesses on the tiny synthetic model)."""

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "ernie_edge.cli"]


def run(*args, input=None, check=True):
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, input=input, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_generate_json_has_the_contract_keys(tiny_dir):
    out = run("generate", "--model", tiny_dir, "--prompt", "Hi there", "--max-tokens", 12,
              "--seed", 1, "--reasoning-budget", 4, "--json").stdout
    result = json.loads(out)
    assert set(result) >= {"reasoning", "content", "tool_calls", "finish_reason", "usage", "timings"}
    assert result["usage"]["completion_tokens"] == 12 and result["finish_reason"] == "length"
    assert result["reasoning"] and result["content"]


def test_generate_with_messages_and_tools_files(tiny_dir, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                               "parameters": {"type": "object", "properties": {}}}}]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    (tmp_path / "t.json").write_text(json.dumps(tools))
    out = run("generate", "--model", tiny_dir, "--messages", tmp_path / "m.json", "--tools",
              tmp_path / "t.json", "--max-tokens", 4, "--temperature", 0, "--json").stdout
    assert json.loads(out)["usage"]["prompt_tokens"] > 40  # system + tools were rendered


@pytest.mark.parametrize("args, message", [
    (["--messages", "missing.json"], "--messages missing.json: cannot read JSON"),
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "x", "--max-tokens", "200000"], "context holds"),
])
def test_bad_input_exits_2_with_a_clear_message(tiny_dir, args, message):
    proc = run("generate", "--model", tiny_dir, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_kv_dtype_flag_errors_are_clear(tiny_dir):
    """--kv-dtype i8 needs a converted model (tiny_dir is an HF folder: the reference backend); the
    working i8 path is run by test_bench on the converted model."""
    proc = run("generate", "--model", tiny_dir, "--prompt", "Hi", "--kv-dtype", "i8", check=False)
    assert proc.returncode == 2 and "needs the cpu backend (a converted model)" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("generate", "--model", tiny_dir, "--prompt", "Hi", "--kv-dtype", "i4", check=False)
    assert proc.returncode == 2 and "--kv-dtype" in proc.stderr


def test_missing_model_is_a_clear_error(tmp_path):
    proc = run("generate", "--model", tmp_path / "nowhere", "--prompt", "x", check=False)
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr


def test_chat_session(tiny_dir):
    lines = "Hello\n/system You are terse.\nSecond question\n/think\nThird\n/exit\n"
    out = run("chat", "--model", tiny_dir, "--max-tokens", 10, "--reasoning-budget", 3, "--seed", 0,
              input=lines).stdout
    assert out.count("thinking: ") == 2  # hidden for the third answer after /think
    assert out.count("answer: ") == 3
    assert "(system prompt set; new conversation)" in out and "(thinking hidden)" in out
    assert out.count("tok/s") == 3


def test_synth_writes_a_loadable_checkpoint(tmp_path):
    out = run("synth", tmp_path / "s", "--preset", "tiny", "--layers", 2).stdout.strip()
    import ernie_edge
    assert ernie_edge.load(out).config.num_hidden_layers == 2


def test_ctrl_c_stops_the_answer_not_the_chat(tiny_dir):
    """SIGINT while an answer streams prints [stopped], and the chat goes on to the next prompt."""
    import os
    import select
    import signal
    import time

    proc = subprocess.Popen([*CLI, "chat", "--model", str(tiny_dir), "--max-tokens", "100000", "--seed", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
