"""int8 kernels, and the quantized matvec kernels shared by the int4 and int8 formats.

Legend: T tokens, K input features, O output features, G weight group size, B = K/32 activation
blocks, E experts in a bank, k routed slots per token, I expert intermediate size, H hidden size.

Weights are read exactly as ernie_edge/formats/quant.py stores them (no repacking):
  int8  codes int8 [.., O, K]      scales fp16 [.., O, K/G]
  int4  packed uint8 [.., O, K/2]  scales fp16 [.., O, K/G]   (q4.py)
fp16 scales are passed as their uint16 view (numba cannot take float16 arrays); the wrappers accept
either and take the view themselves. int4 codes may be stored in 4-row tiles instead of by rows
(ernie_edge/formats/layout.py): every kernel takes a `tiled` flag per matrix or bank (bound at
`bind_*`, a runtime value: one compiled kernel reads both, with the same bits); int8 codes are
stored by rows.

Decode (one token): the activation x is quantized to int16 in blocks of 32
(`act_quant.quantize_act`, like llama.cpp's Q8_0 but with 16-bit values) and every weight block is
an exact integer dot (kernels/simd.py). Error bound, per output row o (tested in
tests/test_kernels_q8.py):

    |y_approx[o] - y_exact[o]| <= sum_b  (max_{j in b} |x_j| / 65534) * sum_{j in b} |W[o, j]|

(rounding each x_j to the nearest multiple of d_b = max|x_b|/32767 moves it by at most d_b/2), plus
float32 rounding: 1/258 of the int8 (Q8_0) bound, at the same speed (the matvecs are memory-bound).
The rounding still makes results jump by up to ~d_b * |W| when an input moves by an ulp.

With `act8` (the CPU backend's default decode, cpu_weights.py) int4 weights take x quantized to
int8 instead (`ActScratch.views(.., int8=True)`): the row dots (`simd.rows_dot4`) are then
kernels/dot8.py's, by the buffer's type, with its bound (254 in place of 65534) and the bits of the
prefill tiles. int8 weights keep int16 activations.

Decode kernels are one parallel region each; their rows are shared out in work units that a thread
takes from its own share first, then from the end of the other's (`_next_unit`), and the MoE layer
runs its routed experts and its shared expert together (`experts_pair_*`: two regions, not four).
Each decode wrapper has a `bind_*` twin that checks its arguments once and returns the kernel call
on them (a `functools.partial`): decode calls it every token on the same buffers, without the
checks and views the wrapper would redo (cpu_model.DecodePlan). A bound call reads the arrays it was
given, so it takes them as they are (`act_quant.live`) and never a converted copy.

Prefill (`*_matmul`) is exact float32: weight rows are dequantized into a small fp32 tile that
stays in cache and multiplied with all T tokens by BLAS sgemm (numpy).

All weight, scale and scratch arrays must be C-contiguous (mmapped safetensors views are).
"""

from __future__ import annotations

from functools import partial

import numpy as np
from numba import prange

from . import simd
from ._jit import get_threads, njit, pnjit, single_threaded_blas, worker_pool
from .act_quant import ACT_BLOCK, act_group, check_contig, check_tiles, check_weight, live, log2_sub, quantize_act

# ---- quantized-activation scratch ---------------------------------------------------------------

MAX_UNITS = 1 << 13  # work-unit claim flags per ActScratch (see `_next_unit`; bigger matrices get bigger units)


