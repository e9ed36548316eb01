"""Attention kernels (fp16 and int8 KV caches) against a plain numpy twin written here and against
ernie_edge.reference (docs/ERNIE_SPEC.md §3.2): softmax((q k^T) * D^-0.5 + causal mask) v, GQA h -> h // R.

The int8 cache's decode quantizes q per head to int8 (integer dot products) and rounds each tile's
probabilities (times the V scales) to uint8 (error <= max / 510 per probability); its twin
`attention_i8_np` does both in numpy, so every comparison with it is float32 round-off only
(relative error <= 1e-5). Against the float twin the int8 decode is allowed 1e-2; its prefill is
float round-off only."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ernie_edge import reference as ref
import ernie_edge.kernels.attention_decode as decode_mod
from ernie_edge.kernels import _jit, attention, attention_ir, kv_layout

RNG = np.random.default_rng(7)
DTYPES = ["f16", "i8"]
CODE_MAX = 127  # int8 codes per (position, head): step = max|x| / CODE_MAX


def assert_rel(got, want, rel=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.abs(want).max(), 1e-30)
    assert np.abs(got - want).max() <= rel * scale, (np.abs(got - want).max(), scale)


def attention_np(q, k, v, q_positions):
    """softmax((q k^T) * D^-0.5 + causal mask) v with GQA head h -> kv head h // group; [T, Nq*D]."""
    T, nq, d = q.shape
    group = nq // k.shape[1]
    out = np.zeros((T, nq, d))
    for t in range(T):
        for h in range(nq):
            kk = k[: q_positions[t] + 1, h // group].astype(np.float64)
            s = kk @ q[t, h].astype(np.float64) * d ** -0.5
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[: q_positions[t] + 1, h // group]
    return out.reshape(T, nq * d)


def quantize_q_np(q):
    """The int8 decode's query: q * D^-0.5 rounded to int8 per head, returned unscaled by D^-0.5."""
    d = q.shape[-1]
    qs = q * np.float32(d ** -0.5)
    amax = np.abs(qs).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.maximum(amax, 1e-30), 0).astype(np.float32)
    return (np.floor(qs * inv + np.float32(0.5)) * (amax / np.float32(127))) / np.float32(d ** -0.5)


def attention_i8_np(q, kc, vc, length):
    """The int8 decode's twin: q rounded as quantize_q_np, and each tile's probabilities times the V
    scales rounded to uint8 relative to the tile's largest (the rounding is scale-free, so the
    kernel's online softmax gives the same codes); [1, Nq*D]."""
    nq, d = q.shape
    nkv = kc.shape[0]
    k, _ = attention.kv_read(kc, vc, 0, length)
    codes, scales = kv_layout.split_views(vc, d, is_k=False)
    codes = codes.reshape(nkv, -1, d)[:, :length].astype(np.float64)
    scales = scales.reshape(nkv, -1)[:, :length].astype(np.float64)
    qq = quantize_q_np(q).astype(np.float64)
    out = np.zeros((nq, d))
    for h in range(nq):
        g = h // (nq // nkv)
        s = (k[:, g] @ qq[h]) * d ** -0.5
        w = np.exp(s - s.max())
        p = w * scales[g]
        for t0 in range(0, length, attention.KV_TILE):
            seg = p[t0:t0 + attention.KV_TILE]
            top = seg.max()
            if top < attention_ir.P_TINY:  # the kernel drops such a tile (<= 1e-30 of the total)
                continue
            out[h] += top / attention_ir.P_ONE * (np.floor(seg / top * attention_ir.P_ONE + 0.5) @ codes[g, t0:t0 + len(seg)])
        out[h] /= w.sum()
    return out.reshape(1, -1)


def decode_twin(q, k, v, kc, vc, length):
    """What the decode kernel must give: the float twin for fp16, the rounding twin for int8."""
    if kc.dtype == np.int8:
        return attention_i8_np(q, kc, vc, length)
    return attention_np(q[None], k, v, np.array([length - 1]))


def fill_cache(S, nkv, d, cap, kv_dtype):
    """Random k, v written to a new cache; returns the cache's own values (kv_read) and the arrays."""
    k = RNG.standard_normal((S, nkv, d)).astype(np.float32)
    v = RNG.standard_normal((S, nkv, d)).astype(np.float32)
    kc, vc = attention.new_kv_cache(nkv, cap, d, kv_dtype)
    attention.kv_write(k, v, kc, vc, 0)
    kr, vr = attention.kv_read(kc, vc, 0, S)
    return kr, vr, kc, vc


def decode(q, kc, vc, length, cap):
    out = np.empty_like(q)
    attention.attention_decode(q, kc, vc, length, out, attention.DecodeScratch(q.shape[0], q.shape[1], cap))
    return out


# ---- cache layout ------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_kv_write_round_trip_across_tiles(kv_dtype):
    kc, vc = attention.new_kv_cache(2, 600, 16, kv_dtype)
    nt = 3 * attention.KV_BLOCK // attention.KV_TILE
    assert kc.shape == vc.shape == (2, nt, attention.tile_elems(16, kv_dtype))
    k = RNG.standard_normal((300, 2, 16)).astype(np.float32)
    v = RNG.standard_normal((300, 2, 16)).astype(np.float32)
    attention.kv_write(k[:200], v[:200], kc, vc, 0)
    attention.kv_write(k[200:], v[200:], kc, vc, 200)  # starts mid-tile, crosses tiles and the block at 256
    k2, v2 = attention.kv_read(kc, vc, 0, 300)
    if kv_dtype == "f16":
        np.testing.assert_array_equal(k2, k.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(v2, v.astype(np.float16).astype(np.float32))
    else:  # symmetric codes per (position, head): error <= half a step of max|x| / CODE_MAX
        for x, x2 in ((k, k2), (v, v2)):
            step = np.abs(x).max(-1, keepdims=True) / CODE_MAX
            assert np.all(np.abs(x2 - x) <= 0.5001 * step)
            assert np.abs(x2 - x).max() > 0.2 * step.min()  # really quantized, and to this step
    with pytest.raises(ValueError):
        attention.kv_write(k[:10], v[:10], kc, vc, 3 * attention.KV_BLOCK - 5)


# float32 values whose fp16 rounding is delicate: signed zeros, fp16 subnormals and the smallest
# ones, ties to even (1 + 2^-11 rounds down, 1 + 3 * 2^-11 up), the largest finite fp16 and the
# halfway point above it (65520 overflows to inf), float32 subnormals, infinities.
F16_EDGES = np.array([0.0, -0.0, 1e-8, 2.9802322e-08, 2.9802326e-08, 5.9604645e-08, 8.9406967e-08, 6.0975552e-05,
                      6.1035156e-05, 1.00048828125, 1.00146484375, 2049.0, 2051.0, 65504.0, 65519.996, 65520.0,
                      -65520.0, 1e6, np.inf, -np.inf, 1e-40, -3e-6], np.float32)


def f16_cases(rng) -> np.ndarray:
    """F16_EDGES, then random float32 bit patterns (every exponent; NaNs left out), as [T, 2, 16]."""
    bits = rng.integers(0, 2 ** 32, 4000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([F16_EDGES, bits[~np.isnan(bits)]])
    return x[: len(x) // 32 * 32].reshape(-1, 2, 16)


def test_kv_write_f16_rounds_as_numpy():
    """The fp16 cache holds exactly numpy's astype(float16) bits: round to nearest even, subnormals,
    overflow to inf (ir.f32_to_f16; the generic path's bit manipulation is checked in
    test_simd_paths_agree)."""
    x = f16_cases(np.random.default_rng(11))
    kc, vc = attention.new_kv_cache(2, len(x), 16, "f16")
    attention.kv_write(x, -x, kc, vc, 0)
    k, v = attention.kv_read(kc, vc, 0, len(x))
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    np.testing.assert_array_equal(k.astype(np.float16).view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(v.astype(np.float16).view(np.uint16), (-want).view(np.uint16))


def test_int8_cache_zero_row_and_bytes():
    kc, vc = attention.new_kv_cache(1, 32, 16, "i8")
    attention.kv_write(np.zeros((1, 1, 16), np.float32), np.ones((1, 1, 16), np.float32), kc, vc, 0)
    k, v = attention.kv_read(kc, vc, 0, 1)
    assert np.all(k == 0) and np.all(v == 1)
    f16 = attention.new_kv_cache(4, 4096, 128, "f16")
    q = attention.new_kv_cache(4, 4096, 128, "i8")
    # 128 code bytes + a float32 scale per position and head, vs 256 bytes for fp16
    assert sum(a.nbytes for a in q) / sum(a.nbytes for a in f16) == pytest.approx((128 + 4) / 256)


def test_int8_cache_layout():
    """The documented i8 order: K tile [D/4, KT, 4] (byte (d//4 * KT + j) * 4 + d%4); V tile in chunks of
    64 dims, chunk c0 .. c0+w-1 at byte c0 * KT as [KT/4, w, 4] (w = 64, or D % 64 for the last one);
    then KT float32 scales. D = 80: one full V chunk and one of 16 dims."""
    d = 80
    k = np.zeros((32, 1, d), np.float32)
    v = np.zeros((32, 1, d), np.float32)
    k[:, 0, 0] = v[:, 0, 0] = 127  # pins every position's scale to 1
    k[:, 0, 5] = np.arange(32) - 16
    v[:, 0, 3] = 16 - np.arange(32)  # first chunk (w = 64)
    v[:, 0, 70] = np.arange(32) - 8  # second chunk (dims 64..79, w = 16)
    kc, vc = attention.new_kv_cache(1, 32, d, "i8")
    attention.kv_write(k, v, kc, vc, 0)
    kb, vb = kc[0, 0], vc[0, 0]
    for j in range(32):
        assert kb[((5 // 4) * 32 + j) * 4 + 5 % 4] == j - 16
        assert vb[((j // 4) * 64 + 3) * 4 + j % 4] == 16 - j
        assert vb[64 * 32 + ((j // 4) * 16 + 70 - 64) * 4 + j % 4] == j - 8
    np.testing.assert_array_equal(kb[d * 32:].view(np.float32), np.ones(32, np.float32))
    np.testing.assert_array_equal(vb[d * 32:].view(np.float32), np.ones(32, np.float32))


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_cache_overwrite_keeps_neighbours(kv_dtype):
    """Rewriting positions (a truncated conversation) replaces them and only them."""
    k = RNG.standard_normal((64, 2, 32)).astype(np.float32)
    v = RNG.standard_normal((64, 2, 32)).astype(np.float32)
    kc, vc = attention.new_kv_cache(2, 64, 32, kv_dtype)
    attention.kv_write(k, v, kc, vc, 0)
    before_k, before_v = attention.kv_read(kc, vc, 0, 64)
    attention.kv_write(-k[20:23], -v[20:23], kc, vc, 20)
    after_k, after_v = attention.kv_read(kc, vc, 0, 64)
    keep = np.r_[0:20, 23:64]
    np.testing.assert_array_equal(after_k[keep], before_k[keep])
    np.testing.assert_array_equal(after_v[keep], before_v[keep])
    np.testing.assert_array_equal(after_k[20:23], -before_k[20:23])
    np.testing.assert_array_equal(after_v[20:23], -before_v[20:23])


# ---- decode ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 33, 255, 256, 257, 4097])
def test_attention_decode(kv_dtype, length):
    nq, nkv, d = 20, 4, 128
    k, v, kc, vc = fill_cache(length, nkv, d, 4100, kv_dtype)
    q = RNG.standard_normal((nq, d)).astype(np.float32)
    out = decode(q, kc, vc, length, 4100).reshape(1, -1)
    assert_rel(out, decode_twin(q, k, v, kc, vc, length))
    if kv_dtype == "f16":
        assert_rel(out, ref.attention(q[None], k, v, np.array([length - 1])))
    else:  # the uint8 probabilities' rounding stays small next to the float result
        assert_rel(out, attention_np(quantize_q_np(q)[None], k, v, np.array([length - 1])), 1e-2)


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("nq,nkv,d", [(4, 2, 16), (6, 1, 32), (14, 2, 48), (16, 1, 64), (10, 2, 80), (6, 2, 144)])
def test_attention_decode_head_groups_and_dims(kv_dtype, nq, nkv, d):
    """R = 2, 3, 5, 6, 7 (two register tiles: 4 + 3) and 16 (three tiles); D with a 16- or 48-wide
    remainder past 64-dim P.V passes (and int8 V chunks: 80 = 64 + 16, 144 = 2 x 64 + 16)."""
    k, v, kc, vc = fill_cache(300, nkv, d, 512, kv_dtype)
    q = RNG.standard_normal((nq, d)).astype(np.float32)
    out = decode(q, kc, vc, 300, 512)
    assert_rel(out.reshape(1, -1), decode_twin(q, k, v, kc, vc, 300))


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("nsplit", [1, 3, decode_mod.MAX_SPLIT])
def test_attention_decode_any_split(kv_dtype, nsplit, monkeypatch):
    """The result does not depend on how the positions are split into work items."""
    monkeypatch.setattr(decode_mod, "decode_splits", lambda nkv, length: min(nsplit, -(-length // 256)))
    k, v, kc, vc = fill_cache(5000, 2, 32, 5000, kv_dtype)
    q = RNG.standard_normal((4, 32)).astype(np.float32)
    assert_rel(decode(q, kc, vc, 5000, 5000).reshape(1, -1), decode_twin(q, k, v, kc, vc, 5000))


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_attention_decode_ignores_slots_past_length(kv_dtype):
    """Stale entries after `length` (a truncated conversation) have no effect, even huge ones."""
    k, v, kc, vc = fill_cache(40, 2, 32, 64, kv_dtype)
    q = RNG.standard_normal((4, 32)).astype(np.float32)
    before = decode(q, kc, vc, 37, 64)
    junk = np.full((3, 2, 32), 3e4, np.float32)
    attention.kv_write(junk, junk, kc, vc, 37)
    np.testing.assert_array_equal(decode(q, kc, vc, 37, 64), before)


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_attention_decode_large_scores_are_stable(kv_dtype):
    nq, nkv, d = 4, 2, 32
    k, v, kc, vc = fill_cache(300, nkv, d, 512, kv_dtype)
    q = (RNG.standard_normal((nq, d)) * 200).astype(np.float32)  # exp would overflow without the max
    out = decode(q, kc, vc, 300, 512)
    assert np.all(np.isfinite(out))
    assert_rel(out.reshape(1, -1), decode_twin(q, k, v, kc, vc, 300), rel=1e-4)


# ---- prefill -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_decode_step_is_rope_write_and_attention(kv_dtype):
    """A bound decode step (bind_decode_step) does in one call what decode did in four: apply_rope of
    q and k, kv_write of k and v at the slot, attention_decode over slots 0 .. slot; same bits in
    the output and in the cache, token after token, for each layer's own cache, with a RoPE table
    that starts past 0 and slots that cross tiles."""
    from ernie_edge.kernels.rope import apply_rope, rope_tables
    nq, nkv, d, start, layers = 10, 2, 32, 7, 2
    rng = np.random.default_rng(21)
    cos, sin = rope_tables(96, d, 10000.0, start=start)
    caches = [attention.new_kv_cache(nkv, 96, d, kv_dtype) for _ in range(layers)]
    twins = [(k.copy(), v.copy()) for k, v in caches]
    q, k, v = (np.zeros((1, n, d), np.float32) for n in (nq, nkv, nkv))
    pos, out = np.zeros(1, np.int64), np.zeros((nq, d), np.float32)
    scratch = attention.DecodeScratch(nq, d, 256)
    steps = attention.bind_decode_step(q, k, v, pos, cos, sin, start, [c[0] for c in caches],
                                       [c[1] for c in caches], out, scratch)
    assert len(steps) == layers
    for slot in (0, 1, 30, 31, 32, 33, 70):
        pos[0] = start + slot
        for li in range(layers):
            for a in (q, k, v):
                a[:] = rng.standard_normal(a.shape).astype(np.float32)
            q2, k2, v2 = q.copy(), k.copy(), v.copy()
            attention.check_step(slot, int(pos[0]), caches[li][0], cos, start)
            steps[li](slot)
            apply_rope(q2, pos, cos, sin, start)
            apply_rope(k2, pos, cos, sin, start)
            attention.kv_write(k2, v2, *twins[li], slot)
            want = np.empty_like(out)
            attention.attention_decode(q2[0], *twins[li], slot + 1, want, attention.DecodeScratch(nq, d, 256))
            np.testing.assert_array_equal(out, want)
            np.testing.assert_array_equal(q, q2)
            np.testing.assert_array_equal(caches[li][0], twins[li][0])
            np.testing.assert_array_equal(caches[li][1], twins[li][1])
    with pytest.raises(ValueError, match="cache slot 256"):
        attention.check_step(256, start, caches[0][0], cos, start)
    with pytest.raises(ValueError, match="position 6 outside the rope table"):
        attention.check_step(0, start - 1, caches[0][0], cos, start)
    other = attention.new_kv_cache(nkv, 512, d, kv_dtype)
    with pytest.raises(ValueError, match="differs from layer 0"):
        attention.bind_decode_step(q, k, v, pos, cos, sin, start, [caches[0][0], other[0]], [caches[0][1], other[1]],
                                   out, scratch)
    with pytest.raises(ValueError, match="k must be"):
        attention.bind_decode_step(q, k[:, :1].copy(), v, pos, cos, sin, start, [caches[0][0]], [caches[0][1]], out,
                                   scratch)
    with pytest.raises(ValueError, match="scratch for 8 positions"):
        attention.bind_decode_step(q, k, v, pos, cos, sin, start, [caches[0][0]], [caches[0][1]], out,
                                   attention.DecodeScratch(nq, d, 8))


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("start,T", [(0, 1), (0, 17), (100, 33), (5, 70), (250, 20)])
def test_attention_prefill_causal(kv_dtype, start, T):
    nq, nkv, d = 20, 4, 128
    k, v, kc, vc = fill_cache(start + T, nkv, d, 512, kv_dtype)
    q = RNG.standard_normal((T, nq, d)).astype(np.float32)
    out = np.empty_like(q)
    attention.attention_prefill(q, kc, vc, start, out)
    pos = np.arange(start, start + T)
    assert_rel(out.reshape(T, -1), attention_np(q, k, v, pos))
    assert_rel(out.reshape(T, -1), ref.attention(q, k, v, pos))


@pytest.mark.parametrize("start,T", [(0, 70), (300, 9)])
def test_attention_prefill_fp16_is_decode_per_token(start, T):
    """fp16 cache: prefill runs decode's kernels per (KV head, token), so each row is what decoding
    that token gives (bit for bit when decode takes one position range per head; decode's split
    merge may round differently on more threads)."""
    nq, nkv, d = 20, 4, 128
    k, v, kc, vc = fill_cache(start + T, nkv, d, 512, "f16")
    q = RNG.standard_normal((T, nq, d)).astype(np.float32)
    out = np.empty_like(q)
    attention.attention_prefill(q, kc, vc, start, out)
    for t in range(T):
        np.testing.assert_allclose(out[t], decode(q[t], kc, vc, start + t + 1, 512), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_attention_prefill_head_dim_80(kv_dtype):
    """A head dim that is not a multiple of 64 (int8 V in chunks of 64 + 16 dims)."""
    start, T, nq, nkv, d = 40, 30, 10, 2, 80
    k, v, kc, vc = fill_cache(start + T, nkv, d, 256, kv_dtype)
    q = RNG.standard_normal((T, nq, d)).astype(np.float32)
    out = np.empty_like(q)
    attention.attention_prefill(q, kc, vc, start, out)
    assert_rel(out.reshape(T, -1), attention_np(q, k, v, np.arange(start, start + T)))


# ---- argument checks ---------------------------------------------------------------------------

def test_attention_rejects_bad_arguments():
    k, v, kc, vc = fill_cache(4, 2, 16, 8, "f16")
    q, out = np.zeros((4, 16), np.float32), np.empty((4, 16), np.float32)
    with pytest.raises(ValueError):  # past the cache
        attention.attention_decode(q, kc, vc, attention.KV_BLOCK + 1, out, attention.DecodeScratch(4, 16, 1024))
    with pytest.raises(ValueError):  # past the scratch
        attention.attention_decode(q, kc, vc, 9, out, attention.DecodeScratch(4, 16, 8))
    with pytest.raises(ValueError):  # a cache in another layout
        attention.attention_decode(q, np.zeros((2, 8, 16), np.uint16), np.zeros((2, 8, 16), np.uint16), 1, out,
                                   attention.DecodeScratch(4, 16, 8))
    k8, v8 = attention.new_kv_cache(2, 8, 16, "i8")
    with pytest.raises(ValueError):  # K and V of different dtypes
        attention.attention_decode(q, kc, v8, 1, out, attention.DecodeScratch(4, 16, 8))
    with pytest.raises(ValueError):
        attention.new_kv_cache(2, 8, 16, "f32")
    with pytest.raises(ValueError):
        attention.new_kv_cache(2, 8, 24)  # head_dim not a multiple of 16


# ---- the other SIMD paths ------------------------------------------------------------------------

_OTHER_PATH = """
import numpy as np
from ernie_edge.kernels import _jit, attention
rng = np.random.default_rng(3)
for dt in ("f16", "i8"):  # head dim 80: int8 V in two chunks (64 + 16 dims), read in 16-dim passes or 64 + 16
    k = rng.standard_normal((300, 2, 80)).astype(np.float32)
    kc, vc = attention.new_kv_cache(2, 300, 80, dt)
    attention.kv_write(k, k[::-1].copy(), kc, vc, 0)
    q = rng.standard_normal((10, 80)).astype(np.float32)
    out = np.empty_like(q)
    attention.attention_decode(q, kc, vc, 299, out, attention.DecodeScratch(10, 80, 300))
    np.save(f"{dir}/{_jit.SIMD}-{dt}.npy", out)
# every probability and V code at its largest (255 x 127): pair sums overflow int16 multiply-adds
ones = np.ones((300, 2, 48), np.float32)
kc, vc = attention.new_kv_cache(2, 300, 48, "i8")
attention.kv_write(ones, ones, kc, vc, 0)
out = np.empty((10, 48), np.float32)
attention.attention_decode(ones[0, :1].repeat(10, 0), kc, vc, 299, out, attention.DecodeScratch(10, 48, 300))
np.save(f"{dir}/{_jit.SIMD}-flat.npy", out)
# fp16 rounding of the cache write (ir.f32_to_f16: fptrunc on x86, bit manipulation on generic)
x = np.load(f"{dir}/f16-cases.npy")
kc, vc = attention.new_kv_cache(2, len(x), 16, "f16")
attention.kv_write(x, x, kc, vc, 0)
np.save(f"{dir}/{_jit.SIMD}-f16bits.npy", attention.kv_read(kc, vc, 0, len(x))[0].astype(np.float16).view(np.uint16))
"""


def test_forced_simd_path_sets_the_attention_tiling():
    """ERNIE_EDGE_SIMD reaches attention through _jit: 512-bit register tiles (NVEC 2) only on the
    host's own best path, and only where the CPU has AVX-512."""
    script = "from ernie_edge.kernels import _jit, attention_ir; print(_jit.SIMD, attention_ir.NVEC, _jit.VNNI512)"
    host = _jit._host_paths()
    for path in host:
        env = dict(os.environ, ERNIE_EDGE_SIMD=path)
        got = subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120, capture_output=True,
                             text=True).stdout.split()
        wide = path == host[0] and path != "generic" and bool(_jit._FEATURES.get("avx512f"))
        assert got[:2] == [path, "2" if wide else "1"], (path, got)
        assert got[2] == str(wide and path == "avxvnni" and bool(_jit._FEATURES.get("avx512vnni"))), (path, got)


def test_simd_paths_agree(tmp_path):
    """generic (portable vector IR, NVEC 1) and avx2 give the host path's results (float round-off),
    also where int8 P.V's products are at their largest. The other paths compile in subprocesses
    (~15 s each); CI's CPU has VNNI, so this is where its AVX2 and generic code runs at all."""
    script = _OTHER_PATH.replace("{dir}", str(tmp_path))
    cases = f16_cases(np.random.default_rng(12))
    np.save(tmp_path / "f16-cases.npy", cases)
    paths = {p for p in ("generic", "avx2", _jit.SIMD) if p in _jit._host_paths()}
    for path in sorted(paths - {_jit.SIMD}):
        env = dict(os.environ, ERNIE_EDGE_SIMD=path, NUMBA_CACHE_DIR=str(tmp_path / f"cache-{path}"))
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    exec(script, {})  # this process's path
    outs = {f.stem: np.load(f) for f in sorted(tmp_path.glob("*.npy"))}
    for dt in DTYPES:
        got = [v for name, v in outs.items() if name.endswith(dt)]
        assert len(got) == len(paths)
        for x in got[1:]:
            assert_rel(x, got[0])
    flat = [v for name, v in outs.items() if name.endswith("flat")]
    assert len(flat) == len(paths)
    for x in flat:  # softmax of equal scores over rows of ones: exactly 1 up to the uint8 rounding
        np.testing.assert_allclose(x, 1.0, rtol=1e-5)
    bits = [v for name, v in outs.items() if name.endswith("f16bits")]
    assert len(bits) == len(paths)
    with np.errstate(over="ignore"):
        want = cases.astype(np.float16).view(np.uint16)
    for x in bits:
        np.testing.assert_array_equal(x, want)


# ---- the model's cache object ------------------------------------------------------------------

def small_config():
    from ernie_edge.config import ErnieConfig
    return ErnieConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, moe_intermediate_size=32, moe_num_experts=4, moe_k=2,
                       head_dim=32, max_position_embeddings=10000)


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_kv_cache_object_dtype_bytes_and_growth(kv_dtype):
    from ernie_edge.kv_cache import GROW_CHUNK, KVCache, kv_bytes
    cfg = small_config()
    cache = KVCache(cfg, kv_dtype=kv_dtype)
    cache.reserve(10)
    assert cache.capacity == GROW_CHUNK and cache.nbytes() == kv_bytes(cfg, GROW_CHUNK, kv_dtype)
    assert attention.cache_dtype(cache.k[0]) == kv_dtype
    x = RNG.standard_normal((5, 2, 32)).astype(np.float32)
    attention.kv_write(x, x, cache.k[1], cache.v[1], 3)
    cache.length = GROW_CHUNK - 2
    cache.reserve(5)  # grows, keeping what was written
    assert cache.capacity == 2 * GROW_CHUNK
    k, _ = attention.kv_read(cache.k[1], cache.v[1], 3, 5)
    assert np.abs(k - x).max() <= (1e-2 if kv_dtype == "f16" else 0.51 * np.abs(x).max() / CODE_MAX)
    assert kv_bytes(cfg, 4096, "i8") / kv_bytes(cfg, 4096, "f16") == pytest.approx((32 + 4) / 64)


def test_kv_cache_rejects_unknown_dtype():
    from ernie_edge.errors import ErnieEdgeError
    from ernie_edge.kv_cache import KVCache
    with pytest.raises(ErnieEdgeError, match="kv_dtype"):
        KVCache(small_config(), kv_dtype="f32")
