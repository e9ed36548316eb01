"""int4 kernels against the spec (formats.quant.dequantize_q4) and against a numpy twin of the
int16-activation arithmetic (which must agree to float32 rounding). The int4 decode kernels are
q8.py's generic ones with bits=4; q4.py holds the prefill matmul."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ernie_edge.kernels import _jit, q4, q8
from ernie_edge.kernels.act_quant import ACT_MAX
from ernie_edge.kernels.q8 import ActScratch
from ernie_edge.formats.quant import FP16_MAX, dequantize_q4, pack_q4, unpack_q4

RNG = np.random.default_rng(1234)


# ---- numpy twin of the decode arithmetic -----------------------------------------------------

def act_perm(k: int, gs: int) -> np.ndarray:
    """Order in which quantize_act lays out x: block b = (group g, chunk c) = low then high half."""
    idx = []
    for b in range(k // 32):
        g, c = divmod(b, gs // 32)
        lo = g * gs + 16 * c + np.arange(16)
        idx.append(np.concatenate([lo, lo + gs // 2]))
    return np.concatenate(idx)


def quantize_act_np(x: np.ndarray, gs: int):
    """(xq int [K] in kernel order, xd float32 [B], perm) exactly as the kernel rounds."""
    perm = act_perm(x.shape[0], gs)
    xb = x[perm].reshape(-1, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=1)
    d = (amax / np.float32(ACT_MAX)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, ACT_MAX / amax.astype(np.float64), 0.0)
    xq = np.rint(xb.astype(np.float64) * inv[:, None]).astype(np.int64)
    return xq.reshape(-1), d, perm


def twin_matvec(x, codes, scales, gs):
    """(y float64 [O], magnitude scale [O]) of sum_b ws * xd * sum_j code * xq, codes int [O, K]."""
    xq, xd, perm = quantize_act_np(x, gs)
    c = codes[:, perm].astype(np.int64).reshape(codes.shape[0], -1, 32)  # [O, B, 32]
    isum = (c * xq.reshape(-1, 32)[None]).sum(axis=2)  # [O, B]
    ws = scales.astype(np.float64)[:, np.arange(len(xd)) // (gs // 32)]  # [O, B]
    y = (ws * xd[None] * isum).sum(axis=1)
    # magnitude of the float terms the kernel adds (the offset is removed in integers, exactly)
    mag = (np.abs(ws) * xd[None] * (np.abs(c) * np.abs(xq.reshape(-1, 32))[None]).sum(axis=2)).sum(axis=1)
    return y, mag


def act_error_bound(x, w_deq, gs):
    """sum_b max|x_b| / 65534 * sum_{j in b} |W[o, j]| (blocks in kernel order)."""
    perm = act_perm(x.shape[0], gs)
    amax = np.abs(x[perm].reshape(-1, 32)).max(axis=1).astype(np.float64)
    wabs = np.abs(w_deq[:, perm]).reshape(w_deq.shape[0], -1, 32).sum(axis=2)
    return (wabs * amax[None] / (2.0 * ACT_MAX)).sum(axis=1)


def random_q4(o, k, gs, scale=0.05, rng=RNG):
    codes = rng.integers(-8, 8, size=(o, k))
    scales = (rng.random((o, k // gs)) * scale + scale / 10).astype(np.float16)
    return codes, pack_q4(codes, gs), scales


def check_matvec(x, codes, packed, scales, gs):
    out = np.full(codes.shape[0], np.nan, np.float32)
    q8.matvec(x, packed, scales, out, ActScratch(x.shape[0]), 4)
    y, mag = twin_matvec(x, codes, scales, gs)
    np.testing.assert_array_less(np.abs(out - y), 1e-5 * mag + 1e-30)
    w = dequantize_q4(packed, scales, gs).astype(np.float64)
    exact = w @ x.astype(np.float64)
    np.testing.assert_array_less(np.abs(out - exact), act_error_bound(x, w, gs) + 1e-6 * mag + 1e-30)
    return out


# ---- decode matvec -----------------------------------------------------------------------------

@pytest.mark.parametrize("o", [1, 3, 4, 5, 37])
@pytest.mark.parametrize("k,gs", [(32, 32), (64, 32), (64, 64), (2560, 32), (2560, 64), (2560, 128)])
def test_q4_matvec_matches_twin_and_bound(o, k, gs):
    codes, packed, scales = random_q4(o, k, gs)
    x = RNG.standard_normal(k).astype(np.float32)
    check_matvec(x, codes, packed, scales, gs)


def test_q4_matvec_extreme_codes_and_scales():
    o, k, gs = 9, 256, 32
    codes = np.where(RNG.random((o, k)) < 0.5, -8, 7)
    codes[3] = -8
    codes[4] = 7
    scales = np.full((o, k // gs), 1.0, np.float16)
    scales[0] = FP16_MAX
    scales[1] = np.float16(6e-8)  # subnormal fp16
    scales[2] = 0.0  # all-zero groups by scale
    scales[5] = -0.5  # negative scales are legal in the format's arithmetic
    codes[6, :32] = 0  # an all-zero group by codes
    x = RNG.standard_normal(k).astype(np.float32)
    out = check_matvec(x, codes, pack_q4(codes, gs), scales, gs)
    assert out[2] == 0.0


def test_q4_matvec_zero_and_constant_input():
    codes, packed, scales = random_q4(8, 128, 32)
    out = np.empty(8, np.float32)
    q8.matvec(np.zeros(128, np.float32), packed, scales, out, ActScratch(128), 4)
    assert np.all(out == 0.0)
    x = np.full(128, 3.0, np.float32)  # constant blocks quantize exactly: result is exact
    q8.matvec(x, packed, scales, out, ActScratch(128), 4)
    w = dequantize_q4(packed, scales, 32).astype(np.float64)
    np.testing.assert_allclose(out, w @ x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_q4_matvec_largest_integer_sums_are_exact(sign):
    """All-equal blocks put every xq at +-32767: the per-lane integer sums reach their extremes
    (nibbles 0 and 15, offset -8 * 32 * 32767 in one lane) and must stay exact."""
    k, gs = 256, 64
    codes = np.zeros((6, k), np.int64)
    codes[0], codes[1] = -8, 7
    codes[2, ::2], codes[2, 1::2] = -8, 7
    codes[3:] = RNG.integers(-8, 8, size=(3, k))
    scales = np.full((6, k // gs), 0.25, np.float16)
    x = np.full(k, sign * 1.5, np.float32)
    out = np.empty(6, np.float32)
    q8.matvec(x, pack_q4(codes, gs), scales, out, ActScratch(k), 4)
    np.testing.assert_allclose(out, 0.25 * 1.5 * sign * codes.sum(axis=1), rtol=1e-6, atol=1e-6)


def test_q4_matvec_accepts_uint16_scales_and_larger_scratch():
    codes, packed, scales = random_q4(6, 64, 32)
    x = RNG.standard_normal(64).astype(np.float32)
    a, b = np.empty(6, np.float32), np.empty(6, np.float32)
    q8.matvec(x, packed, scales, a, ActScratch(64), 4)
    q8.matvec(x, packed, scales.view(np.uint16), b, ActScratch(4096, rows=3), 4)
    np.testing.assert_array_equal(a, b)


def test_q4_matvec_rejects_bad_arguments():
    codes, packed, scales = random_q4(6, 64, 32)
    x = np.zeros(64, np.float32)
    with pytest.raises(ValueError):
        q8.matvec(x, packed, scales, np.empty(5, np.float32), ActScratch(64), 4)
    with pytest.raises(ValueError):
        q8.matvec(np.zeros(32, np.float32), packed, scales, np.empty(6, np.float32), ActScratch(64), 4)
    with pytest.raises(ValueError):
        q8.matvec(x, packed, scales, np.empty(6, np.float32), ActScratch(32), 4)
    with pytest.raises(ValueError):
        q8.matvec(x, np.asfortranarray(packed), scales, np.empty(6, np.float32), ActScratch(64), 4)
    with pytest.raises(TypeError):
        q8.matvec(x, packed, scales.astype(np.float32), np.empty(6, np.float32), ActScratch(64), 4)


# ---- MoE expert decode kernels ----------------------------------------------------------------

def silu(t):
    return t / (1.0 + np.exp(-t))


@pytest.mark.parametrize("inter", [64, 66])  # 66: rows not a multiple of 4
def test_q4_experts_gate_up_silu(inter):
    E, hid, gs = 5, 96, 32
    gc, gp, gsc = random_q4(E * inter, hid, gs)
    uc, up, usc = random_q4(E * inter, hid, gs)
    gp, gsc, up, usc = (a.reshape(E, inter, -1) for a in (gp, gsc, up, usc))
    gc, uc = gc.reshape(E, inter, hid), uc.reshape(E, inter, hid)
    x = RNG.standard_normal(hid).astype(np.float32)
    ids = np.array([4, 0, 2])
    out = np.full((3, inter), np.nan, np.float32)
    q8.experts_gate_up_silu(x, gp, gsc, up, usc, ids, out, ActScratch(hid), 4)
    for j, e in enumerate(ids):
        g, gmag = twin_matvec(x, gc[e], gsc[e], gs)
        u, umag = twin_matvec(x, uc[e], usc[e], gs)
        np.testing.assert_allclose(out[j], silu(g) * u, rtol=1e-4, atol=1e-5 * float((gmag * umag).max()) ** 0.5)


@pytest.mark.parametrize("hid", [96, 98])
def test_q4_experts_down_weighted_order_and_values(hid):
    E, inter, gs = 6, 64, 32
    dc, dp, dsc = random_q4(E * hid, inter, gs)
    dp, dsc, dc = dp.reshape(E, hid, -1), dsc.reshape(E, hid, -1), dc.reshape(E, hid, inter)
    ids = np.array([5, 1, 3, 0])
    wts = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    h = RNG.standard_normal((4, inter)).astype(np.float32)
    out = np.full(hid, np.nan, np.float32)
    q8.experts_down_weighted(h, dp, dsc, ids, wts, out, ActScratch(inter, rows=4), 4)
    want = np.zeros(hid)
    mag = np.zeros(hid)
    for j in np.argsort(ids):
        y, m = twin_matvec(h[j], dc[ids[j]], dsc[ids[j]], gs)
        want += wts[j] * y
        mag += wts[j] * m
    np.testing.assert_array_less(np.abs(out - want), 1e-5 * mag)
    # slot order does not matter: the kernel always sums in ascending expert id
    perm = np.array([2, 0, 3, 1])
    out2 = np.empty(hid, np.float32)
    q8.experts_down_weighted(h[perm], dp, dsc, ids[perm], wts[perm], out2, ActScratch(inter, rows=4), 4)
    np.testing.assert_array_equal(out, out2)


def test_q4_experts_reject_bad_ids():
    dc, dp, dsc = random_q4(2 * 32, 64, 32)
    with pytest.raises(ValueError):
        q8.experts_down_weighted(np.zeros((1, 64), np.float32), dp.reshape(2, 32, -1), dsc.reshape(2, 32, -1),
                                 np.array([2]), np.ones(1, np.float32), np.empty(32, np.float32), ActScratch(64), 4)


# ---- prefill (exact float32) -------------------------------------------------------------------

@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("o,k,gs", [(5, 32, 32), (37, 64, 64), (300, 2560, 128), (129, 2560, 32)])
def test_q4_matmul_exact(t, o, k, gs):
    codes, packed, scales = random_q4(o, k, gs)
    X = RNG.standard_normal((t, k)).astype(np.float32)
    out = np.full((t, o), np.nan, np.float32)
    q4.q4_matmul(X, packed, scales, out)
    want = X.astype(np.float64) @ dequantize_q4(packed, scales, gs).astype(np.float64).T
    scale = np.abs(X).astype(np.float64) @ np.abs(dequantize_q4(packed, scales, gs)).astype(np.float64).T
    np.testing.assert_array_less(np.abs(out - want), 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("gs", [32, 64, 128])
def test_q4_dequant_rows_is_the_spec(gs):
    codes, packed, scales = random_q4(11, 256, gs)
    scales[0, 0] = FP16_MAX
    scales[1, 0] = np.float16(6e-8)
    tile = np.empty((4, 256), np.float32)
    q4.q4_dequant_rows(packed, scales, 5, tile)
    np.testing.assert_array_equal(tile, dequantize_q4(packed, scales, gs)[5:9])
    np.testing.assert_array_equal(unpack_q4(packed, gs), codes)


# ---- the portable and the plain AVX2 paths ------------------------------------------------------

PATH_CHECK = """
import numpy as np
from ernie_edge.kernels import _jit, q4, q8
from ernie_edge.formats.quant import dequantize_q4, dequantize_q8, pack_q4
assert _jit.SIMD == "{path}" and not _jit.AVX512, (_jit.SIMD, _jit.AVX512)
rng = np.random.default_rng(0)
for gs, k in ((32, 96), (32, 128), (64, 128)):
    codes = rng.integers(-8, 8, size=(7, k)); sc = (rng.random((7, k // gs)) * 0.1).astype(np.float16)
    x = rng.standard_normal(k).astype(np.float32)
    out = np.empty(7, np.float32)
    q8.matvec(x, pack_q4(codes, gs), sc, out, q8.ActScratch(k), 4)
    want = dequantize_q4(pack_q4(codes, gs), sc, gs) @ x
    assert np.abs(out - want).max() < 2e-4 * np.abs(want).max(), (out, want)
    c8 = rng.integers(-127, 128, size=(7, k)).astype(np.int8)
    q8.q8_matvec(x, c8, sc, out, q8.ActScratch(k))
    want = dequantize_q8(c8, sc, gs) @ x
    assert np.abs(out - want).max() < 2e-4 * np.abs(want).max(), (out, want)
X = rng.standard_normal((3, 128)).astype(np.float32)
y = np.empty((3, 7), np.float32)
q4.q4_matmul(X, pack_q4(codes, 64), sc, y)
assert np.abs(y - X @ dequantize_q4(pack_q4(codes, 64), sc, 64).T).max() < 1e-4
from ernie_edge.kernels import attention
kc, vc = attention.new_kv_cache(1, 8, 16)
attention.kv_write(np.ones((8, 1, 16), np.float32), np.ones((8, 1, 16), np.float32), kc, vc, 0)
out = np.empty((2, 16), np.float32)
attention.attention_decode(np.ones((2, 16), np.float32), kc, vc, 8, out, attention.DecodeScratch(2, 16, 8))
assert np.allclose(out, 1.0)
print("ok")
"""


@pytest.mark.parametrize("path", ["generic", "avx2"])
def test_other_simd_paths_in_subprocess(path):
    """The portable path and the 256-bit AVX2 one (also what an AVX-512 CPU runs when forced below
    its best path): decode matvecs with even and odd block counts, the exact prefill matmul."""
    if path == _jit.SIMD or path not in _jit._host_paths():
        pytest.skip(f"{path}: this process's path or not available on this CPU")
    env = dict(os.environ, ERNIE_EDGE_SIMD=path)
    res = subprocess.run([sys.executable, "-c", PATH_CHECK.replace("{path}", path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_q4_matvec3_equals_three_matvecs():
    x = RNG.standard_normal(256).astype(np.float32)
    mats = [random_q4(o, 256, 64)[1:] for o in (9, 4, 3)]
    outs = [np.empty(p.shape[0], np.float32) for p, _ in mats]
    q8.matvec3(x, [(*m, o) for m, o in zip(mats, outs)], ActScratch(256), 4)
    for (p, s), got in zip(mats, outs):
        one = np.empty(p.shape[0], np.float32)
        q8.matvec(x, p, s, one, ActScratch(256), 4)
        np.testing.assert_array_equal(got, one)


# ---- routed + shared expert in one region -------------------------------------------------------

@pytest.mark.parametrize("inter, shared, hid, gs", [(96, 64, 64, 32), (128, 96, 192, 64), (128, 160, 256, 128)])
def test_experts_pair_equals_two_calls_bit_for_bit(inter, shared, hid, gs):
    """int4 routed bank (group gs) + int8 shared expert: the fused kernels give exactly the two
    separate kernels' results, the shared expert's down output added last."""
    E, k = 8, 3
    rng = np.random.default_rng(inter + shared)
    x = rng.standard_normal(hid).astype(np.float32)
    bank = lambda o, i: [a.reshape(E, o, -1) for a in random_q4(E * o, i, gs, rng=rng)[1:]]  # noqa: E731
    (gw, gsc), (uw, usc), (dw, dsc) = bank(inter, hid), bank(inter, hid), bank(hid, inter)
    s8 = lambda o, i: (rng.integers(-127, 128, size=(1, o, i)).astype(np.int8),  # noqa: E731
                       (rng.random((1, o, i // 32)) * 0.01).astype(np.float16))
    (sgw, sgs), (suw, sus), (sdw, sds) = s8(shared, hid), s8(shared, hid), s8(hid, shared)
    ids = np.array([5, 1, 6])
    w = np.array([0.5, 0.3, 0.2], np.float32)
    zero, one = np.zeros(1, np.int64), np.ones(1, np.float32)

    h_two, g_two = np.empty((k, inter), np.float32), np.empty((1, shared), np.float32)
    q8.experts_gate_up_silu(x, gw, gsc, uw, usc, ids, h_two, ActScratch(hid), 4)
    q8.q8_experts_gate_up_silu(x, sgw, sgs, suw, sus, zero, g_two, ActScratch(hid))
    y_routed, y_shared = np.empty(hid, np.float32), np.empty(hid, np.float32)
    q8.experts_down_weighted(h_two, dw, dsc, ids, w, y_routed, ActScratch(inter, rows=k), 4)
    q8.q8_matvec(g_two[0], sdw[0], sds[0], y_shared, ActScratch(shared))

    h_one, g_one = np.empty_like(h_two), np.empty_like(g_two)
    act_a, act_b = ActScratch(max(hid, inter), rows=k), ActScratch(max(hid, shared))
    q8.experts_pair_gate_up_silu(x, (gw, gsc, uw, usc, ids, h_one, 4), (sgw, sgs, suw, sus, zero, g_one, 8),
                                 act_a, act_b)
    np.testing.assert_array_equal(h_one, h_two)
    np.testing.assert_array_equal(g_one, g_two)
    y = np.empty(hid, np.float32)
    q8.experts_pair_down_weighted((h_one, dw, dsc, ids, w, 4), (g_one, sdw, sds, zero, one, 8), y, act_a, act_b)
    np.testing.assert_array_equal(y, y_routed + y_shared)
    with pytest.raises(ValueError, match="bank b: down bank"):
        q8.experts_pair_down_weighted((h_one, dw, dsc, ids, w, 4), (g_one, sdw[:, :, :32], sds, zero, one, 8), y,
                                      act_a, act_b)
