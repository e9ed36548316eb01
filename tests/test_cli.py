"""The command line as a user runs it (subprocesses on the tiny synthetic model): generate, convert,
synth, the error contract (exit 2, one line, no traceback) walked through every subcommand."""

import json
import os
import pty
import select
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cli_helpers import CLI, assert_user_error, cli_env, interruptible, nan_checkpoint, run


def gen_json(model, *args, **kw) -> dict:
    return json.loads(run("generate", "--model", model, "--json", *args, **kw).stdout)


@pytest.fixture(scope="module")
def nan_dir(tiny_dir, tmp_path_factory):
    return nan_checkpoint(tiny_dir, tmp_path_factory.mktemp("nan") / "nan")


# ---- generate ------------------------------------------------------------------------------------

def test_generate_json_has_the_contract_keys(tiny_edge_dir):
    result = gen_json(tiny_edge_dir, "--prompt", "Hi there", "--max-tokens", 12, "--seed", 1,
                      "--reasoning-budget", 4)
    assert set(result) >= {"reasoning", "reasoning_content", "content", "tool_calls", "finish_reason", "usage",
                           "timings"}
    assert result["usage"]["completion_tokens"] == 12 and result["finish_reason"] == "length"
    assert result["reasoning"] and result["content"]
    assert result["reasoning_content"] == result["reasoning"]
    assert result["tool_calls"] is None  # null, not [], when the model called nothing


def test_generate_with_messages_and_tools_files(tiny_edge_dir, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                               "parameters": {"type": "object", "properties": {}}}}]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    (tmp_path / "t.json").write_text(json.dumps(tools))
    result = gen_json(tiny_edge_dir, "--messages", tmp_path / "m.json", "--tools", tmp_path / "t.json",
                      "--max-tokens", 4, "--temperature", 0)
    assert result["usage"]["prompt_tokens"] > 40  # system + tools were rendered


# Flag plumbing is the same for both backends: these run the tiny HF folder on the reference,
# which starts faster than the kernels.
REF = ("--backend", "reference", "--temperature", 0)


@pytest.fixture(scope="module")
def greedy_thinking(tiny_dir) -> str:
    return gen_json(tiny_dir, *REF, "--prompt", "Hi", "--max-tokens", 16)["reasoning"]


def test_prompt_from_stdin_and_from_a_file_is_the_same_prompt(tiny_dir, tmp_path):
    text = "Tell me about the sea.\nIn two lines."
    (tmp_path / "p.txt").write_text(text)
    args = (*REF, "--max-tokens", 4)
    direct = gen_json(tiny_dir, "--prompt", text, *args)
    piped = gen_json(tiny_dir, "--prompt", "-", *args, input=text)
    from_file = gen_json(tiny_dir, "--prompt-file", tmp_path / "p.txt", *args)
    assert direct["usage"] == piped["usage"] == from_file["usage"]
    assert direct["reasoning"] == piped["reasoning"] == from_file["reasoning"]


def test_stop_string_ends_the_answer(tiny_dir, greedy_thinking):
    stop = greedy_thinking[5:7]
    cut = gen_json(tiny_dir, *REF, "--prompt", "Hi", "--max-tokens", 16, "--stop", stop)
    assert cut["finish_reason"] == "stop" and cut["reasoning"] == greedy_thinking[: greedy_thinking.index(stop)]


def test_sampling_flags_become_the_sampling_params(tiny_dir):
    from ernie_edge.cli import _sampling, build_parser
    a = build_parser().parse_args(["generate", "--model", "m", "--prompt", "x", "--presence-penalty", "1.5",
                                   "--frequency-penalty", "-0.5", "--repetition-penalty", "1.2", "--stop", "END",
                                   "--stop", "\n\n", "--top-k", "7", "--min-p", "0.1", "--max-tokens", "9"])
    p = _sampling(a, tiny_dir)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (1.5, -0.5, 1.2)
    assert (p.stop, p.top_k, p.min_p, p.max_tokens) == (("END", "\n\n"), 7, 0.1, 9)
    assert p.temperature == 0.6  # unset flags keep the model's generation_config.json


