"""rmsnorm, SwiGLU, RoPE and the router against plain numpy twins written here
and against ernie_edge.reference (docs/ERNIE_SPEC.md §3). float32 paths: relative error <= 1e-5."""

from __future__ import annotations

import numpy as np
import pytest

from ernie_edge import reference as ref
from ernie_edge.kernels import moe, norm, rope

RNG = np.random.default_rng(7)


def assert_rel(got, want, rel=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.abs(want).max(), 1e-30)
    assert np.abs(got - want).max() <= rel * scale, (np.abs(got - want).max(), scale)


# ---- rmsnorm / swiglu --------------------------------------------------------------------------

def rmsnorm_np(x, w, eps):
    x = x.astype(np.float64)
    return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * w


@pytest.mark.parametrize("t,h", [(1, 2560), (3, 64), (17, 96)])
def test_rmsnorm(t, h):
    x = (RNG.standard_normal((t, h)) * 3).astype(np.float32)
    w = RNG.standard_normal(h).astype(np.float32)
    out = np.empty_like(x)
    norm.rmsnorm(x, w, 1e-5, out)
    assert_rel(out, rmsnorm_np(x, w, 1e-5))
    assert_rel(out, ref.rms_norm(x, w, 1e-5))
    norm.rmsnorm(x[0], w, 1e-5, out[0])  # 1-D form
    assert_rel(out[0], rmsnorm_np(x[:1], w, 1e-5)[0])


def test_rmsnorm_eps_inside_sqrt_and_zero_row():
    x = np.zeros((1, 32), np.float32)
    out = np.empty_like(x)
    norm.rmsnorm(x, np.ones(32, np.float32), 1e-5, out)
    assert np.all(out == 0.0)
    x = np.full((1, 32), 1e-3, np.float32)
    norm.rmsnorm(x, np.ones(32, np.float32), 1e-5, out)
    assert_rel(out, 1e-3 / np.sqrt(1e-6 + 1e-5) * np.ones((1, 32)))


def test_add_rmsnorm_updates_residual():
    h = RNG.standard_normal((2, 64)).astype(np.float32)
    d = RNG.standard_normal((2, 64)).astype(np.float32)
    w = RNG.standard_normal(64).astype(np.float32)
    h0 = h.copy()
    out = np.empty_like(h)
    norm.add_rmsnorm(h, d, w, 1e-5, out)
    np.testing.assert_array_equal(h, h0 + d)
    assert_rel(out, rmsnorm_np(h0 + d, w, 1e-5))


def test_silu_mul():
    g = (RNG.standard_normal(100) * 10).astype(np.float32)
    u = RNG.standard_normal(100).astype(np.float32)
    out = np.empty_like(g)
    norm.silu_mul(g, u, out)
    assert_rel(out, g / (1 + np.exp(-g.astype(np.float64))) * u)


# ---- RoPE ------------------------------------------------------------------------------------

def rope_np(x, positions, theta):
    d = x.shape[-1]
    inv = (np.float32(1.0) / (np.float32(theta) ** (np.arange(0, d, 2).astype(np.float32) / np.float32(d))))
    ang = positions.astype(np.float32)[:, None] * inv[None, :].astype(np.float32)  # fp32, one multiply
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = x.copy()
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 1::2] * c + x[..., 0::2] * s
    return out


def test_rope_inv_freq_matches_reference():
    np.testing.assert_array_equal(rope.rope_inv_freq(128, 500000.0), ref.rope_inv_freq(128, 500000.0))


def test_rope_interleaved_pairs():
    positions = np.array([0, 1, 7, 1000, 65535, 131071])
    x = RNG.standard_normal((6, 5, 128)).astype(np.float32)
    cos, sin = rope.rope_tables(131072, 128, 500000.0)
    got = x.copy()
    rope.apply_rope(got, positions, cos, sin)
    assert_rel(got, rope_np(x, positions, 500000.0))
    assert_rel(got, ref.apply_rope(x, positions, ref.rope_inv_freq(128, 500000.0)))
    np.testing.assert_array_equal(got[0], x[0])  # position 0 is the identity


