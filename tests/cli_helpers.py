"""Running `ernie-edge` as a user does, in a subprocess, and checking how it fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "ernie_edge.cli"]


def cli_env(home: Path | None = None) -> dict:
    """The environment of a CLI run; `home` is its ERNIE_EDGE_HOME (models store, caches)."""
    env = dict(os.environ, OMP_WAIT_POLICY="passive", OPENBLAS_NUM_THREADS="1")
    env.pop("NO_COLOR", None)
    if home is not None:
        env["ERNIE_EDGE_HOME"] = str(home)
    return env


def interruptible() -> None:
    """preexec_fn of a child that a test sends SIGINT: SIGINT back to its default action, so that
    Python in the child installs its KeyboardInterrupt handler even when the test run itself
    ignores SIGINT (as a background job of a non-interactive shell, or under nohup, does)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(*args, input: str | None = None, check: bool = True, home: Path | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, input=input,
                          timeout=timeout, env=cli_env(home), stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_user_error(proc: subprocess.CompletedProcess, fragment: str = "") -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0], (fragment, lines[0])


def nan_checkpoint(src: Path, out: Path) -> Path:
    """A copy of the HF checkpoint `src` with NaN in its final norm: every logit is NaN."""
    shutil.copytree(src, out)
    name = "model.norm.weight"
    shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    with open(shard, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        start, end = json.loads(f.read(n))[name]["data_offsets"]
        f.seek(8 + n + start)
        f.write(b"\xc0\x7f" * ((end - start) // 2))  # bf16 NaN
    return out