@pytest.mark.parametrize("flag", ["--frequency-penalty", "--repetition-penalty"])
def test_penalty_flags_change_the_answer(tiny_dir, greedy_thinking, flag):
    """Greedy decoding of the random model repeats one token; the penalty breaks the repeat."""
    assert len(set(greedy_thinking[4:])) <= 2  # the repeat the penalties must break
    penalised = gen_json(tiny_dir, *REF, "--prompt", "Hi", "--max-tokens", 16, flag, 2)["reasoning"]
    assert penalised != greedy_thinking


def test_ctx_size_caps_the_context(tiny_dir):
    args = ("--prompt", "Hi", *REF)
    assert_user_error(run("generate", "--model", tiny_dir, *args, "--ctx-size", 64, check=False),
                      "the context holds 64")
    ok = gen_json(tiny_dir, *args, "--ctx-size", 90)  # the prompt is ~82 tokens
    assert ok["usage"]["total_tokens"] == 90 and ok["finish_reason"] == "length"


def test_generate_streams_and_ctrl_c_keeps_the_text(tiny_edge_dir):
    """Text appears while the process still runs (a 100000-token answer takes minutes); SIGINT
    then exits 130 with the text printed and a note on stderr."""
    proc = subprocess.Popen([*CLI, "generate", "--model", str(tiny_edge_dir), "--prompt", "Tell me a long story",
                             "--max-tokens", "100000", "--show-thinking", "--seed", "0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env(), preexec_fn=interruptible)
    try:
        seen = b""
        deadline = time.monotonic() + 120
        while len(seen) < 20:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready and proc.poll() is None, (seen, proc.poll())
            seen += os.read(proc.stdout.fileno(), 4096)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert (seen + rest).startswith(seen) and len(seen + rest) >= 20
    assert b"cancelled after" in err and b"Traceback" not in err


def test_ctrl_c_in_json_mode_prints_what_was_generated(tiny_edge_dir):
    """KeyboardInterrupt in the 6th decode step: the JSON still comes, with finish_reason cancelled."""
    import io

    import ernie_edge
    from ernie_edge.cli_generate import GenerateSettings, run_generate
    from ernie_edge.sampling import SamplingParams

    class InterruptedModel:
        def __init__(self, model, after):
            self.model, self.left = model, after

        def __getattr__(self, name):
            return getattr(self.model, name)

        def prefill(self, ids, cache):
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= 1
            return self.model.prefill(ids, cache)

    model = InterruptedModel(ernie_edge.load(tiny_edge_dir), after=6)  # the prompt, then 5 tokens
    out = io.StringIO()
    settings = GenerateSettings(params=SamplingParams(temperature=0, max_tokens=50), json=True)
    code = run_generate(model, [{"role": "user", "content": "Hi"}], settings, out=out, err=io.StringIO())
    result = json.loads(out.getvalue())
    assert code == 130 and result["finish_reason"] == "cancelled"
    assert result["usage"]["completion_tokens"] == 6 and result["reasoning"]


def test_thinking_is_dimmed_on_a_terminal_and_plain_in_a_pipe(tiny_dir):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--max-tokens", "8", *map(str, REF)]
    master, slave = pty.openpty()
    proc = subprocess.Popen([*CLI, *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE,
                            env=cli_env())
    os.close(slave)
    tty_out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        tty_out += chunk
    assert proc.wait(timeout=120) == 0
    os.close(master)
    piped = run(*args, "--show-thinking").stdout
    assert b"\x1b[2m" in tty_out  # dimmed thinking on a terminal
    assert piped.strip() and "\x1b" not in piped


def test_unconverted_checkpoint_needs_convert_or_backend_reference(tiny_dir):
    proc = run("generate", "--model", tiny_dir, "--prompt", "Hi", check=False)
    assert_user_error(proc, f"convert it once with `ernie-edge convert {tiny_dir}`")
    assert "--backend reference" in proc.stderr
    proc = run("generate", "--model", tiny_dir, "--prompt", "Hi", "--backend", "reference", "--max-tokens", 2)
    assert proc.stdout == ""  # in a pipe only the answer is printed, and 2 tokens are all thinking
    assert "(no answer: the model was still thinking" in proc.stderr
    assert_user_error(run("bench", "--model", tiny_dir, check=False), "ernie-edge convert")


def test_kv_dtype_flag_errors_are_clear(tiny_dir):
    """--kv-dtype i8 needs a converted model; the working i8 path is run by test_bench."""
    proc = run("generate", "--model", tiny_dir, "--backend", "reference", "--prompt", "Hi", "--kv-dtype", "i8",
               check=False)
    assert_user_error(proc, "needs the cpu backend (a converted model)")
    assert_user_error(run("generate", "--model", tiny_dir, "--prompt", "Hi", "--kv-dtype", "i4", check=False),
                      "--kv-dtype")


def test_missing_model_is_a_clear_error(tmp_path):
    assert_user_error(run("generate", "--model", tmp_path / "nowhere", "--prompt", "x", check=False),
                      "no such file or folder")


# ---- convert / synth / files ---------------------------------------------------------------------

def test_convert_recipe_names(tiny_dir, tmp_path):
    out = run("convert", tiny_dir, "--recipe", "q4g32-d4", "--no-progress", home=tmp_path).stdout.strip()
    assert Path(out) == tmp_path / "models" / f"{tiny_dir.name}-q4g32-d4"
    assert json.loads((Path(out) / "manifest.json").read_text())["recipe"] == {
        "expert_bits": 4, "dense_bits": 4, "group_size": 32}
    assert_user_error(run("convert", tiny_dir, "--recipe", "q4g32-d4", "--dense-bits", 8, check=False),
                      "not both")


def test_convert_of_a_missing_folder_is_not_a_download(tmp_path):
    for src in ("/nonexistent/model", "./nowhere", "~/nowhere-ernie-edge"):
        proc = run("convert", src, check=False, home=tmp_path)
        assert_user_error(proc, "folder not found")
        assert "hf download" in proc.stderr and "huggingface-cli" not in proc.stderr


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_converted_files_follow_the_umask(tiny_dir, tmp_path, umask, mode):
    """tokenizer.json is built through mkstemp (0600); it must be readable like the rest."""
    dest = tmp_path / "edge"
    subprocess.run([*CLI, "convert", str(tiny_dir), str(dest), "--no-progress"], check=True, capture_output=True,
                   env=cli_env(), umask=umask, timeout=300)
    modes = {p.name: p.stat().st_mode & 0o777 for p in dest.iterdir()}
    assert "tokenizer.json" in modes and set(modes.values()) == {mode}, modes


def test_synth_writes_a_loadable_checkpoint(tmp_path):
    out = run("synth", tmp_path / "s", "--preset", "tiny", "--layers", 2).stdout.strip()
    import ernie_edge
    assert ernie_edge.load(out).config.num_hidden_layers == 2


def test_synth_refuses_a_folder_with_files_unless_force(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert_user_error(run("synth", folder, check=False), "not empty")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    run("synth", folder, "--force")
    assert (folder / "config.json").is_file() and (folder / "notes.txt").read_text() == "keep me"
    assert_user_error(run("synth", folder / "notes.txt", check=False), "is a file")


def test_synth_into_a_read_only_place_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = Path("/sys/ernie-edge-synth-test")  # sysfs refuses new folders, even to root
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        target = tmp_path / "ro" / "out"
    assert_user_error(run("synth", target, check=False), "cannot write the checkpoint")
    assert not target.exists()


def test_synth_that_runs_out_of_space_leaves_nothing_behind(tmp_path):
    """A file-size limit makes the first shard's write fail part way, like a full disk."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "s"
    proc = subprocess.run([*CLI, "synth", str(out)], capture_output=True, text=True, env=cli_env(),
                          preexec_fn=limit, timeout=120)
    assert_user_error(proc, "cannot write the checkpoint: File too large")
    assert not out.exists()  # the half shard and the folder this run made are gone


def test_info_into_a_closed_pipe_exits_quietly(tiny_edge_dir):
    read, write = os.pipe()
    os.close(read)  # nobody reads: like `ernie-edge info M | head -0`
    proc = subprocess.run([*CLI, "info", str(tiny_edge_dir)], stdout=write, stderr=subprocess.PIPE, env=cli_env(),
                          timeout=120)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == b""


def test_eval_shows_progress(tiny_edge_dir, tiny_dir):
    proc = run("eval", "--model", tiny_edge_dir, "--reference", tiny_dir, "--prompts", 2, "--tokens", 8)
    assert "eval" in proc.stderr and "2/2" in proc.stderr
    assert "Mean    KLD" in proc.stdout


# ---- help and errors ----------------------------------------------------------------------------

def test_every_flag_has_help_and_the_description_is_whole():
    import argparse

    from ernie_edge.cli import build_parser
    parser = build_parser()
    assert parser.description.endswith(".") and "ERNIE" in parser.description
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {action.option_strings or action.dest}" for name, p in sub.choices.items()
               for action in p._actions if not action.help]
    assert missing == []
    assert all(choice.help for choice in sub._choices_actions)


def walk_cases(tiny_dir, edge, nan_dir, tmp):
    """(args, fragment of the one error line) for each subcommand's bad inputs."""
    a_file = tmp / "a-file.txt"
    a_file.write_text("x")
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("x")
    (tmp / "models" / "junk").mkdir(parents=True)
    bad_messages = tmp / "messages.json"
    bad_messages.write_text('[{"role": "robot", "content": "hi"}]')
    gen = ["generate", "--model", edge, "--prompt", "x"]
    return {
        "demo": [(["demo", "--prompt"], "expected one argument")],
        "generate": [
            (["generate", "--model", tmp / "nowhere", "--prompt", "x"], "no such file or folder"),
            (["generate", "--model", "no-such-model", "--prompt", "x"], "no model of that name"),
            (["generate", "--model", edge], "one of the arguments --prompt --prompt-file --messages is required"),
            (["generate", "--model", tiny_dir, "--prompt", "x"], "ernie-edge convert"),
            (gen + ["--max-tokens", "0"], "--max-tokens: must be >= 1"),
            (gen + ["--temperature", "abc"], "invalid float value"),
            (gen + ["--temperature", "-1"], "temperature must be"),
            (gen + ["--top-p", "2"], "top_p must be"),
            (gen + ["--presence-penalty", "5"], "presence_penalty must be"),
            (gen + ["--max-tokens", "200000"], "context holds"),
            (gen + ["--ctx-size", "8"], "--ctx-size: must be >= 16"),
            (gen + ["--threads", "-1"], "--threads: must be >= 0"),
            (["generate", "--model", edge, "--messages", tmp / "missing.json"], "cannot read it"),
            (["generate", "--model", edge, "--messages", a_file], "cannot read JSON"),
            (["generate", "--model", edge, "--messages", bad_messages], "messages[0].role: unknown role"),
            (["generate", "--model", edge, "--prompt-file", tmp / "missing.txt"], "No such file"),
            (gen + ["--tools", tmp / "missing.json"], "--tools"),
            (["generate", "--model", edge, "--prompt", " "], "the prompt is empty"),
            (["generate", "--model", nan_dir, "--backend", "reference", "--prompt", "x"], "NaN"),
        ],
        "chat": [
            (["chat", "--model", tmp / "nowhere"], "no such file or folder"),
            (["chat", "--model", tiny_dir], "ernie-edge convert"),
            (["chat", "--model", edge, "--top-k", "-1"], "--top-k: must be >= 0"),
            (["chat", "--model", edge, "--tools", a_file], "--tools"),
        ],
        "list": [(["list", "extra"], "unrecognized arguments")],
        "rm": [
            (["rm", "nothere", "--yes"], "no model named 'nothere'"),
            (["rm", "../escape", "--yes"], "not a model name"),
            (["rm", "junk"], "pass --yes"),
        ],
        "convert": [
            (["convert", "/nonexistent"], "folder not found"),
            (["convert", tiny_dir, "--recipe", "q5"], "--recipe 'q5'"),
            (["convert", tiny_dir, "--threads", "x"], "expected a whole number"),
            (["convert", edge], "already a converted"),
            (["convert", tiny_dir, "--group-size", "33"], "invalid choice"),
        ],
        "verify": [(["verify", tmp / "nowhere"], "no such file or folder"),
                   (["verify", tiny_dir], "unconverted HF checkpoint")],
        "info": [(["info", tmp / "nowhere"], "no such file or folder"), (["info", tiny_dir], "unconverted")],
        "eval": [
            (["eval", "--model", edge], "--reference"),
            (["eval", "--model", tmp / "nowhere", "--reference", tiny_dir, "--no-progress"], "no such file"),
            (["eval", "--model", edge, "--reference", tiny_dir, "--prompts", "0"], "--prompts: must be >= 1"),
            (["eval", "--model", edge, "--reference", tiny_dir, "--prompts", "1", "--tokens", "4", "--no-progress",
              "--json", "/proc/ernie-edge/report.json"], "--json /proc/ernie-edge/report.json"),
        ],
        "bench": [
            (["bench", "--model", tiny_dir], "ernie-edge convert"),
            (["bench", "--model", edge, "--gen-tokens", "0"], "--gen-tokens: must be >= 1"),
            (["bench", "--model", edge, "--prompt-tokens", "many"], "expected a whole number"),
            (["bench", "--model", tmp / "nowhere"], "no such file or folder"),
            (["bench", "--model", edge, "--json", a_file / "b.json"], "cannot write there"),
        ],
        "serve": [
            (["serve", "--model", tmp / "nowhere"], "no such file or folder"),
            (["serve", "--model", tiny_dir], "ernie-edge convert"),
            (["serve", "--model", edge, "--port", "0"], "--port: must be >= 1"),
            (["serve", "--model", edge, "--slots", "x"], "expected a whole number"),
            (["serve", "--model", edge, "--host", "0.0.0.0"], "needs --api-key"),
            (["serve", "--model", edge, "--api-key-file", tmp / "missing.key"], "cannot read it"),
            (["serve", "--model", edge, "--ctx", "64", "--ctx-size", "128"], "disagree"),
        ],
        "gui": [(["gui", "--theme", "purple"], "invalid choice"), (["gui", "extra"], "unrecognized arguments")],
        "install-desktop": [(["install-desktop", "extra"], "unrecognized arguments")],
        "synth": [
            (["synth", a_file], "is a file"),
            (["synth", tmp / "full"], "not empty"),
            (["synth", tmp / "s", "--layers", "0"], "--layers: must be >= 1"),
            (["synth", tmp / "s", "--preset", "huge"], "invalid choice"),
        ],
    }


def test_every_subcommand_fails_cleanly_on_bad_input(tiny_dir, tiny_edge_dir, nan_dir, tmp_path):
    from ernie_edge.cli import build_parser
    cases = walk_cases(tiny_dir, tiny_edge_dir, nan_dir, tmp_path)
    import argparse
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(cases) == set(sub.choices)  # a new subcommand needs its bad inputs here

    def check(case):
        args, fragment = case
        proc = run(*args, check=False, home=tmp_path)
        try:
            assert_user_error(proc, fragment)
        except AssertionError as e:
            return f"{args}: {e}"
        return None

    with ThreadPoolExecutor(3) as pool:
        failures = [f for f in pool.map(check, [c for group in cases.values() for c in group]) if f]
    assert failures == []


def test_os_errors_are_one_line_too(tiny_edge_dir, monkeypatch, capsys):
    """A file another user made unreadable (e.g. an old 0600 tokenizer.json) is a message, not a
    traceback: simulated here, since the tests may run as root."""
    from ernie_edge import cli, manifest

    def unreadable(folder, **kw):
        raise PermissionError(13, "Permission denied", str(tiny_edge_dir / "tokenizer.json"))

    monkeypatch.setattr(manifest, "verify", unreadable)
    assert cli.main(["verify", str(tiny_edge_dir)]) == 2
    assert capsys.readouterr().err == f"ernie-edge verify: error: {tiny_edge_dir / 'tokenizer.json'}: Permission denied\n"
