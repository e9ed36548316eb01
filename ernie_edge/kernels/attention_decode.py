"""GQA decode attention (docs/ERNIE_SPEC.md §3.2): one query token over an fp16 or int8 KV cache.

Legend: L attended length, Nq query heads, Nkv KV heads, R = Nq / Nkv query heads per KV head, D
head dim, KT = KV_TILE positions per cache tile, B = DECODE_BLOCK positions per softmax step.

Decode reads the cache once per token (it is memory-bound at long context): each work item is one
KV head x one contiguous range of positions, processed in blocks of B positions with an online
softmax; all R query heads are scored from one pass over each K tile and accumulated from one pass
over each V tile (the intrinsics of attention_ir.py). The ranges' partial results are merged as in
flash-decoding. Query head h reads KV head h // R. Scores are (q . k) * D^-0.5, softmax in float32.
For an int8 cache q is quantized per head to int8 and each tile's probabilities (times the V
scales) are rounded to uint8 (attention_ir.py's module doc).
"""

from __future__ import annotations

from functools import partial

import numpy as np
from numba import prange
from numba.extending import overload

from . import _jit
from ._jit import njit, pnjit
from .attention_ir import (DECODE_BLOCK, MAX_HEADS, NEG_INF, exp_nonpos, pv1, pv2, pv3, pv4, pv5, pv6, pvi1, pvi2,
                           pvi3, pvi4, pvi5, pvi6, qk1, qk2, qk3, qk4, qk5, qk6, quantize_tile, vmax)
from .kv_layout import KV_TILE, _kv_write, check_cache, is_i8
from .rope import _apply_rope, check_rope

MAX_SPLIT = 16  # most position ranges one KV head is split into (decode work items per head)


def _head_plan(R: int) -> tuple[int, int, int]:
    """(chunks, size, last): R heads in register tiles of at most MAX_HEADS, all `size` heads but the
    last, which has `last`."""
    nch = (R + MAX_HEADS - 1) // MAX_HEADS
    size = (R + nch - 1) // nch
    return nch, size, R - (nch - 1) * size


# The head loops take the head count as the TYPE of `heads`, a tuple of R zeros (`head_tuple`), so
# that a kernel compiles the one or two register tiles its R needs, not all MAX_HEADS of them (half
# the compile time of the attention kernels). R = Nq / Nkv, 5 for ERNIE-4.5-21B-A3B.
QK = (None, qk1, qk2, qk3, qk4, qk5, qk6)
PV = (None, pv1, pv2, pv3, pv4, pv5, pv6)
PVI = (None, pvi1, pvi2, pvi3, pvi4, pvi5, pvi6)


def head_tuple(R: int) -> tuple:
    """The `heads` argument of the attention kernels for R query heads per KV head."""
    return (0,) * R


def _qk_heads(kc, toff, D, q, qi, qsc, qsum, h0, s, soff, sstride, heads):
    """Scores of heads h0 .. h0 + R - 1 (R = len(heads)) against one K tile into s[soff + r*sstride + j]."""
    raise NotImplementedError("only callable from numba-compiled code")


def _pv_heads(vc, toff, D, n, p, poff, pstride, acc, heads):
    """acc[r, :] += p[r, poff : poff+n] . V tile rows 0..n-1 for R = len(heads) heads (acc [R, D])."""
    raise NotImplementedError("only callable from numba-compiled code")


