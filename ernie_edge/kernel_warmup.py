"""Getting a model's CPU kernels ready before its first request, with progress.

numba compiles each kernel on first use: a few tens of seconds once per kernel version and SIMD
path, after which every run loads them from the on-disk cache (kernels/_jit.py) in a second or two.
`warm_up` runs a throwaway pass through every path a model takes (a short and a long prefill, a
one-token decode, a batched decode step), so that no request later stalls on a compile, and
reports each kernel numba starts compiling. How many kernels a cold warm-up compiled is kept per
set of weight formats (beside numba's cache), so the next cold warm-up - after an upgrade, say -
can show a bar with a total. `console_warm_up` draws that bar on a terminal.

numba compiles on the calling thread, one kernel at a time. On a machine with two or more cores a
cold warm-up therefore starts a helper process (`python -m ernie_edge.kernel_warmup decode ...`) at
its first compile: the helper compiles the one-token decode path into the shared on-disk cache
while this process compiles the prefill and batched paths; then this process runs the decode path
too, which loads what the helper compiled. The helper's compiles are reported as this process's
(it prints one line per compile). A warm start, where nothing compiles, starts no helper. If the
helper fails, this process compiles those kernels itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

COUNTS_FILE = "warmup-counts.json"  # in $NUMBA_CACHE_DIR: {formats key: kernels a cold warm-up compiled}


@dataclass(frozen=True)
class WarmupProgress:
    compiled: int  # kernels compiled so far by this warm-up
    expected: int | None  # what the last cold warm-up of these weight formats compiled (None: unknown)
    kernel: str  # the last ernie-edge kernel numba started compiling (its helpers from numba count too)
    elapsed_s: float


@contextmanager
def compile_events(callback: Callable[[str], None]):
    """Call callback("module.qualname") whenever numba starts compiling a function (not when it
    loads one from its cache) inside the block: ernie-edge's kernels and the numba helpers they
    use."""
    from numba.core import event

    class Listener(event.Listener):
        def on_start(self, ev):
            fn = getattr(ev.data.get("dispatcher"), "py_func", None)
            callback(f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}")

        def on_end(self, ev):
            pass

    with event.install_listener("numba:compile", Listener()):
        yield


def formats_key(model) -> str:
    """The kernel set a model needs: its backend, weight formats, KV cache type and activation roundings."""
    manifest = getattr(getattr(model, "weights", None), "manifest", None)
    tensors = getattr(manifest, "tensors", None) or {}
    quants = sorted({getattr(t, "quant", None) or (t.get("quant") if isinstance(t, dict) else None) or "?"
                     for t in (tensors.values() if isinstance(tensors, dict) else tensors)})
    kv = getattr(model.backend, "kv_dtype", "f16")
    acts = [getattr(model.backend, name, None) for name in ("prefill_acts", "decode_acts")]
    acts_key = ":acts-" + "-".join(acts) if None not in acts else ""
    return f"{model.backend_name}:{','.join(quants)}:kv-{kv}{acts_key}"


def _counts_path() -> Path | None:
    root = os.environ.get("NUMBA_CACHE_DIR")
    return Path(root) / COUNTS_FILE if root else None


def _read_counts() -> dict:
    path = _counts_path()
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def _save_count(key: str, n: int) -> None:
    path = _counts_path()
    if path is None:
        return
    counts = _read_counts()
    counts[key] = n
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(counts, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache dir only loses the estimate


class _DecodeHelper:
    """The helper process that compiles a model's one-token decode path into numba's cache, and the
    thread that relays its compile lines to `report`."""

    def __init__(self, model, report: Callable[[str], None]):
        backend = model.backend
        cmd = [sys.executable, "-m", "ernie_edge.kernel_warmup", "decode", str(model.path),
               "--kv-dtype", getattr(backend, "kv_dtype", "f16"), "--decode-acts", getattr(backend, "decode_acts", "i8")]
        if getattr(backend, "max_context", None):
            cmd += ["--max-context", str(backend.max_context)]
        from .kernels import _jit
        env = dict(os.environ, NUMBA_CACHE_DIR=_jit.CACHE_ROOT, ERNIE_EDGE_SIMD=_jit.SIMD)  # this process's cache
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                     text=True, env=env)
        self.thread = threading.Thread(target=self._relay, args=(report,), daemon=True)
        self.thread.start()

    def _relay(self, report) -> None:
        for line in self.proc.stdout:
            if line.startswith("compile "):
                report(line[len("compile "):].strip())

    def wait(self) -> None:
        self.proc.wait()
        self.thread.join()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()



def _helper_wanted(model) -> bool:
    """A decode helper pays off where there is a second core to compile on and the model runs on
    the CPU backend from a folder a child process can load."""
    return ((os.cpu_count() or 1) >= 2 and model.backend_name == "cpu" and os.environ.get(HELPER_ENV) != "0"
            and os.name == "posix"  # numba's cache saves are locked there (kernels/_jit.py)
            and getattr(model, "location", None) is not None and getattr(model.location, "kind", None) == "edge")


HELPER_ENV = "ERNIE_EDGE_WARMUP_HELPER"  # "0": compile everything in this process


def warm_up(model, progress: Callable[[WarmupProgress], None] | None = None) -> float:
    """Compile (first run) or load (cached) every kernel the model's requests will use, through a
    throwaway pass; returns the seconds it took. progress, when given, is called as each kernel
    starts compiling (here or in the decode helper)."""
    from .cpu_weights import QBATCH_MAX_T
    from .kernels import _jit  # noqa: F401 (numba's options and cache dir before any compile)

    key = formats_key(model)
    expected = _read_counts().get(key)
    compiled: list[str] = []
    t0 = time.perf_counter()
    lock = threading.Lock()
    helper: _DecodeHelper | None = None
    helper_tried = False  # at the first compile: a cold start
    kernel = ""

    def on_compile(name: str) -> None:
        nonlocal kernel, helper, helper_tried
        with lock:
            compiled.append(name)
            if name.startswith("ernie_edge."):
                kernel = name.removeprefix("ernie_edge.kernels.").removeprefix("ernie_edge.")
            if progress is not None:
                progress(WarmupProgress(len(compiled), expected, kernel, time.perf_counter() - t0))
            if not helper_tried:
                helper_tried = True
                if _helper_wanted(model):
                    try:
                        helper = _DecodeHelper(model, on_compile)
                    except OSError:
                        pass  # no helper: this process compiles the decode path too

    # a context shorter than QBATCH_MAX_T never takes the long-prompt path: no need to compile it
    context = getattr(model.backend, "max_context", None) or model.config.max_position_embeddings
    long = min(QBATCH_MAX_T + 1, context)
    ids = np.arange(long, dtype=np.int64) % model.config.vocab_size
    try:
        with compile_events(on_compile):
            _decode_share(model)  # a part of the decode helper's path, compiled here
            a, b = model.new_cache(), model.new_cache()
            model.prefill(ids[:2], a)  # the small-batch path (the first compile starts the helper)
            model.prefill(ids[:3], b)
            model.decode_batch([3, 4], [a, b])  # the engine's batched step
            model.prefill(ids, model.new_cache())  # the long-prompt path
            if helper is not None:
                helper.wait()  # its kernels are in the cache now (or it failed: compiled below)
            model.decode(5, a)  # one-token decode
    finally:
        if helper is not None:
            helper.stop()
    if compiled:
        _save_count(key, len(compiled))
    return time.perf_counter() - t0


def _moe_and_dense(layers: list) -> tuple[list, list]:
    """The CPU backend's layers split into (MoE layers, dense ones: a plain MLP, ERNIE's layer 0)."""
    from .cpu_weights import SwiGLU
    return ([L for L in layers if not isinstance(L.mlp, SwiGLU)],
            [L for L in layers if isinstance(L.mlp, SwiGLU)])


def _dense_layers_last(layers: list) -> list:
    """The layers with the MoE ones first and the dense ones last."""
    moe, dense = _moe_and_dense(layers)
    return moe + dense


def _decode_share(model) -> None:
    """Compile here the part of the one-token decode path that the decode helper reaches late: the
    dense layers' MLP gate / up kernel (ERNIE's layer 0: a kernel of its own) and the MoE layers'
    paired down projection, by running each once. The helper - the longer half of a cold warm-up -
    runs the dense layers last, and gets to the down projection after the attention kernels and the
    routed gate / up region: by then both are in numba's cache. Balances the two processes (4-layer
    default recipe, 2 cores, Intel Xeon 2026-12-08: the helper had ended 7.7 s after this process's
    share; ~32 -> ~28 s). The router needs nothing here: decode routes inside the gate / up region."""
    backend = model.backend
    buf = getattr(backend, "buf", None)
    if model.backend_name != "cpu" or buf is None:
        return  # the CPU backend's layers only
    x, s = np.zeros(model.config.hidden_size, np.float32), buf.scratch
    moe, dense = _moe_and_dense(backend.layers)
    if dense:
        dense[0].mlp.gate_up_silu(x, s)
    if moe:
        paired = moe[0].mlp.bind_paired(x, buf.y, s)
        if paired is not None:
            s.idx[:] = 0  # any experts do: the down projections (into buf.y) only need compiling
            s.he[:] = 0.0
            paired[1]()


def _decode_main(argv: list[str]) -> int:
    """The decode helper: load the model, compile its one-token decode path, print a line per compile."""
    ap = argparse.ArgumentParser(prog="python -m ernie_edge.kernel_warmup")
    ap.add_argument("part", choices=["decode"])
    ap.add_argument("model")
    ap.add_argument("--kv-dtype", default="f16")
    ap.add_argument("--max-context", type=int)
    ap.add_argument("--decode-acts", default="i8")
    a = ap.parse_args(argv)
    from .model import load
    model = load(a.model, backend="cpu", threads=1, prefetch=False, kv_dtype=a.kv_dtype, max_context=a.max_context,
                 decode_acts=a.decode_acts)
    # The main process compiles the dense layers' MLP kernel first (`_decode_share`): by the time this
    # pass reaches those layers, last, it loads that kernel from the cache. (A throwaway pass: the
    # layer order changes no kernel, only the garbage it computes.)
    model.backend.layers = _dense_layers_last(model.backend.layers)
    with compile_events(lambda name: print(f"compile {name}", flush=True)):
        model.decode(1, model.new_cache())
    return 0


def console_warm_up(model, stream=sys.stderr) -> float:
    """warm_up with a progress bar on a terminal (tqdm; a line per 10 kernels when not a terminal),
    then "kernels ready in N s"."""
    from tqdm import tqdm

    print("preparing kernels (the first run compiles them, later runs load them from the cache) ...",
          file=stream, flush=True)
    bar = None

    def show(p: WarmupProgress) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=p.expected, desc="compiling kernels", unit=" kernels", file=stream,
                       disable=not getattr(stream, "isatty", lambda: False)(), leave=False)
            if bar.disable:
                print(f"compiling kernels{f' (about {p.expected})' if p.expected else ''} ...", file=stream, flush=True)
        bar.update(1)
        bar.set_postfix_str(p.kernel, refresh=True)
        if bar.disable and p.compiled % 10 == 0:
            print(f"  {p.compiled} kernels compiled, {p.elapsed_s:.0f} s", file=stream, flush=True)

    try:
        seconds = warm_up(model, show)
    finally:
        if bar is not None:
            bar.close()
    print(f"kernels ready in {seconds:.1f} s", file=stream, flush=True)
    return seconds


if __name__ == "__main__":
    sys.exit(_decode_main(sys.argv[1:]))
