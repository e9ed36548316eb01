"""GQA attention over the device KV cache (layout in norm_rope.py): one-query decode split over
position chunks, and blocked causal prefill (numpy twin: ernie_edge/reference.py `attention`).

Query head h reads KV head h // (Nq / Nkv). Scores are q.k / sqrt(D) in float32, softmax with the
running maximum (exp(-inf) = 0 masks), output = P.V / sum P.

Decode (one query per head, L cached positions): block (h, c) scores positions [c C, (c+1) C) (one
thread per position, reading K's positions-innermost rows), and writes its unnormalised P.V, its
maximum and its sum; a second kernel merges the chunks of each head. Work per block stays C
positions whatever the context, and a long context fills the GPU with chunks.

Prefill (T queries at cache slots i0 .. i0+T-1, keys 0 .. i0+t visible to query t): block (h, tile)
takes BQ queries and walks the keys in tiles of BK, with an online softmax per query row; scores
and the output accumulator stay in shared memory.

Legend: T queries, L valid cache positions, Nq/Nkv heads, D head dim (<= MAX_D), C positions per
decode chunk, BQ/BK query/key tile.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from .device import MAX_THREADS, SIMULATOR, block_max, block_total, blocks, device_jit, dmax, dmin, jit

MAX_D = 256  # the largest head dim the shared arrays hold (ERNIE-4.5: 128)
CHUNK = 128  # C: positions per decode block
BQ = 16  # prefill queries per block
BK = 32  # prefill keys per tile
ATTN_THREADS = 64 if SIMULATOR else 128
NEG_INF = -np.inf


@jit
def _decode_chunks(q, k_cache, v_cache, length, n_chunks, scale, o_part, m_part, l_part):
    """Block (h, c): o_part[h, c] = sum_p exp(s_p - m) v_p, m_part = m, l_part = sum_p exp(s_p - m)
    over positions p of chunk c (p < length)."""
    qs = cuda.shared.array(MAX_D, float32)
    sc = cuda.shared.array(CHUNK, float32)
    part = cuda.shared.array(MAX_THREADS, float32)
    for h in range(cuda.blockIdx.x, q.shape[0], cuda.gridDim.x):
        for c in range(cuda.blockIdx.y, n_chunks, cuda.gridDim.y):
            _decode_chunk(h, c, qs, sc, part, q, k_cache, v_cache, length, scale, o_part, m_part, l_part)
            cuda.syncthreads()


@device_jit
def _decode_chunk(h, c, qs, sc, part, q, k_cache, v_cache, length, scale, o_part, m_part, l_part):
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    D = q.shape[1]
    kvh = h // (q.shape[0] // k_cache.shape[0])
    p0 = c * CHUNK
    n = dmin(CHUNK, length - p0)
    for d in range(tid, D, nt):
        qs[d] = q[h, d] * scale
    cuda.syncthreads()
    best = float32(NEG_INF)
    for i in range(tid, n, nt):
        s = float32(0.0)
        for d in range(D):
            s += qs[d] * float32(k_cache[kvh, d, p0 + i])
        sc[i] = s
        best = dmax(best, s)
    part[tid] = best
    cuda.syncthreads()
    if tid == 0:
        part[0] = block_max(part, nt)
    cuda.syncthreads()
    m = part[0]
    cuda.syncthreads()
    tot = float32(0.0)
    for i in range(tid, n, nt):
        e = math.exp(sc[i] - m)
        sc[i] = e
        tot += e
    part[tid] = tot
    cuda.syncthreads()
    for d in range(tid, D, nt):
        acc = float32(0.0)
        for i in range(n):
            acc += sc[i] * float32(v_cache[kvh, p0 + i, d])
        o_part[h, c, d] = acc
    if tid == 0:
        m_part[h, c] = m
        l_part[h, c] = block_total(part, nt)


@jit
def _decode_merge(o_part, m_part, l_part, n_chunks, out):
    """Block h: out[h] = sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c."""
    for h in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
        M = m_part[h, 0]
        for c in range(1, n_chunks):
            M = dmax(M, m_part[h, c])
        den = float32(0.0)
        for c in range(n_chunks):
            den += math.exp(m_part[h, c] - M) * l_part[h, c]
        for d in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
            acc = float32(0.0)
            for c in range(n_chunks):
                acc += math.exp(m_part[h, c] - M) * o_part[h, c, d]
            out[h, d] = acc / den


@jit
def _prefill(q, k_cache, v_cache, i0, scale, out):
    """Block (h, tile): queries t in [tile BQ, tile BQ + BQ), each at cache slot i0 + t."""
    qs = cuda.shared.array((BQ, MAX_D), float32)
    acc = cuda.shared.array((BQ, MAX_D), float32)
    sc = cuda.shared.array((BQ, BK), float32)
    m_row = cuda.shared.array(BQ, float32)
    l_row = cuda.shared.array(BQ, float32)
    a_row = cuda.shared.array(BQ, float32)
    for h in range(cuda.blockIdx.x, q.shape[1], cuda.gridDim.x):
        for t0 in range(cuda.blockIdx.y * BQ, q.shape[0], cuda.gridDim.y * BQ):
            _prefill_tile(h, t0, qs, acc, sc, m_row, l_row, a_row, q, k_cache, v_cache, i0, scale, out)
            cuda.syncthreads()


@device_jit
def _prefill_tile(h, t0, qs, acc, sc, m_row, l_row, a_row, q, k_cache, v_cache, i0, scale, out):
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    T, D = q.shape[0], q.shape[2]
    kvh = h // (q.shape[1] // k_cache.shape[0])
    nq = dmin(BQ, T - t0)
    for i in range(tid, BQ * D, nt):
        r = i // D
        d = i - r * D
        qs[r, d] = q[t0 + r, h, d] * scale if r < nq else float32(0.0)
        acc[r, d] = float32(0.0)
    for r in range(tid, BQ, nt):
        m_row[r] = float32(NEG_INF)
        l_row[r] = float32(0.0)
    cuda.syncthreads()
    end = i0 + t0 + nq  # keys [0, end) are visible to some query of the tile
    for k0 in range(0, end, BK):
        for i in range(tid, BQ * BK, nt):
            r = i // BK
            j = i - r * BK
            p = k0 + j
            s = float32(NEG_INF)
            if r < nq and p <= i0 + t0 + r:
                s = float32(0.0)
                for d in range(D):
                    s += qs[r, d] * float32(k_cache[kvh, d, p])
            sc[r, j] = s
        cuda.syncthreads()
        for r in range(tid, BQ, nt):  # online softmax, one row per thread
            m_new = m_row[r]
            for j in range(BK):
                m_new = dmax(m_new, sc[r, j])
            alpha = float32(0.0)
            tot = float32(0.0)
            if m_new != NEG_INF:
                alpha = math.exp(m_row[r] - m_new)
                for j in range(BK):
                    e = math.exp(sc[r, j] - m_new)
                    sc[r, j] = e
                    tot += e
            else:
                for j in range(BK):
                    sc[r, j] = float32(0.0)
            m_row[r] = m_new
            l_row[r] = l_row[r] * alpha + tot
            a_row[r] = alpha
        cuda.syncthreads()
        for i in range(tid, BQ * D, nt):
            r = i // D
            d = i - r * D
            a = acc[r, d] * a_row[r]
            for j in range(dmin(BK, end - k0)):
                e = sc[r, j]
                if e != 0.0:
                    a += e * float32(v_cache[kvh, k0 + j, d])
            acc[r, d] = a
        cuda.syncthreads()
    for i in range(tid, nq * D, nt):
        r = i // D
        d = i - r * D
        out[t0 + r, h, d] = acc[r, d] / l_row[r]


# ---- host entry points -----------------------------------------------------------------------------

class DecodeScratch:
    """The per-chunk partial results of decode attention, grown with the context."""

    def __init__(self, n_heads: int, head_dim: int, positions: int):
        self.chunks = max(1, -(-positions // CHUNK))
        self.o = cuda.device_array((n_heads, self.chunks, head_dim), np.float32)
        self.m = cuda.device_array((n_heads, self.chunks), np.float32)
        self.l = cuda.device_array((n_heads, self.chunks), np.float32)


def attention_decode(q, k_cache, v_cache, length: int, out, scratch: DecodeScratch, stream=0):
    """out [Nq, D] = attention of q [Nq, D] (after RoPE) over cache positions [0, length)."""
    nq, d = q.shape
    if d > MAX_D:
        raise ValueError(f"head_dim {d} exceeds the kernels' MAX_D {MAX_D}")
    chunks = -(-length // CHUNK)
    if chunks > scratch.chunks:
        raise ValueError(f"decode scratch holds {scratch.chunks} chunks, {length} positions need {chunks}")
    scale = float32(d ** -0.5)
    _decode_chunks[(blocks(nq, 1), blocks(chunks, 1)), ATTN_THREADS, stream](
        q, k_cache, v_cache, length, chunks, scale, scratch.o, scratch.m, scratch.l)
    _decode_merge[blocks(nq, 1), ATTN_THREADS, stream](scratch.o, scratch.m, scratch.l, chunks, out)


def attention_prefill(q, k_cache, v_cache, i0: int, out, stream=0):
    """out [T, Nq, D] = causal attention of q [T, Nq, D] at slots i0.. over cache slots [0, i0 + T)."""
    T, nq, d = q.shape
    if d > MAX_D:
        raise ValueError(f"head_dim {d} exceeds the kernels' MAX_D {MAX_D}")
    _prefill[(blocks(nq, 1), blocks(T, BQ)), ATTN_THREADS, stream](q, k_cache, v_cache, i0, float32(d ** -0.5), out)
