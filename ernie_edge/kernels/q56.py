"""int5 / int6 ("int{b}-sym-g{G}", formats q5 / q6) kernels: the decode matvec and its fused forms
(q/k/v in one region; an MLP's gate, up and SwiGLU; a MoE layer's q4 / q8 routed experts paired
with a q5 / q6 shared expert), a small-batch matmul and the exact float32 prefill matmul.

Legend: T tokens, K input features, O output features, G weight group size, B = K/32 activation
blocks, b bits per code (5 or 6), h = b - 4 high bits per code.

Layout (ernie_edge/formats/quant.py): packed uint8 [O, K*b/8]; each block of 32 codes takes 4b
bytes: 16 bytes of low nibbles in the q4 g32 order (byte j: u_j & 15 | (u_{j+16} & 15) << 4), then
4h bytes of high bits (byte i holds u_{i+4h t} >> 4 at bits h t, t = 0 .. 8/h - 1), u = code + 2^(b-1);
scales fp16 [O, K/G] (the float16 array or its uint16 view). The codes may be stored in 4-row tiles
(ernie_edge/formats/layout.py): every kernel takes a `tiled` flag, read at run time (the same
compiled kernel and bits for both layouts).

Decode: as the int4 / int8 matvecs (kernels/q8.py), x is quantized to int16 per block of 32
(`act_quant.quantize_act`, natural block order) and each 32-block of a row is an exact integer dot:
the block's codes are rebuilt as int16 vectors (low nibbles OR the high bits moved to bit 4, minus
2^(b-1)) and multiplied with vpdpwssd / vpmaddwd / generic LLVM vector IR (kernels/simd.py's
`_dot_i16`, the SIMD path of kernels/_jit.py). Every i32 lane sums 4 products of |code| <= 32 and
|xq| <= 32767: below 2^24, so the conversion to float is exact on every path. The error bound is the
decode matvec's (kernels/q8.py). Rows are shared out in q8.py's work units, and the fused kernels
reuse q8.py's routed-expert quads, so a layer takes as few parallel regions as with q4 / q8 only;
each fused result equals the separate calls' (bit for bit but for the last sum of `pair_down_weighted`,
which fastmath may reassociate). As in q8.py, each decode wrapper has a `bind_*` twin: the checked
kernel call on bound buffers, which decode repeats every token. With `act8`, x is quantized to int8
and the row dots are kernels/dot8.py's (`_dot4` picks by the activations' type).

Prefill: `matmul_small` is the decode arithmetic for small batches in kernels/qbatch.py's register
tiles (4 rows x up to 4 tokens: each block read once and widened once per tile); `matmul_exact` is
exact float32: rows dequantized into a tile (vector code, as q4's), multiplied by sgemm
(q8.tiled_matmul).

All weight, scale and scratch arrays must be C-contiguous (mmapped safetensors views are).
"""

from __future__ import annotations

from functools import partial

import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import dot8, ir
from ._jit import get_threads, njit, pnjit
from . import q8
from .codes import block_i16, block_offset
from .act_quant import ACT_BLOCK, act_group, as_u16, check_contig, check_tiles, live, log2_sub, quantize_act
from .q8 import (ActScratch, _down_sum1, _down_sum4, _gate_up_quad, _gate_up_tail, _next_unit, _quantize_slots,
                 _silu_mul, _units, row_start, tiled_matmul)
from .qbatch import CHUNK_ROWS, TILE_TOKENS, _quantize_rows, make_tile
from .simd import _dot_i16, _prefetch_ahead
from .ir import F32, F32x8, I8, I16, I16x16, I32x8, VectorType

BITS = (5, 6)


