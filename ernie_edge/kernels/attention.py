"""GQA attention over an fp16 KV cache (ERNIE_SPEC §3.2): decode (one query) and blocked causal
prefill.

Legend: T new tokens, S cache capacity (positions), L attended length, Nq query heads, Nkv KV
heads, R = Nq / Nkv query heads per KV head, D head dim, C positions per decode chunk.

KV cache layout (what these kernels read): k_cache, v_cache uint16 [Nkv, S, D], the bits of
float16 values, head-major so one head's keys are one contiguous stream. fp16 halves the memory
(131072 positions x 28 layers take 7.5 GB in fp16) and decoding it costs a vcvtph2ps per 8 values.
Query head h reads KV head h // R. Scores are (q . k) * D^-0.5, softmax in float32.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from . import simd
from ._jit import max_threads, njit, pnjit

DECODE_CHUNK = 256  # C: positions per decode work item
PREFILL_QBLOCK = 16  # queries per prefill work item
PREFILL_KBLOCK = 64  # keys per prefill inner block


def kv_write(k, v, k_cache, v_cache, start: int) -> None:
    """Store k, v float32 [T, Nkv, D] (post-RoPE) at positions start .. start+T-1 (rounded to fp16)."""
    T = k.shape[0]
    nkv, cap, d = k_cache.shape
    if k.shape != (T, nkv, d) or v.shape != k.shape or v_cache.shape != k_cache.shape:
        raise ValueError(f"kv_write shapes: k {k.shape}, v {v.shape}, cache {k_cache.shape}")
    if start < 0 or start + T > cap:
        raise ValueError(f"positions {start}..{start + T - 1} do not fit a cache of {cap} positions")
    k_cache.view(np.float16)[:, start:start + T] = k.transpose(1, 0, 2)
    v_cache.view(np.float16)[:, start:start + T] = v.transpose(1, 0, 2)


class DecodeScratch:
    """Per-chunk partial softmax state for `attention_decode`, sized for up to `max_len` positions."""

    def __init__(self, n_heads: int, head_dim: int, max_len: int):
        nch = max(1, -(-max_len // DECODE_CHUNK))
        self.max_len = max_len
        self.m = np.empty((nch, n_heads), np.float32)  # running max per chunk and head
        self.l = np.empty((nch, n_heads), np.float32)  # sum of exp per chunk and head
        self.acc = np.empty((nch, n_heads, head_dim), np.float32)  # unnormalised P.V
        # decoded K and V of the chunk each thread is working on (indexed by numba thread id)
        self.kf = np.empty((max_threads(), 2, DECODE_CHUNK, head_dim), np.float32)
        self.sc = np.empty((nch, n_heads, DECODE_CHUNK), np.float32)  # scores / probabilities


@njit(inline="always")
def _decode_rows(src, g, p0, n, dst):
    """dst[j, :] = float32(src[g, p0 + j, :]) for j < n (fp16 bits -> float32)."""
    D = src.shape[2]
    for j in range(n):
        for d in range(D):
            dst[j, d] = simd.f16_to_f32(src[g, p0 + j, d])


@pnjit()
def _attention_decode(q, k_cache, v_cache, length, out, m, l, acc, kf, sc):
    nq, D = q.shape
    nkv = k_cache.shape[0]
    rep = nq // nkv
    scale = np.float32(D ** -0.5)
    C = kf.shape[2]
    nch = (length + C - 1) // C
    for item in prange(nkv * nch):
        g, c = item // nch, item % nch
        p0 = c * C
        n = min(C, length - p0)
        tid = numba.get_thread_id()
        kc, vc = kf[tid, 0], kf[tid, 1]
        _decode_rows(k_cache, g, p0, n, kc)
        _decode_rows(v_cache, g, p0, n, vc)
        for r in range(rep):
            h = g * rep + r
            mx = -np.inf
            for j in range(n):
                s = np.float32(0.0)
                for d in range(D):
                    s += q[h, d] * kc[j, d]
                s *= scale
                sc[c, h, j] = s
                mx = max(mx, s)
            tot = np.float32(0.0)
            for j in range(n):
                e = np.exp(sc[c, h, j] - mx)
                sc[c, h, j] = e
                tot += e
            for d in range(D):
                acc[c, h, d] = 0.0
            for j in range(n):
                p = sc[c, h, j]
                for d in range(D):
                    acc[c, h, d] += p * vc[j, d]
            m[c, h] = mx
            l[c, h] = tot
    _combine_chunks(m, l, acc, nch, out)


@njit()
def _combine_chunks(m, l, acc, nch, out):
    """Flash-decoding merge: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c per head.
    (A separate function: numba treats names shared with a prange body as reductions.)"""
    nq, D = out.shape
    for h in range(nq):
        big = -np.inf
        for c in range(nch):
            big = max(big, m[c, h])
        denom = np.float32(0.0)
        for d in range(D):
            out[h, d] = 0.0
        for c in range(nch):
            f = np.exp(m[c, h] - big)
            denom += f * l[c, h]
            for d in range(D):
                out[h, d] += f * acc[c, h, d]
        inv = np.float32(1.0) / denom
        for d in range(D):
            out[h, d] *= inv


def attention_decode(q, k_cache, v_cache, length: int, out, scratch: DecodeScratch) -> np.ndarray:
    """out float32 [Nq, D] = softmax(q K^T * D^-0.5) V over cache positions 0 .. length-1.

    q float32 [Nq, D] (post-RoPE) for the token at position length-1, whose k/v must already be in
    the cache (kv_write). Work is split over KV heads x chunks of 256 positions in one parallel
    region, each chunk's K/V decoded once for its R query heads; cost is linear in length.
    """
    nq, d = q.shape
    nkv, cap, _ = k_cache.shape
    if q.dtype != np.float32 or not q.flags.c_contiguous or nq % nkv or k_cache.shape[2] != d:
        raise ValueError(f"attention_decode: q {q.dtype} {q.shape} vs cache {k_cache.shape}")
    if k_cache.dtype != np.uint16 or v_cache.dtype != np.uint16:
        raise ValueError("k_cache / v_cache must be the uint16 view of float16 [Nkv, S, D] arrays")
    if not 1 <= length <= min(cap, scratch.max_len):
        raise ValueError(f"length {length} outside 1..{min(cap, scratch.max_len)} (cache / scratch size)")
    if out.shape != q.shape or out.dtype != np.float32 or scratch.acc.shape[1:] != (nq, d):
        raise ValueError(f"attention_decode: out {out.shape} / scratch do not match q {q.shape}")
    _attention_decode(q, k_cache, v_cache, length, out, scratch.m, scratch.l, scratch.acc, scratch.kf,
                      scratch.sc)
    return out


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
        kc = np.empty((KB, D), np.float32)
        vc = np.empty((KB, D), np.float32)
        sc = np.empty(KB, np.float32)
        mx = np.full((QB, rep), -np.inf, np.float32)
        tot = np.zeros((QB, rep), np.float32)
        acc = np.zeros((QB, rep, D), np.float32)
        last = p0 + t1  # keys 0 .. last-1 are visible to some query of the block
        for k0 in range(0, last, KB):
            n = min(KB, last - k0)
            _decode_rows(k_cache, g, k0, n, kc)
            _decode_rows(v_cache, g, k0, n, vc)
            for t in range(t0, t1):
                nv = min(n, p0 + t + 1 - k0)  # causal: key position <= query position
                if nv <= 0:
                    continue
                for r in range(rep):
                    h = g * rep + r
                    cmax = -np.inf
                    for j in range(nv):
                        s = np.float32(0.0)
                        for d in range(D):
                            s += q[t, h, d] * kc[j, d]
                        s *= scale
                        sc[j] = s
                        cmax = max(cmax, s)
                    old = mx[t - t0, r]
                    new = max(old, cmax)
                    f = np.exp(old - new)
                    tsum = tot[t - t0, r] * f
                    for d in range(D):
                        acc[t - t0, r, d] *= f
                    for j in range(nv):
                        p = np.exp(sc[j] - new)
                        tsum += p
                        for d in range(D):
                            acc[t - t0, r, d] += p * vc[j, d]
                    mx[t - t0, r] = new
                    tot[t - t0, r] = tsum
        for t in range(t0, t1):
            for r in range(rep):
                inv = np.float32(1.0) / tot[t - t0, r]
                for d in range(D):
                    out[t, g * rep + r, d] = acc[t - t0, r, d] * inv


def attention_prefill(q, k_cache, v_cache, start: int, out) -> np.ndarray:
    """Blocked causal attention: out float32 [T, Nq, D] for queries q [T, Nq, D] at positions
    start .. start+T-1, each attending to cached positions 0 .. its own (k/v of the T new tokens
    must already be written with kv_write). Online softmax over key blocks of 64; parallel over
    KV heads x blocks of 16 queries."""
    T, nq, d = q.shape
    nkv, cap, _ = k_cache.shape
    if q.dtype != np.float32 or not q.flags.c_contiguous or nq % nkv or k_cache.shape[2] != d:
        raise ValueError(f"attention_prefill: q {q.dtype} {q.shape} vs cache {k_cache.shape}")
    if k_cache.dtype != np.uint16 or v_cache.dtype != np.uint16:
        raise ValueError("k_cache / v_cache must be the uint16 view of float16 [Nkv, S, D] arrays")
    if start < 0 or start + T > cap:
        raise ValueError(f"positions {start}..{start + T - 1} outside a cache of {cap}")
    if out.shape != q.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"attention_prefill: out {out.shape} must match q {q.shape} (float32, contiguous)")
    _attention_prefill(q, k_cache, v_cache, start, out)
    return out