class ActScratch:
    """Preallocated quantized-activation buffers for up to `rows` vectors of length up to `k`.

    int16 (`views`): xq int16 [rows, k], xd float32 [rows, k/32] (block scales), xs int32
    [rows, k/32] (int4 offset term 8 * sum(xq) per block). int8 (`views(.., int8=True)`, the
    int8-activation decode of kernels/dot8.py): xq int8 [rows, 128 NS] in the span order, xd float32
    / xs int32 [rows, 16 NS] spread to the lanes, NS = ceil(k / 128). Allocate once per shape;
    kernels overwrite them.
    """

    def __init__(self, k: int, rows: int = 1):
        if k % ACT_BLOCK:
            raise ValueError(f"activation length {k} is not a multiple of {ACT_BLOCK}")
        self.k, self.rows = k, rows
        self.xq = np.zeros((rows, k), np.int16)
        self.xd = np.zeros((rows, k // ACT_BLOCK), np.float32)
        self.xs = np.zeros((rows, k // ACT_BLOCK), np.int32)
        ns = -(-k // 128)
        self.xq8 = np.zeros((rows, 128 * ns), np.int8)
        self.xd8 = np.zeros((rows, 16 * ns), np.float32)
        self.xs8 = np.zeros((rows, 16 * ns), np.int32)
        self.claims = np.zeros(MAX_UNITS, np.int64)  # the decode kernels' work-unit claims (`_next_unit`)

    def views(self, k: int, rows: int = 1, int8: bool = False):
        """(xq, xd, xs) C-contiguous views [rows, ..] for a k-long input: int16 as in the class doc,
        or the int8 span buffers when `int8`."""
        if k > self.k or rows > self.rows or k % ACT_BLOCK:
            raise ValueError(f"ActScratch({self.k}, rows={self.rows}) too small for {rows} x {k}")
        if int8:
            ns = -(-k // 128)
            bufs, widths = (self.xq8, self.xd8, self.xs8), (128 * ns, 16 * ns, 16 * ns)
        else:
            bufs, widths = (self.xq, self.xd, self.xs), (k, k // ACT_BLOCK, k // ACT_BLOCK)
        return tuple(b.reshape(-1)[: rows * n].reshape(rows, n) for b, n in zip(bufs, widths))


def int8_acts(act8: bool, bits: int) -> bool:
    """Whether a weight of `bits` takes int8 activations (kernels/dot8.py) when the caller asks for
    them (`act8`): int4 / int5 / int6 do; int8 weights keep int16 activations."""
    return act8 and bits in (4, 5, 6)


@njit(inline="always")
def _silu_mul(g, u):
    return g / (np.float32(1.0) + np.exp(-g)) * u


# ---- the decode kernels' schedule --------------------------------------------------------------
# A kernel's rows are cut into work units of UNIT_QUADS groups of 4 rows. Thread t owns the t-th
# contiguous share of the units and works through it in order (one sequential stream per thread,
# as a static split gives); a thread that finishes its share then takes units from the END of the
# other shares, walking backwards, until it meets their owners. Every unit is claimed exactly once
# (simd.fetch_add on its flag in `claims`), and every output row is computed by one thread in a
# fixed order, so results do not depend on the schedule. A static split made the region wait for
# the slower thread (random experts read from DRAM at unequal speeds, benchmarks/experts_dram.py);
# a fully dynamic, interleaved schedule breaks each thread's sequential stream and its prefetches.

UNIT_QUADS = 8  # groups of 4 rows per work unit (32 rows: 40-80 KiB of int4 / int8 weights)


@njit(inline="always")
def _units(nquads, claims):
    """(quads per unit, number of units) for a kernel of `nquads` groups of 4 rows, with those units'
    claim flags cleared (units grow past UNIT_QUADS so that there are at most len(claims))."""
    uq = max(UNIT_QUADS, -(-nquads // claims.shape[0]))
    n = -(-nquads // uq)
    claims[:n] = 0
    return uq, n


@njit(inline="always")
def _next_unit(claims, t, nt, n, k, pos):
    """Thread t's next work unit of n (see above): returns (unit or -1 when all are done, k, pos).

    State: k = 0 while in its own share, k > 0 while taking from share (t + k) % nt; pos = the unit
    to try next (n: start at the end of that share). Start with k = 0, pos = t * n // nt."""
    while k < nt:
        o = (t + k) % nt
        lo, hi = o * n // nt, (o + 1) * n // nt
        if k == 0:
            if pos < hi and simd.fetch_add(claims, pos, 1) == 0:
                return pos, k, pos + 1
        else:
            if pos >= hi:
                pos = hi - 1
            if pos >= lo and simd.fetch_add(claims, pos, 1) == 0:
                return pos, k, pos - 1
        k, pos = k + 1, n
    return -1, k, pos


# ---- shared decode kernels (w: uint8 packed int4 or int8 codes) ------------------------------

@pnjit()
def _matvec(x, w, s, out, xq, xd, xs, gs, tiled, claims, nt):
    """out [O] = W x, one parallel region of nt threads; rows in work units (`_next_unit`); tiled:
    w is stored in 4-row tiles (ernie_edge/formats/layout.py)."""
    K, O, nsg = x.shape[0], w.shape[0], s.shape[1]
    nb = K // 32
    l2 = log2_sub(nb, nsg)
    quantize_act(x, xq, xd, xs, gs)
    nq = O // 4
    uq, n = _units(nq, claims)
    for t in prange(nt):
        u, k, pos = _next_unit(claims, t, nt, n, 0, t * n // nt)
        while u >= 0:
            for p in range(u * uq, min(nq, (u + 1) * uq)):
                _rows4_into(w, s, out, 4 * p, xq, xd, xs, nb, l2, tiled)
            u, k, pos = _next_unit(claims, t, nt, n, k, pos)
    _rows_tail(w, s, out, xq, xd, xs, nb, l2)


@njit(inline="always")
def _rows4_into(w, s, out, r, xq, xd, xs, nb, l2, tiled):
    kw, nsg = w.shape[1], s.shape[1]
    a, b, c, d = simd.rows_dot4(w, r * kw, kw, s, r * nsg, nsg, xq, xd, xs, nb, l2, tiled)
    out[r], out[r + 1], out[r + 2], out[r + 3] = a, b, c, d


@njit()
def _rows_tail(w, s, out, xq, xd, xs, nb, l2):
    """The rows past the last group of 4 (a matrix stored by rows: tiles have none)."""
    kw, nsg = w.shape[1], s.shape[1]
    for r in range(4 * (out.shape[0] // 4), out.shape[0]):
        out[r] = simd.rows_dot1(w, r * kw, kw, s, r * nsg, nsg, xq, xd, xs, nb, l2, False)


@pnjit()
def _matvec3(x, w0, s0, o0, w1, s1, o1, w2, s2, o2, xq, xd, xs, gs, tiled, claims, nt):
    """Three matvecs of the same x (e.g. q, k, v projections) in one parallel region; tiled: all
    three stored in 4-row tiles."""
    nb = x.shape[0] // 32
    l2 = log2_sub(nb, s0.shape[1])
    quantize_act(x, xq, xd, xs, gs)
    n0, n1, n2 = o0.shape[0] // 4, o1.shape[0] // 4, o2.shape[0] // 4
    nq = n0 + n1 + n2
    uq, n = _units(nq, claims)
    for t in prange(nt):
        u, k, pos = _next_unit(claims, t, nt, n, 0, t * n // nt)
        while u >= 0:
            for p in range(u * uq, min(nq, (u + 1) * uq)):
                if p < n0:
                    _rows4_into(w0, s0, o0, 4 * p, xq, xd, xs, nb, l2, tiled)
                elif p < n0 + n1:
                    _rows4_into(w1, s1, o1, 4 * (p - n0), xq, xd, xs, nb, l2, tiled)
                else:
                    _rows4_into(w2, s2, o2, 4 * (p - n0 - n1), xq, xd, xs, nb, l2, tiled)
            u, k, pos = _next_unit(claims, t, nt, n, k, pos)
    _rows_tail(w0, s0, o0, xq, xd, xs, nb, l2)
    _rows_tail(w1, s1, o1, xq, xd, xs, nb, l2)
    _rows_tail(w2, s2, o2, xq, xd, xs, nb, l2)


@njit(inline="always")
def _gate_up_quad(wg, sg, wu, su, ids, out_h, p, nq, xq, xd, xs, nb, l2, tiled):
    """Work quad p of a bank: slot j = p // nq, rows r..r+3 (r = 4 (p % nq)) of silu(G x) * (U x);
    tiled: the banks are stored in 4-row tiles."""
    inter, kw, nsg = wg.shape[1], wg.shape[2], sg.shape[2]
    j = p // nq
    r = 4 * (p % nq)
    row = ids[j] * inter + r
    g0, g1, g2, g3 = simd.rows_dot4(wg, row * kw, kw, sg, row * nsg, nsg, xq, xd, xs, nb, l2, tiled)
    u0, u1, u2, u3 = simd.rows_dot4(wu, row * kw, kw, su, row * nsg, nsg, xq, xd, xs, nb, l2, tiled)
    out_h[j, r] = _silu_mul(g0, u0)
    out_h[j, r + 1] = _silu_mul(g1, u1)
    out_h[j, r + 2] = _silu_mul(g2, u2)
    out_h[j, r + 3] = _silu_mul(g3, u3)


@njit()
def _gate_up_tail(wg, sg, wu, su, ids, out_h, xq, xd, xs, nb, l2):
    """The last inter % 4 rows of every slot (serial; banks stored by rows: tiles have none)."""
    inter, kw, nsg = wg.shape[1], wg.shape[2], sg.shape[2]
    for j in range(ids.shape[0]):
        for r in range(4 * (inter // 4), inter):
            row = ids[j] * inter + r
            g = simd.rows_dot1(wg, row * kw, kw, sg, row * nsg, nsg, xq, xd, xs, nb, l2, False)
            u = simd.rows_dot1(wu, row * kw, kw, su, row * nsg, nsg, xq, xd, xs, nb, l2, False)
            out_h[j, r] = _silu_mul(g, u)


@pnjit()
def _experts_gate_up_silu(x, wg, sg, wu, su, ids, out_h, xq, xd, xs, gs, tiled, claims, nt):
    """out_h[j, :] = silu(Wg[ids[j]] x) * (Wu[ids[j]] x) for every slot j, one parallel region."""
    nb = x.shape[0] // 32
    l2 = log2_sub(nb, sg.shape[2])
    quantize_act(x, xq, xd, xs, gs)
    nq = wg.shape[1] // 4
    total = ids.shape[0] * nq
    uq, n = _units(total, claims)
    for t in prange(nt):
        u, k, pos = _next_unit(claims, t, nt, n, 0, t * n // nt)
        while u >= 0:
            for p in range(u * uq, min(total, (u + 1) * uq)):
                _gate_up_quad(wg, sg, wu, su, ids, out_h, p, nq, xq, xd, xs, nb, l2, tiled)
            u, k, pos = _next_unit(claims, t, nt, n, k, pos)
    _gate_up_tail(wg, sg, wu, su, ids, out_h, xq, xd, xs, nb, l2)


@njit(inline="always")
def _quantize_two(x, sga, xqa, xda, xsa, gsa, sgb, xqb, xdb, xsb, gsb, quantize_b):
    """x quantized for two banks a and b (for b only when quantize_b): (blocks, a's and b's log2_sub)."""
    nb = x.shape[0] // 32
    quantize_act(x, xqa, xda, xsa, gsa)
    if quantize_b:
        quantize_act(x, xqb, xdb, xsb, gsb)
    return nb, log2_sub(nb, sga.shape[2]), log2_sub(nb, sgb.shape[2])


@pnjit()
def _experts2_gate_up_silu(x, wga, sga, wua, sua, idsa, outa, xqa, xda, xsa, gsa, tiled_a,
                           wgb, sgb, wub, sub, idsb, outb, xqb, xdb, xsb, gsb, tiled_b, quantize_b, claims, nt):
    """`_experts_gate_up_silu` of two banks a and b (e.g. the routed experts and the shared expert,
    int4 and int8) on the same x in ONE parallel region: one stream of work units for both.
    quantize_b False: b's buffers are a's (x quantized the same way for both)."""
    nb, l2a, l2b = _quantize_two(x, sga, xqa, xda, xsa, gsa, sgb, xqb, xdb, xsb, gsb, quantize_b)
    nqa, nqb = wga.shape[1] // 4, wgb.shape[1] // 4
    na = idsa.shape[0] * nqa
    total = na + idsb.shape[0] * nqb
    uq, n = _units(total, claims)
    for t in prange(nt):
        u, k, pos = _next_unit(claims, t, nt, n, 0, t * n // nt)
        while u >= 0:
            for p in range(u * uq, min(total, (u + 1) * uq)):
                if p < na:
                    _gate_up_quad(wga, sga, wua, sua, idsa, outa, p, nqa, xqa, xda, xsa, nb, l2a, tiled_a)
                else:
                    _gate_up_quad(wgb, sgb, wub, sub, idsb, outb, p - na, nqb, xqb, xdb, xsb, nb, l2b, tiled_b)
            u, k, pos = _next_unit(claims, t, nt, n, k, pos)
    _gate_up_tail(wga, sga, wua, sua, idsa, outa, xqa, xda, xsa, nb, l2a)
    _gate_up_tail(wgb, sgb, wub, sub, idsb, outb, xqb, xdb, xsb, nb, l2b)


@njit(inline="always")
def _nth_slot(ids, prev_key):
    """The slot whose key ids[j] * k + j is the smallest above prev_key (ascending expert order)."""
    n = ids.shape[0]
    best, best_key = -1, -1
    for j in range(n):
        key = ids[j] * n + j
        if key > prev_key and (best < 0 or key < best_key):
            best, best_key = j, key
    return best, best_key


@njit(inline="always")
def _down_sum4(wd, sd, ids, weights, r, hq, hd, hs, nb, l2, tiled):
    """Rows r..r+3 of sum over slots, in ascending expert id, of weights[j] * Wd[ids[j]] h[j]."""
    hid, kw, nsg = wd.shape[1], wd.shape[2], sd.shape[2]
    a0 = a1 = a2 = a3 = np.float32(0.0)
    key = -1
    for _ in range(ids.shape[0]):
        j, key = _nth_slot(ids, key)
        row = ids[j] * hid + r
        y0, y1, y2, y3 = simd.rows_dot4(wd, row * kw, kw, sd, row * nsg, nsg, hq[j], hd[j], hs[j], nb, l2, tiled)
        wj = weights[j]
        a0 += wj * y0
        a1 += wj * y1
        a2 += wj * y2
        a3 += wj * y3
    return a0, a1, a2, a3


@njit(inline="always")
def _down_sum1(wd, sd, ids, weights, r, hq, hd, hs, nb, l2):
    """Row r of the same sum (the rows past the last group of 4; banks stored by rows)."""
    hid, kw, nsg = wd.shape[1], wd.shape[2], sd.shape[2]
    acc = np.float32(0.0)
    key = -1
    for _ in range(ids.shape[0]):
        j, key = _nth_slot(ids, key)
        row = ids[j] * hid + r
        acc += weights[j] * simd.rows_dot1(wd, row * kw, kw, sd, row * nsg, nsg, hq[j], hd[j], hs[j], nb, l2, False)
    return acc


@njit(inline="always")
def _quantize_slots(h, hq, hd, hs, gs):
    for j in range(h.shape[0]):
        quantize_act(h[j], hq[j], hd[j], hs[j], gs)


@pnjit()
def _experts_down_weighted(h, wd, sd, ids, weights, out, hq, hd, hs, gs, tiled, claims, nt):
    """out [H] = sum over slots in ascending expert id of weights[j] * Wd[ids[j]] h[j]."""
    nb = h.shape[1] // 32
    l2 = log2_sub(nb, sd.shape[2])
    _quantize_slots(h, hq, hd, hs, gs)
    hid = wd.shape[1]
    nq = hid // 4
    uq, n = _units(nq, claims)
    for t in prange(nt):
        u, k, pos = _next_unit(claims, t, nt, n, 0, t * n // nt)
        while u >= 0:
            for p in range(u * uq, min(nq, (u + 1) * uq)):
                r = 4 * p
                out[r], out[r + 1], out[r + 2], out[r + 3] = _down_sum4(wd, sd, ids, weights, r, hq, hd, hs, nb, l2,
                                                                        tiled)
            u, k, pos = _next_unit(claims, t, nt, n, k, pos)
    for r in range(4 * nq, hid):
        out[r] = _down_sum1(wd, sd, ids, weights, r, hq, hd, hs, nb, l2)


@pnjit()
def _experts2_down_weighted(ha, wda, sda, idsa, wa, hqa, hda, hsa, gsa, tiled_a,
                            hb, wdb, sdb, idsb, wb, hqb, hdb, hsb, gsb, tiled_b, out, claims, nt):
    """out [H] = (bank a's weighted sum) + (bank b's), each as `_experts_down_weighted`, in ONE
    parallel region (the routed experts and the shared expert, added last: docs/ERNIE_SPEC.md P13)."""
    nba, nbb = ha.shape[1] // 32, hb.shape[1] // 32
    l2a, l2b = log2_sub(nba, sda.shape[2]), log2_sub(nbb, sdb.shape[2])
    _quantize_slots(ha, hqa, hda, hsa, gsa)
    _quantize_slots(hb, hqb, hdb, hsb, gsb)
    hid = wda.shape[1]
    nq = hid // 4
    uq, n = _units(nq, claims)
    for t in prange(nt):
        u, k, pos = _next_unit(claims, t, nt, n, 0, t * n // nt)
        while u >= 0:
            for p in range(u * uq, min(nq, (u + 1) * uq)):
                r = 4 * p
                a0, a1, a2, a3 = _down_sum4(wda, sda, idsa, wa, r, hqa, hda, hsa, nba, l2a, tiled_a)
                b0, b1, b2, b3 = _down_sum4(wdb, sdb, idsb, wb, r, hqb, hdb, hsb, nbb, l2b, tiled_b)
                out[r], out[r + 1], out[r + 2], out[r + 3] = a0 + b0, a1 + b1, a2 + b2, a3 + b3
            u, k, pos = _next_unit(claims, t, nt, n, k, pos)
    for r in range(4 * nq, hid):
        out[r] = (_down_sum1(wda, sda, idsa, wa, r, hqa, hda, hsa, nba, l2a)
                  + _down_sum1(wdb, sdb, idsb, wb, r, hqb, hdb, hsb, nbb, l2b))


# ---- wrappers (bits 4: packed int4 [.., O, K/2] uint8; bits 8: int8 codes [.., O, K]) --------

def matvec(x, w, s, out, act: ActScratch, bits: int, act8: bool = False, tiled: bool = False) -> np.ndarray:
    """out float32 [O] = W x; x float32 [K]; w packed uint8 [O, K/2] (bits=4) or int8 codes [O, K]
    (bits=8), scales fp16 [O, K/G].

    Decode path: x is quantized to int16 per block of 32 into `act` (ActScratch(K) or larger), so
    the result carries the activation error bound in the module doc; with act8 and int4 weights to
    int8 (kernels/dot8.py's arithmetic and bound). One parallel region. tiled: w is stored in
    4-row tiles (ernie_edge/formats/layout.py).
    """
    bind_matvec(np.ascontiguousarray(x, np.float32), w, s, out, act, bits, act8, tiled)()
    return out


def bind_matvec(x, w, s, out, act: ActScratch, bits: int, act8: bool = False, tiled: bool = False):
    """`matvec` as a call to repeat: x float32 [K] and out are bound, not copied."""
    k = x.shape[0]
    s = check_weight(w, s, k, bits, ndim=2)
    check_tiles(w, k, tiled)
    if out.shape != (w.shape[0],) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 [{w.shape[0]}], got {out.dtype} {out.shape}")
    xq, xd, xs = act.views(k, int8=int8_acts(act8, bits))
    return partial(_matvec, live(x, np.float32, "x"), w, s, out, xq[0], xd[0], xs[0], act_group(k, s, bits),
                   tiled, act.claims, get_threads())


def matvec3(x, mats, act: ActScratch, bits: int, act8: bool = False, tiled: bool = False):
    """Three matvecs of one x in ONE parallel region (q, k and v projections): mats is three
    (w, scales, out) as `matvec` takes them, with the same input length, group size and layout
    (tiled: all three in 4-row tiles). Returns the three outs."""
    bind_matvec3(np.ascontiguousarray(x, np.float32), mats, act, bits, act8, tiled)()
    return tuple(out for _, _, out in mats)


def bind_matvec3(x, mats, act: ActScratch, bits: int, act8: bool = False, tiled: bool = False):
    """`matvec3` as a call to repeat: x float32 [K] and the outs are bound, not copied."""
    k = x.shape[0]
    if len(mats) != 3:
        raise ValueError(f"matvec3 takes exactly three (weight, scales, out) triples, got {len(mats)}")
    args = []
    for i, (w, s, out) in enumerate(mats):
        s = check_weight(w, s, k, bits, f"weight {i}", ndim=2)
        check_tiles(w, k, tiled, f"weight {i}")
        if out.shape != (w.shape[0],) or out.dtype != np.float32:
            raise ValueError(f"out {i} must be float32 [{w.shape[0]}], got {out.dtype} {out.shape}")
        args += [w, s, out]
    if len({a.shape[-1] for a in args[1::3]}) != 1:
        raise ValueError("matvec3: the three weights must share one group size")
    xq, xd, xs = act.views(k, int8=int8_acts(act8, bits))
    return partial(_matvec3, live(x, np.float32, "x"), *args, xq[0], xd[0], xs[0], act_group(k, args[1], bits),
                   tiled, act.claims, get_threads())


def _check_gate_up(x, wg, sg, wu, su, ids, out_h, bits: int, what: str = "", tiled: bool = False):
    k = x.shape[0]
    sg = check_weight(wg, sg, k, bits, f"{what}gate bank", ndim=3)
    su = check_weight(wu, su, k, bits, f"{what}up bank", ndim=3)
    check_tiles(wg, k, tiled, f"{what}gate bank")
    if wg.shape != wu.shape or wg.ndim != 3:
        raise ValueError(f"{what}gate bank {wg.shape} and up bank {wu.shape} must both be [E, I, K']")
    ids = _ids_buffer(ids, what)
    if out_h.shape != (ids.shape[0], wg.shape[1]) or out_h.dtype != np.float32:
        raise ValueError(f"{what}out_h must be float32 [{ids.shape[0]}, {wg.shape[1]}], got {out_h.dtype} {out_h.shape}")
    check_contig(out_h=out_h)
    return sg, su, ids


def _check_down(h, wd, sd, ids, weights, out, bits: int, what: str = "", tiled: bool = False):
    nslot, inter = h.shape
    sd = check_weight(wd, sd, inter, bits, f"{what}down bank", ndim=3)
    check_tiles(wd, inter, tiled, f"{what}down bank")
    ids = _ids_buffer(ids, what)
    if ids.shape[0] != nslot or weights.shape != (nslot,):
        raise ValueError(f"{what}h {h.shape}, expert_ids {ids.shape} and weights {weights.shape} disagree")
    if out.shape != (wd.shape[1],) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 [{wd.shape[1]}], got {out.dtype} {out.shape}")
    return sd, ids, live(h, np.float32, f"{what}h"), live(weights, np.float32, f"{what}weights")


def experts_gate_up_silu(x, wg, sg, wu, su, ids, out_h, act: ActScratch, bits: int,
                         act8: bool = False, tiled: bool = False) -> np.ndarray:
    """out_h float32 [k, I] = silu(G_e x) * (U_e x), e = ids[j], for all k slots in ONE parallel
    region. Banks: packed uint8 [E, I, K/2] (bits=4) or int8 [E, I, K] (bits=8), scales fp16
    [E, I, K/G], each expert in 4-row tiles where `tiled`; x float32 [K]; act = ActScratch(K) or
    larger."""
    bind_experts_gate_up_silu(np.ascontiguousarray(x, np.float32), wg, sg, wu, su, _check_ids(ids, wg.shape[0]),
                              out_h, act, bits, act8, tiled)()
    return out_h


def bind_experts_gate_up_silu(x, wg, sg, wu, su, ids, out_h, act: ActScratch, bits: int, act8: bool = False,
                              tiled: bool = False):
    """`experts_gate_up_silu` as a call to repeat: x, ids (int64, read at each call) and out_h are bound."""
    sg, su, ids = _check_gate_up(x, wg, sg, wu, su, ids, out_h, bits, tiled=tiled)
    k = x.shape[0]
    xq, xd, xs = act.views(k, int8=int8_acts(act8, bits))
    return partial(_experts_gate_up_silu, live(x, np.float32, "x"), wg, sg, wu, su, ids, out_h, xq[0], xd[0],
                   xs[0], act_group(k, sg, bits), tiled, act.claims, get_threads())


def experts_down_weighted(h, wd, sd, ids, weights, out, act: ActScratch, bits: int,
                          act8: bool = False, tiled: bool = False) -> np.ndarray:
    """out float32 [H] = sum_j weights[j] * D_e h[j], e = ids[j], summed in ascending expert id
    (docs/ERNIE_SPEC.md P13) starting from 0; overwrites out. h float32 [k, I]; bank uint8
    [E, H, I/2] (bits=4) or int8 [E, H, I] (bits=8), scales fp16 [E, H, I/G]; weights float32 [k];
    act = ActScratch(I, rows=k) or larger; tiled: the bank's experts in 4-row tiles."""
    bind_experts_down_weighted(np.ascontiguousarray(h, np.float32), wd, sd, _check_ids(ids, wd.shape[0]),
                               np.ascontiguousarray(weights, np.float32), out, act, bits, act8, tiled)()
    return out


def bind_experts_down_weighted(h, wd, sd, ids, weights, out, act: ActScratch, bits: int, act8: bool = False,
                               tiled: bool = False):
    """`experts_down_weighted` as a call to repeat: h, ids, weights and out are bound, not copied."""
    sd, ids, h, weights = _check_down(h, wd, sd, ids, weights, out, bits, tiled=tiled)
    hq, hd, hs = act.views(h.shape[1], h.shape[0], int8=int8_acts(act8, bits))
    return partial(_experts_down_weighted, h, wd, sd, ids, weights, out, hq, hd, hs, act_group(h.shape[1], sd, bits),
                   tiled, act.claims, get_threads())


def experts_pair_gate_up_silu(x, a, b, act_a: ActScratch, act_b: ActScratch, act8: bool = False):
    """Gate, up and SwiGLU of two expert banks on the same x in ONE parallel region.

    a, b: (gate, gate_scales, up, up_scales, expert_ids, out_h, bits[, tiled]) each, as
    `experts_gate_up_silu` takes them (bits 4 or 8; the banks may differ: routed int4 experts
    and an int8 shared expert as a one-expert bank). Results are bit-identical to two separate
    calls. Returns (out_h of a, out_h of b)."""
    a, b = checked_gate_up_bank(a), checked_gate_up_bank(b)
    bind_experts_pair_gate_up_silu(np.ascontiguousarray(x, np.float32), a, b, act_a, act_b, act8)()
    return a[5], b[5]


def bind_experts_pair_gate_up_silu(x, a, b, act_a: ActScratch, act_b: ActScratch, act8: bool = False):
    """`experts_pair_gate_up_silu` as a call to repeat: x, the ids and the outs are bound."""
    k = x.shape[0]
    x = live(x, np.float32, "x")
    args, rounding = [], None
    for bank, act, what in ((a, act_a, "bank a: "), (b, act_b, "bank b: ")):
        wg, sg, wu, su, ids, out_h, bits, tiled = _with_layout(bank, 7)
        sg, su, ids = _check_gate_up(x, wg, sg, wu, su, ids, out_h, bits, what, tiled)
        gs, int8 = act_group(k, sg, bits), int8_acts(act8, bits)
        quantize_b = (gs, int8) != rounding  # (bank a's is always quantized)
        if not quantize_b:
            act = act_a  # both banks take x quantized the same way: quantize it once
        rounding = gs, int8
        xq, xd, xs = act.views(k, int8=int8)
        args += [wg, sg, wu, su, ids, out_h, xq[0], xd[0], xs[0], gs, tiled]
    return partial(_experts2_gate_up_silu, x, *args, quantize_b, act_a.claims, get_threads())


def experts_pair_down_weighted(a, b, out, act_a: ActScratch, act_b: ActScratch, act8: bool = False) -> np.ndarray:
    """out [H] = (weighted down projection of bank a) + (that of bank b), in ONE parallel region.

    a, b: (h, down, down_scales, expert_ids, weights, bits[, tiled]) each, as
    `experts_down_weighted` takes them. Bit-identical to computing each sum on its own and adding b's to a's."""
    bind_experts_pair_down_weighted(checked_down_bank(a), checked_down_bank(b), out, act_a, act_b, act8)()
    return out


def bind_experts_pair_down_weighted(a, b, out, act_a: ActScratch, act_b: ActScratch, act8: bool = False):
    """`experts_pair_down_weighted` as a call to repeat: each bank's h, ids and weights, and out, are bound."""
    args = []
    for bank, act, what in ((a, act_a, "bank a: "), (b, act_b, "bank b: ")):
        h, wd, sd, ids, weights, bits, tiled = _with_layout(bank, 6)
        sd, ids, h, weights = _check_down(h, wd, sd, ids, weights, out, bits, what, tiled)
        hq, hd, hs = act.views(h.shape[1], h.shape[0], int8=int8_acts(act8, bits))
        args += [h, wd, sd, ids, weights, hq, hd, hs, act_group(h.shape[1], sd, bits), tiled]
    if a[1].shape[1] != b[1].shape[1]:
        raise ValueError(f"bank a's output size {a[1].shape[1]} differs from bank b's {b[1].shape[1]}")
    return partial(_experts2_down_weighted, *args, out, act_a.claims, get_threads())


def _check_ids(ids, n_experts: int) -> np.ndarray:
    """The expert ids of a one-shot call, as int64, each checked to be in [0, n_experts)."""
    ids = np.ascontiguousarray(ids, np.int64)
    if ids.ndim != 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= n_experts:
        raise ValueError(f"expert_ids {ids} must be a non-empty 1-D array of ids in [0, {n_experts})")
    return ids


def _with_layout(bank, n: int) -> tuple:
    """A bank tuple of n fields, or n + 1 with its layout flag last (tiled), as n + 1 fields."""
    if len(bank) not in (n, n + 1):
        raise ValueError(f"a bank is {n} fields and an optional tiled flag, got {len(bank)}")
    return (*bank, False) if len(bank) == n else tuple(bank)


def checked_gate_up_bank(bank):
    """A one-shot call's (gate, gate_scales, up, up_scales, expert_ids, out_h, bits) with its ids
    checked (`_check_ids`), ready to bind."""
    return (*bank[:4], _check_ids(bank[4], bank[0].shape[0]), *bank[5:])


def checked_down_bank(bank):
    """A one-shot call's (h, down, down_scales, expert_ids, weights, bits[, tiled]) with h and
    weights as float32 and its ids checked, ready to bind."""
    h, wd, sd, ids, weights, bits, tiled = _with_layout(bank, 6)
    return (np.ascontiguousarray(h, np.float32), wd, sd, _check_ids(ids, wd.shape[0]),
            np.ascontiguousarray(weights, np.float32), bits, tiled)


def _ids_buffer(ids, what: str = "") -> np.ndarray:
    """The ids buffer of a bound call: read at each call (the router writes it), so only its type and
    shape are checked here; the one-shot wrappers check the values (`_check_ids`)."""
    ids = live(ids, np.int64, f"{what}expert_ids")
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"{what}expert_ids must be a non-empty 1-D array, got shape {ids.shape}")
    return ids


# ---- int8 public API --------------------------------------------------------------------------

def q8_matvec(x, codes, scales, out, act: ActScratch) -> np.ndarray:
    """`matvec` of int8 W (codes int8 [O, K], scales fp16 [O, K/G]): out float32 [O] = W x."""
    return matvec(x, codes, scales, out, act, bits=8)


def q8_matvec3(x, wq, sq, out_q, wk, sk, out_k, wv, sv, out_v, act: ActScratch):
    """`matvec3` of three int8 weights (q, k and v projections): out_* = W_* x."""
    return matvec3(x, [(wq, sq, out_q), (wk, sk, out_k), (wv, sv, out_v)], act, 8)


def q8_experts_gate_up_silu(x, gate_codes, gate_scales, up_codes, up_scales, expert_ids, out_h,
                            act: ActScratch) -> np.ndarray:
    """out_h [k, I] = silu(G_e x) * (U_e x) for e = expert_ids[j]; banks int8 [E, I, K]."""
    return experts_gate_up_silu(x, gate_codes, gate_scales, up_codes, up_scales, expert_ids, out_h, act, 8)


def q8_experts_down_weighted(h, down_codes, down_scales, expert_ids, weights, out,
                             act: ActScratch) -> np.ndarray:
    """out [H] = sum_j weights[j] * D_e h[j] in ascending expert id; bank int8 [E, H, I]."""
    return experts_down_weighted(h, down_codes, down_scales, expert_ids, weights, out, act, 8)


# ---- prefill: dequantize row tiles + BLAS ------------------------------------------------------

@njit(inline="always")
def row_start(r, kw, span_bytes, tiled):
    """Byte offset of row r's first block in a matrix of rows of kw bytes: r kw by rows; in 4-row
    tiles (ernie_edge/formats/layout.py) its tile's start plus r % 4 spans (span_bytes = 4 blocks)."""
    if tiled:
        return (r - r % 4) * kw + (r % 4) * span_bytes
    return r * kw


@njit()
def _q8_dequant_rows(codes, s, r0, tile, tiled):
    """tile[i, :] = dequantized row r0 + i of int8 codes [O, K] (float32, exact). Serial, see q4.
    int8 codes are stored by rows (tiled is False)."""
    n, K = tile.shape
    nsg = s.shape[1]
    for i in range(n):
        simd.q8_dequant_row(codes, (r0 + i) * K, s, (r0 + i) * nsg, K // nsg, tile, i * K, K, False)


def tiled_matmul(X, w, s, out, dequant_rows, tile_bytes: int = 1 << 21, parallel: bool = True,
                 tiled: bool = False) -> np.ndarray:
    """out [T, O] = X [T, K] W^T, dequantizing W a tile of rows at a time (each row read once);
    dequant_rows(w, s, r0, tile, tiled), tiled: w is stored in 4-row tiles.

    The tiles are shared out dynamically to get_threads() workers; each dequantizes its tile
    (numba, no GIL) and multiplies it with all T tokens by single-threaded sgemm (no GIL either).
    """
    T, K = X.shape
    O = w.shape[0]
    rows = max(8, min(O, tile_bytes // (4 * K)))
    starts = list(range(0, O, rows))
    nworkers = min(get_threads(), len(starts)) if parallel else 1
    if nworkers <= 1:
        _matmul_tiles(X, w, s, out, dequant_rows, rows, iter(starts), tiled)
        return out
    single_threaded_blas()
    todo = iter(starts)  # next() on a list iterator is atomic under the GIL
    jobs = [worker_pool().submit(_matmul_tiles, X, w, s, out, dequant_rows, rows, todo, tiled)
            for _ in range(nworkers)]
    for job in jobs:
        job.result()
    return out


def _matmul_tiles(X, w, s, out, dequant_rows, rows, todo, tiled) -> None:
    T, K = X.shape
    tile = np.empty((rows, K), np.float32)
    part = np.empty(T * rows, np.float32)
    for r0 in todo:
        n = min(rows, w.shape[0] - r0)
        dequant_rows(w, s, r0, tile[:n], tiled)
        y = part[: T * n].reshape(T, n)
        np.matmul(X, tile[:n].T, out=y)
        out[:, r0:r0 + n] = y


def check_matmul(X, w, s, out, bits: int):
    """Check a prefill matmul's arguments; returns the scales as uint16."""
    if X.ndim != 2 or X.dtype != np.float32:
        raise ValueError(f"X must be float32 [T, K], got {X.dtype} {X.shape}")
    s = check_weight(w, s, X.shape[1], bits, ndim=2)
    if out.shape != (X.shape[0], w.shape[0]) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 [{X.shape[0]}, {w.shape[0]}], got {out.dtype} {out.shape}")
    return s


def q8_matmul(X, codes, scales, out) -> np.ndarray:
    """out float32 [T, O] = X W^T for int8 W [O, K]; exact float32 (dequantized tiles + sgemm)."""
    s = check_matmul(X, codes, scales, out, 8)
    return tiled_matmul(X, codes, s, out, _q8_dequant_rows)