def _pv_heads_int(vc, toff, D, n, pq, poff, pstride, psc, t, qstride, acc, heads):
    """Integer P.V of one int8 V tile (tile t of the block) for R = len(heads) heads (acc [R, D])."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_qk_heads, inline="always")
def _qk_heads_impl(kc, toff, D, q, qi, qsc, qsum, h0, s, soff, sstride, heads):
    nch, size, last = _head_plan(len(heads))
    full, tail = QK[size], QK[last]

    def impl(kc, toff, D, q, qi, qsc, qsum, h0, s, soff, sstride, heads):
        for c in range(nch - 1):
            full(kc, toff, D, q, qi, qsc, qsum, h0 + c * size, s, soff + c * size * sstride, sstride)
        r0 = (nch - 1) * size
        tail(kc, toff, D, q, qi, qsc, qsum, h0 + r0, s, soff + r0 * sstride, sstride)
    return impl


@overload(_pv_heads, inline="always")
def _pv_heads_impl(vc, toff, D, n, p, poff, pstride, acc, heads):
    nch, size, last = _head_plan(len(heads))
    full, tail = PV[size], PV[last]

    def impl(vc, toff, D, n, p, poff, pstride, acc, heads):
        for c in range(nch - 1):
            full(vc, toff, D, n, p, c * size * pstride + poff, pstride, acc, c * size * D)
        r0 = (nch - 1) * size
        tail(vc, toff, D, n, p, r0 * pstride + poff, pstride, acc, r0 * D)
    return impl


@overload(_pv_heads_int, inline="always")
def _pv_heads_int_impl(vc, toff, D, n, pq, poff, pstride, psc, t, qstride, acc, heads):
    nch, size, last = _head_plan(len(heads))
    full, tail = PVI[size], PVI[last]

    def impl(vc, toff, D, n, pq, poff, pstride, psc, t, qstride, acc, heads):
        for c in range(nch - 1):
            r0 = c * size
            full(vc, toff, D, n, pq, r0 * pstride + poff, pstride, psc, r0 * qstride + t, qstride, acc, r0 * D)
        r0 = (nch - 1) * size
        tail(vc, toff, D, n, pq, r0 * pstride + poff, pstride, psc, r0 * qstride + t, qstride, acc, r0 * D)
    return impl


@njit(inline="always")
def _quantize_probs(v_cache, toff0, te, D, sc, n, pq, psc):
    """int8 V: the block's probabilities times the positions' V scales, rounded to uint8 per head and
    tile (`quantize_tile`): pq [R, B], psc [R, B/KT]."""
    KT = KV_TILE
    R, B = sc.shape
    for t in range((n + KT - 1) // KT):
        voff = toff0 + t * te + D * KT  # this tile's V scales
        for r in range(R):
            quantize_tile(sc, r * B + t * KT, v_cache, voff, min(KT, n - t * KT), pq, r * B + t * KT,
                          psc, r * (B // KT) + t)


@njit(inline="always")
def _softmax_step(sc, n, m, l, acc):
    """Online softmax over one block: scores sc[r, :n] -> exp(s - new max) in place; rescales the
    running sum l[r] and accumulator acc[r, :] to the new max m[r]."""
    R, D = acc.shape
    for r in range(R):
        row = sc[r]
        mx = vmax(row, 0, n, m[r])
        f = exp_nonpos(m[r] - mx)
        tot = np.float32(0.0)
        for j in range(n):
            e = exp_nonpos(row[j] - mx)
            row[j] = e
            tot += e
        l[r] = l[r] * f + tot
        m[r] = mx
        if f != np.float32(1.0):
            for d in range(D):
                acc[r, d] *= f


@pnjit()
def _attention_decode(qs, qi, qsc, qsum, k_cache, v_cache, length, nsplit, mpart, lpart, apart, spart,
                      pqpart, pscpart, out, heads):
    nq, D = qs.shape
    if is_i8(k_cache):
        _quantize_q(qs, qi.reshape(nq, D), qsc, qsum)
    nkv, ntc, te = k_cache.shape
    R = nq // nkv
    B, KT = DECODE_BLOCK, KV_TILE
    nblk = (length + B - 1) // B
    for item in prange(nkv * nsplit):
        g, sp = item // nsplit, item % nsplit
        b0, b1 = sp * nblk // nsplit, (sp + 1) * nblk // nsplit
        # This item's softmax state is its slice of the per-split outputs (nothing allocated here).
        sc = spart[sp, g * R:(g + 1) * R]  # [R, B] scores, then probabilities, of one block
        acc = apart[sp, g * R:(g + 1) * R]  # [R, D] unnormalised P.V
        m = mpart[sp, g * R:(g + 1) * R]  # [R] running max
        l = lpart[sp, g * R:(g + 1) * R]  # [R] running sum
        pq = pqpart[sp, g * R:(g + 1) * R]  # [R, B] int8 V: uint8 probabilities of one block
        psc = pscpart[sp, g * R:(g + 1) * R]  # [R, B/KT] their scale per tile
        m[:] = NEG_INF
        l[:] = 0.0
        acc[:] = 0.0
        for b in range(b0, b1):
            n = min(B, length - b * B)
            tile0 = g * ntc + b * (B // KT)
            for t in range((n + KT - 1) // KT):
                _qk_heads(k_cache, (tile0 + t) * te, D, qs, qi, qsc, qsum, g * R, sc, t * KT, B, heads)
            _softmax_step(sc, n, m, l, acc)
            if is_i8(v_cache):
                _quantize_probs(v_cache, tile0 * te, te, D, sc, n, pq, psc)
                for t in range((n + KT - 1) // KT):
                    _pv_heads_int(v_cache, (tile0 + t) * te, D, min(KT, n - t * KT), pq, t * KT, B, psc, t,
                                  B // KT, acc, heads)
            else:
                for t in range((n + KT - 1) // KT):
                    _pv_heads(v_cache, (tile0 + t) * te, D, min(KT, n - t * KT), sc, t * KT, B, acc, heads)
    _combine_splits(mpart, lpart, apart, nsplit, out)


@njit(inline="always")
def _quantize_q(qs, qi, qsc, qsum):
    """Symmetric int8 per query head: qi = round(qs / qsc), qsc = max|qs| / 127, qsum = sum(qi)."""
    nq, D = qs.shape
    for h in range(nq):
        amax = np.float32(0.0)
        for d in range(D):
            amax = max(amax, abs(qs[h, d]))
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        tot = 0
        for d in range(D):
            c = np.int32(np.floor(qs[h, d] * inv + np.float32(0.5)))
            qi[h, d] = c
            tot += c
        qsc[h] = amax / np.float32(127.0)
        qsum[h] = tot


@njit()
def _combine_splits(m, l, acc, nsplit, out):
    """Flash-decoding merge: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c per head.
    (A separate function: numba treats names shared with a prange body as reductions.)"""
    nq, D = out.shape
    for h in range(nq):
        big = NEG_INF
        for c in range(nsplit):
            big = max(big, m[c, h])
        denom = np.float32(0.0)
        for d in range(D):
            out[h, d] = 0.0
        for c in range(nsplit):
            f = np.exp(m[c, h] - big)
            denom += f * l[c, h]
            for d in range(D):
                out[h, d] += f * acc[c, h, d]
        inv = np.float32(1.0) / denom
        for d in range(D):
            out[h, d] *= inv


class DecodeScratch:
    """Per-model buffers of `attention_decode` for up to `max_len` positions: the scaled query and
    each position range's partial softmax state (max, sum, unnormalised P.V)."""

    def __init__(self, n_heads: int, head_dim: int, max_len: int):
        self.max_len = max_len
        self.qs = np.empty((n_heads, head_dim), np.float32)
        self.qi = np.empty(n_heads * head_dim, np.int8)  # int8 caches: q codes [Nq, D], scales, code sums
        self.qsc = np.empty(n_heads, np.float32)
        self.qsum = np.empty(n_heads, np.int32)
        self.m = np.empty((MAX_SPLIT, n_heads), np.float32)
        self.l = np.empty((MAX_SPLIT, n_heads), np.float32)
        self.acc = np.empty((MAX_SPLIT, n_heads, head_dim), np.float32)
        self.scores = np.empty((MAX_SPLIT, n_heads, DECODE_BLOCK), np.float32)  # one block's, per item
        # int8 caches: the block's probabilities as uint8 codes, with a scale per tile
        self.pq = np.zeros((MAX_SPLIT, n_heads, DECODE_BLOCK), np.uint8)
        self.psc = np.zeros((MAX_SPLIT, n_heads, DECODE_BLOCK // KV_TILE), np.float32)


@njit(inline="always")
def _splits(n_kv_heads, length, threads):
    nblk = -(-length // DECODE_BLOCK)
    return max(1, min(nblk, MAX_SPLIT, -(-threads // n_kv_heads)))


def decode_splits(n_kv_heads: int, length: int, threads: int | None = None) -> int:
    """Position ranges per KV head: enough work items for every thread, each >= 1 block."""
    return _splits(n_kv_heads, length, _jit.get_threads() if threads is None else threads)


def attention_decode(q, k_cache, v_cache, length: int, out, scratch: DecodeScratch) -> np.ndarray:
    """out float32 [Nq, D] = softmax(q K^T * D^-0.5) V over cache positions 0 .. length-1.

    q float32 [Nq, D] (post-RoPE) for the token at position length-1, whose k/v must already be in
    the cache (kv_write). One parallel region; work items are KV head x position range; each K and
    V tile is read once for the R query heads that share it; cost is linear in length.
    """
    nq, d = q.shape
    dc = check_cache(k_cache, v_cache, d)
    nkv, nt, _ = k_cache.shape
    if q.dtype != np.float32 or not q.flags.c_contiguous or nq % nkv:
        raise ValueError(f"attention_decode: q must be C-contiguous float32 [Nq, D], Nq % Nkv == 0; "
                         f"got {q.dtype} {q.shape} for {nkv} KV heads of dim {dc}")
    if not 1 <= length <= min(nt * KV_TILE, scratch.max_len):
        raise ValueError(f"length {length} outside 1..{min(nt * KV_TILE, scratch.max_len)} (cache / scratch size)")
    if out.shape != q.shape or out.dtype != np.float32 or scratch.acc.shape[1:] != (nq, d):
        raise ValueError(f"attention_decode: out {out.shape} / scratch do not match q {q.shape}")
    np.multiply(q, np.float32(d ** -0.5), out=scratch.qs)
    _attention_decode(scratch.qs, scratch.qi, scratch.qsc, scratch.qsum, k_cache, v_cache, length,
                      decode_splits(nkv, length), scratch.m, scratch.l, scratch.acc, scratch.scores, scratch.pq,
                      scratch.psc, out, head_tuple(nq // nkv))
    return out


# ---- one decode step of a layer: RoPE, the cache write and attention in one call -----------------

@njit()
def _decode_step(q, k, v, pos, cos, sin, table_start, k_cache, v_cache, scale, nt, qs, qi, qsc, qsum, m, l, acc,
                 scores, pq, psc, out, heads, slot):
    _apply_rope(q, pos, cos, sin, table_start)
    _apply_rope(k, pos, cos, sin, table_start)
    nkv, ntc, _ = k_cache.shape
    _kv_write(k, v, k_cache.reshape(-1), v_cache.reshape(-1), ntc, slot)
    nq, D = qs.shape
    for h in range(nq):
        for d in range(D):
            qs[h, d] = q[0, h, d] * scale
    _attention_decode(qs, qi, qsc, qsum, k_cache, v_cache, slot + 1, _splits(nkv, slot + 1, nt), m, l, acc, scores,
                      pq, psc, out, heads)


def bind_decode_step(q, k, v, pos, cos, sin, table_start: int, k_caches, v_caches, out, scratch: DecodeScratch):
    """One token's attention in each layer as one call per layer: returns a list of step(slot), one
    per (k_cache, v_cache) pair, each doing in one compiled call what decode did in four:
    apply_rope of q and k [1, N, D] at position pos[0] (rope.apply_rope's tables cos, sin from
    table_start), kv_write of k and v at cache slot `slot`, then attention_decode over slots
    0 .. slot into out [Nq, D]. Everything bound is checked here, once (every layer's cache); the
    slot, and pos[0] (read at each call), must stay inside the cache and the tables: the caller
    checks them once per token (`check_step`)."""
    nq, d = out.shape
    for i, (kc, vc) in enumerate(zip(k_caches, v_caches)):
        check_cache(kc, vc, d)
        if kc.shape != k_caches[0].shape or kc.dtype != k_caches[0].dtype:
            raise ValueError(f"layer {i}'s cache {kc.shape} {kc.dtype} differs from layer 0's {k_caches[0].shape}")
    nkv, ntc, _ = k_caches[0].shape
    for name, a, heads in (("q", q, nq), ("k", k, nkv), ("v", v, nkv)):
        if a.shape != (1, heads, d) or a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"decode step: {name} must be C-contiguous float32 [1, {heads}, {d}], "
                             f"got {a.dtype} {a.shape}")
    check_rope(q, pos, cos, sin)
    check_rope(k, pos, cos, sin)
    if out.dtype != np.float32 or not out.flags.c_contiguous or nq % nkv or scratch.acc.shape[1:] != (nq, d):
        raise ValueError(f"decode step: out {out.dtype} {out.shape} / scratch do not fit {nkv} KV heads of dim {d}")
    if scratch.max_len < ntc * KV_TILE:
        raise ValueError(f"decode step: scratch for {scratch.max_len} positions, cache of {ntc * KV_TILE}")
    s = scratch
    bound = (q, k, v, pos, cos, sin, table_start)
    work = (np.float32(d ** -0.5), _jit.get_threads(), s.qs, s.qi, s.qsc, s.qsum, s.m, s.l, s.acc, s.scores, s.pq,
            s.psc, out, head_tuple(nq // nkv))
    return [partial(_decode_step, *bound, kc, vc, *work) for kc, vc in zip(k_caches, v_caches)]


def check_step(slot: int, position: int, k_cache, cos, table_start: int) -> None:
    """The per-token arguments of bound decode steps: cache slot `slot` inside the cache (and so
    inside the scratch `bind_decode_step` checked), RoPE position inside the tables."""
    if not 0 <= slot < k_cache.shape[1] * KV_TILE:
        raise ValueError(f"cache slot {slot} outside a cache of {k_cache.shape[1] * KV_TILE} positions")
    if not table_start <= position < table_start + cos.shape[0]:
        raise ValueError(f"position {position} outside the rope table [{table_start}, {table_start + cos.shape[0]})")
