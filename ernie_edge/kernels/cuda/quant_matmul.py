"""Matrix-matrix products over q4 / q8 weights in their stored layout (prefill: many tokens).

Tiled: a block of 256 threads computes a tile of BT tokens x BO output rows, walking K in steps of
TK. Each step stages the tokens' inputs [BT, TK] and the weight rows [BO, TK], dequantized to
float32 (code x fp16 scale, the spec of ernie_edge/formats/quant.py), in shared memory; thread
(ty, tx) accumulates tokens ty, ty+16 x rows tx, tx+16, tx+32, tx+48 in registers. The weight
tile's rows are padded to TK+1 floats so the 16 rows a warp reads sit in 16 different banks.

Three entry points share the tile code:
  matmul            Y [T, O] (+)= X W^T                                    (q, k, v, o, LM head)
  grouped_gate_up   Hg[i] = silu(G_e x) * U_e x, x = X[perm[i]]            (experts, tokens grouped
  grouped_down      Yg[i] = w[i] * D_e Hg[i]                                 by expert, see moe.py)
A grouped launch runs over a tile list (expert, first row, rows) built on the host by
moe.group_tokens, so each expert's weights are read once per BT tokens routed to it.

Legend: T tokens, O output rows, K inputs, E experts, G group size, BT/BO/TK tile sizes.
"""

from __future__ import annotations

import math

from numba import cuda, float32, int32

from .device import blocks, device_jit, dmin, jit

BT = 32  # tokens per tile
BO = 64  # output rows per tile
TK = 64  # inputs per step
TK1 = TK + 1  # a weight tile's padded row (shared-array shapes must be constants)
MM_THREADS = 256  # 16 x 16


@device_jit
def _load_w(codes, scales, bits, G, o0, k0, K, ws, tid):
    """ws[r, kk] = W[o0 + r, k0 + kk] dequantized (0 past the matrix)."""
    O = codes.shape[0]
    half = G // 2
    for i in range(tid, BO * TK, MM_THREADS):
        r = i // TK
        kk = i - r * TK
        o = o0 + r
        k = k0 + kk
        v = float32(0.0)
        if o < O and k < K:
            g = k // G
            if bits == 4:
                j = k - g * G
                byte = int32(codes[o, g * half + (j % half)])
                code = ((byte >> 4) if j >= half else (byte & 0xF)) - 8
            else:
                code = int32(codes[o, k])
            v = float32(scales[o, g]) * float32(code)
        ws[r, kk] = v


@device_jit
def _load_x(X, start, count, k0, xs, tid):
    """xs[t, kk] = X[start + t, k0 + kk] (0 past the tile or K)."""
    K = X.shape[1]
    for i in range(tid, BT * TK, MM_THREADS):
        t = i // TK
        kk = i - t * TK
        k = k0 + kk
        v = float32(0.0)
        if t < count and k < K:
            v = X[start + t, k]
        xs[t, kk] = v


@device_jit
def _gather_x(X, perm, start, count, k0, xs, tid):
    """xs[t, kk] = X[perm[start + t], k0 + kk] (0 past the tile or K)."""
    K = X.shape[1]
    for i in range(tid, BT * TK, MM_THREADS):
        t = i // TK
        kk = i - t * TK
        k = k0 + kk
        v = float32(0.0)
        if t < count and k < K:
            v = X[perm[start + t], k]
        xs[t, kk] = v


@device_jit
def _fma_tile(xs, ws, acc, ty, tx):
    for kk in range(TK):
        a0 = xs[ty, kk]
        a1 = xs[ty + 16, kk]
        for j in range(4):
            b = ws[tx + 16 * j, kk]
            acc[0, j] += a0 * b
            acc[1, j] += a1 * b


@device_jit
def _zero(acc):
    for i in range(2):
        for j in range(4):
            acc[i, j] = float32(0.0)


@device_jit
def _store_tile(acc, out, t0, o0, count, O, ty, tx, accumulate):
    """out[t0 + t, o] (+)= this thread's accumulators, inside the tile's rows and the matrix."""
    for i in range(2):
        t = ty + 16 * i
        for j in range(4):
            o = o0 + tx + 16 * j
            if t < count and o < O:
                if accumulate:
                    out[t0 + t, o] += acc[i, j]
                else:
                    out[t0 + t, o] = acc[i, j]