def test_rope_table_offset_and_range_check():
    cos, sin = rope.rope_tables(16, 8, 10000.0, start=100)
    x = RNG.standard_normal((2, 1, 8)).astype(np.float32)
    got = x.copy()
    rope.apply_rope(got, np.array([100, 115]), cos, sin, table_start=100)
    assert_rel(got, rope_np(x, np.array([100, 115]), 10000.0))
    with pytest.raises(ValueError):
        rope.apply_rope(x.copy(), np.array([99, 100]), cos, sin, table_start=100)


# ---- router ------------------------------------------------------------------------------------

def route_np(x, wg, bias, k):
    logits = x.astype(np.float64) @ wg.astype(np.float64).T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    score = p + (0 if bias is None else bias)
    idx = np.argsort(-score, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, axis=1)
    return idx, w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("T", [1, 5])  # one token: the parallel decode logits
def test_route(use_bias, T):
    H, E, k = 256, 64, 6
    x = RNG.standard_normal((T, H)).astype(np.float32)
    wg = (RNG.standard_normal((E, H)) * 0.05).astype(np.float32)
    bias = (RNG.standard_normal(E) * 0.05).astype(np.float32) if use_bias else None
    idx, w = np.empty((T, k), np.int64), np.empty((T, k), np.float32)
    moe.route(x, wg, bias, k, idx, w)
    want_idx, want_w = route_np(x, wg, bias, k)
    np.testing.assert_array_equal(idx, want_idx)
    assert_rel(w, want_w)
    ridx, rw = ref.route(x, wg, bias, k)
    np.testing.assert_array_equal(idx, ridx)
    assert_rel(w, rw)


def test_route_bias_only_selects_and_ties_pick_lower_index():
    x = np.ones((1, 32), np.float32)
    wg = np.zeros((8, 32), np.float32)  # all logits equal: p = 1/8 each, a full tie
    idx, w = np.empty((1, 2), np.int64), np.empty((1, 2), np.float32)
    moe.route(x, wg, None, 2, idx, w)
    np.testing.assert_array_equal(idx, [[0, 1]])
    bias = np.zeros(8, np.float32)
    bias[6] = 1.0
    moe.route(x, wg, bias, 2, idx, w)
    np.testing.assert_array_equal(idx, [[6, 0]])
    np.testing.assert_allclose(w, [[0.5, 0.5]])  # weights from the un-biased p


def test_route_of_one_token_equals_its_row_in_a_batch():
    """Decode (one token, parallel logits) and prefill (a batch) route a token identically."""
    T, H, E, k = 9, 2560, 64, 6
    x = RNG.standard_normal((T, H)).astype(np.float32)
    wg = (RNG.standard_normal((E, H)) * 0.02).astype(np.float32)
    bias = (RNG.standard_normal(E) * 0.01).astype(np.float32)
    idx, w = np.empty((T, k), np.int64), np.empty((T, k), np.float32)
    moe.route(x, wg, bias, k, idx, w)
    work = np.full((3, E), np.nan, np.float32)  # decode's scratch: whatever it held before is overwritten
    for t in range(T):
        i1, w1 = np.empty((1, k), np.int64), np.empty((1, k), np.float32)
        moe.route(x[t], wg, bias if t % 2 else None, k, i1, w1, work=work)
        i2, w2 = np.empty((1, k), np.int64), np.empty((1, k), np.float32)
        moe.route(x[t:t + 1], wg, bias if t % 2 else None, k, i2, w2)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(w1, w2)
        if t % 2:
            np.testing.assert_array_equal(i1[0], idx[t])
            np.testing.assert_array_equal(w1[0], w[t])
    with pytest.raises(ValueError, match=r"work must be C-contiguous float32 \[3, 64\]"):
        moe.route(x[0], wg, bias, k, i1, w1, work=np.zeros((2, E), np.float32))
