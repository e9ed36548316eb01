"""kernels/qbatch8.py: prefill matmuls with int8 activations, against formats.quant.dequantize_* + numpy.

Bound tested (module doc of qbatch8.py), per token t and output row o:
    |y[t, o] - (W x_t)[o]| <= sum_b max|x_t block b| / 254 * sum_{j in b} |W[o, j]|   (+ float32)
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ernie_edge.formats.quant import dequantize_q4, dequantize_qn, pack_q4, pack_qn, quantize_q4, quantize_qn
from ernie_edge.kernels import _jit, qbatch8
from ernie_edge.kernels.act_quant import ACT8_MAX

RNG = np.random.default_rng(11)


def random_weight(o, k, gs, bits, lead=()):
    """Packed weights of bits 4 / 5 / 6 from random floats, some zero groups; their dequantized floats."""
    W = RNG.standard_normal((*lead, o, k)).astype(np.float32)
    w, scales = quantize_q4(W, gs) if bits == 4 else quantize_qn(W, gs, bits)
    scales.reshape(-1, k // gs)[::5, 0] = 0.0  # zero groups
    return w, scales


def dequant(w, scales, gs, bits):
    return (dequantize_q4(w, scales, gs) if bits == 4 else dequantize_qn(w, scales, gs, bits)).astype(np.float64)


def act_bound(X, W):
    """[T, O] int8 activation-rounding bound for X [T, K] times dense W [O, K]."""
    amax = np.abs(X.reshape(X.shape[0], -1, 32)).max(axis=2).astype(np.float64)  # [T, B]
    wsum = np.abs(W).reshape(W.shape[0], -1, 32).sum(axis=2)  # [O, B]
    return amax @ wsum.T / (2.0 * ACT8_MAX)


def check_matmul(X, w, scales, gs, bits):
    out = np.full((X.shape[0], w.shape[0]), np.nan, np.float32)
    qbatch8.qmatmul8(X, w, scales, out, bits)
    W = dequant(w, scales, gs, bits)
    exact = X.astype(np.float64) @ W.T
    mag = np.abs(X).astype(np.float64) @ np.abs(W).T
    np.testing.assert_array_less(np.abs(out - exact), act_bound(X, W) + 1e-6 * mag + 1e-30)
    return out, exact


@pytest.mark.parametrize("bits", [4, 5, 6])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("t", [1, 2, 7, 13, 70])
def test_qmatmul8_within_activation_bound(t, gs, bits):
    """Whole spans (K = 384: 3 spans, K/G odd for G = 128), 9 row quads + a 1-row tail, tiles of
    8 / 4 / 2 / 1 tokens, and more tokens than one TOKEN_BLOCK."""
    o, k = 37, 384
    w, scales = random_weight(o, k, gs, bits)
    X = RNG.standard_normal((t, k)).astype(np.float32)
    out, exact = check_matmul(X, w, scales, gs, bits)
    assert np.abs(out - exact).max() < 2e-2 * np.abs(exact).max()  # the bound is not vacuous here


@pytest.mark.parametrize("bits", [4, 5, 6])
@pytest.mark.parametrize("gs, k", [(32, 96), (32, 224), (64, 320), (32, 32)])
def test_qmatmul8_partial_last_span(bits, gs, k):
    """K not a multiple of 128: the last span's missing blocks read nothing past the row."""
    w, scales = random_weight(9, k, gs, bits)
    X = RNG.standard_normal((5, k)).astype(np.float32)
    check_matmul(X, w, scales, gs, bits)


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_qmatmul8_outlier_blocks(bits):
    k, gs = 256, 32
    w, scales = random_weight(8, k, gs, bits)
    X = RNG.standard_normal((5, k)).astype(np.float32)
    X[0, :32] *= 1e4  # one huge block, one denormal block, one zero block
    X[1, 32:64] = 1e-40
    X[2, 64:96] = 0.0
    check_matmul(X, w, scales, gs, bits)


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_qmatmul8_largest_integer_sums(bits):
    """Every code at its largest unsigned value (and at its most negative) times |xq| = 127: the
    block sums and the offset term are exact."""
    k, half = 256, 1 << (bits - 1)
    codes = np.full((4, k), half - 1)
    codes[1] = -half
    w = pack_q4(codes, 32) if bits == 4 else pack_qn(codes, bits)
    scales = np.ones((4, k // 32), np.float16)
    assert np.array_equal(dequant(w, scales, 32, bits), codes)
    X = np.full((6, k), 3.0, np.float32)
    X[3] = -3.0
    out = np.empty((6, 4), np.float32)
    qbatch8.qmatmul8(X, w, scales, out, bits)
    np.testing.assert_allclose(out, X @ codes.T.astype(np.float32), rtol=1e-6)


def test_qmatmul8_uint16_scales_zero_tokens_and_bad_arguments():
    w, scales = random_weight(6, 64, 32, 4)
    X = RNG.standard_normal((3, 64)).astype(np.float32)
    a, b = np.empty((3, 6), np.float32), np.empty((3, 6), np.float32)
    qbatch8.qmatmul8(X, w, scales, a, 4)
    qbatch8.qmatmul8(X, w, scales.view(np.uint16), b, 4)
    np.testing.assert_array_equal(a, b)
    qbatch8.qmatmul8(np.empty((0, 64), np.float32), w, scales, np.empty((0, 6), np.float32), 4)
    with pytest.raises(ValueError, match="int4, int5 or int6"):
        qbatch8.qmatmul8(X, w, scales, a, 8)
    with pytest.raises(ValueError, match="input of length"):
        qbatch8.qmatmul8(np.zeros((3, 32), np.float32), w, scales, a, 4)
    with pytest.raises(ValueError, match="out"):
        qbatch8.qmatmul8(X, w, scales, np.empty((3, 5), np.float32), 4)
    w6, s6 = random_weight(6, 64, 32, 6)
    with pytest.raises(ValueError):
        qbatch8.qmatmul8(X, w6, s6, a, 5)  # int6 bytes read as int5


@pytest.mark.parametrize("gs", [32, 64, 128])
def test_quantize_rows8_span_order(gs):
    """Block b = 4s + c (in act_quant's block order for gs) lands at 128 s + 16 c (its first 16
    values) and 128 s + 64 + 16 c (its last 16); its scale and sum of codes fill lanes 16 s + 4 c .. + 3."""
    k = 384
    x = RNG.standard_normal((2, k)).astype(np.float32) * 3
    x[1, 32:64] = 0.0
    xq, xd, xs = qbatch8.quantize_rows8(x, gs)
    assert xq.shape == (2, k) and xd.shape == xs.shape == (2, 16 * k // 128)
    half, chunks = gs // 2, gs // 32
    for t in range(2):
        for b in range(k // 32):
            g, c = divmod(b, chunks)
            vals = np.concatenate([x[t, g * gs + 16 * c:][:16], x[t, g * gs + half + 16 * c:][:16]])
            s, cc = divmod(b, 4)
            q = np.concatenate([xq[t, 128 * s + 16 * cc:][:16], xq[t, 128 * s + 64 + 16 * cc:][:16]]).astype(np.int64)
            d = xd[t, 16 * s + 4 * cc]
            np.testing.assert_array_equal(xd[t, 16 * s + 4 * cc:][:4], d)
            np.testing.assert_array_equal(xs[t, 16 * s + 4 * cc:][:4], q.sum())
            np.testing.assert_allclose(q * np.float64(d), vals, rtol=0, atol=np.abs(vals).max() / 254 + 1e-30)
            assert np.abs(q).max() <= ACT8_MAX and (np.abs(q).max() == ACT8_MAX or not vals.any())


def test_quantize_rows8_pads_a_partial_span_with_zeros():
    xq, xd, xs = qbatch8.quantize_rows8(RNG.standard_normal((1, 96)).astype(np.float32))
    assert xq.shape == (1, 128) and not xq[0, 48:64].any() and not xq[0, 112:].any()
    assert not xd[0, 12:].any() and not xs[0, 12:].any()


# ---- routed experts ---------------------------------------------------------------------------------

def _experts_by_matmuls(x, idx, weights, banks):
    """qexperts8's result composed from qmatmul8 calls, one expert at a time in ascending id."""
    (gate, gsc), (up, usc), (down, dsc) = banks
    out = np.zeros_like(x)
    for e in np.unique(idx):
        rows, slot = np.nonzero(idx == e)
        g = np.empty((len(rows), gate.shape[1]), np.float32)
        u = np.empty_like(g)
        qbatch8.qmatmul8(x[rows], gate[e], gsc[e], g, 4)
        qbatch8.qmatmul8(x[rows], up[e], usc[e], u, 4)
        h = (g / (1 + np.exp(-g))) * u
        y = np.empty((len(rows), x.shape[1]), np.float32)
        qbatch8.qmatmul8(h, down[e], dsc[e], y, 4)
        out[rows] += weights[rows, slot][:, None] * y
    return out


@pytest.mark.parametrize("T, gs, inter", [(1, 32, 96), (9, 64, 128), (40, 128, 256), (23, 128, 384)])
def test_qexperts8_is_the_per_expert_matmuls(T, gs, inter):
    E, H, k = 8, 256, 3
    banks = [random_weight(inter, H, gs, 4, lead=(E,)), random_weight(inter, H, gs, 4, lead=(E,)),
             random_weight(H, inter, gs, 4, lead=(E,))]
    x = RNG.standard_normal((T, H)).astype(np.float32)
    idx = np.stack([RNG.choice(E, k, replace=False) for _ in range(T)])
    weights = RNG.random((T, k)).astype(np.float32)
    out = np.full((T, H), np.nan, np.float32)
    qbatch8.qexperts8(x, idx, weights, *banks[0], *banks[1], *banks[2], out)
    want = _experts_by_matmuls(x, idx, weights, banks)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # and the float model within the two stages' rounding
    W = [dequant(w, s, gs, 4) for w, s in banks]
    ref = np.zeros((T, H))
    for t in range(T):
        for j, e in enumerate(idx[t]):
            g, u = W[0][e] @ x[t], W[1][e] @ x[t]
            ref[t] += weights[t, j] * (W[2][e] @ (g / (1 + np.exp(-g)) * u))
    assert np.abs(out - ref).max() < 3e-2 * np.abs(ref).max()


def test_qexperts8_checks_its_arguments():
    E, H, inter = 4, 64, 64
    gate = random_weight(inter, H, 32, 4, lead=(E,))
    down = random_weight(H, inter, 32, 4, lead=(E,))
    x = np.zeros((2, H), np.float32)
    out = np.empty((2, H), np.float32)
    with pytest.raises(ValueError, match="expert ids"):
        qbatch8.qexperts8(x, np.array([[0], [E]]), np.ones((2, 1), np.float32), *gate, *gate, *down, out)
    with pytest.raises(ValueError, match="int4 banks"):
        qbatch8.qexperts8(x, np.zeros((2, 1)), np.ones((2, 1), np.float32), *gate, *gate, *down, out, bits=5)
    qbatch8.qexperts8(np.zeros((0, H), np.float32), np.zeros((0, 1)), np.zeros((0, 1), np.float32), *gate, *gate,
                      *down, np.empty((0, H), np.float32))


# ---- every SIMD path computes the same bits ---------------------------------------------------------

PATH_CHECK = """
import sys
import numpy as np
from ernie_edge.kernels import _jit
for name, value in {patch}.items():
    setattr(_jit, name, value)
from ernie_edge.kernels import q8, q56, qbatch8
data = np.load(sys.argv[1])
outs = {{}}
act = q8.ActScratch(data["x"].shape[1])
for bits in (4, 5, 6):
    w, s, x = data[f"w{{bits}}"], data[f"s{{bits}}"], data["x"]
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    outs[f"y{{bits}}"] = qbatch8.qmatmul8(x, w, s, out, bits)
    one = np.empty(w.shape[0], np.float32)  # the one-token decode matvec with int8 activations
    outs[f"d{{bits}}"] = (q8.matvec if bits == 4 else q56.matvec)(x[0], w, s, one, act, bits, act8=True)
np.savez(sys.argv[2], **outs)
print(_jit.SIMD, _jit.AVX512, _jit.VNNI512, qbatch8.TILE_MAX)
"""


def _path_variants():
    """(label, ERNIE_EDGE_SIMD, _jit attributes to patch before the kernels compile) per path this
    CPU can run, other than this process's own."""
    host, feats = _jit._host_paths(), _jit._FEATURES
    out = []
    if "avxvnni" in host and (_jit.SIMD, _jit.VNNI512) != ("avxvnni", False):
        out.append(("vnni-256", "avxvnni", {"AVX512": False, "VNNI512": False}))
    if feats.get("avx512bw") and (_jit.SIMD, _jit.AVX512) != ("avx2", True):
        out.append(("avx512bw", "avx2", {"AVX512": True, "VNNI512": False}))
    if "avx2" in host and (_jit.SIMD, _jit.AVX512) != ("avx2", False):
        out.append(("avx2", "avx2", {"AVX512": False, "VNNI512": False}))
    if _jit.SIMD != "generic":
        out.append(("generic", "generic", {}))
    return out


def test_simd_paths_give_the_same_bits(tmp_path):
    """Each SIMD path's byte dot (512-bit vpdpbusd, 256-bit vpdpbusd, vpmaddubsw + vpmaddwd in 512
    or 256 bits, generic IR) and int5 / int6 unpacking (two-register permutes with AVX-512, loads and
    inserts without), in a child process with its own numba cache, gives this process's
    results bit for bit: the integer lanes and the float epilogue are the same on every path. The
    one-token decode matvec with int8 activations (kernels/dot8.py's row dots) too, in its row quads
    (its O % 4 tail rows may differ in the last bit, test_kernels_dot8.py)."""
    variants = _path_variants()
    if not variants:
        pytest.skip("this CPU runs no other SIMD path")
    k, data = 352, {}  # 2 whole spans and a partial one
    data["x"] = RNG.standard_normal((11, k)).astype(np.float32)
    for bits in (4, 5, 6):
        data[f"w{bits}"], data[f"s{bits}"] = random_weight(10, k, 32, bits)
    np.savez(tmp_path / "in.npz", **data)
    want = {}
    for bits in (4, 5, 6):
        out = np.empty((11, 10), np.float32)
        want[bits] = qbatch8.qmatmul8(data["x"], data[f"w{bits}"], data[f"s{bits}"], out, bits)
    for label, simd, patch in variants:
        env = dict(os.environ, ERNIE_EDGE_SIMD=simd, NUMBA_CACHE_DIR=str(tmp_path / f"cache-{label}"))
        res = subprocess.run([sys.executable, "-c", PATH_CHECK.format(patch=repr(patch)), str(tmp_path / "in.npz"),
                              str(tmp_path / f"{label}.npz")], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, (label, res.stderr[-3000:])
        got = np.load(tmp_path / f"{label}.npz")
        for bits in (4, 5, 6):
            np.testing.assert_array_equal(got[f"y{bits}"], want[bits], err_msg=f"{label} ({res.stdout.strip()}) int{bits}")
            np.testing.assert_array_equal(got[f"d{bits}"][:8], want[bits][0, :8], err_msg=f"{label} decode int{bits}")
            np.testing.assert_allclose(got[f"d{bits}"][8:], want[bits][0, 8:], rtol=1e-6)  # tail rows: last bit
