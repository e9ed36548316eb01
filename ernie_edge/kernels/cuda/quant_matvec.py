"""Decode matrix-vector products over q4 / q8 weights in their stored layout (one token).

The codes are read as 32-bit words: a q4 row of K weights is K/8 words, a q8 row K/4 words (the
stored bytes, viewed as uint32 on the device; nothing is repacked). One warp computes one output
row: lane l reads words l, l+32, l+64, ... of the row, so each step of a warp reads 128 contiguous
bytes, and multiplies them with the float32 input, one fp16 scale per group of G weights:

  q4 word w of a row (G/8 words per group g = w // (G/8), byte offset j = 4 (w % (G/8)) in it):
      byte b (0..3): low nibble  -> element g G + j + b,        code = nibble - 8
                     high nibble -> element g G + G/2 + j + b,  code = nibble - 8
  q8 word w: byte b -> element 4 w + b, code = the byte as a signed int8

The warp's 32 partial sums go through shared memory (device.py explains why no shuffles), in two
alternating halves, so a block needs one barrier per step of rows: lane 0 still reads step s's half
while the other lanes write step s+1's into the other one.

Legend: O output rows, K inputs, NW words per row, G group size, E experts.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32, int32

from .device import MAX_THREADS, ROWS, THREADS, WARP, blocks, device_jit, jit, warp_total

_PARTS2 = 2 * MAX_THREADS  # two halves of partial sums (see the module doc)


@device_jit
def row_dot(words, scales, row, x, lane, bits, G):
    """Lane `lane`'s share of sum_k W[row, k] x[k] for a q4 / q8 matrix in words [O, NW]."""
    nw = words.shape[1]
    acc = float32(0.0)
    if bits == 4:
        wpg = G // 8
        half = G // 2
        for w in range(lane, nw, WARP):
            g = w // wpg
            base = g * G + (w - g * wpg) * 4
            word = words[row, w]
            s = float32(0.0)
            for b in range(4):
                lo = int32((word >> (8 * b)) & 0xF) - 8
                hi = int32((word >> (8 * b + 4)) & 0xF) - 8
                s += float32(lo) * x[base + b] + float32(hi) * x[base + half + b]
            acc += float32(scales[row, g]) * s
    else:
        wpg = G // 4
        for w in range(lane, nw, WARP):
            word = words[row, w]
            s = float32(0.0)
            for b in range(4):
                c = int32((word >> (8 * b)) & 0xFF)
                c -= (c & 0x80) << 1  # sign-extend the byte
                s += float32(c) * x[4 * w + b]
            acc += float32(scales[row, w // wpg]) * s
    return acc


@device_jit
def _reduce_store(part, row0, per, acc, row, rows, out, accumulate):
    """The warp's 32 partials of `row` into one of the two halves of part, one barrier, then lane 0
    writes (or adds) their sum. Every thread of the block calls it once per step of rows."""
    tid = cuda.threadIdx.x
    base = (row0 // per // cuda.gridDim.x) % 2 * MAX_THREADS + tid
    part[base] = acc
    cuda.syncthreads()
    if tid % WARP == 0 and row < rows:
        total = warp_total(part, base)
        if accumulate:
            out[row] += total
        else:
            out[row] = total


@jit
def _matvec(words, scales, bits, G, x, out, accumulate):
    """out[o] (+)= W[o] . x, one warp per row, blockDim / 32 rows per block and step."""
    part = cuda.shared.array(_PARTS2, float32)
    lane = cuda.threadIdx.x % WARP
    per = cuda.blockDim.x // WARP
    rows = words.shape[0]
    for row0 in range(cuda.blockIdx.x * per, rows, cuda.gridDim.x * per):
        row = row0 + cuda.threadIdx.x // WARP
        acc = row_dot(words, scales, row, x, lane, bits, G) if row < rows else float32(0.0)
        _reduce_store(part, row0, per, acc, row, rows, out, accumulate)


@jit
def _matvec3(wq, sq, wk, sk, wv, sv, bits, G, x, q, k, v):
    """q, k, v = Wq x, Wk x, Wv x in one launch: blockIdx.y picks the matrix."""
    part = cuda.shared.array(_PARTS2, float32)
    lane = cuda.threadIdx.x % WARP
    per = cuda.blockDim.x // WARP
    m = cuda.blockIdx.y
    words, scales, out = wq, sq, q
    if m == 1:
        words, scales, out = wk, sk, k
    elif m == 2:
        words, scales, out = wv, sv, v
    rows = words.shape[0]
    for row0 in range(cuda.blockIdx.x * per, rows, cuda.gridDim.x * per):
        row = row0 + cuda.threadIdx.x // WARP
        acc = row_dot(words, scales, row, x, lane, bits, G) if row < rows else float32(0.0)
        _reduce_store(part, row0, per, acc, row, rows, out, False)


@jit
def _fmatvec(w, x, out, accumulate):
    """out[o] (+)= w[o] . x for a float32 matrix (tensors stored as f16 / f32)."""
    part = cuda.shared.array(_PARTS2, float32)
    lane = cuda.threadIdx.x % WARP
    per = cuda.blockDim.x // WARP
    rows = w.shape[0]
    for row0 in range(cuda.blockIdx.x * per, rows, cuda.gridDim.x * per):
        row = row0 + cuda.threadIdx.x // WARP
        acc = float32(0.0)
        if row < rows:
            for j in range(lane, w.shape[1], WARP):
                acc += w[row, j] * x[j]
        _reduce_store(part, row0, per, acc, row, rows, out, accumulate)


# ---- host entry points (device arrays in, nothing copied back) --------------------------------------

def as_words(codes: np.ndarray) -> np.ndarray:
    """The stored codes [..., O, K/2] uint8 (q4) or [..., O, K] int8 (q8) viewed as uint32 words
    [..., O, NW] (the same bytes; the converter's rows are a multiple of 16 bytes)."""
    codes = np.ascontiguousarray(codes)
    if codes.shape[-1] % 4:
        raise ValueError(f"a code row of {codes.shape[-1]} bytes is not a whole number of 32-bit words")
    return codes.view(np.uint32)


def matvec(words, scales, bits: int, group_size: int, x, out, accumulate: bool = False, stream=0):
    """out [O] = W x (or out += W x): words uint32 [O, NW], scales float16 [O, K/G], x float32 [K]."""
    grid = blocks(words.shape[0], ROWS)
    _matvec[grid, THREADS, stream](words, scales, bits, group_size, x, out, accumulate)


def matvec3(q_w, k_w, v_w, bits: int, group_size: int, x, q, k, v, stream=0):
    """q, k, v = the three (words, scales) pairs times x, in one launch."""
    grid = (blocks(max(q_w[0].shape[0], k_w[0].shape[0], v_w[0].shape[0]), ROWS), 3)
    _matvec3[grid, THREADS, stream](q_w[0], q_w[1], k_w[0], k_w[1], v_w[0], v_w[1], bits, group_size, x, q, k, v)


def fmatvec(w, x, out, accumulate: bool = False, stream=0):
    """out [O] = w x (or +=) for a float32 matrix w [O, K]."""
    _fmatvec[blocks(w.shape[0], ROWS), THREADS, stream](w, x, out, accumulate)
