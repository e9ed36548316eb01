"""int5 / int6 kernels (kernels/q56.py) against the spec (formats.quant.dequantize_qn) and against
the numpy twin of the int16-activation arithmetic in tests/test_kernels_q4.py (natural block order:
its gs = 32 case), on the host's SIMD path here and on the avx2 / generic paths in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ernie_edge.formats.layout import tile_rows
from ernie_edge.formats.quant import FP16_MAX, dequantize_qn, pack_qn
from ernie_edge.kernels import _jit, q8, q56
from ernie_edge.kernels.q8 import ActScratch

from test_kernels_q4 import act_error_bound, twin_matvec

RNG = np.random.default_rng(56)
BITS = (5, 6)


def random_qn(o, k, gs, bits, scale=0.05, rng=RNG):
    off = 1 << (bits - 1)
    codes = rng.integers(-off, off, size=(o, k))
    scales = (rng.random((o, k // gs)) * scale + scale / 10).astype(np.float16)
    return codes, pack_qn(codes, bits), scales


def check_matvec(x, codes, packed, scales, gs, bits):
    """The kernel equals the twin to float rounding and the exact product within the bound."""
    out = np.full(codes.shape[0], np.nan, np.float32)
    q56.matvec(x, packed, scales, out, ActScratch(x.shape[0]), bits)
    y, mag = twin_matvec(x, codes, scales.astype(np.float32).repeat(gs // 32, axis=1), 32)
    np.testing.assert_array_less(np.abs(out - y), 1e-5 * mag + 1e-30)
    w = dequantize_qn(packed, scales, gs, bits).astype(np.float64)
    np.testing.assert_array_less(np.abs(out - w @ x), act_error_bound(x, w, 32) + 1e-6 * mag + 1e-30)
    return out


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("o", [1, 4, 5, 37])
@pytest.mark.parametrize("k,gs", [(32, 32), (64, 64), (2560, 32), (2560, 128)])
def test_matvec_matches_twin_and_bound(bits, o, k, gs):
    codes, packed, scales = random_qn(o, k, gs, bits)
    check_matvec(RNG.standard_normal(k).astype(np.float32), codes, packed, scales, gs, bits)


@pytest.mark.parametrize("bits", BITS)
def test_matvec_extreme_codes_scales_and_integer_sums(bits):
    """Codes at both ends with every xq at +-32767 (all-equal blocks): the largest lane sums must
    stay exact; fp16 extremes and negative scales go through."""
    off = 1 << (bits - 1)
    o, k, gs = 9, 256, 64
    codes = np.where(RNG.random((o, k)) < 0.5, -off, off - 1)
    codes[3], codes[4] = -off, off - 1
    scales = np.full((o, k // gs), 0.25, np.float16)
    scales[0], scales[1], scales[2], scales[5] = FP16_MAX / 64, np.float16(6e-8), 0.0, -0.5
    for x in (np.full(k, 1.5, np.float32), np.full(k, -1.5, np.float32), RNG.standard_normal(k).astype(np.float32)):
        out = check_matvec(x, codes, pack_qn(codes, bits), scales, gs, bits)
        assert out[2] == 0.0
    out = np.empty(o, np.float32)
    q56.matvec(np.full(k, 1.5, np.float32), pack_qn(codes, bits), scales, out, ActScratch(k), bits)
    np.testing.assert_array_equal(out[3:5], [0.25 * 1.5 * -off * k, 0.25 * 1.5 * (off - 1) * k])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("t", [1, 3, 17, 100])
@pytest.mark.parametrize("o,k,gs", [(5, 64, 32), (37, 256, 64), (130, 2560, 128)])
def test_matmul_small_and_exact(bits, t, o, k, gs):
    """matmul_small: every token's row is the decode matvec's arithmetic (the twin to float
    rounding, the exact product within the activation bound) for every token tile and the
    O % 4 tail rows; matmul_exact: exact float32."""
    codes, packed, scales = random_qn(o, k, gs, bits)
    X = RNG.standard_normal((t, k)).astype(np.float32)
    out = np.full((t, o), np.nan, np.float32)
    q56.matmul_small(X, packed, scales, out, bits)
    w = dequantize_qn(packed, scales, gs, bits).astype(np.float64)
    for i in range(t):
        y, mag = twin_matvec(X[i], codes, scales.astype(np.float32).repeat(gs // 32, axis=1), 32)
        np.testing.assert_array_less(np.abs(out[i] - y), 1e-5 * mag + 1e-30)
        np.testing.assert_array_less(np.abs(out[i] - w @ X[i]), act_error_bound(X[i], w, 32) + 1e-6 * mag + 1e-30)
    one = np.empty(o, np.float32)
    q56.matvec(X[t - 1], packed, scales, one, ActScratch(k), bits)
    np.testing.assert_allclose(out[t - 1], one, rtol=0, atol=1e-5 * np.abs(one).max())
    q56.matmul_exact(X, packed, scales, out, bits)
    scale = np.abs(X).astype(np.float64) @ np.abs(w).T
    np.testing.assert_array_less(np.abs(out - X.astype(np.float64) @ w.T), 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("bits", BITS)
def test_matmul_small_largest_integer_sums(bits):
    """Codes at both ends with every xq at +-32767: the tile's 16-product lane sums (< 2^24) stay
    exact, so the result is the float64 product to float32 rounding."""
    off = 1 << (bits - 1)
    o, k, gs = 8, 256, 32
    codes = np.where(RNG.random((o, k)) < 0.5, -off, off - 1)
    codes[0], codes[1] = -off, off - 1
    scales = np.full((o, k // gs), 0.25, np.float16)
    packed = pack_qn(codes, bits)
    X = np.stack([np.full(k, 1.5, np.float32), np.full(k, -1.5, np.float32)] * 3)
    out = np.empty((6, o), np.float32)
    q56.matmul_small(X, packed, scales, out, bits)
    want = X.astype(np.float64) @ dequantize_qn(packed, scales, gs, bits).astype(np.float64).T
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert out[0, 0] == 0.25 * 1.5 * -off * k


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_dequant_rows_is_the_spec(bits, gs):
    codes, packed, scales = random_qn(11, 256, gs, bits)
    scales[5, 0], scales[6, 0] = FP16_MAX, np.float16(-6e-8)
    tile = np.empty((4, 256), np.float32)
    q56.dequant_rows(packed, scales, 5, tile, bits)
    np.testing.assert_array_equal(tile, dequantize_qn(packed, scales, gs, bits)[5:9])


def test_matvec_accepts_uint16_scales_and_larger_scratch():
    codes, packed, scales = random_qn(6, 64, 32, 6)
    x = RNG.standard_normal(64).astype(np.float32)
    a, b = np.empty(6, np.float32), np.empty(6, np.float32)
    q56.matvec(x, packed, scales, a, ActScratch(64), 6)
    q56.matvec(x, packed, scales.view(np.uint16), b, ActScratch(4096, rows=3), 6)
    np.testing.assert_array_equal(a, b)


def test_rejects_bad_arguments():
    codes, packed, scales = random_qn(6, 64, 32, 6)
    x, out = np.zeros(64, np.float32), np.empty(6, np.float32)
    for args, match in [((x, packed, scales, np.empty(5, np.float32), ActScratch(64), 6), "out must be"),
                        ((x, packed, scales, out, ActScratch(64), 5), "does not take an input"),
                        ((x, packed, scales, out, ActScratch(64), 4), "bits must be 5 or 6"),
                        ((np.zeros(32, np.float32), packed, scales, out, ActScratch(64), 6), "does not take"),
                        ((x, packed, scales[:, :1], out, ActScratch(64), 6), "scales"),
                        ((x, np.asfortranarray(packed), scales, out, ActScratch(64), 6), "C-contiguous"),
                        ((x, packed.view(np.int8), scales, out, ActScratch(64), 6), "uint8")]:
        with pytest.raises(ValueError, match=match):
            q56.matvec(*args)
    with pytest.raises(TypeError):
        q56.matvec(x, packed, scales.astype(np.float32), out, ActScratch(64), 6)
    with pytest.raises(ValueError, match="out must be"):
        q56.matmul_small(np.zeros((3, 64), np.float32), packed, scales, np.empty((3, 5), np.float32), 6)
    with pytest.raises(ValueError, match="out of range"):
        q56.dequant_rows(packed, scales, 4, np.empty((3, 64), np.float32), 6)


def test_bound_matvec_reads_its_buffers_each_call():
    """bind_matvec checks once and binds x and out themselves: each call reads x's current contents
    (decode rewrites the buffer every token). It refuses an x it would have to convert, since a copy
    would be bound in its place."""
    codes, packed, scales = random_qn(8, 64, 32, 5)
    x, out, act = np.zeros(64, np.float32), np.empty(8, np.float32), ActScratch(64)
    call = q56.bind_matvec(x, packed, scales, out, act, 5, act8=True)
    for _ in range(3):
        x[:] = RNG.standard_normal(64)
        call()
        want = q56.matvec(x.copy(), packed, scales, np.empty(8, np.float32), ActScratch(64), 5, act8=True)
        np.testing.assert_array_equal(out, want)
    for bad in (x.astype(np.float64), np.zeros(128, np.float32)[::2]):
        with pytest.raises(ValueError, match="bound, not copied"):
            q56.bind_matvec(bad, packed, scales, out, act, 5)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("act8", [True, False])
def test_tiled_matvec_is_the_matvec(bits, gs, act8):
    """The matrix in 4-row tiles (formats/layout.py) read by the tiled matvec: the same integer lanes
    summed in the same order, so bit for bit the matvec of the rows, with int8 and int16 activations
    (tests/test_kernels_tiles.py: every other kernel)."""
    codes, packed, scales = random_qn(12, 384, gs, bits)
    x = RNG.standard_normal(384).astype(np.float32)
    want, got = np.empty(12, np.float32), np.empty(12, np.float32)
    q56.matvec(x, packed, scales, want, ActScratch(384), bits, act8=act8)
    q56.bind_matvec(x, tile_rows(packed, bits), scales, got, ActScratch(384), bits, act8=act8, tiled=True)()
    np.testing.assert_array_equal(got, want)


# ---- the other SIMD paths ---------------------------------------------------------------------

PATH_CHECK = """
import sys
import numpy as np
from ernie_edge.kernels import _jit, q8, q56
from ernie_edge.kernels.q8 import ActScratch
from ernie_edge.formats.quant import dequantize_qn, pack_qn
from ernie_edge.formats.layout import tile_rows
assert _jit.SIMD == sys.argv[1], _jit.SIMD
rng = np.random.default_rng(0)
for bits in (5, 6):
    off = 1 << (bits - 1)
    for gs in (32, 128):
        codes = rng.integers(-off, off, size=(7, 256)); sc = (rng.random((7, 256 // gs)) * 0.1).astype(np.float16)
        p = pack_qn(codes, bits)
        w = dequantize_qn(p, sc, gs, bits)
        x = rng.standard_normal(256).astype(np.float32)
        out = np.empty(7, np.float32)
        q56.matvec(x, p, sc, out, ActScratch(256), bits)
        assert np.abs(out - w @ x).max() < 2e-4 * np.abs(w @ x).max(), (out, w @ x)
        xc = np.full(256, 1.5, np.float32)
        q56.matvec(xc, p, sc, out, ActScratch(256), bits)  # exact integer sums on this path too
        np.testing.assert_allclose(out, w.astype(np.float64) @ xc, rtol=1e-5)
        p4, s4 = p[:4], sc[:4]  # the tiled matvec: the stored matrix's bits
        for act8 in (True, False):
            want, got = np.empty(4, np.float32), np.empty(4, np.float32)
            q56.matvec(x, p4, s4, want, ActScratch(256), bits, act8=act8)
            q56.bind_matvec(x, tile_rows(p4, bits), s4, got, ActScratch(256), bits, act8=act8, tiled=True)()
            np.testing.assert_array_equal(got, want)
        X = rng.standard_normal((3, 256)).astype(np.float32)
        y = np.empty((3, 7), np.float32)
        for matmul in (q56.matmul_small, q56.matmul_exact):
            matmul(X, p, sc, y, bits)
            assert np.abs(y - X @ w.T).max() < 2e-4 * np.abs(X @ w.T).max()
print("ok")
"""


@pytest.mark.parametrize("path", ["avx2", "generic"])
def test_other_simd_paths_in_subprocess(path, tmp_path):
    if path != "generic" and path not in _jit._host_paths():
        pytest.skip(f"this CPU has no {path} path")
    if path == _jit.SIMD:
        pytest.skip(f"{path} is this process's path (tested above)")
    env = dict(os.environ, ERNIE_EDGE_SIMD=path, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", PATH_CHECK, path], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


# ---- fused decode kernels: bit for bit the separate calls ----------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_matvec3_equals_three_matvecs(bits):
    x = RNG.standard_normal(256).astype(np.float32)
    mats = [random_qn(o, 256, gs, bits)[1:] for o, gs in ((9, 64), (4, 32), (3, 128))]
    outs = [np.empty(p.shape[0], np.float32) for p, _ in mats]
    q56.matvec3(x, [(*m, o) for m, o in zip(mats, outs)], ActScratch(256), bits)
    for (p, s), got in zip(mats, outs):
        one = np.empty(p.shape[0], np.float32)
        q56.matvec(x, p, s, one, ActScratch(256), bits)
        np.testing.assert_array_equal(got, one)


def silu_mul(g, u):
    g = g.astype(np.float32)
    return g / (np.float32(1.0) + np.exp(-g)) * u


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows", [64, 66])  # 66: a partial row quad
def test_gate_up_silu_equals_matvecs(bits, rows):
    k = 128
    x = RNG.standard_normal(k).astype(np.float32)
    (_, wg, sg), (_, wu, su) = random_qn(rows, k, 32, bits), random_qn(rows, k, 64, bits)
    out = np.full(rows, np.nan, np.float32)
    q56.gate_up_silu(x, wg, sg, wu, su, out, ActScratch(k), bits)
    g, u = np.empty(rows, np.float32), np.empty(rows, np.float32)
    q56.matvec(x, wg, sg, g, ActScratch(k), bits)
    q56.matvec(x, wu, su, u, ActScratch(k), bits)
    np.testing.assert_allclose(out, silu_mul(g, u), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("ebits, gs, hid", [(4, 32, 96), (4, 128, 256), (8, 64, 192)])
def test_pair_with_routed_experts_equals_separate_calls(bits, ebits, gs, hid):
    """Routed q4 / q8 experts paired with a q5 / q6 shared expert: the two fused regions give
    q8.py's routed kernels and q56's shared kernels bit for bit, and their sum to float rounding
    (the kernels' fastmath may reassociate the last addition)."""
    from ernie_edge.formats.quant import quantize_q4, quantize_q8
    rng = np.random.default_rng(bits + ebits + hid)
    E, inter, shared_w, k = 6, 128, 96, 3
    x = rng.standard_normal(hid).astype(np.float32)
    quant = quantize_q4 if ebits == 4 else quantize_q8
    bank = lambda o, i: quant(rng.standard_normal((E, o, i)).astype(np.float32) * 0.1, gs if i % gs == 0 else 32)  # noqa: E731
    (wg, sg), (wu, su), (wd, sd) = bank(inter, hid), bank(inter, hid), bank(hid, inter)
    (_, sgw, sgs), (_, suw, sus) = random_qn(shared_w, hid, 32, bits, rng=rng), random_qn(shared_w, hid, 32, bits, rng=rng)
    _, sdw, sds = random_qn(hid, shared_w, 32, bits, rng=rng)
    ids, wts = np.array([4, 1, 5]), np.array([0.5, 0.3, 0.2], np.float32)
    act_a, act_b = ActScratch(max(hid, inter), rows=k), ActScratch(max(hid, shared_w))
    he, g = np.empty((k, inter), np.float32), np.empty(shared_w, np.float32)
    out = np.empty(hid, np.float32)
    q56.pair_gate_up_silu(x, (wg, sg, wu, su, ids, he, ebits), (sgw, sgs, suw, sus, g, bits), act_a, act_b)
    q56.pair_down_weighted((he, wd, sd, ids, wts, ebits), (g, sdw, sds, bits), out, act_a, act_b)

    he2, g2 = np.empty_like(he), np.empty_like(g)
    q8.experts_gate_up_silu(x, wg, sg, wu, su, ids, he2, ActScratch(hid), ebits)
    q56.gate_up_silu(x, sgw, sgs, suw, sus, g2, ActScratch(hid), bits)
    np.testing.assert_array_equal(he, he2)
    np.testing.assert_array_equal(g, g2)
    want = np.empty(hid, np.float32)
    q8.experts_down_weighted(he2, wd, sd, ids, wts, want, ActScratch(inter, rows=k), ebits)
    shared = np.empty(hid, np.float32)
    q56.matvec(g2, sdw, sds, shared, ActScratch(shared_w), bits)
    want += shared
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=1e-6 * np.abs(want).max())
