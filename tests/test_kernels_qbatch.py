"""kernels/qbatch.py: small-batch int16-activation matmuls, against formats.quant.dequantize_* + numpy.

Bound tested (module doc of qbatch.py), per token t and output row o:
    |y[t, o] - (W x_t)[o]| <= sum_b max|x_t block b| / 65534 * sum_{j in b} |W[o, j]|   (+ float32)
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ernie_edge.kernels import _jit, act_quant, qbatch
from ernie_edge.kernels.act_quant import ACT_MAX
from ernie_edge.formats.quant import dequantize_q4, dequantize_q8, pack_q4, quantize_q4, quantize_q8

RNG = np.random.default_rng(7)


def random_weight(o, k, gs, bits, lead=()):
    """Random codes with mixed-sign scales (q4 may be negative), some zero groups."""
    if bits == 4:
        codes = RNG.integers(-8, 8, size=(*lead, o, k))
        w = pack_q4(codes, gs)
        scales = (RNG.standard_normal((*lead, o, k // gs)) * 0.02).astype(np.float16)
    else:
        w = RNG.integers(-127, 128, size=(*lead, o, k)).astype(np.int8)
        scales = (RNG.random((*lead, o, k // gs)) * 0.002).astype(np.float16)
    scales.reshape(-1, k // gs)[::5, 0] = 0.0  # zero groups
    return w, scales


def dequant(w, scales, gs, bits):
    return (dequantize_q4 if bits == 4 else dequantize_q8)(w, scales, gs).astype(np.float64)


def act_bound(X, W):
    """[T, O] activation-rounding bound for X [T, K] times dense W [O, K]."""
    amax = np.abs(X.reshape(X.shape[0], -1, 32)).max(axis=2).astype(np.float64)  # [T, B]
    wsum = np.abs(W).reshape(W.shape[0], -1, 32).sum(axis=2)  # [O, B]
    return amax @ wsum.T / (2.0 * ACT_MAX)


def check_matmul(X, w, scales, gs, bits):
    out = np.full((X.shape[0], w.shape[0]), np.nan, np.float32)
    qbatch.qmatmul(X, w, scales, out, bits)
    W = dequant(w, scales, gs, bits)
    exact = X.astype(np.float64) @ W.T
    mag = np.abs(X).astype(np.float64) @ np.abs(W).T
    np.testing.assert_array_less(np.abs(out - exact), act_bound(X, W) + 1e-6 * mag + 1e-30)
    return out, exact


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("t", [1, 2, 7, 33, 64])
def test_qmatmul_within_activation_bound(t, gs, bits):
    o, k = 37, 384  # 9 row quads + a 1-row tail; K/G odd for G = 128
    w, scales = random_weight(o, k, gs, bits)
    X = RNG.standard_normal((t, k)).astype(np.float32)
    out, exact = check_matmul(X, w, scales, gs, bits)
    assert np.abs(out - exact).max() < 1e-3 * np.abs(exact).max()  # the bound is not vacuous here


@pytest.mark.parametrize("bits", [4, 8])
def test_qmatmul_quantized_real_weights_and_outlier_blocks(bits):
    k, gs = 256, 32
    W = RNG.standard_normal((8, k)).astype(np.float32)
    w, scales = (quantize_q4 if bits == 4 else quantize_q8)(W, gs)
    if bits == 4:
        assert (scales < 0).any()  # the converter's negative q4 scales are covered
    X = RNG.standard_normal((5, k)).astype(np.float32)
    X[0, :32] *= 1e4  # one huge block, one denormal block, one zero block
    X[1, 32:64] = 1e-40
    X[2, 64:96] = 0.0
    check_matmul(X, w, scales, gs, bits)


def test_qmatmul_largest_integer_sums():
    k = 128
    w = np.full((4, k), 127, np.int8)
    w[1] = -127
    scales = np.ones((4, k // 32), np.float16)
    X = np.full((6, k), 3.0, np.float32)
    X[3] = -3.0
    out = np.empty((6, 4), np.float32)
    qbatch.qmatmul(X, w, scales, out, 8)
    np.testing.assert_allclose(out, X @ dequant(w, scales, 32, 8).T, rtol=1e-6)


def test_qmatmul_uint16_scales_and_zero_tokens():
    w, scales = random_weight(6, 64, 32, 4)
    X = RNG.standard_normal((3, 64)).astype(np.float32)
    a, b = np.empty((3, 6), np.float32), np.empty((3, 6), np.float32)
    qbatch.qmatmul(X, w, scales, a, 4)
    qbatch.qmatmul(X, w, scales.view(np.uint16), b, 4)
    np.testing.assert_array_equal(a, b)
    qbatch.qmatmul(np.empty((0, 64), np.float32), w, scales, np.empty((0, 6), np.float32), 4)


def test_qmatmul_rejects_bad_arguments():
    w, scales = random_weight(6, 64, 32, 4)
    X = np.zeros((2, 64), np.float32)
    out = np.empty((2, 6), np.float32)
    with pytest.raises(ValueError, match="int8"):
        qbatch.qmatmul(X, w, scales, out, 8)
    with pytest.raises(ValueError, match="input of length"):
        qbatch.qmatmul(np.zeros((2, 32), np.float32), w, scales, out, 4)
    with pytest.raises(ValueError, match="scales"):
        qbatch.qmatmul(X, w, np.ones((6, 3), np.float16), out, 4)
    with pytest.raises(ValueError, match="out"):
        qbatch.qmatmul(X, w, scales, np.empty((2, 5), np.float32), 4)
    with pytest.raises(TypeError, match="float16"):
        qbatch.qmatmul(X, w, scales.astype(np.float32), out, 4)


def test_quantize_rows_block_order():
    """gs > 32: block b holds the values of the low then the high nibbles of one int4 chunk."""
    x = np.arange(128, dtype=np.float32)[None] + 1
    xq, xd = qbatch.quantize_rows(x, 64)
    got = xq[0].astype(np.float64) * np.repeat(xd[0], 32)
    want = np.concatenate([x[0, 0:16], x[0, 32:48], x[0, 16:32], x[0, 48:64], x[0, 64:80], x[0, 96:112],
                           x[0, 80:96], x[0, 112:128]])
    np.testing.assert_allclose(got, want, rtol=0, atol=128 / 65534)
    assert np.abs(xq).max() == ACT_MAX


@pytest.mark.parametrize("gs", [32, 64, 128])
def test_quantize_rows_is_the_decode_quantizer_row_by_row(gs):
    """One quantizer for prefill and decode: each row exactly as act_quant.quantize_act gives it."""
    x = RNG.standard_normal((3, 256)).astype(np.float32) * 4
    x[1, 32:64] = 1e-40  # a denormal block
    x[2, :32] = 0.0
    xq, xd = qbatch.quantize_rows(x, gs)
    for t in range(3):
        q1, d1 = np.empty(256, np.int16), np.empty(8, np.float32)
        act_quant.quantize_act(x[t], q1, d1, np.empty(8, np.int32), gs)
        np.testing.assert_array_equal(xq[t], q1)
        np.testing.assert_array_equal(xd[t], d1)


# ---- routed experts -----------------------------------------------------------------------------

def experts_reference(x, idx, wts, banks, gs, bits):
    """float64 numpy twin: per token, slots in ascending expert id."""
    G, U, D = (dequant(w, s, g, bits) for (w, s), g in zip(banks, gs))
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for j in np.argsort(idx[t]):
            e = idx[t, j]
            g, u = G[e] @ x[t], U[e] @ x[t]
            out[t] += wts[t, j] * (D[e] @ (g / (1 + np.exp(-g)) * u))
    return out


def make_experts(E, H, inter, gs, bits, gsd=None):
    gate = random_weight(inter, H, gs, bits, (E,))
    up = random_weight(inter, H, gs, bits, (E,))
    down = random_weight(H, inter, gsd or gs, bits, (E,))
    return gate, up, down


def route(T, E, k):
    idx = np.stack([RNG.permutation(E)[:k] for _ in range(T)])
    wts = RNG.random((T, k)).astype(np.float32)
    return idx, wts / wts.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("t,gs", [(1, 32), (2, 64), (7, 128), (33, 32), (64, 64)])
def test_qexperts_matches_float64_twin(t, gs, bits):
    E, H, inter, k = 8, 128, 160, 3  # inter: one full 128-row chunk and a 32-row one
    gsd = gs if inter % gs == 0 else 32
    gate, up, down = make_experts(E, H, inter, gs, bits, gsd)
    x = RNG.standard_normal((t, H)).astype(np.float32)
    idx, wts = route(t, E, k)
    out = np.full((t, H), np.nan, np.float32)
    qbatch.qexperts(x, idx, wts, *gate, *up, *down, out, bits)
    want = experts_reference(x, idx, wts, (gate, up, down), (gs, gs, gsd), bits)
    # x and h are each rounded by at most 1/65534 of their block max: ~1e-5 relative in all
    err = np.abs(out - want).max(axis=1)
    assert (err < 2e-4 * np.abs(want).max(axis=1)).all(), err / np.abs(want).max(axis=1)


def test_qexperts_sums_in_ascending_expert_order():
    """Each token's slots are added in ascending expert id from 0: the same float32 sum as
    adding the one-expert results in that order, each a fused multiply-add (emulated in float64:
    the product of two float32 is exact there)."""
    E, H, inter, k, T, gs = 6, 64, 64, 3, 5, 32
    gate, up, down = make_experts(E, H, inter, gs, 4)
    x = RNG.standard_normal((T, H)).astype(np.float32)
    idx = np.array([[5, 0, 3], [3, 5, 0], [1, 2, 4], [4, 1, 2], [0, 5, 3]])
    wts = RNG.random((T, k)).astype(np.float32)
    out = np.empty((T, H), np.float32)
    qbatch.qexperts(x, idx, wts, *gate, *up, *down, out, 4)
    want = np.zeros((T, H), np.float32)
    for t in range(T):
        for j in np.argsort(idx[t]):
            one = np.empty((1, H), np.float32)
            qbatch.qexperts(x[t:t + 1], idx[t:t + 1, j:j + 1], np.ones((1, 1), np.float32), *gate, *up, *down,
                            one, 4)
            want[t] = (np.float64(wts[t, j]) * one[0] + want[t]).astype(np.float32)
    np.testing.assert_array_equal(out, want)


def test_qexperts_rejects_bad_ids_and_banks():
    gate, up, down = make_experts(4, 64, 32, 32, 8)
    x = np.zeros((2, 64), np.float32)
    out = np.empty_like(x)
    with pytest.raises(ValueError, match="expert ids"):
        qbatch.qexperts(x, np.array([[0], [4]]), np.ones((2, 1), np.float32), *gate, *up, *down, out, 8)
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        qbatch.qexperts(x, np.array([[0, 1]]), np.ones((1, 2), np.float32), *gate, *up, *down, out, 8)
    with pytest.raises(ValueError, match="banks disagree"):
        qbatch.qexperts(x, np.array([[0], [1]]), np.ones((2, 1), np.float32), *gate, *up, gate[0][:, :, :32].copy(),
                        gate[1][:, :, :1].copy(), out, 8)


# ---- the portable and the plain AVX2 paths -------------------------------------------------------

PATH_CHECK = """
import numpy as np
from ernie_edge.kernels import _jit, qbatch
from ernie_edge.formats.quant import dequantize_q4, dequantize_q8, pack_q4
assert _jit.SIMD == "{path}", _jit.SIMD
rng = np.random.default_rng(0)
for gs in (32, 64):
    codes = rng.integers(-8, 8, size=(9, 128)); sc = (rng.standard_normal((9, 128 // gs)) * 0.1).astype(np.float16)
    X = rng.standard_normal((6, 128)).astype(np.float32)
    out = np.empty((6, 9), np.float32)
    qbatch.qmatmul(X, pack_q4(codes, gs), sc, out, 4)
    want = X @ dequantize_q4(pack_q4(codes, gs), sc, gs).T
    assert np.abs(out - want).max() < 2e-4 * np.abs(want).max(), (out, want)
    c8 = rng.integers(-127, 128, size=(9, 128)).astype(np.int8)
    qbatch.qmatmul(X, c8, sc, out, 8)
    want = X @ dequantize_q8(c8, sc, gs).T
    assert np.abs(out - want).max() < 2e-4 * np.abs(want).max(), (out, want)
print("ok")
"""


@pytest.mark.parametrize("path", ["generic", "avx2"])
def test_other_simd_paths_in_subprocess(path):
    if path == _jit.SIMD or path not in _jit._host_paths():
        pytest.skip(f"{path}: this process's path or not available on this CPU")
    env = dict(os.environ, ERNIE_EDGE_SIMD=path)
    res = subprocess.run([sys.executable, "-c", PATH_CHECK.replace("{path}", path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
