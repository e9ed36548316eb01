"""MoE on the device (docs/ERNIE_SPEC.md §3.5, P3-P6, P13): the fp32 router with the correction
bias and top-k, the decode expert kernels (routed experts and the shared expert in one launch per
projection), and the prefill plumbing around quant_matmul's grouped kernels (numpy twins:
ernie_edge/reference.py `route`, `mlp` and `ReferenceModel._moe`).

Router, one block per token: (decode: the post-attention RMSNorm first, writing h) logits = h wg^T
(warp w scores experts w, w + warps, ...), then one thread: softmax over all E, top-k of p + bias
by repeated argmax (ties to the lower id, as the CPU kernel), weights = p / max(sum, norm_min), and
the k choices written in ascending expert id: the order every consumer sums them in (P13).

Decode experts (one token): `experts_gate_up` runs block row-groups x slots, slot s < k being routed
expert ids[s] and slot k the shared expert (or layer 0's dense MLP as a one-expert bank with no
routed slot); each warp computes a gate row and an up row and writes silu(g) * u. `experts_down`
gives each warp one output row: the k routed down rows and the shared one, weighted, summed in
ascending expert id, shared last, and added to the residual stream.

Prefill: `group_tokens` (host, numpy) orders the (token, slot) pairs by expert into a tile list;
quant_matmul's grouped kernels run it; `combine` adds each token's rows back, in ascending expert
id, plus the shared expert, to the residual stream.

Legend: T tokens, H hidden, E experts, k slots per token, I expert width, R = T k grouped rows.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from .device import MAX_THREADS, ROWS, THREADS, WARP, block_total, blocks, device_jit, dmax, jit, warp_total
from .quant_matvec import row_dot

MAX_EXPERTS = 128  # the router's shared arrays (ERNIE-4.5: 64)
MAX_SLOTS = 17  # routed slots + the shared expert (ERNIE-4.5: 6 + 1)
_LOGIT_PARTS = MAX_EXPERTS * WARP  # shared-array sizes must be plain constants
_SLOT_PARTS = MAX_SLOTS * MAX_THREADS
_SLOT_PARTS2 = 2 * _SLOT_PARTS  # two alternating halves (quant_matvec.py's module doc)
_PARTS2 = 2 * MAX_THREADS


@jit
def _route(x, norm_w, eps, do_norm, h, wg, bias, use_bias, k, norm_min, idx, w):
    part = cuda.shared.array(MAX_THREADS, float32)
    lp = cuda.shared.array(_LOGIT_PARTS, float32)
    p = cuda.shared.array(MAX_EXPERTS, float32)
    tid = cuda.threadIdx.x
    for t in range(cuda.blockIdx.x, h.shape[0], cuda.gridDim.x):
        _route_one(t, tid, part, lp, p, x, norm_w, eps, do_norm, h, wg, bias, use_bias, k, norm_min, idx, w)
        cuda.syncthreads()


@device_jit
def _route_one(t, tid, part, lp, p, x, norm_w, eps, do_norm, h, wg, bias, use_bias, k, norm_min, idx, w):
    nt = cuda.blockDim.x
    H = h.shape[1]
    E = wg.shape[0]
    if do_norm:
        ss = float32(0.0)
        for j in range(tid, H, nt):
            ss += x[t, j] * x[t, j]
        part[tid] = ss
        cuda.syncthreads()
        if tid == 0:
            part[0] = float32(1.0) / math.sqrt(block_total(part, nt) / float32(H) + eps)
        cuda.syncthreads()
        inv = part[0]
        for j in range(tid, H, nt):
            h[t, j] = norm_w[j] * (x[t, j] * inv)
        cuda.syncthreads()
    lane = tid % WARP
    for e in range(tid // WARP, E, nt // WARP):
        acc = float32(0.0)
        for j in range(lane, H, WARP):
            acc += h[t, j] * wg[e, j]
        lp[e * WARP + lane] = acc
    cuda.syncthreads()
    if tid == 0:
        mx = float32(-np.inf)
        for e in range(E):
            p[e] = warp_total(lp, e * WARP)
            mx = dmax(mx, p[e])
        tot = float32(0.0)
        for e in range(E):
            p[e] = math.exp(p[e] - mx)
            tot += p[e]
        for e in range(E):
            p[e] = p[e] / tot
            lp[e] = p[e] + bias[e] if use_bias else p[e]  # selection scores (lp is free again)
        wsum = float32(0.0)
        for s in range(k):
            best = 0
            for e in range(1, E):
                if lp[e] > lp[best]:
                    best = e
            lp[best] = float32(-np.inf)
            j = s  # insertion into ascending expert id
            while j > 0 and idx[t, j - 1] > best:
                idx[t, j] = idx[t, j - 1]
                w[t, j] = w[t, j - 1]
                j -= 1
            idx[t, j] = best
            w[t, j] = p[best]
            wsum += p[best]
        denom = dmax(wsum, norm_min)
        for s in range(k):
            w[t, s] = w[t, s] / denom


@jit
def _experts_gate_up(x, ids, n_routed, gw, gs, uw, us, bits, G, h, sgw, sgs, suw, sus, sbits, sG, h_shared,
                     has_shared):
    """Block (row group, slot): h[slot, row] = silu(G_e x) * U_e x; the slot n_routed is the shared bank."""
    pg = cuda.shared.array(_PARTS2, float32)
    pu = cuda.shared.array(_PARTS2, float32)
    tid = cuda.threadIdx.x
    lane = tid % WARP
    per = cuda.blockDim.x // WARP
    slot = cuda.blockIdx.y
    shared = slot >= n_routed
    if shared and not has_shared:
        return
    rows = sgw.shape[1] if shared else gw.shape[1]
    for row0 in range(cuda.blockIdx.x * per, rows, cuda.gridDim.x * per):
        row = row0 + tid // WARP
        g = float32(0.0)
        u = float32(0.0)
        if row < rows:
            if shared:
                g = row_dot(sgw[0], sgs[0], row, x, lane, sbits, sG)
                u = row_dot(suw[0], sus[0], row, x, lane, sbits, sG)
            else:
                e = ids[slot]
                g = row_dot(gw[e], gs[e], row, x, lane, bits, G)
                u = row_dot(uw[e], us[e], row, x, lane, bits, G)
        base = (row0 // per // cuda.gridDim.x) % 2 * MAX_THREADS + tid  # alternate halves: one barrier a step
        pg[base] = g
        pu[base] = u
        cuda.syncthreads()
        if lane == 0 and row < rows:
            g = warp_total(pg, base)
            u = warp_total(pu, base)
            v = g / (float32(1.0) + math.exp(-g)) * u
            if shared:
                h_shared[row] = v
            else:
                h[slot, row] = v


@jit
def _experts_down(h, ids, wts, n_routed, dw, ds, bits, G, h_shared, sdw, sds, sbits, sG, has_shared, out,
                  accumulate):
    """out[row] (+)= sum_s wts[s] D_ids[s] h[s] (ascending id) + D_shared h_shared, one warp per row."""
    part = cuda.shared.array(_SLOT_PARTS2, float32)
    tid = cuda.threadIdx.x
    lane = tid % WARP
    per = cuda.blockDim.x // WARP
    H = out.shape[0]
    for row0 in range(cuda.blockIdx.x * per, H, cuda.gridDim.x * per):
        row = row0 + tid // WARP
        base = (row0 // per // cuda.gridDim.x) % 2 * _SLOT_PARTS + tid  # alternate halves: one barrier a step
        if row < H:
            for s in range(n_routed):
                e = ids[s]
                part[base + s * MAX_THREADS] = row_dot(dw[e], ds[e], row, h[s], lane, bits, G)
            if has_shared:
                part[base + n_routed * MAX_THREADS] = row_dot(sdw[0], sds[0], row, h_shared, lane, sbits, sG)
        cuda.syncthreads()
        if lane == 0 and row < H:
            total = float32(0.0)
            for s in range(n_routed):
                total += wts[s] * warp_total(part, base + s * MAX_THREADS)
            if has_shared:
                total += warp_total(part, base + n_routed * MAX_THREADS)
            if accumulate:
                out[row] += total
            else:
                out[row] = total


@jit
def _combine(Yg, pos, shared_y, has_shared, x):
    """Block t: x[t] += sum_s Yg[pos[t, s]] (slots in ascending expert id) + shared_y[t]."""
    for t in range(cuda.blockIdx.x, x.shape[0], cuda.gridDim.x):
        for j in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
            y = float32(0.0)
            for s in range(pos.shape[1]):
                y += Yg[pos[t, s], j]
            if has_shared:
                y += shared_y[t, j]
            x[t, j] += y


@jit
def _residual_add(x, a, b, has_b):
    """x += a (+ b), elementwise over flat arrays: (routed + shared) added to the residual stream."""
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        y = a[i]
        if has_b:
            y += b[i]
        x[i] += y


# ---- host entry points -----------------------------------------------------------------------------

def check_router(n_experts: int, k: int) -> None:
    if n_experts > MAX_EXPERTS or k + 1 > MAX_SLOTS:
        raise ValueError(f"the CUDA MoE kernels take at most {MAX_EXPERTS} experts and {MAX_SLOTS - 1} "
                         f"per token; this model has {n_experts} and {k}")


def route(h, wg, bias, k: int, norm_min: float, idx, w, norm=None, stream=0):
    """Router of T tokens: idx [T, k] int64 and w [T, k] float32, in ascending expert id.
    h [T, H] is the normed input; with norm = (x, norm_w, eps) it is computed first, from x."""
    check_router(wg.shape[0], k)
    x, norm_w, eps = norm if norm is not None else (h, wg[0], 0.0)
    b = bias if bias is not None else wg[0]
    _route[blocks(h.shape[0], 1), THREADS, stream](x, norm_w, float32(eps), norm is not None, h, wg, b, bias is not None,
                                        k, float32(norm_min), idx, w)


def experts_gate_up(x, ids, n_routed: int, routed, shared, h, h_shared, stream=0):
    """Decode: h [k, I] = silu(G x) * U x of the routed experts ids[:n_routed], and h_shared [Is]
    of the shared bank. routed / shared: (gate_words, gate_scales, up_words, up_scales, bits, G),
    banks [E, I, NW] / [1, Is, NW]; either may be None (no routed slot: layer 0's dense MLP is the
    shared bank; no shared expert). h and h_shared are always given (unused ones as placeholders)."""
    base = routed if routed is not None else shared
    sh = shared if shared is not None else routed
    grid = (blocks(max(base[0].shape[1], sh[0].shape[1]), ROWS), n_routed + (shared is not None))
    _experts_gate_up[grid, THREADS, stream](x, ids, n_routed, *base, h, *sh, h_shared, shared is not None)


def experts_down(h, ids, wts, n_routed: int, routed, h_shared, shared, out, accumulate: bool = True, stream=0):
    """Decode: out [H] (+)= sum_s wts[s] D_ids[s] h[s] (ascending id) + D_shared h_shared.
    routed / shared: (down_words, down_scales, bits, G), banks [E, H, NW] / [1, H, NW]; either may
    be None; h [k, I] and h_shared [Is] are always given."""
    base = routed if routed is not None else shared
    sh = shared if shared is not None else routed
    _experts_down[blocks(out.shape[0], ROWS), THREADS, stream](
        h, ids, wts, n_routed, *base, h_shared, *sh, shared is not None, out, accumulate)


def group_tokens(idx: np.ndarray, tile_rows: int):
    """Order the (token, slot) pairs of idx [T, k] by expert (tokens ascending within one).

    Returns (order [R]: flat index t k + s of grouped row i, perm [R]: its token, pos [T, k]: the
    grouped row of (t, s), tiles: (expert, start, count) int64 arrays [n], one per tile_rows rows
    of an expert)."""
    T, k = idx.shape
    flat = idx.reshape(-1)
    order = np.argsort(flat, kind="stable")
    pos = np.empty(T * k, np.int64)
    pos[order] = np.arange(T * k)
    experts, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    tiles = [(e, s + j, min(tile_rows, c - j)) for e, s, c in zip(experts, starts, counts)
             for j in range(0, c, tile_rows)]
    tiles = np.array(tiles, np.int64).reshape(-1, 3)
    return order, (order // k).astype(np.int64), pos.reshape(T, k), (tiles[:, 0].copy(), tiles[:, 1].copy(),
                                                                      tiles[:, 2].copy())


def residual_add(x, a, b=None, stream=0):
    """x += a + b (b may be None), flat float32 arrays of one size."""
    _residual_add[blocks(x.shape[0], THREADS), THREADS, stream](x, a, b if b is not None else a, b is not None)


def combine(Yg, pos, shared_y, x, stream=0):
    """x [T, H] += each token's grouped rows Yg[pos[t, :]] (+ shared_y [T, H], or None)."""
    _combine[blocks(x.shape[0], 1), THREADS, stream](Yg, pos, shared_y if shared_y is not None else x, shared_y is not None, x)
