"""The models store: `list`, `rm`, `--model NAME`, and what an unconverted checkpoint is answered with."""

import json
import shutil

import pytest

from cli_helpers import assert_user_error, run
from ernie_edge.errors import ModelNotFoundError
from ernie_edge.formats.recipe import DEFAULT_NAME as DEFAULT
from ernie_edge.model_dir import looks_like_path, resolve
from ernie_edge.models_store import conversion_advice, list_models


@pytest.fixture
def home(tmp_path, tiny_edge_dir, monkeypatch):
    """ERNIE_EDGE_HOME with the converted tiny model in its store as `tiny-q4g32-d8`, beside an
    unconverted checkpoint and an unfinished conversion."""
    store = tmp_path / "models"
    shutil.copytree(tiny_edge_dir, store / "tiny-q4g32-d8")
    (store / "raw-hf").mkdir()
    (store / "raw-hf" / "config.json").write_text("{}")
    (store / "half-q4g32-d8.partial").mkdir()
    monkeypatch.setenv("ERNIE_EDGE_HOME", str(tmp_path))
    return tmp_path


def test_list_shows_the_store_and_each_model(home):
    lines = run("list", home=home).stdout.splitlines()
    assert lines[0] == f"models store: {home / 'models'}"
    assert lines[1].split() == ["NAME", "SIZE", "RECIPE", "PATH"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"tiny-q4g32-d8", "raw-hf", "half-q4g32-d8.partial"}
    assert DEFAULT in rows["tiny-q4g32-d8"].split()[3] and "KB" in rows["tiny-q4g32-d8"]
    assert str(home / "models" / "tiny-q4g32-d8") in rows["tiny-q4g32-d8"]
    assert "(not converted)" in rows["raw-hf"] and "(unfinished)" in rows["half-q4g32-d8.partial"]
    listed = json.loads(run("list", "--json", home=home).stdout)
    assert listed["store"] == str(home / "models")
    tiny = next(m for m in listed["models"] if m["name"] == "tiny-q4g32-d8")
    assert tiny["kind"] == "edge" and tiny["recipe"] == DEFAULT and tiny["bytes"] > 100_000


def test_an_empty_store_says_how_to_fill_it(tmp_path):
    out = run("list", home=tmp_path).stdout
    assert f"models store: {tmp_path / 'models'}" in out and "ernie-edge convert" in out


def test_model_names_resolve_everywhere_a_model_is_taken(home):
    assert resolve("tiny-q4g32-d8").path == home / "models" / "tiny-q4g32-d8"
    result = json.loads(run("generate", "--model", "tiny-q4g32-d8", "--prompt", "Hi", "--max-tokens", 3,
                            "--json", home=home).stdout)
    assert result["usage"]["completion_tokens"] == 3
    assert run("info", "tiny-q4g32-d8", home=home).stdout.startswith(str(home / "models" / "tiny-q4g32-d8"))
    assert run("verify", "tiny-q4g32-d8", home=home).stdout.strip() == "OK"
    with pytest.raises(ModelNotFoundError, match="no model of that name in the models store"):
        resolve("tiny-q4g32-d4")


def test_rm_asks_or_needs_yes(home):
    assert_user_error(run("rm", "tiny-q4g32-d8", home=home, check=False), "pass --yes")
    assert (home / "models" / "tiny-q4g32-d8").is_dir()
    out = run("rm", "tiny-q4g32-d8", "--yes", home=home).stdout
    assert out.startswith("deleted tiny-q4g32-d8") and not (home / "models" / "tiny-q4g32-d8").exists()
    assert [m.name for m in list_models()] == ["half-q4g32-d8.partial", "raw-hf"]


def test_an_unconverted_checkpoint_points_to_its_converted_copy(home, tiny_dir):
    advice = conversion_advice(str(tiny_dir), resolve(tiny_dir))
    assert "a converted copy is in the models store: use --model tiny-q4g32-d8" in advice
    shutil.rmtree(home / "models" / "tiny-q4g32-d8")
    advice = conversion_advice(str(tiny_dir), resolve(tiny_dir))
    assert f"`ernie-edge convert {tiny_dir}` (then use --model {tiny_dir.name}-{DEFAULT})" in advice


@pytest.mark.parametrize("text, is_path", [
    ("/abs/model", True), ("./model", True), ("../model", True), ("~/model", True), ("a/b/c", True),
    ("models/", True), ("baidu/ERNIE-4.5-21B-A3B-Thinking", False), ("tiny-q4g32-d8", False)])
def test_what_looks_like_a_path(text, is_path):
    assert looks_like_path(text) == is_path


def test_a_cached_repo_id_is_refused_with_its_convert_command(tiny_dir, tmp_path):
    """A repo in the local HF cache (HF_HUB_CACHE layout) is an unconverted checkpoint too."""
    import os
    import subprocess

    from cli_helpers import CLI, cli_env
    snapshot = tmp_path / "hub" / "models--acme--Tiny-ERNIE" / "snapshots" / "abc123"
    shutil.copytree(tiny_dir, snapshot)
    (tmp_path / "hub" / "models--acme--Tiny-ERNIE" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--Tiny-ERNIE" / "refs" / "main").write_text("abc123")
    env = dict(cli_env(home=tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"))
    proc = subprocess.run([*CLI, "chat", "--model", "acme/Tiny-ERNIE"], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert_user_error(proc, f"`ernie-edge convert acme/Tiny-ERNIE` (then use --model Tiny-ERNIE-{DEFAULT})")


def test_rm_on_a_terminal_asks_first(home):
    import os
    import pty
    import subprocess

    from cli_helpers import CLI, cli_env

    def rm_answering(answer: bytes) -> bytes:
        master, slave = pty.openpty()
        proc = subprocess.Popen([*CLI, "rm", "tiny-q4g32-d8"], stdin=slave, stdout=slave, stderr=slave,
                                env=cli_env(home=home))
        os.close(slave)
        out = b""
        while b"[y/N]" not in out:
            out += os.read(master, 4096)
        os.write(master, answer + b"\r")
        assert proc.wait(timeout=60) == 0
        try:
            while chunk := os.read(master, 4096):
                out += chunk
        except OSError:  # EIO once the child has closed the terminal
            pass
        os.close(master)
        return out

    assert b"kept" in rm_answering(b"n") and (home / "models" / "tiny-q4g32-d8").is_dir()
    assert b"deleted tiny-q4g32-d8" in rm_answering(b"y") and not (home / "models" / "tiny-q4g32-d8").exists()
