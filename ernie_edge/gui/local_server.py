"""The "Local API server" toggle: serve the open model over the OpenAI-compatible HTTP API on
127.0.0.1, so other programs on this computer can use it while the app runs. No Qt.

It runs `python -m ernie_edge.cli serve` as a child process on the same model folder (the weights
are memory-mapped, so the page cache is shared). The server package is optional: a build without
it says so instead of failing.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import ErnieEdgeError

UNAVAILABLE = "The local API server is not available in this build."


class LocalServer:
    def __init__(self, model_path: str, port: int):
        self.model_path = model_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}/v1"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        """Whether this build has the server (ernie_edge.server, inside this package: an editable
        install elsewhere on the path must not count)."""
        import ernie_edge
        try:
            import ernie_edge.server as server
        except ImportError:
            return False
        here = Path(ernie_edge.__file__).resolve().parent
        return here in Path(server.__file__).resolve().parents

    def start(self, timeout_s: float = 120.0) -> str:
        """Start the server and wait until it answers; returns its URL (blocking: call off the UI
        thread). Raises ErnieEdgeError when it is not in this build or does not come up."""
        if not self.available():
            raise ErnieEdgeError(UNAVAILABLE)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ernie_edge.cli", "serve", "--model", self.model_path,
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() or "").strip().splitlines()
                raise ErnieEdgeError(f"The local API server stopped: {err[-1] if err else self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1.0):
                    return self.url
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
        self.stop()
        raise ErnieEdgeError(f"The local API server did not answer on port {self.port} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