def _rows_dot(context, builder, sig, args, nrows, bits):
    """sum_b ws[o, b >> log2sub] * xd[b] * sum_j code[o, b, j] * xq[b, j] for nrows rows.

    args: (w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled) as kernels/simd.py's
    row dots (w uint8, woff / wstride in bytes; s the uint16 scales; xs not read: the codes are
    made signed here; tiled: the 4 rows are the 4-row tile at woff, `codes.block_offset`)."""
    (w, woff, wstride, s, soff, sstride, xq, xd, _, nblk, log2sub, tiled) = args
    wty, _, _, sty, _, _, xqty, xdty, _, _, _, _ = sig.args
    wptr = ir.data_ptr(context, builder, wty, w, I8)
    sptr = ir.data_ptr(context, builder, sty, s, I16)
    xqptr = ir.data_ptr(context, builder, xqty, xq, I16)
    xdptr = ir.data_ptr(context, builder, xdty, xd, F32)
    accs = [cgutils.alloca_once_value(builder, ir.Constant(F32x8, [0.0] * 8)) for _ in range(nrows)]
    izero8 = ir.Constant(I32x8, [0] * 8)
    block_bytes = 4 * bits
    with cgutils.for_range(builder, nblk) as loop:
        i = loop.index
        _prefetch_ahead(builder, wptr, woff, wstride, i, nrows, block_bytes)
        x0 = builder.mul(i, ir.c64(32))
        xlo = ir.load_vec(builder, xqptr, x0, I16x16)
        xhi = ir.load_vec(builder, xqptr, builder.add(x0, ir.c64(16)), I16x16)
        xdi = builder.load(builder.gep(xdptr, [i]))
        g = builder.lshr(i, log2sub)
        for r in range(nrows):
            rr = ir.c64(r)
            wo = block_offset(builder, woff, wstride, r, i, bits, tiled)
            srow = builder.add(soff, builder.mul(rr, sstride))
            ws = ir.f16_to_f32(builder, builder.load(builder.gep(sptr, [builder.add(srow, g)])))
            wlo, whi = block_i16(builder, wptr, wo, bits)
            f = builder.sitofp(_dot_i16(builder, wlo, whi, xlo, xhi, izero8), F32x8)
            dv = ir.splat(builder, builder.fmul(ws, xdi), F32x8)
            acc = builder.load(accs[r])
            builder.store(builder.fadd(acc, builder.fmul(f, dv, flags=("contract",)), flags=("contract",)), accs[r])
    return [ir.hsum8(builder, builder.load(accs[r])) for r in range(nrows)]


# (w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled): dot1 -> float32, dot4 -> rows r..r+3
q5_dot1, q5_dot4 = (ir.row_dot_intrinsic(n, partial(_rows_dot, nrows=n, bits=5)) for n in (1, 4))
q6_dot1, q6_dot4 = (ir.row_dot_intrinsic(n, partial(_rows_dot, nrows=n, bits=6)) for n in (1, 4))


def _dot4(bits, w, woff, wstride, s, soff, sstride, xq, xd, xs, nb, l2, tiled):
    """Rows r .. r + 3 of an int5 / int6 matrix (bits 5 or 6) dotted with one token's activations:
    int16 (this module's dots; xs unused) or int8 (kernels/dot8.py's, by the type of xq); tiled:
    the 4-row tile at byte woff."""
    raise NotImplementedError("only callable from numba-compiled code")


def _dot1(bits, w, woff, wstride, s, soff, sstride, xq, xd, xs, nb, l2, tiled):
    """One row, as `_dot4`."""
    raise NotImplementedError("only callable from numba-compiled code")


def _by_bits(xq, int8_dots, int16_dots):
    """The implementation of a row-dot stub: the (int5, int6) pair of intrinsics for xq's type,
    picked by `bits` at run time."""
    q5, q6 = int8_dots if xq.dtype == types.int8 else int16_dots

    def dot(bits, w, woff, wstride, s, soff, sstride, xq, xd, xs, nb, l2, tiled):
        if bits == 5:
            return q5(w, woff, wstride, s, soff, sstride, xq, xd, xs, nb, l2, tiled)
        return q6(w, woff, wstride, s, soff, sstride, xq, xd, xs, nb, l2, tiled)
    return dot


@overload(_dot4, inline="always")
def _dot4_impl(bits, w, woff, wstride, s, soff, sstride, xq, xd, xs, nb, l2, tiled):
    return _by_bits(xq, (dot8.q5_row4, dot8.q6_row4), (q5_dot4, q6_dot4))


@overload(_dot1, inline="always")
def _dot1_impl(bits, w, woff, wstride, s, soff, sstride, xq, xd, xs, nb, l2, tiled):
    return _by_bits(xq, (dot8.q5_row1, dot8.q6_row1), (q5_dot1, q6_dot1))


# ---- decode -----------------------------------------------------------------------------------------

