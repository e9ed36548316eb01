"""Token choice on the device, so a decode step need not copy the logits row back: greedy argmax,
and temperature sampling by inverse CDF with a uniform number drawn on the host (the host keeps
the seeded RNG, so a seed gives the same tokens on every device). numpy twins in the tests.

Two passes over V in blocks of THREADS: each block reduces its part (max and its first index; or
the sum of exp((l - max) / temperature)), then one block finishes (and, for sampling, walks the
block sums to the one holding the target, then its entries).

Legend: V logits (only the first n ids may be chosen), B blocks of the first pass.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int64

from .device import MAX_THREADS, SIMULATOR, THREADS, dmax, dmin, jit

PASS_BLOCKS = 4 if SIMULATOR else 64  # B: blocks of the first pass


@jit
def _block_argmax(logits, n, best_v, best_i):
    """Block b: the max of its stride of logits[:n] and its lowest index."""
    sv = cuda.shared.array(MAX_THREADS, float32)
    si = cuda.shared.array(MAX_THREADS, int64)
    tid = cuda.threadIdx.x
    b = cuda.blockIdx.x
    step = cuda.blockDim.x * cuda.gridDim.x
    v = float32(-np.inf)
    i_best = int64(n)
    for i in range(b * cuda.blockDim.x + tid, n, step):
        x = logits[i]
        if x > v:
            v = x
            i_best = i
    sv[tid] = v
    si[tid] = i_best
    cuda.syncthreads()
    if tid == 0:
        for j in range(1, cuda.blockDim.x):
            if sv[j] > v or (sv[j] == v and si[j] < i_best):
                v = sv[j]
                i_best = si[j]
        best_v[b] = v
        best_i[b] = i_best


@jit
def _finish_argmax(best_v, best_i, out):
    v = best_v[0]
    i_best = best_i[0]
    for j in range(1, best_v.shape[0]):
        if best_v[j] > v or (best_v[j] == v and best_i[j] < i_best):
            v = best_v[j]
            i_best = best_i[j]
    out[0] = i_best
    out[1] = 0


@jit
def _block_expsum(logits, n, best_v, inv_t, sums):
    """Block b: sum of exp((l - max) / T) over its contiguous part of logits[:n]."""
    part = cuda.shared.array(MAX_THREADS, float32)
    tid = cuda.threadIdx.x
    b = cuda.blockIdx.x
    per = -(-n // cuda.gridDim.x)
    m = best_v[0]
    for j in range(1, best_v.shape[0]):
        m = dmax(m, best_v[j])
    s = float32(0.0)
    for i in range(b * per + tid, dmin(n, (b + 1) * per), cuda.blockDim.x):
        s += math.exp((logits[i] - m) * inv_t)
    part[tid] = s
    cuda.syncthreads()
    if tid == 0:
        tot = float32(0.0)
        for j in range(cuda.blockDim.x):
            tot += part[j]
        sums[b] = tot


@jit
def _pick(logits, n, best_v, inv_t, sums, u, out):
    """One thread: find the block where the running sum passes u * total, then the entry."""
    m = best_v[0]
    for j in range(1, best_v.shape[0]):
        m = dmax(m, best_v[j])
    total = float32(0.0)
    for b in range(sums.shape[0]):
        total += sums[b]
    target = u * total
    per = -(-n // sums.shape[0])
    run = float32(0.0)
    b = 0
    while b < sums.shape[0] - 1 and run + sums[b] <= target:
        run += sums[b]
        b += 1
    choice = dmin(n, (b + 1) * per) - 1
    for i in range(b * per, dmin(n, (b + 1) * per)):
        run += math.exp((logits[i] - m) * inv_t)
        if run > target:
            choice = i
            break
    out[0] = choice
    out[1] = 1


class TokenScratch:
    """The first pass's per-block results and the chosen id ([id, sampled?]) on the device."""

    def __init__(self):
        self.best_v = cuda.device_array(PASS_BLOCKS, np.float32)
        self.best_i = cuda.device_array(PASS_BLOCKS, np.int64)
        self.sums = cuda.device_array(PASS_BLOCKS, np.float32)
        self.out = cuda.device_array(2, np.int64)


def argmax(logits, n: int, scratch: TokenScratch, stream=0):
    """The lowest index of the largest of logits[:n] (a device array [2]: id, 0)."""
    _block_argmax[PASS_BLOCKS, THREADS, stream](logits, n, scratch.best_v, scratch.best_i)
    _finish_argmax[1, 1, stream](scratch.best_v, scratch.best_i, scratch.out)
    return scratch.out


def sample(logits, n: int, temperature: float, u: float, scratch: TokenScratch, stream=0):
    """The id i < n where the running sum of softmax(logits[:n] / temperature) first exceeds u
    (u uniform in [0, 1), drawn by the caller). temperature 0: argmax."""
    if temperature <= 0:
        return argmax(logits, n, scratch, stream)
    _block_argmax[PASS_BLOCKS, THREADS, stream](logits, n, scratch.best_v, scratch.best_i)
    inv_t = float32(1.0 / temperature)
    _block_expsum[PASS_BLOCKS, THREADS, stream](logits, n, scratch.best_v, inv_t, scratch.sums)
    _pick[1, 1, stream](logits, n, scratch.best_v, inv_t, scratch.sums, float32(u), scratch.out)
    return scratch.out
