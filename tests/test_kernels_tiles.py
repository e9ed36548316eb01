"""Every kernel that reads packed int4 / int5 / int6 weights reads them in 4-row tiles too
(ernie_edge/formats/layout.py): the same codes in another order give the same bits, in decode
(q8.py, q56.py, routed.py), the batched and prefill tiles (qbatch.py, qbatch8.py), the exact
prefill and the row dequantizers (q4.py, q56.py); on the host's SIMD path here and on the avx2 /
generic paths in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ernie_edge.formats.layout import has_tiles, tile_rows, tiled_rows, untile_rows
from ernie_edge.formats.quant import pack_q4, pack_qn
from ernie_edge.kernels import _jit, moe, q4, q8, q56, qbatch, qbatch8, routed
from ernie_edge.kernels.q8 import ActScratch

RNG = np.random.default_rng(44)
K, O, E, I, KSLOT = 256, 12, 5, 128, 3  # inputs, rows, experts, expert width, routed slots


def packed(shape, bits, gs, rng=RNG):
    """Random codes packed by rows [.., O, K*b/8] and fp16 scales [.., O, K/gs]."""
    off = 1 << (bits - 1)
    codes = rng.integers(-off, off, size=shape)
    flat = codes.reshape(-1, shape[-1])
    data = pack_q4(flat, gs) if bits == 4 else pack_qn(flat, bits)
    scales = (rng.random((*shape[:-1], shape[-1] // gs)) * 0.05 + 0.005).astype(np.float16)
    return data.reshape(*shape[:-1], -1), scales


def tiled(data, bits):
    t = tile_rows(data, bits)
    t.flags.writeable = False  # as the mapped files: the kernels compiled for those take it
    return t


# ---- the layout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 5, 6])
def test_tile_rows_layout_and_inverse(bits):
    """Tile t holds rows 4t .. 4t + 3 span by span: span s of row 4t + i at byte 4t KW + 16b (4s + i);
    a bank is tiled expert by expert; `untile_rows` and `tiled_rows` read it back."""
    data, _ = packed((2, 8, 384), bits, 32)
    t = tile_rows(data, bits)
    kw, span = data.shape[-1], 16 * bits
    for e in range(2):
        flat = t[e].reshape(-1)
        for r in range(8):
            for sp in range(kw // span):
                at = (r // 4) * 4 * kw + span * (4 * sp + r % 4)
                np.testing.assert_array_equal(flat[at:at + span], data[e, r, sp * span:(sp + 1) * span])
    np.testing.assert_array_equal(untile_rows(t, bits), data)
    ids = np.array([6, 1, 1, 7, 0])
    np.testing.assert_array_equal(tiled_rows(t[1], bits, ids), data[1][ids])


def test_no_tiles_without_whole_tiles_and_spans():
    assert has_tiles(8, 256) and not has_tiles(6, 256) and not has_tiles(8, 224)
    for shape in ((6, 256), (8, 224)):
        data, scales = packed(shape, 4, 32)
        with pytest.raises(ValueError, match="no 4-row tiles"):
            tile_rows(data, 4)
        with pytest.raises(ValueError, match="no 4-row tiles"):
            q8.bind_matvec(np.zeros(shape[1], np.float32), data, scales, np.empty(shape[0], np.float32),
                           ActScratch(shape[1]), 4, tiled=True)
    with pytest.raises(ValueError, match="not int8"):
        tile_rows(np.zeros((4, 128), np.uint8), 8)


# ---- decode ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 5, 6])
@pytest.mark.parametrize("gs", [32, 128])
@pytest.mark.parametrize("act8", [True, False])
def test_matvecs(bits, gs, act8):
    mod = q8 if bits == 4 else q56
    x = RNG.standard_normal(K).astype(np.float32)
    mats = [packed((o, K), bits, gs) for o in (O, 8, 4)]
    want, got = np.empty(O, np.float32), np.empty(O, np.float32)
    mod.matvec(x, *mats[0], want, ActScratch(K), bits, act8)
    mod.matvec(x, tiled(mats[0][0], bits), mats[0][1], got, ActScratch(K), bits, act8, tiled=True)
    np.testing.assert_array_equal(got, want)
    outs = [[np.empty(len(w), np.float32) for w, _ in mats] for _ in range(2)]
    mod.matvec3(x, [(w, s, o) for (w, s), o in zip(mats, outs[0])], ActScratch(K), bits, act8)
    mod.matvec3(x, [(tiled(w, bits), s, o) for (w, s), o in zip(mats, outs[1])], ActScratch(K), bits, act8,
                tiled=True)
    for a, b in zip(*outs):
        np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("act8", [True, False])
def test_q4_expert_banks(act8):
    x = RNG.standard_normal(K).astype(np.float32)
    (g, gsc), (u, usc) = packed((E, I, K), 4, 128), packed((E, I, K), 4, 128)
    d, dsc = packed((E, K, I), 4, 32)
    ids = np.array([3, 0, 4])
    hw, hg = np.empty((KSLOT, I), np.float32), np.empty((KSLOT, I), np.float32)
    q8.experts_gate_up_silu(x, g, gsc, u, usc, ids, hw, ActScratch(K), 4, act8)
    q8.experts_gate_up_silu(x, tiled(g, 4), gsc, tiled(u, 4), usc, ids, hg, ActScratch(K), 4, act8, tiled=True)
    np.testing.assert_array_equal(hg, hw)
    wts = RNG.random(KSLOT).astype(np.float32)
    yw, yg = np.empty(K, np.float32), np.empty(K, np.float32)
    q8.experts_down_weighted(hw, d, dsc, ids, wts, yw, ActScratch(I, rows=KSLOT), 4, act8)
    q8.experts_down_weighted(hw, tiled(d, 4), dsc, ids, wts, yg, ActScratch(I, rows=KSLOT), 4, act8, tiled=True)
    np.testing.assert_array_equal(yg, yw)


@pytest.mark.parametrize("shared_bits", [4, 5])
@pytest.mark.parametrize("act8", [True, False])
def test_pairs_and_routed_region(shared_bits, act8):
    """A MoE layer's routed bank and shared expert, both tiled, in the paired kernels (q8.py's with a
    q4 shared expert, q56.py's with a q5 one) and in routed.py's region with its router."""
    x = RNG.standard_normal(K).astype(np.float32)
    (g, gsc), (u, usc), (d, dsc) = packed((E, I, K), 4, 128), packed((E, I, K), 4, 128), packed((E, K, I), 4, 128)
    S = 256  # shared expert width
    sg, su, sd = packed((S, K), shared_bits, 32), packed((S, K), shared_bits, 32), packed((K, S), shared_bits, 32)
    ids = np.array([2, 4, 1])
    wr = RNG.standard_normal((E, K)).astype(np.float32)
    bias = np.zeros(E, np.float32)
    results = []
    for t in (False, True):
        lay = (lambda w, b: tiled(w, b)) if t else (lambda w, b: w)
        ha, hb = np.empty((KSLOT, I), np.float32), np.empty((1, S) if shared_bits == 4 else S, np.float32)
        acts = ActScratch(K, rows=KSLOT), ActScratch(max(K, S))
        bank = (lay(g, 4), gsc, lay(u, 4), usc, ids, ha, 4, t)
        if shared_bits == 4:
            shared = (lay(sg[0][None], 4), sg[1][None], lay(su[0][None], 4), su[1][None], np.zeros(1, np.int64),
                      hb, 4, t)
            q8.experts_pair_gate_up_silu(x, bank, shared, *acts, act8)
        else:
            shared = (lay(sg[0], 5), sg[1], lay(su[0], 5), su[1], hb, 5, t)
            q56.pair_gate_up_silu(x, bank, shared, *acts, act8)
        y = np.empty(K, np.float32)
        wts = np.array([0.5, 0.3, 0.2], np.float32)
        down_acts = ActScratch(I, rows=KSLOT), ActScratch(S)
        if shared_bits == 4:
            q8.experts_pair_down_weighted((ha, lay(d, 4), dsc, ids, wts, 4, t),
                                          (hb, lay(sd[0][None], 4), sd[1][None], np.zeros(1, np.int64),
                                           np.ones(1, np.float32), 4, t), y, *down_acts, act8)
        else:
            q56.pair_down_weighted((ha, lay(d, 4), dsc, ids, wts, 4, t), (hb, lay(sd[0], 5), sd[1], 5, t), y,
                                   *down_acts, act8)
        # routed.py: the router picks the experts inside the region
        idx, w = np.zeros((1, 2), np.int64), np.zeros((1, 2), np.float32)
        route = moe.router_args(x, wr, bias, 2, idx, w, 1e-12, np.zeros((3, E), np.float32))
        hr, hs = np.empty((2, I), np.float32), np.empty_like(hb)
        acts_r = ActScratch(K, rows=2), ActScratch(max(K, S))
        if shared_bits == 4:
            call = routed.bind_experts_pair_gate_up_silu(route, x, (lay(g, 4), gsc, lay(u, 4), usc, hr, 4, t),
                                                         (*shared[:5], hs, 4, t), *acts_r, act8)
        else:
            call = routed.bind_pair_gate_up_silu(route, x, (lay(g, 4), gsc, lay(u, 4), usc, hr, 4, t),
                                                 (*shared[:4], hs, 5, t), *acts_r, act8)
        call()
        results.append((ha.copy(), hb.copy(), y, hr.copy(), hs.copy(), idx.copy()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(b, a)


def test_q56_gate_up_silu():
    x = RNG.standard_normal(K).astype(np.float32)
    (g, gsc), (u, usc) = packed((O, K), 6, 64), packed((O, K), 6, 64)
    want, got = np.empty(O, np.float32), np.empty(O, np.float32)
    q56.gate_up_silu(x, g, gsc, u, usc, want, ActScratch(K), 6, True)
    q56.gate_up_silu(x, tiled(g, 6), gsc, tiled(u, 6), usc, got, ActScratch(K), 6, True, tiled=True)
    np.testing.assert_array_equal(got, want)


# ---- batches and prefill ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 5, 6])
@pytest.mark.parametrize("T", [1, 5, 9])
def test_matmuls(bits, T):
    X = RNG.standard_normal((T, K)).astype(np.float32)
    w, s = packed((O, K), bits, 64)
    t = tiled(w, bits)
    small = qbatch.qmatmul if bits == 4 else (lambda X, w, s, out, b, tiled=False: q56.matmul_small(X, w, s, out, b,
                                                                                                   tiled))
    exact = (lambda X, w, s, out, b, tiled=False: q4.q4_matmul(X, w, s, out, tiled)) if bits == 4 else q56.matmul_exact
    for fn in (small, exact, qbatch8.qmatmul8):
        want, got = np.empty((T, O), np.float32), np.empty((T, O), np.float32)
        fn(X, w, s, want, bits)
        fn(X, t, s, got, bits, tiled=True)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_row_dequantizers(bits):
    w, s = packed((O, K), bits, 32)
    t = tiled(w, bits)
    want, got = np.empty((O - 3, K), np.float32), np.empty((O - 3, K), np.float32)
    if bits == 4:
        q4.q4_dequant_rows(w, s, 3, want)
        q4.q4_dequant_rows(t, s, 3, got, tiled=True)
    else:
        q56.dequant_rows(w, s, 3, want, bits)
        q56.dequant_rows(t, s, 3, got, bits, tiled=True)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("T", [1, 6])
def test_grouped_experts(T):
    x = RNG.standard_normal((T, K)).astype(np.float32)
    (g, gsc), (u, usc), (d, dsc) = packed((E, I, K), 4, 128), packed((E, I, K), 4, 128), packed((E, K, I), 4, 32)
    idx = np.stack([RNG.choice(E, KSLOT, replace=False) for _ in range(T)])
    wts = RNG.random((T, KSLOT)).astype(np.float32)
    for fn in (qbatch.qexperts, qbatch8.qexperts8):
        want, got = np.empty((T, K), np.float32), np.empty((T, K), np.float32)
        fn(x, idx, wts, g, gsc, u, usc, d, dsc, want, 4)
        fn(x, idx, wts, tiled(g, 4), gsc, tiled(u, 4), usc, tiled(d, 4), dsc, got, 4, tiled=True)
        np.testing.assert_array_equal(got, want)


# ---- the other SIMD paths ---------------------------------------------------------------------------

PATH_CHECK = """
import sys
import numpy as np
from ernie_edge.formats.layout import tile_rows
from ernie_edge.formats.quant import pack_q4, pack_qn
from ernie_edge.kernels import _jit, q4, q8, q56, qbatch, qbatch8
from ernie_edge.kernels.q8 import ActScratch
assert _jit.SIMD == sys.argv[1], _jit.SIMD
rng = np.random.default_rng(0)
for bits in (4, 5, 6):
    off = 1 << (bits - 1)
    codes = rng.integers(-off, off, size=(8, 256))
    w = pack_q4(codes, 128) if bits == 4 else pack_qn(codes, bits)
    s = (rng.random((8, 2)) * 0.1).astype(np.float16)
    t = tile_rows(w, bits)
    mod = q8 if bits == 4 else q56
    x = rng.standard_normal(256).astype(np.float32)
    for act8 in (True, False):
        want, got = np.empty(8, np.float32), np.empty(8, np.float32)
        mod.matvec(x, w, s, want, ActScratch(256), bits, act8)
        mod.matvec(x, t, s, got, ActScratch(256), bits, act8, tiled=True)
        np.testing.assert_array_equal(got, want)
    X = rng.standard_normal((5, 256)).astype(np.float32)
    small = qbatch.qmatmul if bits == 4 else q56.matmul_small
    for fn in (small, qbatch8.qmatmul8):
        want, got = np.empty((5, 8), np.float32), np.empty((5, 8), np.float32)
        fn(X, w, s, want, bits)
        fn(X, t, s, got, bits, tiled=True)
        np.testing.assert_array_equal(got, want)
print("ok")
"""


@pytest.mark.parametrize("path", ["avx2", "generic"])
def test_other_simd_paths_in_subprocess(path):
    env = {**os.environ, "ERNIE_EDGE_SIMD": path}
    r = subprocess.run([sys.executable, "-c", PATH_CHECK, path], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_host_path_is_the_one_compiled():
    assert _jit.SIMD in ("avxvnni", "avx2", "generic")