@jit
def _matmul(X, codes, scales, bits, G, K, out, accumulate):
    """Block (o tile, t tile): out[t, o] (+)= sum_k X[t, k] W[o, k]."""
    xs = cuda.shared.array((BT, TK), float32)
    ws = cuda.shared.array((BO, TK1), float32)
    acc = cuda.local.array((2, 4), float32)
    tid = cuda.threadIdx.x
    ty = tid // 16
    tx = tid - ty * 16
    for ob in range(cuda.blockIdx.x, -(-codes.shape[0] // BO), cuda.gridDim.x):
        for tb in range(cuda.blockIdx.y, -(-X.shape[0] // BT), cuda.gridDim.y):
            o0 = ob * BO
            t0 = tb * BT
            count = dmin(BT, X.shape[0] - t0)
            _zero(acc)
            for k0 in range(0, K, TK):
                _load_x(X, t0, count, k0, xs, tid)
                _load_w(codes, scales, bits, G, o0, k0, K, ws, tid)
                cuda.syncthreads()
                _fma_tile(xs, ws, acc, ty, tx)
                cuda.syncthreads()
            _store_tile(acc, out, t0, o0, count, out.shape[1], ty, tx, accumulate)


@jit
def _grouped_gate_up(X, perm, tile_e, tile_start, tile_count, gcodes, gscales, ucodes, uscales, bits, G, K,
                     out):
    """Block (o tile, tile y): out[start + t, o] = silu(G_e x) * U_e x for x = X[perm[start + t]]."""
    xs = cuda.shared.array((BT, TK), float32)
    wg = cuda.shared.array((BO, TK1), float32)
    wu = cuda.shared.array((BO, TK1), float32)
    ag = cuda.local.array((2, 4), float32)
    au = cuda.local.array((2, 4), float32)
    tid = cuda.threadIdx.x
    ty = tid // 16
    tx = tid - ty * 16
    for ob in range(cuda.blockIdx.x, -(-out.shape[1] // BO), cuda.gridDim.x):
        for y in range(cuda.blockIdx.y, tile_e.shape[0], cuda.gridDim.y):
            o0 = ob * BO
            e = tile_e[y]
            start = tile_start[y]
            count = tile_count[y]
            _zero(ag)
            _zero(au)
            for k0 in range(0, K, TK):
                _gather_x(X, perm, start, count, k0, xs, tid)
                _load_w(gcodes[e], gscales[e], bits, G, o0, k0, K, wg, tid)
                _load_w(ucodes[e], uscales[e], bits, G, o0, k0, K, wu, tid)
                cuda.syncthreads()
                _fma_tile(xs, wg, ag, ty, tx)
                _fma_tile(xs, wu, au, ty, tx)
                cuda.syncthreads()
            for i in range(2):
                t = ty + 16 * i
                for j in range(4):
                    o = o0 + tx + 16 * j
                    if t < count and o < out.shape[1]:
                        g = ag[i, j]
                        out[start + t, o] = g / (float32(1.0) + math.exp(-g)) * au[i, j]


@jit
def _grouped_down(Hg, tile_e, tile_start, tile_count, codes, scales, bits, G, K, row_w, out):
    """Block (o tile, tile y): out[start + t, o] = row_w[start + t] * (D_e Hg[start + t])[o]."""
    xs = cuda.shared.array((BT, TK), float32)
    ws = cuda.shared.array((BO, TK1), float32)
    acc = cuda.local.array((2, 4), float32)
    tid = cuda.threadIdx.x
    ty = tid // 16
    tx = tid - ty * 16
    for ob in range(cuda.blockIdx.x, -(-out.shape[1] // BO), cuda.gridDim.x):
        for y in range(cuda.blockIdx.y, tile_e.shape[0], cuda.gridDim.y):
            o0 = ob * BO
            e = tile_e[y]
            start = tile_start[y]
            count = tile_count[y]
            _zero(acc)
            for k0 in range(0, K, TK):
                _load_x(Hg, start, count, k0, xs, tid)
                _load_w(codes[e], scales[e], bits, G, o0, k0, K, ws, tid)
                cuda.syncthreads()
                _fma_tile(xs, ws, acc, ty, tx)
                cuda.syncthreads()
            for i in range(2):
                t = ty + 16 * i
                for j in range(4):
                    o = o0 + tx + 16 * j
                    if t < count and o < out.shape[1]:
                        out[start + t, o] = row_w[start + t] * acc[i, j]


@jit
def _fmatmul(X, w, out, accumulate):
    """out[t, o] (+)= sum_k X[t, k] w[o, k] for a float32 matrix (tensors stored as f16 / f32)."""
    xs = cuda.shared.array((BT, TK), float32)
    ws = cuda.shared.array((BO, TK1), float32)
    acc = cuda.local.array((2, 4), float32)
    tid = cuda.threadIdx.x
    ty = tid // 16
    tx = tid - ty * 16
    for ob in range(cuda.blockIdx.x, -(-w.shape[0] // BO), cuda.gridDim.x):
        for tb in range(cuda.blockIdx.y, -(-X.shape[0] // BT), cuda.gridDim.y):
            o0 = ob * BO
            t0 = tb * BT
            count = dmin(BT, X.shape[0] - t0)
            O, K = w.shape
            _zero(acc)
            for k0 in range(0, K, TK):
                _load_x(X, t0, count, k0, xs, tid)
                for i in range(tid, BO * TK, MM_THREADS):
                    r = i // TK
                    kk = i - r * TK
                    ws[r, kk] = w[o0 + r, k0 + kk] if o0 + r < O and k0 + kk < K else float32(0.0)
                cuda.syncthreads()
                _fma_tile(xs, ws, acc, ty, tx)
                cuda.syncthreads()
            _store_tile(acc, out, t0, o0, count, O, ty, tx, accumulate)


# ---- host entry points -----------------------------------------------------------------------------

def matmul(X, codes, scales, bits: int, group_size: int, out, accumulate: bool = False, stream=0):
    """out [T, O] = X [T, K] W^T (or +=) for W in q4 / q8: codes uint8 [O, K/2] or int8 [O, K]."""
    O = codes.shape[0]
    K = X.shape[1]
    _matmul[(blocks(O, BO), blocks(X.shape[0], BT)), MM_THREADS, stream](
        X, codes, scales, bits, group_size, K, out, accumulate)


def grouped_gate_up(X, perm, tiles, gate, up, bits: int, group_size: int, out, stream=0):
    """out [R, I] rows in grouped order: silu(G_e X[perm[i]]) * U_e X[perm[i]]. gate, up:
    (codes, scales) banks [E, I, ...]; tiles: (expert, start, count) device arrays (moe.group_tokens)."""
    tile_e, tile_start, tile_count = tiles
    I = gate[0].shape[1]
    _grouped_gate_up[(blocks(I, BO), blocks(tile_e.shape[0], 1)), MM_THREADS, stream](
        X, perm, tile_e, tile_start, tile_count, gate[0], gate[1], up[0], up[1], bits, group_size, X.shape[1], out)


def grouped_down(Hg, tiles, down, bits: int, group_size: int, row_w, out, stream=0):
    """out [R, H] = row_w[i] * D_e Hg[i] for the grouped rows i; down: (codes, scales) bank [E, H, ...]."""
    tile_e, tile_start, tile_count = tiles
    H = down[0].shape[1]
    _grouped_down[(blocks(H, BO), blocks(tile_e.shape[0], 1)), MM_THREADS, stream](
        Hg, tile_e, tile_start, tile_count, down[0], down[1], bits, group_size, Hg.shape[1], row_w, out)


def fmatmul(X, w, out, accumulate: bool = False, stream=0):
    """out [T, O] = X w^T (or +=) for a float32 matrix w [O, K]."""
    _fmatmul[(blocks(w.shape[0], BO), blocks(X.shape[0], BT)), MM_THREADS, stream](X, w, out, accumulate)
