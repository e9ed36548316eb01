"""Causal GQA attention for prefill (docs/ERNIE_SPEC.md §3.2) over an fp16 or int8 KV cache.

Legend: T new tokens, Nq query heads, Nkv KV heads, R = Nq / Nkv, D head dim, KT = KV_TILE.

The new tokens' k/v are written to the cache first (kv_write). Then:

- fp16 cache: each work item (a KV head x one query token) runs decode's blocked online softmax
  (attention_decode.py: all R query heads scored from one pass over each K tile and accumulated
  from one pass over each V tile, the LLVM vector IR of attention_ir.py) over the positions that
  token sees: the same float32 arithmetic as decoding it, 1.6-2x faster than the float tiles below
  (docs/PERF.md). Items are KV-head-major, so a static split gives each thread the same mix of
  short and long rows.
- int8 cache: each work item (a KV head x a block of PREFILL_QBLOCK queries) loads key blocks of
  PREFILL_KBLOCK positions from the cache as float32 (codes times scales, the element offsets of
  kv_layout.py) and runs an online softmax over them in float32, exact up to float rounding
  (decode's int8 path rounds q and the probabilities to 8 bits instead).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import njit, pnjit
from .attention_decode import _pv_heads, _qk_heads, _softmax_step, head_tuple
from .attention_ir import DECODE_BLOCK, NEG_INF, exp_nonpos
from .kv_layout import KV_TILE, check_cache, k_code, tile_scale, v_code

PREFILL_QBLOCK = 16  # queries per prefill work item
PREFILL_KBLOCK = 64  # keys per prefill inner block (a multiple of KV_TILE)


@njit(inline="always")
def _load_kt(k_cache, g, k0, n, kt):
    """kt[d, j] = float32 key d of position k0 + j, for j < n (k0 a multiple of KV_TILE)."""
    D = kt.shape[0]
    ntc, te = k_cache.shape[1], k_cache.shape[2]
    for j0 in range(0, n, KV_TILE):
        toff = (g * ntc + (k0 + j0) // KV_TILE) * te
        m = min(KV_TILE, n - j0)
        for d in range(D):
            for j in range(m):
                kt[d, j0 + j] = k_code(k_cache, toff, d, j) * tile_scale(k_cache, toff, D, j)


@njit(inline="always")
def _load_v(v_cache, g, k0, n, vb):
    """vb[j, :] = float32 value row of position k0 + j, for j < n (k0 a multiple of KV_TILE)."""
    D = vb.shape[1]
    ntc, te = v_cache.shape[1], v_cache.shape[2]
    for j0 in range(0, n, KV_TILE):
        toff = (g * ntc + (k0 + j0) // KV_TILE) * te
        for j in range(min(KV_TILE, n - j0)):
            s = tile_scale(v_cache, toff, D, j)
            for d in range(D):
                vb[j0 + j, d] = v_code(v_cache, toff, D, j, d) * s


@njit(inline="always")
def _scores(qrow, scale, kt, n, s):
    """s[j] = (qrow * scale) . k_j for j < n; keys innermost, four head dims per pass (D % 4 == 0)."""
    D = qrow.shape[0]
    for j in range(n):
        s[j] = 0.0
    for d in range(0, D, 4):
        q0, q1 = qrow[d] * scale, qrow[d + 1] * scale
        q2, q3 = qrow[d + 2] * scale, qrow[d + 3] * scale
        for j in range(n):
            s[j] += q0 * kt[d, j] + q1 * kt[d + 1, j] + q2 * kt[d + 2, j] + q3 * kt[d + 3, j]


@njit(inline="always")
def _add_pv(p, vb, n, acc):
    """acc[:] += sum_j p[j] * vb[j, :] for j < n, four positions per pass."""
    D = acc.shape[0]
    n4 = n - n % 4
    for j in range(0, n4, 4):
        p0, p1, p2, p3 = p[j], p[j + 1], p[j + 2], p[j + 3]
        for d in range(D):
            acc[d] += p0 * vb[j, d] + p1 * vb[j + 1, d] + p2 * vb[j + 2, d] + p3 * vb[j + 3, d]
    for j in range(n4, n):
        pj = p[j]
        for d in range(D):
            acc[d] += pj * vb[j, d]


@pnjit()
def _attention_prefill(q, k_cache, v_cache, p0, out):
    T, nq, D = q.shape
    nkv = k_cache.shape[0]
    rep = nq // nkv
    scale = np.float32(D ** -0.5)
    QB, KB = PREFILL_QBLOCK, PREFILL_KBLOCK
    nqb = (T + QB - 1) // QB
    for item in prange(nkv * nqb):
        g, b = item // nqb, item % nqb
        t0 = b * QB
        t1 = min(T, t0 + QB)
        kt = np.empty((D, KB), np.float32)
        vb = np.empty((KB, D), np.float32)
        sc = np.empty(KB, np.float32)
        mx = np.full((QB, rep), -np.inf, np.float32)
        tot = np.zeros((QB, rep), np.float32)
        acc = np.zeros((QB, rep, D), np.float32)
        last = p0 + t1  # keys 0 .. last-1 are visible to some query of the block
        for k0 in range(0, last, KB):
            n = min(KB, last - k0)
            _load_kt(k_cache, g, k0, n, kt)
            _load_v(v_cache, g, k0, n, vb)
            for t in range(t0, t1):
                nv = min(n, p0 + t + 1 - k0)  # causal: key position <= query position
                if nv <= 0:
                    continue
                for r in range(rep):
                    h = g * rep + r
                    _scores(q[t, h], scale, kt, nv, sc)
                    cmax = NEG_INF
                    for j in range(nv):
                        cmax = max(cmax, sc[j])
                    old = mx[t - t0, r]
                    new = max(old, cmax)
                    f = exp_nonpos(old - new)
                    tsum = tot[t - t0, r] * f
                    a = acc[t - t0, r]
                    for d in range(D):
                        a[d] *= f
                    for j in range(nv):
                        e = exp_nonpos(sc[j] - new)
                        sc[j] = e
                        tsum += e
                    _add_pv(sc, vb, nv, a)
                    mx[t - t0, r] = new
                    tot[t - t0, r] = tsum
        for t in range(t0, t1):
            for r in range(rep):
                inv = np.float32(1.0) / tot[t - t0, r]
                for d in range(D):
                    out[t, g * rep + r, d] = acc[t - t0, r, d] * inv


@pnjit()
def _attention_prefill_rows(qs, k_cache, v_cache, p0, out, heads):
    """fp16 cache: out[t, heads of g] for every (KV head g, token t) item, by decode's blocked online
    softmax over positions 0 .. p0 + t (qs: the queries already scaled by D^-0.5)."""
    T, nq, D = qs.shape
    nkv, ntc, te = k_cache.shape
    R = nq // nkv
    B, KT = DECODE_BLOCK, KV_TILE
    unused_i8 = np.zeros(1, np.int8)  # decode's int8-query arguments, not read for an fp16 cache
    unused_f = np.zeros(1, np.float32)
    unused_i = np.zeros(1, np.int32)
    for item in prange(nkv * T):
        g, t = item // T, item % T
        length = p0 + t + 1
        sc = np.empty((R, B), np.float32)  # one block's scores, then probabilities
        acc = np.zeros((R, D), np.float32)  # unnormalised P.V
        m = np.full(R, NEG_INF, np.float32)
        l = np.zeros(R, np.float32)
        for b in range((length + B - 1) // B):
            n = min(B, length - b * B)
            tile0 = g * ntc + b * (B // KT)
            for tt in range((n + KT - 1) // KT):
                _qk_heads(k_cache, (tile0 + tt) * te, D, qs[t], unused_i8, unused_f, unused_i, g * R, sc, tt * KT,
                          B, heads)
            _softmax_step(sc, n, m, l, acc)
            for tt in range((n + KT - 1) // KT):
                _pv_heads(v_cache, (tile0 + tt) * te, D, min(KT, n - tt * KT), sc, tt * KT, B, acc, heads)
        for r in range(R):
            inv = np.float32(1.0) / l[r]
            for d in range(D):
                out[t, g * R + r, d] = acc[r, d] * inv


def attention_prefill(q, k_cache, v_cache, start: int, out) -> np.ndarray:
    """Blocked causal attention: out float32 [T, Nq, D] for queries q [T, Nq, D] at positions
    start .. start+T-1, each attending to cached positions 0 .. its own (k/v of the T new tokens
    must already be written with kv_write). fp16 cache: decode's kernels per (KV head, query) item;
    int8 cache: online softmax over key blocks of 64, parallel over KV heads x blocks of 16 queries
    (module doc)."""
    T, nq, d = q.shape
    check_cache(k_cache, v_cache, d)
    nkv, nt, _ = k_cache.shape
    if q.dtype != np.float32 or not q.flags.c_contiguous or nq % nkv or d % 4:
        raise ValueError(f"attention_prefill: q must be C-contiguous float32 [T, Nq, D], Nq % Nkv == 0, "
                         f"D % 4 == 0; got {q.dtype} {q.shape} for {nkv} KV heads")
    if start < 0 or start + T > nt * KV_TILE:
        raise ValueError(f"positions {start}..{start + T - 1} outside a cache of {nt * KV_TILE}")
    if out.shape != q.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"attention_prefill: out {out.shape} must match q {q.shape} (float32, contiguous)")
    if k_cache.dtype == np.int8:  # kv_layout's int8 cache
        _attention_prefill(q, k_cache, v_cache, start, out)
    else:
        _attention_prefill_rows(q * np.float32(d ** -0.5), k_cache, v_cache, start, out, head_tuple(nq // nkv))
    return out
