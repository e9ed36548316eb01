"""int8 kernels and the int16 activation quantization, against formats.quant.dequantize_q8 and a
numpy twin of the integer arithmetic.

The decode error bound tested here (ernie_edge/kernels/q8.py):
    |y - W x| <= sum_b max|x_b| / 65534 * sum_{j in b} |W[o, j]|   (+ float32 rounding)
"""

from __future__ import annotations

import numpy as np
import pytest

from ernie_edge.kernels import act_quant, q8
from ernie_edge.kernels.act_quant import ACT_MAX
from ernie_edge.kernels.q8 import ActScratch
from ernie_edge.formats.quant import FP16_MAX, dequantize_q8

RNG = np.random.default_rng(99)


def quantize_act_np(x):
    xb = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=1)
    d = (amax / np.float32(ACT_MAX)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, ACT_MAX / amax.astype(np.float64), 0.0)
    return np.rint(xb.astype(np.float64) * inv[:, None]).astype(np.int64), d


def twin(x, codes, scales, gs):
    """(y float64 [O], magnitude [O]) = sum_b ws * xd * sum_j code * xq."""
    xq, xd = quantize_act_np(x)
    c = codes.astype(np.int64).reshape(codes.shape[0], -1, 32)
    isum = (c * xq[None]).sum(axis=2)
    ws = scales.astype(np.float64)[:, np.arange(len(xd)) // (gs // 32)]
    mag = (np.abs(ws) * xd[None] * (np.abs(c) * np.abs(xq)[None]).sum(axis=2)).sum(axis=1)
    return (ws * xd[None] * isum).sum(axis=1), mag


def bound(x, w):
    amax = np.abs(x.reshape(-1, 32)).max(axis=1).astype(np.float64)
    return (np.abs(w).reshape(w.shape[0], -1, 32).sum(axis=2) * amax[None] / (2.0 * ACT_MAX)).sum(axis=1)


def random_q8(o, k, gs, scale=0.01):
    codes = RNG.integers(-127, 128, size=(o, k)).astype(np.int8)
    scales = (RNG.random((o, k // gs)) * scale + scale / 10).astype(np.float16)
    return codes, scales


def check(x, codes, scales, gs):
    out = np.full(codes.shape[0], np.nan, np.float32)
    q8.q8_matvec(x, codes, scales, out, ActScratch(x.shape[0]))
    y, mag = twin(x, codes, scales, gs)
    np.testing.assert_array_less(np.abs(out - y), 1e-5 * mag + 1e-30)
    w = dequantize_q8(codes, scales, gs).astype(np.float64)
    np.testing.assert_array_less(np.abs(out - w @ x), bound(x, w) + 1e-6 * mag + 1e-30)
    return out


@pytest.mark.parametrize("o", [1, 3, 5, 37])
@pytest.mark.parametrize("k,gs", [(32, 32), (64, 32), (64, 64), (2560, 32), (2560, 128)])
def test_q8_matvec_matches_twin_and_bound(o, k, gs):
    codes, scales = random_q8(o, k, gs)
    check(RNG.standard_normal(k).astype(np.float32), codes, scales, gs)


def test_q8_matvec_extremes():
    o, k, gs = 8, 128, 32
    codes = np.where(RNG.random((o, k)) < 0.5, -127, 127).astype(np.int8)
    scales = np.ones((o, k // gs), np.float16)
    scales[0] = FP16_MAX
    scales[1] = np.float16(6e-8)
    scales[2] = 0.0
    codes[3, :32] = 0
    x = RNG.standard_normal(k).astype(np.float32)
    x[:32] *= 1e4  # one block much larger than the others
    out = check(x, codes, scales, gs)
    assert out[2] == 0.0


def test_q8_matvec_largest_integer_sums_are_exact():
    """+-127 codes times xq = +-32767 (all-equal blocks) is the largest integer lane sum (just below
    2^24, so still exact in float32); -128 codes are outside the format but must not overflow."""
    k = 128
    codes = np.full((5, k), 127, np.int8)
    codes[1] = -127
    codes[2] = -128
    codes[3, ::2] = -128
    codes[4] = RNG.integers(-128, 128, size=k)
    scales = np.full((5, k // 32), 0.5, np.float16)
    out = np.empty(5, np.float32)
    for sign in (1.0, -1.0):
        x = np.full(k, sign * 3.0, np.float32)
        q8.q8_matvec(x, codes, scales, out, ActScratch(k))
        np.testing.assert_allclose(out, 0.5 * 3.0 * sign * codes.astype(np.float64).sum(axis=1), rtol=1e-6)


def test_q8_matvec_tiny_and_zero_blocks():
    codes, scales = random_q8(5, 96, 32)
    x = RNG.standard_normal(96).astype(np.float32)
    x[:32] = 0.0
    x[32:64] *= 1e-30  # tiny blocks
    x[64:96] *= 1e-40  # float32 denormals: 127 / max would overflow in float32
    out = check(x, codes, scales, 32)
    assert np.all(np.isfinite(out))


def test_quantize_act_rounding_and_sums():
    x = RNG.standard_normal(256).astype(np.float32) * 5
    xq = np.empty(256, np.int16)
    xd = np.empty(8, np.float32)
    xs = np.empty(8, np.int32)
    act_quant.quantize_act(x, xq, xd, xs, 32)
    want_q, want_d = quantize_act_np(x)
    np.testing.assert_array_equal(xq.reshape(-1, 32), want_q)
    np.testing.assert_array_equal(xd, want_d)
    np.testing.assert_array_equal(xs, 8 * want_q.sum(axis=1))
    assert np.abs(xq).max() == ACT_MAX


def test_q8_experts_and_shared_gate_up():
    E, inter, hid, gs = 3, 36, 64, 32
    gc, gsc = random_q8(E * inter, hid, gs)
    uc, usc = random_q8(E * inter, hid, gs)
    x = RNG.standard_normal(hid).astype(np.float32)
    ids = np.array([2, 0])
    out = np.empty((2, inter), np.float32)
    q8.q8_experts_gate_up_silu(x, gc.reshape(E, inter, hid), gsc.reshape(E, inter, -1), uc.reshape(E, inter, hid),
                               usc.reshape(E, inter, -1), ids, out, ActScratch(hid))
    for j, e in enumerate(ids):
        g, _ = twin(x, gc.reshape(E, inter, hid)[e], gsc.reshape(E, inter, -1)[e], gs)
        u, _ = twin(x, uc.reshape(E, inter, hid)[e], usc.reshape(E, inter, -1)[e], gs)
        np.testing.assert_allclose(out[j], g / (1 + np.exp(-g)) * u, rtol=1e-4, atol=1e-4)
    inter2 = 64  # the down projection's input must be a multiple of 32
    dc, dsc = random_q8(E * hid, inter2, 32)
    h = RNG.standard_normal((2, inter2)).astype(np.float32)
    y = np.empty(hid, np.float32)
    w = np.array([0.7, 0.3], np.float32)
    q8.q8_experts_down_weighted(h, dc.reshape(E, hid, inter2), dsc.reshape(E, hid, -1), ids, w, y,
                                ActScratch(inter2, rows=2))
    want = sum(w[j] * twin(h[j], dc.reshape(E, hid, inter2)[e], dsc.reshape(E, hid, -1)[e], 32)[0]
               for j, e in enumerate(ids))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("o,k,gs", [(3, 32, 32), (37, 64, 64), (259, 2560, 32)])
def test_q8_matmul_exact(t, o, k, gs):
    codes, scales = random_q8(o, k, gs)
    X = RNG.standard_normal((t, k)).astype(np.float32)
    out = np.full((t, o), np.nan, np.float32)
    q8.q8_matmul(X, codes, scales, out)
    w = dequantize_q8(codes, scales, gs).astype(np.float64)
    scale = np.abs(X).astype(np.float64) @ np.abs(w).T
    np.testing.assert_array_less(np.abs(out - X.astype(np.float64) @ w.T), 1e-5 * scale + 1e-30)


def test_q8_rejects_bad_shapes():
    codes, scales = random_q8(4, 64, 32)
    with pytest.raises(ValueError):
        q8.q8_matvec(np.zeros(64, np.float32), codes, scales[:, :1], np.empty(4, np.float32), ActScratch(64))
    with pytest.raises(ValueError):
        q8.q8_matmul(np.zeros((2, 64), np.float32), codes, scales, np.empty((2, 5), np.float32))
    with pytest.raises(ValueError):
        ActScratch(33)


def test_q8_matvec3_equals_three_matvecs():
    x = RNG.standard_normal(128).astype(np.float32)
    mats = [random_q8(o, 128, 32) for o in (37, 8, 5)]
    outs = [np.empty(w.shape[0], np.float32) for w, _ in mats]
    q8.q8_matvec3(x, mats[0][0], mats[0][1], outs[0], mats[1][0], mats[1][1], outs[1], mats[2][0], mats[2][1],
                  outs[2], ActScratch(128))
    for (w, s), got in zip(mats, outs):
        one = np.empty(w.shape[0], np.float32)
        q8.q8_matvec(x, w, s, one, ActScratch(128))
        np.testing.assert_array_equal(got, one)


# ---- the work-unit schedule --------------------------------------------------------------------

@pytest.mark.parametrize("nt, n", [(1, 1), (1, 7), (2, 1), (2, 2), (2, 9), (3, 10), (4, 3), (4, 64)])
def test_every_work_unit_is_claimed_once_under_any_interleaving(nt, n):
    rng = np.random.default_rng(nt * 100 + n)
    for trial in range(20):
        claims = np.zeros(max(n, 1), np.int64)
        state = {t: (0, t * n // nt) for t in range(nt)}
        done: dict[int, list[int]] = {t: [] for t in range(nt)}
        while state:
            t = int(rng.choice(list(state)))  # any thread may run next
            u, k, pos = q8._next_unit(claims, t, nt, n, *state[t])
            if u < 0:
                del state[t]
            else:
                done[t].append(u)
                state[t] = (k, pos)
        got = sorted(u for units in done.values() for u in units)
        assert got == list(range(n))
        for t in range(nt):  # each thread starts with its own share, in order
            lo, hi = t * n // nt, (t + 1) * n // nt
            own = [u for u in done[t] if lo <= u < hi]
            assert own == list(range(lo, lo + len(own)))


def test_decode_kernels_give_the_same_bits_on_one_or_two_threads():
    from ernie_edge.kernels import _jit

    x = RNG.standard_normal(256).astype(np.float32)
    codes = RNG.integers(-127, 128, size=(4 * 8 * 9 + 3, 256)).astype(np.int8)  # 9 units + a tail
    scales = (RNG.random((codes.shape[0], 8)) * 0.01).astype(np.float16)
    outs = []
    before = _jit.get_threads()
    try:
        for n in (1, 2):
            _jit.set_threads(n)
            out = np.empty(codes.shape[0], np.float32)
            outs.append(q8.q8_matvec(x, codes, scales, out, ActScratch(256)).copy())
    finally:
        _jit.set_threads(before)
    np.testing.assert_array_equal(outs[0], outs[1])
    want = dequantize_q8(codes, scales, 32) @ x
    assert np.abs(outs[0] - want).max() < 1e-3 * np.abs(want).max()


def test_big_matrices_get_bigger_units_not_more_claims():
    claims = np.ones(q8.MAX_UNITS, np.int64)
    assert q8._units(100, claims) == (q8.UNIT_QUADS, -(-100 // q8.UNIT_QUADS))
    assert not claims[:13].any() and claims[13:].all()  # only the units in use are cleared
    big = q8.MAX_UNITS * q8.UNIT_QUADS * 3 + 1
    uq, n = q8._units(big, claims)
    assert uq > q8.UNIT_QUADS and n <= q8.MAX_UNITS and n * uq >= big
