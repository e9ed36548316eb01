"""The one-token decode kernels with int8 activations (kernels/dot8.py's row dots inside the decode
kernels of q8.py / q56.py, `act8=True`): the same bits as the prefill tiles (qbatch8) give a token,
within the int8 activation bound of the exact product, and fused forms equal to separate calls.

Bound (kernels/dot8.py), per output row o:
    |y[o] - (W x)[o]| <= sum_b max|x block b| / 254 * sum_{j in b} |W[o, j]|   (+ float32)
"""

from __future__ import annotations

import numpy as np
import pytest

from ernie_edge.kernels import q8, q56, qbatch8
from test_kernels_qbatch8 import act_bound, dequant, random_weight

RNG = np.random.default_rng(23)


def matvec8(x, w, s, bits, act):
    out = np.full(w.shape[0], np.nan, np.float32)
    return (q8.matvec if bits == 4 else q56.matvec)(x, w, s, out, act, bits, act8=True)


def dirty(act):
    """Fill the scratch's int8 buffers with another, longer row's values (a reused scratch)."""
    for a in (act.xq8, act.xd8, act.xs8):
        a[...] = RNG.integers(-100, 100, a.shape).astype(a.dtype)


@pytest.mark.parametrize("bits", [4, 5, 6])
@pytest.mark.parametrize("gs, k", [(32, 384), (128, 2560), (64, 320), (32, 96), (32, 32)])
def test_matvec8_is_the_prefill_tile_of_one_token(bits, gs, k):
    """Whole and partial spans, 9 row quads + a 1-row tail, a scratch last used for a longer row:
    bit for bit qmatmul8's row for the same token in every row quad, and within the activation bound.
    (A tail row, O % 4 of them, may differ in the last bit: LLVM compiles the one-row dot apart.)"""
    w, s = random_weight(37, k, gs, bits)
    x = RNG.standard_normal(k).astype(np.float32)
    act = q8.ActScratch(4096)
    dirty(act)
    got = matvec8(x, w, s, bits, act)
    want = qbatch8.qmatmul8(x[None], w, s, np.empty((1, 37), np.float32), bits)[0]
    np.testing.assert_array_equal(got[:36], want[:36])
    np.testing.assert_allclose(got[36], want[36], rtol=1e-6)
    W = dequant(w, s, gs, bits)
    exact = W @ x.astype(np.float64)
    np.testing.assert_array_less(np.abs(got - exact), act_bound(x[None], W)[0] + 1e-6 * (np.abs(W) @ np.abs(x)) + 1e-30)


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_matvec3_8_is_three_matvecs(bits):
    k, gs = 256, 32
    mats = [(*random_weight(o, k, gs, bits), np.empty(o, np.float32)) for o in (24, 8, 9)]
    x = RNG.standard_normal(k).astype(np.float32)
    act = q8.ActScratch(k)
    (q8.matvec3 if bits == 4 else q56.matvec3)(x, mats, act, bits, act8=True)
    for w, s, out in mats:
        np.testing.assert_array_equal(out, matvec8(x, w, s, bits, q8.ActScratch(k)))


def _bank(e, o, k, gs, bits=4):
    w, s = random_weight(o, k, gs, bits, lead=(e,))
    return w, s


@pytest.mark.parametrize("gs", [32, 128])
def test_decode_experts8_are_qexperts8_of_one_token(gs):
    """Routed int4 experts of one token (gate / up / SwiGLU, then the weighted down projections in
    ascending expert id) give the prefill experts' bits for that token."""
    E, H, inter = 5, 256, 128
    gate, up, down = _bank(E, inter, H, gs), _bank(E, inter, H, gs), _bank(E, H, inter, gs)
    x = RNG.standard_normal(H).astype(np.float32)
    ids, weights = np.array([3, 0, 4]), np.array([0.5, 0.3, 0.2], np.float32)
    act = q8.ActScratch(H, rows=3)
    h = np.empty((3, inter), np.float32)
    q8.experts_gate_up_silu(x, *gate, *up, ids, h, act, 4, act8=True)
    got = q8.experts_down_weighted(h, *down, ids, weights, np.empty(H, np.float32), act, 4, act8=True)
    want = qbatch8.qexperts8(x[None], ids[None], weights[None], *gate, *up, *down, np.empty((1, H), np.float32))[0]
    np.testing.assert_array_equal(got, want)