@pnjit()
def _matvec(x, w, s, out, xq, xd, xs, bits, tiled, claims, nt):
    """out [O] = W x in one parallel region; rows in q8.py's work units of 4-row quads. tiled: w is
    stored in 4-row tiles (ernie_edge/formats/layout.py)."""
    kw, nsg = w.shape[1], s.shape[1]
    nb = x.shape[0] // 32
    l2 = log2_sub(nb, nsg)
    quantize_act(x, xq, xd, xs, 32)
    nq = out.shape[0] // 4
    uq, n = _units(nq, claims)
    for t in prange(nt):
        u, k, pos = _next_unit(claims, t, nt, n, 0, t * n // nt)
        while u >= 0:
            for p in range(u * uq, min(nq, (u + 1) * uq)):
                r = 4 * p
                a, b, c, d = _dot4(bits, w, r * kw, kw, s, r * nsg, nsg, xq, xd, xs, nb, l2, tiled)
                out[r], out[r + 1], out[r + 2], out[r + 3] = a, b, c, d
            u, k, pos = _next_unit(claims, t, nt, n, k, pos)
    for r in range(4 * nq, out.shape[0]):  # none when tiled
        out[r] = _dot1(bits, w, r * kw, kw, s, r * nsg, nsg, xq, xd, xs, nb, l2, False)


def check_weight(w: np.ndarray, s: np.ndarray, k: int, bits: int, what: str = "weight") -> np.ndarray:
    """Check an int5 / int6 matrix w [O, K*b/8] (uint8) and its scales s [O, K/G] for an input of
    length k; returns s as uint16."""
    if bits not in BITS:
        raise ValueError(f"bits must be 5 or 6, got {bits}")
    if w.dtype != np.uint8 or w.ndim != 2:
        raise ValueError(f"{what}: int{bits} weights must be uint8 [O, K*{bits}/8], got {w.dtype} {w.shape}")
    s = as_u16(s)
    if k % ACT_BLOCK or w.shape[1] != k * bits // 8:
        raise ValueError(f"{what}: shape {w.shape} does not take an input of length {k} (int{bits})")
    if s.ndim != 2 or s.shape[0] != w.shape[0] or s.shape[1] == 0 or k % s.shape[1] or k // s.shape[1] not in (32, 64, 128):
        raise ValueError(f"{what}: scales {s.shape} do not match weights {w.shape} (group size 32, 64 or 128)")
    check_contig(**{what: w, f"{what} scales": s})
    return s


def matvec(x, w, scales, out, act: ActScratch, bits: int, act8: bool = False, tiled: bool = False) -> np.ndarray:
    """out float32 [O] = W x; x float32 [K]; w packed int5 / int6 [O, K*b/8]; act = ActScratch(K) or
    larger. Decode path: x quantized to int16 per block of 32 (the error bound of kernels/q8.py), or
    to int8 with act8 (kernels/dot8.py)."""
    bind_matvec(np.ascontiguousarray(x, np.float32), w, scales, out, act, bits, act8, tiled)()
    return out


def bind_matvec(x, w, scales, out, act: ActScratch, bits: int, act8: bool = False, tiled: bool = False):
    """`matvec` as a call to repeat: x float32 [K] and out are bound, not copied. tiled: w is a
    matrix stored in 4-row tiles (ernie_edge/formats/layout.py; the same bits)."""
    k = x.shape[0]
    s = check_weight(w, scales, k, bits)
    if out.shape != (w.shape[0],) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 [{w.shape[0]}], got {out.dtype} {out.shape}")
    check_tiles(w, k, tiled)
    xq, xd, xs = act.views(k, int8=act8)
    return partial(_matvec, live(x, np.float32, "x"), w, s, out, xq[0], xd[0], xs[0], bits, tiled, act.claims,
                   get_threads())


# ---- fused decode kernels: fewer parallel regions per token (as kernels/q8.py's) ------------------

@njit(inline="always")
def _rows4(bits, w, s, out, r, xq, xd, xs, nb, l2, tiled):
    kw, nsg = w.shape[1], s.shape[1]
    a, b, c, d = _dot4(bits, w, r * kw, kw, s, r * nsg, nsg, xq, xd, xs, nb, l2, tiled)
    out[r], out[r + 1], out[r + 2], out[r + 3] = a, b, c, d


@njit()
def _rows_tail(bits, w, s, out, xq, xd, xs, nb, l2):
    kw, nsg = w.shape[1], s.shape[1]
    for r in range(4 * (out.shape[0] // 4), out.shape[0]):
        out[r] = _dot1(bits, w, r * kw, kw, s, r * nsg, nsg, xq, xd, xs, nb, l2, False)


@pnjit()
def _matvec3(x, w0, s0, o0, w1, s1, o1, w2, s2, o2, xq, xd, xs, bits, tiled, claims, nt):
    """Three matvecs of the same x (the q, k and v projections) in one parallel region; tiled: all
    three in 4-row tiles."""
    nb = x.shape[0] // 32
    quantize_act(x, xq, xd, xs, 32)
    l0, l1, l2 = log2_sub(nb, s0.shape[1]), log2_sub(nb, s1.shape[1]), log2_sub(nb, s2.shape[1])
    n0, n1 = o0.shape[0] // 4, o1.shape[0] // 4
    nq = n0 + n1 + o2.shape[0] // 4
    uq, n = _units(nq, claims)
    for t in prange(nt):
        u, k, pos = _next_unit(claims, t, nt, n, 0, t * n // nt)
        while u >= 0:
            for p in range(u * uq, min(nq, (u + 1) * uq)):
                if p < n0:
                    _rows4(bits, w0, s0, o0, 4 * p, xq, xd, xs, nb, l0, tiled)
                elif p < n0 + n1:
                    _rows4(bits, w1, s1, o1, 4 * (p - n0), xq, xd, xs, nb, l1, tiled)
                else:
                    _rows4(bits, w2, s2, o2, 4 * (p - n0 - n1), xq, xd, xs, nb, l2, tiled)
            u, k, pos = _next_unit(claims, t, nt, n, k, pos)
    _rows_tail(bits, w0, s0, o0, xq, xd, xs, nb, l0)
    _rows_tail(bits, w1, s1, o1, xq, xd, xs, nb, l1)
    _rows_tail(bits, w2, s2, o2, xq, xd, xs, nb, l2)


@njit(inline="always")
def _gate_up_rows(bits, wg, sg, wu, su, out, r, xq, xd, xs, nb, lg, lu, tiled):
    """out[r .. r+3] = silu(G x) * (U x) for rows r .. r+3 (r + 4 <= rows) or the single rows
    from r (stored by rows: tiles have no such rows)."""
    kw, ng, nu = wg.shape[1], sg.shape[1], su.shape[1]
    if r + 4 <= out.shape[0]:
        g0, g1, g2, g3 = _dot4(bits, wg, r * kw, kw, sg, r * ng, ng, xq, xd, xs, nb, lg, tiled)
        u0, u1, u2, u3 = _dot4(bits, wu, r * kw, kw, su, r * nu, nu, xq, xd, xs, nb, lu, tiled)
        out[r], out[r + 1] = _silu_mul(g0, u0), _silu_mul(g1, u1)
        out[r + 2], out[r + 3] = _silu_mul(g2, u2), _silu_mul(g3, u3)
    else:
        for q in range(r, out.shape[0]):
            g = _dot1(bits, wg, q * kw, kw, sg, q * ng, ng, xq, xd, xs, nb, lg, False)
            out[q] = _silu_mul(g, _dot1(bits, wu, q * kw, kw, su, q * nu, nu, xq, xd, xs, nb, lu, False))


@pnjit()
def _gate_up_silu(x, wg, sg, wu, su, out, xq, xd, xs, bits, tiled, claims, nt):
    """out [S] = silu(G x) * (U x) in one parallel region (an MLP's or shared expert's first half)."""
    nb = x.shape[0] // 32
    quantize_act(x, xq, xd, xs, 32)
    lg, lu = log2_sub(nb, sg.shape[1]), log2_sub(nb, su.shape[1])
    nq = (out.shape[0] + 3) // 4
    uq, n = _units(nq, claims)
    for t in prange(nt):
        u, k, pos = _next_unit(claims, t, nt, n, 0, t * n // nt)
        while u >= 0:
            for p in range(u * uq, min(nq, (u + 1) * uq)):
                _gate_up_rows(bits, wg, sg, wu, su, out, 4 * p, xq, xd, xs, nb, lg, lu, tiled)
            u, k, pos = _next_unit(claims, t, nt, n, k, pos)


@njit(inline="always")
def _quantize_pair(x, sga, xqa, xda, xsa, gsa, sgb, sub, xqb, xdb, xsb):
    """x quantized for routed bank a and q5 / q6 shared expert b: (blocks, a's, b's gate and up log2_sub)."""
    nb = x.shape[0] // 32
    quantize_act(x, xqa, xda, xsa, gsa)
    quantize_act(x, xqb, xdb, xsb, 32)
    return nb, log2_sub(nb, sga.shape[2]), log2_sub(nb, sgb.shape[1]), log2_sub(nb, sub.shape[1])


@pnjit()
def _pair_gate_up(x, wga, sga, wua, sua, idsa, outa, xqa, xda, xsa, gsa, tiled_a,
                  wgb, sgb, wub, sub, outb, xqb, xdb, xsb, bits, tiled_b, claims, nt):
    """Routed experts a (q4 / q8 bank, kernels/q8.py's quads) and a q5 / q6 shared expert b:
    gate, up and SwiGLU of both in ONE parallel region, bit-identical to separate calls."""
    nb, l2a, lgb, lub = _quantize_pair(x, sga, xqa, xda, xsa, gsa, sgb, sub, xqb, xdb, xsb)
    nqa = wga.shape[1] // 4
    na = idsa.shape[0] * nqa
    total = na + (outb.shape[0] + 3) // 4
    uq, n = _units(total, claims)
    for t in prange(nt):
        u, k, pos = _next_unit(claims, t, nt, n, 0, t * n // nt)
        while u >= 0:
            for p in range(u * uq, min(total, (u + 1) * uq)):
                if p < na:
                    _gate_up_quad(wga, sga, wua, sua, idsa, outa, p, nqa, xqa, xda, xsa, nb, l2a, tiled_a)
                else:
                    _gate_up_rows(bits, wgb, sgb, wub, sub, outb, 4 * (p - na), xqb, xdb, xsb, nb, lgb, lub, tiled_b)
            u, k, pos = _next_unit(claims, t, nt, n, k, pos)
    _gate_up_tail(wga, sga, wua, sua, idsa, outa, xqa, xda, xsa, nb, l2a)


@pnjit()
def _pair_down(ha, wda, sda, idsa, wa, hqa, hda, hsa, gsa, tiled_a, hb, wdb, sdb, hqb, hdb, hsb, out, bits, tiled_b,
               claims, nt):
    """out [H] = routed experts' weighted down projections (q4 / q8, ascending expert id) + the
    q5 / q6 shared expert's down projection, added last: one parallel region."""
    nba, nbb = ha.shape[1] // 32, hb.shape[0] // 32
    l2a, l2b = log2_sub(nba, sda.shape[2]), log2_sub(nbb, sdb.shape[1])
    _quantize_slots(ha, hqa, hda, hsa, gsa)
    quantize_act(hb, hqb, hdb, hsb, 32)
    hid, kwb, nsb = wda.shape[1], wdb.shape[1], sdb.shape[1]
    nq = hid // 4
    uq, n = _units(nq, claims)
    for t in prange(nt):
        u, k, pos = _next_unit(claims, t, nt, n, 0, t * n // nt)
        while u >= 0:
            for p in range(u * uq, min(nq, (u + 1) * uq)):
                r = 4 * p
                a0, a1, a2, a3 = _down_sum4(wda, sda, idsa, wa, r, hqa, hda, hsa, nba, l2a, tiled_a)
                b0, b1, b2, b3 = _dot4(bits, wdb, r * kwb, kwb, sdb, r * nsb, nsb, hqb, hdb, hsb, nbb, l2b, tiled_b)
                out[r], out[r + 1], out[r + 2], out[r + 3] = a0 + b0, a1 + b1, a2 + b2, a3 + b3
            u, k, pos = _next_unit(claims, t, nt, n, k, pos)
    for r in range(4 * nq, hid):
        b = _dot1(bits, wdb, r * kwb, kwb, sdb, r * nsb, nsb, hqb, hdb, hsb, nbb, l2b, False)
        out[r] = _down_sum1(wda, sda, idsa, wa, r, hqa, hda, hsa, nba, l2a) + b


def matvec3(x, mats, act: ActScratch, bits: int, act8: bool = False, tiled: bool = False):
    """Three matvecs of one x in ONE parallel region (q, k and v): mats is three (w, scales, out)
    as `matvec` takes them (the same bits and layout; group sizes may differ). Returns the three outs."""
    bind_matvec3(np.ascontiguousarray(x, np.float32), mats, act, bits, act8, tiled)()
    return tuple(out for _, _, out in mats)


def bind_matvec3(x, mats, act: ActScratch, bits: int, act8: bool = False, tiled: bool = False):
    """`matvec3` as a call to repeat: x float32 [K] and the outs are bound, not copied."""
    if len(mats) != 3:
        raise ValueError(f"matvec3 takes exactly three (weight, scales, out) triples, got {len(mats)}")
    k = x.shape[0]
    args = []
    for i, (w, scales, out) in enumerate(mats):
        s = check_weight(w, scales, k, bits, f"weight {i}")
        check_tiles(w, k, tiled, f"weight {i}")
        if out.shape != (w.shape[0],) or out.dtype != np.float32:
            raise ValueError(f"out {i} must be float32 [{w.shape[0]}], got {out.dtype} {out.shape}")
        args += [w, s, out]
    xq, xd, xs = act.views(k, int8=act8)
    return partial(_matvec3, live(x, np.float32, "x"), *args, xq[0], xd[0], xs[0], bits, tiled, act.claims,
                   get_threads())


def _check_gate_up(x, wg, sg, wu, su, out, bits: int, tiled: bool = False):
    sg = check_weight(wg, sg, x.shape[0], bits, "gate")
    su = check_weight(wu, su, x.shape[0], bits, "up")
    check_tiles(wg, x.shape[0], tiled, "gate")
    if wg.shape != wu.shape or out.shape != (wg.shape[0],) or out.dtype != np.float32:
        raise ValueError(f"gate {wg.shape}, up {wu.shape} and out {out.dtype} {out.shape} disagree")
    return sg, su


def gate_up_silu(x, wg, sg, wu, su, out, act: ActScratch, bits: int, act8: bool = False,
                 tiled: bool = False) -> np.ndarray:
    """out float32 [S] = silu(G x) * (U x) for int5 / int6 G, U [S, K*b/8] (both in 4-row tiles
    where `tiled`), one parallel region."""
    bind_gate_up_silu(np.ascontiguousarray(x, np.float32), wg, sg, wu, su, out, act, bits, act8, tiled)()
    return out


def bind_gate_up_silu(x, wg, sg, wu, su, out, act: ActScratch, bits: int, act8: bool = False, tiled: bool = False):
    """`gate_up_silu` as a call to repeat: x and out are bound, not copied."""
    sg, su = _check_gate_up(x, wg, sg, wu, su, out, bits, tiled)
    xq, xd, xs = act.views(x.shape[0], int8=act8)
    return partial(_gate_up_silu, live(x, np.float32, "x"), wg, sg, wu, su, out, xq[0], xd[0], xs[0], bits,
                   tiled, act.claims, get_threads())


def pair_gate_up_silu(x, routed, shared, act_a: ActScratch, act_b: ActScratch, act8: bool = False):
    """Gate, up and SwiGLU of a MoE layer's routed experts and its q5 / q6 shared expert in ONE
    parallel region. routed: (gate, gate_scales, up, up_scales, expert_ids, out_h, bits 4 or 8[,
    tiled]) as q8.experts_gate_up_silu takes them; shared: (gate, gate_scales, up, up_scales, out,
    bits 5 or 6[, tiled]) as `gate_up_silu`. Bit-identical to the two separate calls."""
    routed = q8.checked_gate_up_bank(routed)
    bind_pair_gate_up_silu(np.ascontiguousarray(x, np.float32), routed, shared, act_a, act_b, act8)()
    return routed[5], shared[4]


def bind_pair_gate_up_silu(x, routed, shared, act_a: ActScratch, act_b: ActScratch, act8: bool = False):
    """`pair_gate_up_silu` as a call to repeat: x, the expert ids and both outs are bound."""
    x = live(x, np.float32, "x")
    wga, sga, wua, sua, ids, out_h, abits, tiled_a = q8._with_layout(routed, 7)
    sga, sua, ids = q8._check_gate_up(x, wga, sga, wua, sua, ids, out_h, abits, "routed: ", tiled_a)
    wgb, sgb, wub, sub, out_b, bits, tiled_b = q8._with_layout(shared, 6)
    sgb, sub = _check_gate_up(x, wgb, sgb, wub, sub, out_b, bits, tiled_b)
    k = x.shape[0]
    xqa, xda, xsa = act_a.views(k, int8=q8.int8_acts(act8, abits))
    xqb, xdb, xsb = act_b.views(k, int8=act8)
    return partial(_pair_gate_up, x, wga, sga, wua, sua, ids, out_h, xqa[0], xda[0], xsa[0], act_group(k, sga, abits),
                   tiled_a, wgb, sgb, wub, sub, out_b, xqb[0], xdb[0], xsb[0], bits, tiled_b, act_a.claims,
                   get_threads())


def pair_down_weighted(routed, shared, out, act_a: ActScratch, act_b: ActScratch, act8: bool = False) -> np.ndarray:
    """out [H] = the routed experts' weighted down projections + the q5 / q6 shared expert's,
    added last, in ONE parallel region. routed: (h, down, down_scales, expert_ids, weights, bits 4
    or 8[, tiled]) as q8.experts_down_weighted; shared: (h [S], down [H, S*b/8], down_scales, bits 5
    or 6[, tiled])."""
    bind_pair_down_weighted(q8.checked_down_bank(routed), (np.ascontiguousarray(shared[0], np.float32), *shared[1:]),
                            out, act_a, act_b, act8)()
    return out


def bind_pair_down_weighted(routed, shared, out, act_a: ActScratch, act_b: ActScratch, act8: bool = False):
    """`pair_down_weighted` as a call to repeat: both h, the ids, the weights and out are bound."""
    ha, wda, sda, ids, wts, abits, tiled_a = q8._with_layout(routed, 6)
    sda, ids, ha, wts = q8._check_down(ha, wda, sda, ids, wts, out, abits, "routed: ", tiled_a)
    hb, wdb, sdb, bits, tiled_b = q8._with_layout(shared, 4)
    hb = live(hb, np.float32, "shared h")
    sdb = check_weight(wdb, sdb, hb.shape[0], bits, "shared down")
    check_tiles(wdb, hb.shape[0], tiled_b, "shared down")
    if wdb.shape[0] != out.shape[0]:
        raise ValueError(f"shared down {wdb.shape} does not give out {out.shape}")
    hqa, hda, hsa = act_a.views(ha.shape[1], ha.shape[0], int8=q8.int8_acts(act8, abits))
    hqb, hdb, hsb = act_b.views(hb.shape[0], int8=act8)
    return partial(_pair_down, ha, wda, sda, ids, wts, hqa, hda, hsa, act_group(ha.shape[1], sda, abits), tiled_a, hb,
                   wdb, sdb, hqb[0], hdb[0], hsb[0], out, bits, tiled_b, act_a.claims, get_threads())


# ---- prefill ----------------------------------------------------------------------------------------

# register tiles of 4 rows x 1..4 tokens (kernels/qbatch.py's, on int5 / int6 blocks)
_tile5, _tile6 = make_tile(4, 5), make_tile(4, 6)


@njit(inline="always")
def _tile4(bits, nt, w, woff, wstride, s, soff, sstride, xq, xd, toks, t0, nblk, l2, res, tiled):
    """4 weight rows x nt (1..4) tokens toks[t0 ..] -> res[4 j + r] (qbatch._tile_body's arguments)."""
    if bits == 5:
        _tile5(w, woff, wstride, s, soff, sstride, xq, xd, toks, t0, nblk, l2, res, tiled, nt)
    else:
        _tile6(w, woff, wstride, s, soff, sstride, xq, xd, toks, t0, nblk, l2, res, tiled, nt)


@pnjit()
def _matmul_small(x, w, s, out, xq, xd, xs, toks, bits, tiled):
    """out [T, O] = X W^T: X quantized once, then one parallel region over chunks of row quads;
    each quad's blocks are widened once per tile of 4 tokens. The last O % 4 rows: decode dots."""
    O, kw, nsg = w.shape[0], w.shape[1], s.shape[1]
    T, nb = xd.shape
    l2 = log2_sub(nb, nsg)
    _quantize_rows(x, xq, xd, xs, 32)
    nq = O // 4
    per = CHUNK_ROWS // 4
    for c in prange((nq + per - 1) // per):
        res = np.empty(4 * TILE_TOKENS, np.float32)
        for p in range(c * per, min(nq, (c + 1) * per)):
            r = 4 * p
            for t0 in range(0, T, TILE_TOKENS):
                nt = min(TILE_TOKENS, T - t0)
                _tile4(bits, nt, w, r * kw, kw, s, r * nsg, nsg, xq, xd, toks, t0, nb, l2, res, tiled)
                for j in range(nt):
                    for q in range(4):
                        out[t0 + j, r + q] = res[4 * j + q]
    for r in range(4 * nq, O):
        for t in range(T):
            out[t, r] = _dot1(bits, w, r * kw, kw, s, r * nsg, nsg, xq[t], xd[t], xs[t], nb, l2, False)


def _dequant_row_ir(context, builder, sig, args, bits):
    """out[ooff + j] = float(code j) * scale(group of j) for one row of K values, as vector ops.
    args: (w, woff, s, soff, gs, out, ooff, k, tiled); woff in bytes (the row's first block,
    `q8.row_start`), soff in scales."""
    (w, woff, s, soff, gs, out, ooff, k, tiled) = args
    wty, _, sty, _, _, oty, _, _, _ = sig.args
    wptr = ir.data_ptr(context, builder, wty, w, I8)
    sptr = ir.data_ptr(context, builder, sty, s, I16)
    optr = ir.data_ptr(context, builder, oty, out, F32)
    F32x16 = VectorType(F32, 16)
    with cgutils.for_range(builder, builder.udiv(k, ir.c64(32))) as loop:
        b = loop.index
        g = builder.udiv(builder.mul(b, ir.c64(32)), gs)
        scale = ir.splat(builder, ir.f16_to_f32(builder, builder.load(builder.gep(sptr, [builder.add(soff, g)]))),
                         F32x16)
        wlo, whi = block_i16(builder, wptr, block_offset(builder, woff, ir.c64(0), 0, b, bits, tiled), bits)
        base = builder.add(ooff, builder.mul(b, ir.c64(32)))
        for half, codes in ((0, wlo), (16, whi)):
            p = builder.bitcast(builder.gep(optr, [builder.add(base, ir.c64(half))]), F32x16.as_pointer())
            builder.store(builder.fmul(builder.sitofp(codes, F32x16), scale), p, align=4)
    return context.get_dummy_value()


def _make_dequant_row(bits):
    def typer(typingctx, w, woff, s, soff, gs, out, ooff, k, tiled):
        sig = types.void(w, types.intp, s, types.intp, types.intp, out, types.intp, types.intp, types.boolean)

        def codegen(context, builder, signature, args):
            return _dequant_row_ir(context, builder, signature, args, bits)

        return sig, codegen

    return intrinsic(typer)


q5_dequant_row, q6_dequant_row = _make_dequant_row(5), _make_dequant_row(6)


@njit(inline="always")
def _dequant_rows_body(w, s, r0, tile, tiled, bits):
    """tile[i, :] = dequantized row r0 + i (float32, exact: an fp16 scale times a small integer)."""
    n, K = tile.shape
    kw, nsg = w.shape[1], s.shape[1]
    for i in range(n):
        wo = row_start(r0 + i, kw, 16 * bits, tiled)
        if bits == 5:
            q5_dequant_row(w, wo, s, (r0 + i) * nsg, K // nsg, tile, i * K, K, tiled)
        else:
            q6_dequant_row(w, wo, s, (r0 + i) * nsg, K // nsg, tile, i * K, K, tiled)


@njit()
def _dequant_rows5(w, s, r0, tile, tiled):
    _dequant_rows_body(w, s, r0, tile, tiled, 5)


@njit()
def _dequant_rows6(w, s, r0, tile, tiled):
    _dequant_rows_body(w, s, r0, tile, tiled, 6)


DEQUANT_ROWS = {5: _dequant_rows5, 6: _dequant_rows6}  # serial (w, scales, r0, tile, tiled) -> tile, exact


def dequant_rows(w, scales, r0: int, tile, bits: int, tiled: bool = False) -> np.ndarray:
    """tile float32 [n, K] = rows r0 .. r0+n-1 dequantized (= formats.quant.dequantize_q5 / _q6);
    tiled: w is stored in 4-row tiles."""
    s = check_weight(w, scales, tile.shape[1], bits)
    check_tiles(w, tile.shape[1], tiled)
    if not 0 <= r0 <= w.shape[0] - tile.shape[0]:
        raise ValueError(f"rows {r0}..{r0 + tile.shape[0]} out of range for {w.shape[0]} rows")
    check_contig(tile=tile)
    DEQUANT_ROWS[bits](w, s, r0, tile, tiled)
    return tile


def _check_matmul(X, w, scales, out, bits: int, tiled: bool = False) -> np.ndarray:
    if X.ndim != 2 or X.dtype != np.float32:
        raise ValueError(f"X must be float32 [T, K], got {X.dtype} {X.shape}")
    s = check_weight(w, scales, X.shape[1], bits)
    check_tiles(w, X.shape[1], tiled)
    if out.shape != (X.shape[0], w.shape[0]) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 [{X.shape[0]}, {w.shape[0]}], got {out.dtype} {out.shape}")
    check_contig(out=out)
    return s


def matmul_small(X, w, scales, out, bits: int, tiled: bool = False) -> np.ndarray:
    """out float32 [T, O] = X W^T for int5 / int6 W [O, K*b/8] (in 4-row tiles where `tiled`);
    X float32 [T, K]. The decode matvec's arithmetic (int16 activations, the same integer block
    sums and error bound; only the float accumulation order differs) in qbatch's register tiles:
    each weight block is read once and widened once per tile of 4 tokens. For small T
    (cpu_weights.QBATCH_MAX_T)."""
    s = _check_matmul(X, w, scales, out, bits, tiled)
    X = np.ascontiguousarray(X)
    T, K = X.shape
    if T == 0:
        return out
    xq = np.empty((T, K), np.int16)
    xd = np.empty((T, K // 32), np.float32)
    _matmul_small(X, w, s, out, xq, xd, np.empty((T, K // 32), np.int32), np.arange(T, dtype=np.int64), bits,
                  tiled)
    return out


def matmul_exact(X, w, scales, out, bits: int, tiled: bool = False) -> np.ndarray:
    """out float32 [T, O] = X W^T, exact float32: dequantized row tiles + sgemm (q8.tiled_matmul)."""
    s = _check_matmul(X, w, scales, out, bits, tiled)
    return tiled_matmul(np.ascontiguousarray(X), w, s, out, DEQUANT_ROWS[bits], tiled=tiled)
