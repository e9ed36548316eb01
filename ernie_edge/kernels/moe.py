"""MoE routing (docs/ERNIE_SPEC.md §3.5): softmax over all experts, top-k selection with the
correction bias, renormalised weights.

Legend: T tokens, H hidden size, E experts, k experts per token.

The experts themselves run in q8.py (decode: the routed experts with the shared expert,
`experts_pair_gate_up_silu` / `experts_pair_down_weighted`) and qbatch.py (prefill: tokens grouped
by expert, `qexperts`), each adding a token's expert outputs in ascending expert id (P13).
"""

from __future__ import annotations

from functools import partial

import numpy as np
from numba import prange

from . import simd
from ._jit import njit, pnjit
from .act_quant import live


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


@njit(fastmath=False)
def _select(logits, p, bias, use_bias, k, norm_min, idx, w, t):
    """Token t's experts from its router logits [E]: p = softmax(logits), idx[t] = top-k of p + bias
    (bias only selects; ties go to the lower index), w[t] = p[idx[t]] / max(sum, norm_min); logits
    is overwritten. Without fast-math: its bits are the same wherever it is compiled or inlined (the
    decode router runs it inside the experts' region, the batch router here)."""
    E = logits.shape[0]
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


@njit()
def _route(x, wg, bias, use_bias, k, norm_min, idx, w, logits, p, have_logits):
    """Route the T tokens of x [T, H]: each token's logits (unless have_logits: token 0's are in
    logits already), then `_select`."""
    T = x.shape[0]
    E = wg.shape[0]
    for t in range(T):
        if not have_logits:
            for e in range(E):
                logits[e] = _logit(x, t, wg, e)
        _select(logits, p, bias, use_bias, k, norm_min, idx, w, t)


def _route1(x, wg, bias, use_bias, k, norm_min, idx, w, logits, p):
    """One token: the router logits in a parallel region, then the softmax and top-k. Two calls
    from Python on purpose: compiled as one function (njit), decode_batch's rows came out with other
    last bits for a batch of one than for four (tests/test_cpu_model.py's batch invariance)."""
    _router_logits_1(x, wg, logits)
    _route(x, wg, bias, use_bias, k, norm_min, idx, w, logits, p, True)


def route(x, wg, bias, k: int, idx_out, w_out, norm_min: float = 1e-12, work=None):
    """Router in float32: logits = x wg^T, p = softmax over all E, slots = top-k of p + bias (bias
    only selects), weights = p[slots] / max(sum, norm_min). x float32 [T, H] or [H]; wg float32
    [E, H]; bias float32 [E] or None; writes idx_out int64 [T, k] (in descending p + bias) and
    w_out float32 [T, k]; returns them. work: optional float32 [3, E] scratch (decode passes one,
    so that nothing is allocated per token)."""
    x2 = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    if work is None:
        work = np.zeros((3, wg.shape[0]), np.float32)
    bind_route(x2, wg, bias, k, idx_out, w_out, norm_min, work)()
    return idx_out, w_out


def router_args(x, wg, bias, k: int, idx_out, w_out, norm_min: float, work) -> tuple:
    """The checked arguments of the compiled router (`_route1` / `_route`, and the routed gate/up
    regions of kernels/routed.py): (x [T, H], wg, bias, use_bias, k, norm_min, idx_out,
    w_out, logits, p). x, idx_out, w_out and work are bound, not copied (`act_quant.live`)."""
    x2 = live(x, np.float32, "x").reshape(-1, x.shape[-1])
    T, H = x2.shape
    E = wg.shape[0]
    if wg.dtype != np.float32 or wg.shape != (E, H) or not wg.flags.c_contiguous:
        raise ValueError(f"router weight must be C-contiguous float32 [E, {H}], got {wg.dtype} {wg.shape}")
    if not 1 <= k <= E or idx_out.shape != (T, k) or w_out.shape != (T, k):
        raise ValueError(f"route: k={k}, idx_out {idx_out.shape}, w_out {w_out.shape} for T={T}, E={E}")
    idx_out, w_out = live(idx_out, np.int64, "idx_out"), live(w_out, np.float32, "w_out")
    if work.shape != (3, E) or work.dtype != np.float32 or not work.flags.c_contiguous:
        raise ValueError(f"route: work must be C-contiguous float32 [3, {E}], got {work.dtype} {work.shape}")
    logits, p, no_bias = work
    use_bias = bias is not None
    b = np.ascontiguousarray(bias, np.float32) if use_bias else no_bias  # no_bias: never read
    return x2, wg, b, use_bias, k, np.float32(norm_min), idx_out, w_out, logits, p


def routed_ids(route: tuple, x) -> np.ndarray:
    """The ids buffer (idx_out[0]) the routed gate/up region's experts are read from, for router
    arguments `route` (router_args) of one token x [H]."""
    x2, idx = route[0], route[6]
    if x2.shape[0] != 1 or x.ndim != 1 or x2.ctypes.data != x.ctypes.data:
        raise ValueError("the routed gate/up region routes one token: router_args of the same x [H]")
    return idx[0]


def bind_route(x, wg, bias, k: int, idx_out, w_out, norm_min: float, work):
    """`route` as a call to repeat (decode, every token): x float32 [T, H] or [H], idx_out, w_out and
    work are bound, not copied (`act_quant.live`)."""
    args = router_args(x, wg, bias, k, idx_out, w_out, norm_min, work)
    return partial(_route1, *args) if args[0].shape[0] == 1 else partial(_route, *args, False)


# ---- the router's part of decode's routed gate/up regions (kernels/routed.py) ----------------------

ROUTER_ROWS = 8  # router rows (experts) per work unit of a routed region's first phase


@njit(inline="always")
def router_units(n_experts):
    """Work units of the router's rows in a routed region."""
    return (n_experts + ROUTER_ROWS - 1) // ROUTER_ROWS


@njit()
def router_unit(u, x, wg, bias, use_bias, k, norm_min, idx, w, logits, p, claims):
    """Router unit u (< router_units(E)) of a routed region: router logits of experts
    u*ROUTER_ROWS .. for token 0 of x [1, H], as `_router_logits_1` computes them. claims[0] counts
    the finished units; the thread that finishes the last one selects the experts (`_select`) and
    publishes them (claims[1] = 1)."""
    E = wg.shape[0]
    for e in range(u * ROUTER_ROWS, min(E, (u + 1) * ROUTER_ROWS)):
        logits[e] = _logit(x, 0, wg, e)
    if simd.fetch_add_sync(claims, 0, 1) == router_units(E) - 1:
        _select(logits, p, bias, use_bias, k, norm_min, idx, w, 0)
        simd.store_release(claims, 1, 1)


@njit(inline="always")
def wait_routed(claims):
    """Wait until `router_unit` has published the experts (claims[1])."""
    while simd.load_acquire(claims, 1) == 0:
        simd.spin_pause()