def test_pair_kernels8_are_separate_calls():
    """Routed int4 experts paired with a shared expert: an int4 one (both int8 activations, x
    quantized once), an int8 one (int16 activations beside the routed int8 ones), and an int5 one
    (q56.py's pair): each pair is bit for bit the separate calls."""
    E, H, inter, S = 4, 256, 64, 96
    gate, up, down = _bank(E, inter, H, 32), _bank(E, inter, H, 32), _bank(E, H, inter, 32)
    ids, weights = np.array([2, 1]), np.array([0.6, 0.4], np.float32)
    x = RNG.standard_normal(H).astype(np.float32)
    act_a, act_b = q8.ActScratch(H, rows=2), q8.ActScratch(H)

    def routed_alone():
        h = np.empty((2, inter), np.float32)
        q8.experts_gate_up_silu(x, *gate, *up, ids, h, q8.ActScratch(H, rows=2), 4, act8=True)
        return h, q8.experts_down_weighted(h, *down, ids, weights, np.empty(H, np.float32), q8.ActScratch(H, rows=2), 4,
                                           act8=True)

    h_alone, y_alone = routed_alone()
    one = np.zeros(1, np.int64)
    for bits in (4, 8):
        if bits == 4:
            sg, su, sd = _bank(1, S, H, 32), _bank(1, S, H, 32), _bank(1, H, S, 32)
        else:
            sg, su, sd = ((RNG.integers(-127, 128, (1, o, k), dtype=np.int8),
                           (RNG.random((1, o, k // 32)) * 0.01).astype(np.float16)) for o, k in ((S, H), (S, H), (H, S)))
        g_alone = np.empty((1, S), np.float32)
        q8.experts_gate_up_silu(x, *sg, *su, one, g_alone, q8.ActScratch(H), bits, act8=True)
        ys = q8.experts_down_weighted(g_alone, *sd, one, np.ones(1, np.float32), np.empty(H, np.float32),
                                      q8.ActScratch(S), bits, act8=True)
        h, g = np.empty((2, inter), np.float32), np.empty((1, S), np.float32)
        q8.experts_pair_gate_up_silu(x, (*gate, *up, ids, h, 4), (*sg, *su, one, g, bits), act_a, act_b, act8=True)
        out = q8.experts_pair_down_weighted((h, *down, ids, weights, 4), (g, *sd, one, np.ones(1, np.float32), bits),
                                            np.empty(H, np.float32), act_a, act_b, act8=True)
        np.testing.assert_array_equal(h, h_alone)
        np.testing.assert_array_equal(g, g_alone)
        np.testing.assert_array_equal(out, y_alone + ys)
    wg, sg = random_weight(S, H, 32, 5)
    wu, su = random_weight(S, H, 32, 5)
    wd, sd = random_weight(H, S, 32, 5)
    g_alone = np.empty(S, np.float32)
    q56.gate_up_silu(x, wg, sg, wu, su, g_alone, q8.ActScratch(H), 5, act8=True)
    ys = matvec8(g_alone, wd, sd, 5, q8.ActScratch(S))
    h, g = np.empty((2, inter), np.float32), np.empty(S, np.float32)
    q56.pair_gate_up_silu(x, (*gate, *up, ids, h, 4), (wg, sg, wu, su, g, 5), act_a, act_b, act8=True)
    out = q56.pair_down_weighted((h, *down, ids, weights, 4), (g, wd, sd, 5), np.empty(H, np.float32), act_a, act_b,
                                 act8=True)
    np.testing.assert_array_equal(h, h_alone)
    np.testing.assert_array_equal(g, g_alone)
    np.testing.assert_array_equal(out, y_alone + ys)


def test_int8_weights_keep_int16_activations():
    """act8 leaves an int8 matrix on the int16 kernels: the same result as without it."""
    k = 256
    w = RNG.integers(-127, 128, (12, k), dtype=np.int8)
    s = (RNG.random((12, k // 32)) * 0.01).astype(np.float16)
    x = RNG.standard_normal(k).astype(np.float32)
    act = q8.ActScratch(k)
    a = q8.matvec(x, w, s, np.empty(12, np.float32), act, 8, act8=True).copy()
    np.testing.assert_array_equal(a, q8.matvec(x, w, s, np.empty(12, np.float32), act, 8))
