"""The kernel warm-up (ernie_edge/kernel_warmup.py): every path compiled before the first request,
progress for each kernel numba compiles, and the count kept for the next cold start."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import numba
import pytest

import ernie_edge
from ernie_edge import kernel_warmup
from ernie_edge.kernel_warmup import WarmupProgress, compile_events, console_warm_up, formats_key, warm_up


def test_compile_events_report_real_compiles_only():
    seen = []

    @numba.njit
    def twice(x):
        return 2 * x

    with compile_events(seen.append):
        twice(3)  # compiles
        twice(4)  # the same signature: no compile
    twice(5.0)  # outside the block: not reported
    assert seen == ["test_kernel_warmup.test_compile_events_report_real_compiles_only.<locals>.twice"]


def test_progress_names_ernie_edge_kernels(edge_dir, tmp_path):
    """A cold warm-up (a fresh numba cache, in a child process) reports every compile, names only
    ernie-edge's kernels, and saves the count for the next cold start."""
    import os
    import subprocess
    import sys
    code = ("import json, sys, ernie_edge\n"
            "from ernie_edge import kernel_warmup\n"
            "helpers, Helper = [], kernel_warmup._DecodeHelper\n"
            "kernel_warmup._DecodeHelper = lambda *a: helpers.append(1) or Helper(*a)\n"
            "seen = []\n"
            "kernel_warmup.warm_up(ernie_edge.load(sys.argv[1]), lambda p: seen.append((p.compiled, p.kernel)))\n"
            "print(json.dumps([seen, len(helpers)]))\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), ERNIE_EDGE_WARMUP_HELPER="1")

    def cold_then_warm():
        out = subprocess.run([sys.executable, "-c", code, str(edge_dir)], capture_output=True, text=True, env=env,
                             timeout=900, check=True).stdout
        return json.loads(out.splitlines()[-1])

    seen, helpers = cold_then_warm()
    # on two or more cores the decode path compiled in a helper process, into the same cache: a
    # second process finds every kernel there
    assert helpers == (1 if (os.cpu_count() or 1) >= 2 else 0)
    assert cold_then_warm() == [[], 0]
    assert [n for n, _ in seen] == list(range(1, len(seen) + 1)) and len(seen) > 20
    names = {k for _, k in seen if k}
    assert any(k.startswith("q8.") or k.startswith("qbatch.") for k in names), names
    ours = {f.stem for d in (Path(ernie_edge.__file__).parent, Path(ernie_edge.__file__).parent / "kernels")
            for f in d.glob("*.py")}
    assert {k.split(".")[0] for k in names} <= ours, names  # numba's own helpers are counted, not named
    counts = json.loads((tmp_path / "numba" / kernel_warmup.COUNTS_FILE).read_text())
    assert list(counts.values()) == [len(seen)]


def test_warm_up_runs_every_path_and_reports_progress(edge_dir, tmp_path, monkeypatch):
    """Kernels already in this process: nothing compiles, no progress, no count saved; a fake compile
    event goes through the callback with the saved count as `expected`. Without the decode helper
    (the test above covers it): a helper is a new process, started at the first compile, and it
    compiles whatever its path does not find in the on-disk cache, which right after a change of
    the kernel sources need not hold every kernel this process compiled in earlier tests."""
    model = ernie_edge.load(edge_dir)
    model.warmup()  # whatever was not compiled yet in this process
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))  # where the counts are kept
    monkeypatch.setenv(kernel_warmup.HELPER_ENV, "0")
    calls = {"prefill": 0, "decode": 0, "decode_batch": 0}
    for name in calls:
        orig = getattr(model, name)

        def counted(*args, _orig=orig, _name=name, **kw):
            calls[_name] += 1
            return _orig(*args, **kw)
        monkeypatch.setattr(model, name, counted)
    got: list[WarmupProgress] = []
    seconds = warm_up(model, got.append)
    assert seconds > 0 and got == []  # all loaded: nothing compiled
    assert calls["decode_batch"] == 1 and calls["prefill"] >= 3 and calls["decode"] >= 1
    assert not (tmp_path / kernel_warmup.COUNTS_FILE).exists()

    (tmp_path / kernel_warmup.COUNTS_FILE).write_text(json.dumps({formats_key(model): 7}))

    @numba.njit
    def fresh(x):
        return x + 1

    def with_compile(*args, _orig=model.decode_batch, **kw):
        fresh(np.int64(1))  # a real compile inside the warm-up
        return _orig(*args, **kw)
    monkeypatch.setattr(model, "decode_batch", with_compile)
    warm_up(model, got.append)
    assert [(p.compiled, p.expected) for p in got] == [(1, 7)]
    assert json.loads((tmp_path / kernel_warmup.COUNTS_FILE).read_text()) == {formats_key(model): 1}


def test_formats_key_names_the_weight_formats(edge_dir):
    model = ernie_edge.load(edge_dir)
    key = formats_key(model)
    backend, formats, kv, acts = key.split(":")
    assert backend == "cpu" and kv == "kv-f16" and acts == "acts-i8-i8"
    assert set(formats.split(",")) <= {"q4", "q5", "q6", "q8", "f16", "f32"} and formats
    assert formats_key(ernie_edge.load(edge_dir, decode_acts="i16")).endswith(":acts-i8-i16")


def test_console_warm_up_prints_ready_line(edge_dir):
    out = io.StringIO()
    seconds = console_warm_up(ernie_edge.load(edge_dir), out)
    text = out.getvalue()
    assert text.startswith("preparing kernels") and f"kernels ready in {seconds:.1f} s" in text


@pytest.fixture(scope="module")
def edge_dir(tmp_path_factory):
    from ernie_edge.quant import synthetic
    from ernie_edge.quant.convert import ConvertSettings, convert
    root = tmp_path_factory.mktemp("warm")
    src = synthetic.write_checkpoint(root / "src", "tiny", layers=2)
    return convert(ConvertSettings(source=str(src), dest=root / "edge", progress=False))


def test_decode_share_runs_what_the_helper_reaches_late(edge_dir):
    """The main process's share of the decode path (the dense MLP's gate / up and the MoE layers'
    paired down projection) runs on the model's own buffers; the helper's layer order puts the
    dense layers last and keeps every layer."""
    from ernie_edge.cpu_weights import SwiGLU
    model = ernie_edge.load(edge_dir)
    layers = model.backend.layers
    s = model.backend.buf.scratch
    s.idx[:] = -1  # not experts: the share must set its own
    s.g[:] = np.nan
    model.backend.buf.y[:] = np.nan
    kernel_warmup._decode_share(model)
    dense = [L for L in layers if isinstance(L.mlp, SwiGLU)]
    assert dense, "the test model has a dense layer 0"
    assert np.isfinite(s.g[:dense[0].mlp.width]).all()  # gate / up / SwiGLU of x = 0 ran
    assert ((s.idx >= 0) & (s.idx < model.config.moe_num_experts)).all()
    assert np.isfinite(model.backend.buf.y).all()  # the paired down projection ran
    order = kernel_warmup._dense_layers_last(layers)
    assert sorted(map(id, order)) == sorted(map(id, layers))
    kinds = [isinstance(L.mlp, SwiGLU) for L in order]
    assert kinds == sorted(kinds)  # MoE layers first, dense ones last
