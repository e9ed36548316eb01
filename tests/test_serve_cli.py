"""`ernie-edge serve` as a user runs it: a subprocess on a unix socket (mode 0600) that prints its
banner, answers, and drains and exits 0 on Ctrl-C (SIGINT); unsafe settings refused up front."""

from __future__ import annotations

import os
import selectors
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ernie_edge.cli import main
from ernie_edge.server.settings import ServeError, ServeSettings, read_api_key_file
from cli_helpers import interruptible
from serve_helpers import converted_tiny

ROOT = Path(__file__).resolve().parent.parent


def read_until(proc, text: str, timeout: float) -> str:
    """stdout of proc (a binary pipe) up to and including `text` (fails after timeout). It reads
    the pipe's descriptor itself: a buffered readline would keep lines that have arrived where
    the selector cannot see them, and wait for more that never come."""
    out, deadline, fd = b"", time.monotonic() + timeout, proc.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while text.encode() not in out:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} in time; output so far:\n{out.decode(errors='replace')}"
            if sel.select(left):
                chunk = os.read(fd, 1 << 16)
                assert chunk, f"exited ({proc.wait()}) before {text!r}; output:\n{out.decode(errors='replace')}"
                out += chunk
    return out.decode()


def test_serve_on_a_unix_socket_then_ctrl_c(tiny_dir, tmp_path_factory, tmp_path):
    model = converted_tiny(tiny_dir, tmp_path_factory)
    sock = tmp_path / "api.sock"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ernie_edge.cli", "serve", "--model", str(model), "--unix-socket",
                             str(sock), "--threads", "1", "--slots", "1", "--ctx", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            preexec_fn=interruptible)
    try:
        banner = read_until(proc, "Ctrl-C stops the server", 120)
        assert "ready at http://localhost (unix socket" in banner and "memory: weights" in banner
        assert f"curl --unix-socket {sock} http://localhost/v1/chat/completions" in banner
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost") as c:
            assert c.get("/health").json() == {"status": "ok"}
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
            assert r.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "ernie-edge serve: stopped" in proc.stdout.read().decode()
        assert not sock.exists()
    finally:
        proc.kill()
        proc.wait()


def test_unsafe_settings_are_refused(tmp_path, capsys):
    with pytest.raises(ServeError, match="--host 0.0.0.0 exposes the API.*needs --api-key"):
        ServeSettings(model="m", host="0.0.0.0").check()
    ServeSettings(model="m", host="0.0.0.0", api_key="k").check()
    ServeSettings(model="m", host="::1").check()
    assert main(["serve", "--model", str(tmp_path), "--host", "192.168.1.5"]) == 2
    assert "needs --api-key" in capsys.readouterr().err
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    key.chmod(0o644)
    with pytest.raises(ServeError, match="other users can read it.*chmod 600"):
        read_api_key_file(key)
    key.chmod(0o600)
    assert read_api_key_file(key) == "s3cret"


def test_allowed_hosts():
    hosts = ServeSettings(model="m", port=8080, allow_hosts=("myhost", "other:9000")).allowed_hosts()
    assert hosts == {"127.0.0.1:8080", "localhost:8080", "[::1]:8080", "myhost:8080", "other:9000"}
    assert ServeSettings(model="m", host="0.0.0.0", api_key="k").allowed_hosts() is None
    assert ServeSettings(model="m", unix_socket=Path("/tmp/x.sock")).allowed_hosts() is None
