"""RMSNorm, the embedding lookup, interleaved RoPE with the KV-cache write, and SwiGLU on the device
(docs/ERNIE_SPEC.md §3.1-3.4; numpy twins: ernie_edge/reference.py).

The device KV cache of one layer (written here, read by attention.py), float16:
  k_cache [Nkv, D, S]   positions innermost: a warp scoring 32 positions reads 64 contiguous bytes
  v_cache [Nkv, S, D]   dims innermost: a warp summing P.V over 32 dims reads 64 contiguous bytes

Legend: T tokens, H hidden, N heads, Nq/Nkv query/KV heads, D head dim, S cache capacity, V vocab,
G group size.
"""

from __future__ import annotations

import math

from numba import cuda, float32, int32
from numba.types import float16

from .device import MAX_THREADS, THREADS, block_total, blocks, device_jit, jit


@jit
def _rmsnorm(x, w, eps, out, residual, add):
    """One block per row t: (add: x[t] += residual[t] first, in place) out[t] = w * x / rms(x)."""
    part = cuda.shared.array(MAX_THREADS, float32)
    tid = cuda.threadIdx.x
    H = x.shape[1]
    for t in range(cuda.blockIdx.x, x.shape[0], cuda.gridDim.x):
        ss = float32(0.0)
        for j in range(tid, H, cuda.blockDim.x):
            v = x[t, j]
            if add:
                v += residual[t, j]
                x[t, j] = v
            ss += v * v
        part[tid] = ss
        cuda.syncthreads()
        if tid == 0:
            part[0] = float32(1.0) / math.sqrt(block_total(part, cuda.blockDim.x) / float32(H) + eps)
        cuda.syncthreads()
        inv = part[0]
        for j in range(tid, H, cuda.blockDim.x):
            out[t, j] = w[j] * (x[t, j] * inv)
        cuda.syncthreads()


@jit
def _embed_q(codes, scales, bits, G, ids, out):
    """out[t, j] = the dequantized row ids[t] of a q4 / q8 matrix (block t, threads over j)."""
    H = out.shape[1]
    half = G // 2
    for t in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
        r = ids[t]
        for j in range(cuda.threadIdx.x, H, cuda.blockDim.x):
            g = j // G
            if bits == 4:
                i = j - g * G
                byte = int32(codes[r, g * half + (i % half)])
                code = ((byte >> 4) if i >= half else (byte & 0xF)) - 8
            else:
                code = int32(codes[r, j])
            out[t, j] = float32(scales[r, g]) * float32(code)


@jit
def _embed_f(table, ids, out):
    for t in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
        for j in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
            out[t, j] = float32(table[ids[t], j])


@jit
def _rope_kv_write(q, k, v, positions, inv_freq, k_cache, v_cache, slot0):
    """Block t: rotate q[t] in place and k[t] (pairs (2i, 2i+1) share angle fp32(pos) * inv_freq[i]),
    then store k[t], v[t] in the cache at slot slot0 + t as float16."""
    for t in range(cuda.blockIdx.x, q.shape[0], cuda.gridDim.x):
        _rope_kv_one(t, q, k, v, positions, inv_freq, k_cache, v_cache, slot0)


@device_jit
def _rope_kv_one(t, q, k, v, positions, inv_freq, k_cache, v_cache, slot0):
    Nq, D = q.shape[1], q.shape[2]
    Nkv = k.shape[1]
    half = D // 2
    p = float32(positions[t])
    slot = slot0 + t
    for i in range(cuda.threadIdx.x, (Nq + Nkv) * half, cuda.blockDim.x):
        n = i // half
        j = i - n * half
        angle = p * inv_freq[j]
        c = math.cos(angle)
        s = math.sin(angle)
        if n < Nq:
            x0 = q[t, n, 2 * j]
            x1 = q[t, n, 2 * j + 1]
            q[t, n, 2 * j] = x0 * c + (-x1) * s
            q[t, n, 2 * j + 1] = x1 * c + x0 * s
        else:
            h = n - Nq
            x0 = k[t, h, 2 * j]
            x1 = k[t, h, 2 * j + 1]
            k_cache[h, 2 * j, slot] = float16(x0 * c + (-x1) * s)
            k_cache[h, 2 * j + 1, slot] = float16(x1 * c + x0 * s)
    for i in range(cuda.threadIdx.x, Nkv * D, cuda.blockDim.x):
        h = i // D
        d = i - h * D
        v_cache[h, slot, d] = float16(v[t, h, d])


@jit
def _kv_copy(src_k, src_v, dst_k, dst_v, n):
    """Block (head, dim row): copy cache positions [0, n) into a larger cache."""
    for h in range(cuda.blockIdx.x, src_k.shape[0], cuda.gridDim.x):
        for d in range(cuda.blockIdx.y, src_k.shape[1], cuda.gridDim.y):
            for p in range(cuda.threadIdx.x, n, cuda.blockDim.x):
                dst_k[h, d, p] = src_k[h, d, p]
                dst_v[h, p, d] = src_v[h, p, d]


@jit
def _silu_mul(g, u, out):
    """out = g * sigmoid(g) * u, elementwise over flat arrays."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        x = g[i]
        out[i] = x / (float32(1.0) + math.exp(-x)) * u[i]


# ---- host entry points -----------------------------------------------------------------------------

def rmsnorm(x, w, eps: float, out, stream=0):
    """out [T, H] = rmsnorm(x [T, H]) * w."""
    _rmsnorm[blocks(x.shape[0], 1), THREADS, stream](x, w, float32(eps), out, x, False)


def add_rmsnorm(x, delta, w, eps: float, out, stream=0):
    """x += delta (in place), then out = rmsnorm(x) * w; all [T, H]."""
    _rmsnorm[blocks(x.shape[0], 1), THREADS, stream](x, w, float32(eps), out, delta, True)


def embed(table, ids, out, stream=0):
    """out [T, H] = rows `ids` (device int64 [T]) of table: (codes, scales, bits, G) or a float array."""
    if isinstance(table, tuple):
        codes, scales, bits, group_size = table
        _embed_q[blocks(out.shape[0], 1), THREADS, stream](codes, scales, bits, group_size, ids, out)
    else:
        _embed_f[blocks(out.shape[0], 1), THREADS, stream](table, ids, out)


def rope_kv_write(q, k, v, positions, inv_freq, k_cache, v_cache, slot0: int, stream=0):
    """RoPE on q [T, Nq, D] (in place) and k [T, Nkv, D]; k, v stored at cache slots slot0.. ."""
    _rope_kv_write[blocks(q.shape[0], 1), THREADS, stream](q, k, v, positions, inv_freq, k_cache, v_cache, slot0)


def kv_copy(src_k, src_v, dst_k, dst_v, n: int, stream=0):
    """Copy positions [0, n) of one layer's cache into another (a grown or cloned cache)."""
    if n:
        _kv_copy[(blocks(src_k.shape[0], 1), blocks(src_k.shape[1], 1)), THREADS, stream](src_k, src_v, dst_k, dst_v, n)


def silu_mul(g, u, out, stream=0):
    """out = silu(g) * u over flat float32 arrays."""
    _silu_mul[blocks(out.shape[0], THREADS), THREADS, stream](g, u, out)
