"""GQA attention over an fp16 KV cache (ERNIE_SPEC §3.2): decode (one query) and blocked causal
prefill.

Legend: T new tokens, S cache capacity (positions), L attended length, Nq query heads, Nkv KV
heads, R = Nq / Nkv query heads per KV head, D head dim, C = KV_BLOCK positions per cache block.

KV cache layout (allocate with `new_kv_cache`, write with `kv_write`): the bits of float16 values,
  k_cache uint16 [Nkv, S/C, D, C]   keys transposed within each block of C positions
  v_cache uint16 [Nkv, S, D]
fp16 halves the memory (131072 positions x 28 layers take 7.5 GB). Keys are stored block-transposed
so a score loop runs over positions innermost: contiguous, vectorised multiply-adds for the R query
heads that share a KV head, instead of one horizontal reduction per key and head.
Query head h reads KV head h // R. Scores are (q . k) * D^-0.5, softmax in float32.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from . import simd
from ._jit import max_threads, njit, pnjit

KV_BLOCK = 256  # C: positions per cache block = per decode work item
PREFILL_QBLOCK = 16  # queries per prefill work item
PREFILL_KBLOCK = 64  # keys per prefill inner block (divides KV_BLOCK)
NEG_INF = np.float32(-np.inf)  # a float32 constant keeps the softmax in float32 (a Python -inf is float64)


def new_kv_cache(n_kv_heads: int, capacity: int, head_dim: int):
    """(k_cache, v_cache) zero-filled uint16 arrays for >= capacity positions (rounded up to KV_BLOCK)."""
    nblk = max(1, -(-capacity // KV_BLOCK))
    k = np.zeros((n_kv_heads, nblk, head_dim, KV_BLOCK), np.uint16)
    v = np.zeros((n_kv_heads, nblk * KV_BLOCK, head_dim), np.uint16)
    return k, v


def _check_cache(k_cache, v_cache, head_dim=None) -> int:
    """Validate the layout; returns the capacity S."""
    if k_cache.dtype != np.uint16 or v_cache.dtype != np.uint16 or k_cache.ndim != 4 or v_cache.ndim != 3:
        raise ValueError("k_cache / v_cache must be uint16 [Nkv, S/C, D, C] / [Nkv, S, D] (see new_kv_cache)")
    nkv, nblk, d, c = k_cache.shape
    if c != KV_BLOCK or v_cache.shape != (nkv, nblk * c, d) or (head_dim is not None and d != head_dim):
        raise ValueError(f"cache shapes k {k_cache.shape}, v {v_cache.shape} do not match (see new_kv_cache)")
    if not (k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
        raise ValueError("k_cache / v_cache must be C-contiguous")
    return nblk * c


def kv_write(k, v, k_cache, v_cache, start: int) -> None:
    """Store k, v float32 [T, Nkv, D] (post-RoPE) at positions start .. start+T-1 (rounded to fp16)."""
    T = k.shape[0]
    cap = _check_cache(k_cache, v_cache)
    nkv, _, d, C = k_cache.shape
    if k.shape != (T, nkv, d) or v.shape != k.shape:
        raise ValueError(f"kv_write shapes: k {k.shape}, v {v.shape}, cache {k_cache.shape}")
    if start < 0 or start + T > cap:
        raise ValueError(f"positions {start}..{start + T - 1} do not fit a cache of {cap} positions")
    k16 = k_cache.view(np.float16)
    t = 0
    while t < T:
        blk, off = divmod(start + t, C)
        n = min(C - off, T - t)
        k16[:, blk, :, off:off + n] = k[t:t + n].transpose(1, 2, 0)  # [Nkv, D, n]
        t += n
    v_cache.view(np.float16)[:, start:start + T] = v.transpose(1, 0, 2)


def kv_read(k_cache, v_cache, start: int, n: int):
    """(k, v) float32 [n, Nkv, D] of positions start .. start+n-1 (for tests and debugging)."""
    _check_cache(k_cache, v_cache)
    pos = np.arange(start, start + n)
    k = k_cache.view(np.float16)[:, pos // KV_BLOCK, :, pos % KV_BLOCK]  # [n, Nkv, D] (numpy puts the
    v = v_cache.view(np.float16)[:, start:start + n]  # [Nkv, n, D]      split fancy index first)
    return k.astype(np.float32), v.transpose(1, 0, 2).astype(np.float32)


class DecodeScratch:
    """Partial softmax state per cache block for `attention_decode`, for up to `max_len` positions,
    plus each thread's decoded K block [D, C] and V block [C, D]."""

    def __init__(self, n_heads: int, head_dim: int, max_len: int):
        nch = max(1, -(-max_len // KV_BLOCK))
        self.max_len = max_len
        self.m = np.empty((nch, n_heads), np.float32)  # max score per block and head
        self.l = np.empty((nch, n_heads), np.float32)  # sum of exp per block and head
        self.acc = np.empty((nch, n_heads, head_dim), np.float32)  # unnormalised P.V
        self.sc = np.empty((nch, n_heads, KV_BLOCK), np.float32)  # scores / probabilities
        self.kt = np.empty((max_threads(), head_dim, KV_BLOCK), np.float32)
        self.vb = np.empty((max_threads(), KV_BLOCK, head_dim), np.float32)


@njit(inline="always")
def exp_nonpos(x):
    """float32 exp(x) for x <= 0 (softmax after subtracting the max), within ~2 ulp of expf.

    Cephes' expf, branch-free so that LLVM vectorises the softmax loops (numba's np.exp is a scalar
    libm call per element). x is clamped at -87 (exp(-87) ~ 1.6e-38, negligible next to the max term).
    """
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    return y * simd.f32_from_bits((np.int32(n) + np.int32(127)) << 23)


@njit(inline="always")
def _load_kt(k_cache, g, blk, j0, n, kt):
    """kt[d, j] = float32 key d of position blk*C + j0 + j, for j < n."""
    D = k_cache.shape[2]
    for d in range(D):
        for j in range(n):
            kt[d, j] = simd.f16_to_f32(k_cache[g, blk, d, j0 + j])


@njit(inline="always")
def _load_v(v_cache, g, p0, n, vb):
    """vb[j, :] = float32 value row of position p0 + j, for j < n."""
    D = v_cache.shape[2]
    for j in range(n):
        for d in range(D):
            vb[j, d] = simd.f16_to_f32(v_cache[g, p0 + j, d])


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
def _attention_decode(q, k_cache, v_cache, length, out, m, l, acc, sc, ktb, vbb):
    nq, D = q.shape
    nkv = k_cache.shape[0]
    rep = nq // nkv
    scale = np.float32(D ** -0.5)
    C = k_cache.shape[3]
    nch = (length + C - 1) // C
    for item in prange(nkv * nch):
        g, c = item // nch, item % nch
        n = min(C, length - c * C)
        tid = numba.get_thread_id()
        kt, vb = ktb[tid], vbb[tid]
        _load_kt(k_cache, g, c, 0, n, kt)
        _load_v(v_cache, g, c * C, n, vb)
        for r in range(rep):
            h = g * rep + r
            s_h = sc[c, h]
            _scores(q[h], scale, kt, n, s_h)
            mx = NEG_INF
            for j in range(n):
                mx = max(mx, s_h[j])
            tot = np.float32(0.0)
            for j in range(n):
                e = exp_nonpos(s_h[j] - mx)
                s_h[j] = e
                tot += e
            a_h = acc[c, h]
            for d in range(D):
                a_h[d] = 0.0
            _add_pv(s_h, vb, n, a_h)
            m[c, h] = mx
            l[c, h] = tot
    _combine_chunks(m, l, acc, nch, out)


@njit()
def _combine_chunks(m, l, acc, nch, out):
    """Flash-decoding merge: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c per head.
    (A separate function: numba treats names shared with a prange body as reductions.)"""
    nq, D = out.shape
    for h in range(nq):
        big = NEG_INF
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
    the cache (kv_write). Work is split over KV heads x cache blocks of 256 positions in one
    parallel region, each block's K/V decoded once for its R query heads; cost is linear in length.
    """
    nq, d = q.shape
    cap = _check_cache(k_cache, v_cache, d)
    nkv = k_cache.shape[0]
    if q.dtype != np.float32 or not q.flags.c_contiguous or nq % nkv or d % 4:
        raise ValueError(f"attention_decode: q must be C-contiguous float32 [Nq, D], Nq % Nkv == 0, D % 4 == 0; "
                         f"got {q.dtype} {q.shape} for {nkv} KV heads")
    if not 1 <= length <= min(cap, scratch.max_len):
        raise ValueError(f"length {length} outside 1..{min(cap, scratch.max_len)} (cache / scratch size)")
    if out.shape != q.shape or out.dtype != np.float32 or scratch.acc.shape[1:] != (nq, d):
        raise ValueError(f"attention_decode: out {out.shape} / scratch do not match q {q.shape}")
    _attention_decode(q, k_cache, v_cache, length, out, scratch.m, scratch.l, scratch.acc, scratch.sc,
                      scratch.kt, scratch.vb)
    return out


@pnjit()
def _attention_prefill(q, k_cache, v_cache, p0, out):
    T, nq, D = q.shape
    nkv = k_cache.shape[0]
    C = k_cache.shape[3]
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
            _load_kt(k_cache, g, k0 // C, k0 % C, n, kt)
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


def attention_prefill(q, k_cache, v_cache, start: int, out) -> np.ndarray:
    """Blocked causal attention: out float32 [T, Nq, D] for queries q [T, Nq, D] at positions
    start .. start+T-1, each attending to cached positions 0 .. its own (k/v of the T new tokens
    must already be written with kv_write). Online softmax over key blocks of 64; parallel over
    KV heads x blocks of 16 queries."""
    T, nq, d = q.shape
    cap = _check_cache(k_cache, v_cache, d)
    nkv = k_cache.shape[0]
    if q.dtype != np.float32 or not q.flags.c_contiguous or nq % nkv or d % 4:
        raise ValueError(f"attention_prefill: q must be C-contiguous float32 [T, Nq, D], Nq % Nkv == 0, "
                         f"D % 4 == 0; got {q.dtype} {q.shape} for {nkv} KV heads")
    if start < 0 or start + T > cap:
        raise ValueError(f"positions {start}..{start + T - 1} outside a cache of {cap}")
    if out.shape != q.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"attention_prefill: out {out.shape} must match q {q.shape} (float32, contiguous)")
    _attention_prefill(q, k_cache, v_cache, start, out)
    return out
