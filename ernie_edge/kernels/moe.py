"""MoE routing and the grouped (prefill) expert execution (ERNIE_SPEC §3.5).

Legend: T tokens, H hidden size, E experts, k experts per token, I expert intermediate size.

Decode runs the routed experts with the shared expert in two parallel regions
(q8.experts_pair_gate_up_silu / experts_pair_down_weighted; cpu_model._moe_decode).
Prefill groups tokens by expert so each routed expert's weights are read once per batch, and adds
each token's expert outputs in ascending expert id (P13), starting from zero.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from . import norm, q4, q8
from ._jit import get_threads, njit, pnjit, single_threaded_blas, worker_pool


@njit(inline="always")
def _logit(x, t, wg, e):
    """Router logit of expert e for token t (one loop for the decode and prefill paths)."""
    s = np.float32(0.0)
    for j in range(x.shape[1]):
        s += x[t, j] * wg[e, j]
    return s


@pnjit()
def _router_logits_1(x, wg, logits):
    """logits [E] = wg x for one token, experts shared out to the threads (decode: the router
    weights come from DRAM every token, and two threads read them twice as fast as one)."""
    for e in prange(wg.shape[0]):
        logits[e] = _logit(x, 0, wg, e)


@njit()
def _route(x, wg, bias, use_bias, k, norm_min, idx, w, logits, p, have_logits):
    T, H = x.shape
    E = wg.shape[0]
    for t in range(T):
        if not have_logits:
            for e in range(E):
                logits[e] = _logit(x, t, wg, e)
        mx = logits.max()
        tot = np.float32(0.0)
        for e in range(E):
            p[e] = np.exp(logits[e] - mx)
            tot += p[e]
        for e in range(E):
            p[e] = p[e] / tot
        # top-k of p + bias by repeated argmax; ties go to the lower index (stable sort order)
        for e in range(E):
            logits[e] = p[e] + bias[e] if use_bias else p[e]
        wsum = np.float32(0.0)
        for slot in range(k):
            best = 0
            for e in range(1, E):
                if logits[e] > logits[best]:
                    best = e
            idx[t, slot] = best
            logits[best] = -np.inf
            w[t, slot] = p[best]
            wsum += p[best]
        denom = max(wsum, norm_min)
        for slot in range(k):
            w[t, slot] = w[t, slot] / denom


def route(x, wg, bias, k: int, idx_out, w_out, norm_min: float = 1e-12, work=None):
    """Router in float32: logits = x wg^T, p = softmax over all E, slots = top-k of p + bias (bias
    only selects), weights = p[slots] / max(sum, norm_min). x float32 [T, H] or [H]; wg float32
    [E, H]; bias float32 [E] or None; writes idx_out int64 [T, k] (in descending p + bias) and
    w_out float32 [T, k]; returns them. work: optional float32 [3, E] scratch (decode passes one,
    so that nothing is allocated per token)."""
    x2 = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    T, H = x2.shape
    E = wg.shape[0]
    if wg.dtype != np.float32 or wg.shape != (E, H) or not wg.flags.c_contiguous:
        raise ValueError(f"router weight must be C-contiguous float32 [E, {H}], got {wg.dtype} {wg.shape}")
    if not 1 <= k <= E or idx_out.shape != (T, k) or w_out.shape != (T, k):
        raise ValueError(f"route: k={k}, idx_out {idx_out.shape}, w_out {w_out.shape} for T={T}, E={E}")
    if idx_out.dtype != np.int64 or w_out.dtype != np.float32:
        raise ValueError("idx_out must be int64 and w_out float32")
    if work is None:
        work = np.zeros((3, E), np.float32)
    elif work.shape != (3, E) or work.dtype != np.float32 or not work.flags.c_contiguous:
        raise ValueError(f"route: work must be C-contiguous float32 [3, {E}], got {work.dtype} {work.shape}")
    logits, p, no_bias = work
    use_bias = bias is not None
    b = np.ascontiguousarray(bias, np.float32) if use_bias else no_bias  # no_bias: never read
    if T == 1:
        _router_logits_1(x2, wg, logits)
    _route(x2, wg, b, use_bias, k, np.float32(norm_min), idx_out.reshape(T, k), w_out.reshape(T, k),
           logits, p, T == 1)
    return idx_out, w_out


def experts_prefill(x, idx, weights, gate, gate_scales, up, up_scales, down, down_scales, out,
                    bits: int = 4) -> np.ndarray:
    """Routed-expert output for a batch, exact float32: out [T, H] = sum over each token's slots, in
    ascending expert id, of weights[t, j] * expert_e(x[t]). x float32 [T, H]; idx int [T, k];
    weights float32 [T, k]; banks int4 packed uint8 [E, I, H/2] / [E, H, I/2] (bits=4) or int8
    codes [E, I, H] / [E, H, I] (bits=8) with fp16 scales. Overwrites out.

    Tokens are grouped by expert: each hit expert's gate, up and down weights are dequantized a
    tile at a time and multiplied with all of its tokens at once, so every routed expert's weights
    are read once per batch. Experts are shared out to the worker threads (single-threaded sgemm
    each); their outputs are added here in ascending expert id.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if x.dtype != np.float32 or x.ndim != 2 or out.shape != x.shape or out.dtype != np.float32:
        raise ValueError(f"x and out must be float32 [T, H], got x {x.dtype} {x.shape}, out {out.dtype} {out.shape}")
    idx = np.asarray(idx)
    if idx.ndim != 2 or idx.shape[0] != x.shape[0] or weights.shape != idx.shape:
        raise ValueError(f"idx {idx.shape} and weights {weights.shape} must be [T, k] for T={x.shape[0]}")
    if idx.size and (idx.min() < 0 or idx.max() >= gate.shape[0]):
        raise ValueError(f"expert ids must be in [0, {gate.shape[0]})")
    banks = (gate, q8.as_u16(gate_scales), up, q8.as_u16(up_scales), down, q8.as_u16(down_scales))
    experts = np.unique(idx)  # ascending expert id
    groups = [np.nonzero(idx == e) for e in experts]  # (rows, slots) per expert
    single_threaded_blas()
    if get_threads() > 1:
        pool = worker_pool()
        jobs = [pool.submit(_expert_ffn, x, rows, int(e), banks, bits) for e, (rows, _) in zip(experts, groups)]
        results = (job.result() for job in jobs)
    else:
        results = (_expert_ffn(x, rows, int(e), banks, bits) for e, (rows, _) in zip(experts, groups))
    out[...] = 0.0
    for (rows, slots), y in zip(groups, results):  # ascending expert id
        out[rows] += y * weights[rows, slots][:, None].astype(np.float32)
    return out


def _expert_ffn(x, rows, e, banks, bits) -> np.ndarray:
    """down(silu(gate(x)) * up(x)) of expert e for tokens x[rows] -> float32 [n, H] (one thread)."""
    gate, gs, up, us, down, ds = banks
    dequant = q4._q4_dequant_rows if bits == 4 else q8._q8_dequant_rows
    xe = np.ascontiguousarray(x[rows])  # [n, H]
    n, inter = len(rows), gate.shape[1]
    g = np.empty((n, inter), np.float32)
    u = np.empty((n, inter), np.float32)
    q8.tiled_matmul(xe, gate[e], gs[e], g, dequant, parallel=False)
    q8.tiled_matmul(xe, up[e], us[e], u, dequant, parallel=False)
    h = np.empty_like(g)
    norm.silu_mul(g, u, h)
    y = np.empty((n, x.shape[1]), np.float32)
    q8.tiled_matmul(h, down[e], ds[e], y, dequant, parallel=False)
    return y
