"""Prefill matmuls with int8 activations (and the batched decode's, with `decode_acts="i8"`): byte dot
products (vpdpbusd) of unsigned weight codes and signed 8-bit activations, one float epilogue per
32-block for four rows at once (kernels/dot8.py has the arithmetic, its exactness and error bound).

Legend: T tokens, K input features, O output features, G weight group size, B = K/32 activation
blocks, a span = 4 blocks = 128 inputs, NS = ceil(B / 4) spans, b bits per code (4, 5, 6), r a row
of a register tile.

Why: the int16 tiles of kernels/qbatch.py do 32 multiply-adds per 512-bit vpdpwssd and pay a float
epilogue (fold, convert, scale) for every two blocks and token: prefill stays compute-bound at about
half of llama.cpp's int8 GEMM (docs/PERF.md). Here, as in llama.cpp's Q4 x Q8 kernels, the
activations are quantized once per matmul to int8 per block of 32 (`act_quant.quantize_spans8`),
and a register tile of 4 weight rows x up to 8 tokens (`tile8`: dot8.accumulate) unpacks each
span of the rows once for all its tokens.

A token's result does not depend on the tile it ran in: the one-token decode (dot8's row dots in
the decode kernels of q8.py / q56.py) gives each row bit for bit what these tiles give it.
"""

from __future__ import annotations

import numpy as np
from numba import prange, types
from numba.extending import intrinsic

from . import _jit, ir, q56
from ._jit import njit, pnjit
from .act_quant import act_group, check_contig, check_tiles, check_weight, log2_sub, quantize_spans8
from .dot512 import _chunks_sum
from .dot8 import LANES, SPAN, accumulate
from .ir import F32, I8, I16, I32, I64, VectorType
from .qbatch import CHUNK_ROWS, DOWN_CHUNK, EXPERT_CHUNK, _silu, experts_plan

# Token counts of a register tile: 8 with AVX-512's 32 vector registers (the rows' unpacked codes are
# reused by twice as many tokens: int5 / int6 unpacking costs about as much as 4 tokens' dots), 4
# on 16-register paths. A count between them runs as several tiles (`_tile_tokens`).
TILE_MAX = 8 if _jit.AVX512 else 4
TILE_SIZES = (8, 4, 2, 1) if TILE_MAX == 8 else (4, 2, 1)
TOKEN_BLOCK = 64  # tokens per pass over the weights in qmatmul8: 64 x 5 KB of activations at K = 2560
F32x4 = VectorType(F32, 4)


# ---- the register tile ------------------------------------------------------------------------------

def tile8(context, builder, sig, args, ntok, bits):
    """res[4 j + r] = the dot of weight row r with token toks[t0 + j], for 4 rows x ntok tokens.

    args: (w, woff, wstride, s, soff, sstride, xq, xd, xs, toks, t0, nblk, log2sub, res, tiled)
      w, s   as dot8.accumulate takes them (row r at woff + r * wstride, or the 4-row tile at woff
             where `tiled`; scales at soff + r * sstride)
      xq     int8 [*, 128 NS] activations in the span order; xd float32 / xs int32 [*, 16 NS]: the
             block scales and block sums of xq, lane 4c + r of a span holding block c's
      toks   int64 rows of xq / xd / xs; the tile's tokens are toks[t0 .. t0 + ntok)"""
    (w, woff, wstride, s, soff, sstride, xq, xd, xs, toks, t0, nblk, log2sub, res, tiled) = args
    wty, _, _, sty, _, _, xqty, xdty, xsty, tty, _, _, _, rty, _ = sig.args
    tptr, rptr = ir.data_ptr(context, builder, tty, toks, I64), ir.data_ptr(context, builder, rty, res, F32)
    nspan = builder.lshr(builder.add(nblk, ir.c64(3)), ir.c64(2))
    rows = [builder.load(builder.gep(tptr, [builder.add(t0, ir.c64(j))])) for j in range(ntok)]
    accs = accumulate(builder, ir.data_ptr(context, builder, wty, w, I8), ir.data_ptr(context, builder, sty, s, I16),
                      ir.data_ptr(context, builder, xqty, xq, I8), ir.data_ptr(context, builder, xdty, xd, F32),
                      ir.data_ptr(context, builder, xsty, xs, I32), woff, wstride, soff, sstride,
                      [builder.mul(row, builder.mul(nspan, ir.c64(SPAN))) for row in rows],
                      [builder.mul(row, builder.mul(nspan, ir.c64(LANES))) for row in rows], nblk, log2sub, bits,
                      tiled)
    for j, acc in enumerate(accs):
        dst = builder.bitcast(builder.gep(rptr, [ir.c64(4 * j)]), F32x4.as_pointer())
        builder.store(_chunks_sum(builder, acc), dst, align=4)
    return context.get_dummy_value()


def make_tile8(bits):
    """The int8-activation register tile intrinsic of 4 weight rows (int4 / int5 / int6) x nt tokens,
    nt in TILE_SIZES given at run time as the last argument (one unrolled body per size, chosen by a
    switch); the other arguments are `tile8`'s."""
    def typer(typingctx, w, woff, wstride, s, soff, sstride, xq, xd, xs, toks, t0, nblk, log2sub, res, tiled, nt):
        sig = types.void(w, types.intp, types.intp, s, types.intp, types.intp, xq, xd, xs, toks, types.intp,
                         types.intp, types.intp, res, types.boolean, types.intp)

        def codegen(context, builder, signature, args):
            body_sig = types.void(*signature.args[:-1])
            ir.switch(builder, args[-1], {n: (lambda n=n: tile8(context, builder, body_sig, args[:-1], n, bits))
                                          for n in TILE_SIZES})
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


_tile4, _tile5, _tile6 = make_tile8(4), make_tile8(5), make_tile8(6)


@njit(inline="always")
def _tile_tokens(n):
    """The tile size for n remaining tokens: the largest of TILE_SIZES not above n."""
    if n >= TILE_MAX:
        return TILE_MAX
    return 4 if n >= 4 else (2 if n >= 2 else 1)


@njit(inline="always")
def _tile(bits, nt, w, woff, wstride, s, soff, sstride, xq, xd, xs, toks, t0, nblk, l2, res, tiled):
    if bits == 4:
        _tile4(w, woff, wstride, s, soff, sstride, xq, xd, xs, toks, t0, nblk, l2, res, tiled, nt)
    elif bits == 5:
        _tile5(w, woff, wstride, s, soff, sstride, xq, xd, xs, toks, t0, nblk, l2, res, tiled, nt)
    else:
        _tile6(w, woff, wstride, s, soff, sstride, xq, xd, xs, toks, t0, nblk, l2, res, tiled, nt)


# ---- activations ------------------------------------------------------------------------------------

@pnjit()
def _quantize_rows8(x, xq, xd, xs, gs):
    """Every row of x float32 [T, K] -> xq int8 [T, 128 NS], xd float32 / xs int32 [T, 16 NS]; rows
    shared out over the threads."""
    nblk = x.shape[1] // 32
    for t in prange(x.shape[0]):
        quantize_spans8(x[t], xq[t], xd[t], xs[t], gs, 0, nblk)


def act_buffers(T: int, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zeroed (xq int8 [T, 128 NS], xd float32 [T, 16 NS], xs int32 [T, 16 NS]) for K inputs: the
    padding of a partial last span stays zero."""
    ns = -(-K // SPAN)
    return np.zeros((T, SPAN * ns), np.int8), np.zeros((T, LANES * ns), np.float32), np.zeros((T, LANES * ns), np.int32)


def quantize_rows8(x: np.ndarray, gs: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x float32 [T, K] -> (xq, xd, xs) in the span order the tiles take (`act_buffers`); gs is the
    int4 weight group size (block order in act_quant.py) or 32 for int5 / int6. For tests and tools."""
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] % 32 or gs not in (32, 64, 128) or x.shape[1] % gs:
        raise ValueError(f"quantize_rows8: x {x.shape} must be [T, K] with K a multiple of 32 and of gs={gs}")
    xq, xd, xs = act_buffers(*x.shape)
    _quantize_rows8(x, xq, xd, xs, gs)
    return xq, xd, xs


# ---- matmul -----------------------------------------------------------------------------------------

@njit(inline="always")
def _row_tile(r, r1, kw, nsg):
    """(rows, weight stride, scale stride) of the tile at row r of rows r .. r1: four rows, or the
    last rows one at a time (a tile of four copies of one row)."""
    if r + 4 <= r1:
        return 4, kw, nsg
    return 1, 0, 0


@njit(inline="always")
def _rows_all_tokens(bits, w, r, kw, s, nsg, xq, xd, xs, toks, ntoks, nblk, l2, res, out, nrows, wstride, sstride,
                     tiled):
    """out[toks[t], r .. r + nrows) for all ntoks tokens (the tile of `_row_tile`)."""
    t0 = 0
    while t0 < ntoks:
        nt = _tile_tokens(ntoks - t0)
        _tile(bits, nt, w, r * kw, wstride, s, r * nsg, sstride, xq, xd, xs, toks, t0, nblk, l2, res, tiled)
        for j in range(nt):
            for q in range(nrows):
                out[toks[t0 + j], r + q] = res[4 * j + q]
        t0 += nt


@njit(inline="always")
def _qmatmul8_body(w, s, out, xq, xd, xs, toks, nblk, tiled, bits):
    """out[toks] = X[toks] W^T for one block of tokens: one parallel region over chunks of rows;
    each row quad passes over all the block's tokens (kept in L2) while its weights stay in L1.
    tiled: w in 4-row tiles (whole tiles: CHUNK_ROWS % 4 == 0 and O % 4 == 0)."""
    O, kw, nsg = w.shape[0], w.shape[1], s.shape[1]
    T = toks.shape[0]
    l2 = log2_sub(nblk, nsg)
    nchunks = (O + CHUNK_ROWS - 1) // CHUNK_ROWS
    for c in prange(nchunks):
        res = np.empty(4 * TILE_MAX, np.float32)
        r, r1 = c * CHUNK_ROWS, min(O, (c + 1) * CHUNK_ROWS)
        while r < r1:
            nrows, wstride, sstride = _row_tile(r, r1, kw, nsg)
            _rows_all_tokens(bits, w, r, kw, s, nsg, xq, xd, xs, toks, T, nblk, l2, res, out, nrows, wstride, sstride,
                             tiled)
            r += nrows


# One kernel per format, each with its bits a constant: only the tile a model's formats use is compiled.
@pnjit()
def _qmatmul8_q4(w, s, out, xq, xd, xs, toks, nblk, tiled):
    _qmatmul8_body(w, s, out, xq, xd, xs, toks, nblk, tiled, 4)


@pnjit()
def _qmatmul8_q5(w, s, out, xq, xd, xs, toks, nblk, tiled):
    _qmatmul8_body(w, s, out, xq, xd, xs, toks, nblk, tiled, 5)


@pnjit()
def _qmatmul8_q6(w, s, out, xq, xd, xs, toks, nblk, tiled):
    _qmatmul8_body(w, s, out, xq, xd, xs, toks, nblk, tiled, 6)


_QMATMUL8 = {4: _qmatmul8_q4, 5: _qmatmul8_q5, 6: _qmatmul8_q6}


def _check_matrix(w: np.ndarray, scales: np.ndarray, k: int, bits: int) -> np.ndarray:
    """The weight checks of int4 (kernels/act_quant.py's) or int5 / int6 (q56.py's) matrices [O, K*b/8]."""
    if bits == 4:
        return check_weight(w, scales, k, 4, ndim=2)
    if bits not in (5, 6):
        raise ValueError(f"weight: the int8-activation kernels take int4, int5 or int6 weights, not int{bits}")
    if w.ndim != 2:
        raise ValueError(f"weight: int{bits} weights must have 2 dimensions, got {w.shape}")
    return q56.check_weight(w, scales, k, bits)


def qmatmul8(X, w, scales, out, bits: int, tiled: bool = False) -> np.ndarray:
    """out float32 [T, O] = X W^T with X quantized to int8 per block of 32 (error bound above).

    X float32 [T, K]; w packed uint8 [O, K*b/8] for b = bits in 4, 5, 6; scales fp16 (or its uint16
    view) [O, K/G], in 4-row tiles where `tiled`. One parallel region over output rows; overwrites out."""
    X = np.ascontiguousarray(X, np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be float32 [T, K], got {X.shape}")
    T, K = X.shape
    s = _check_matrix(w, scales, K, bits)
    check_tiles(w, K, tiled)
    if out.shape != (T, w.shape[0]) or out.dtype != np.float32:
        raise ValueError(f"out must be C-contiguous float32 [{T}, {w.shape[0]}], got {out.dtype} {out.shape}")
    check_contig(out=out)
    if T == 0:
        return out
    xq, xd, xs = act_buffers(T, K)
    _quantize_rows8(X, xq, xd, xs, act_group(K, s, bits))
    toks = np.arange(T, dtype=np.int64)
    for t0 in range(0, T, TOKEN_BLOCK):  # one block of activations at a time in each core's L2
        _QMATMUL8[bits](w, s, out, xq, xd, xs, toks[t0:t0 + TOKEN_BLOCK], K // 32, tiled)
    return out


# ---- routed experts -----------------------------------------------------------------------------------

@pnjit()
def _experts_gate_up8(xq, xd, xs, nblk, gate, gs_, up, us, hit, starts, slot_tok, h, hq, hd, hs, gsh, tiled):
    """h[slot] = silu(G_e x[t]) * (U_e x[t]) for every slot (sorted by expert), quantized into
    hq / hd / hs; x is given quantized (xq / xd / xs, nblk blocks). One parallel region over (row
    chunk, expert) items, chunk-major. int4 banks."""
    inter, kw, nsg = gate.shape[1], gate.shape[2], gs_.shape[2]
    l2 = log2_sub(nblk, nsg)
    nhit = hit.shape[0]
    nchunks = (inter + EXPERT_CHUNK - 1) // EXPERT_CHUNK
    for item in prange(nchunks * nhit):
        c, e = item // nhit, hit[item % nhit]
        s0, ns = starts[e], starts[e + 1] - starts[e]
        gres = np.empty(4 * TILE_MAX, np.float32)
        ures = np.empty(4 * TILE_MAX, np.float32)
        r, r1 = c * EXPERT_CHUNK, min(inter, (c + 1) * EXPERT_CHUNK)
        while r < r1:
            nrows, wstride, sstride = _row_tile(r, r1, kw, nsg)
            row = e * inter + r
            t0 = 0
            while t0 < ns:
                nt = _tile_tokens(ns - t0)
                _tile(4, nt, gate, row * kw, wstride, gs_, row * nsg, sstride, xq, xd, xs, slot_tok, s0 + t0,
                      nblk, l2, gres, tiled)
                _tile(4, nt, up, row * kw, wstride, us, row * nsg, sstride, xq, xd, xs, slot_tok, s0 + t0,
                      nblk, l2, ures, tiled)
                for j in range(nt):
                    for q in range(nrows):
                        h[s0 + t0 + j, r + q] = _silu(gres[4 * j + q]) * ures[4 * j + q]
                t0 += nt
            r += nrows
        b0, b1 = (c * EXPERT_CHUNK) // 32, (r1 + 31) // 32
        for p in range(s0, s0 + ns):
            quantize_spans8(h[p], hq[p], hd[p], hs[p], gsh, b0, b1)


@pnjit()
def _experts_down8(hq, hd, hs, down, ds, hit, starts, slot_ids, slot_tok, slot_w, out, nblk, tiled):
    """out[t] = sum over t's slots in ascending expert id of w * D_e h[slot], starting from 0."""
    hid, kw, nsg = down.shape[1], down.shape[2], ds.shape[2]
    l2 = log2_sub(nblk, nsg)
    T = out.shape[0]
    nchunks = (hid + DOWN_CHUNK - 1) // DOWN_CHUNK
    for c in prange(nchunks):
        res = np.empty(4 * TILE_MAX, np.float32)
        r0, r1 = c * DOWN_CHUNK, min(hid, (c + 1) * DOWN_CHUNK)
        for t in range(T):
            for r in range(r0, r1):
                out[t, r] = 0.0
        for e in hit:  # ascending expert id (docs/ERNIE_SPEC.md P13)
            s0, ns = starts[e], starts[e + 1] - starts[e]
            r = r0
            while r < r1:
                nrows, wstride, sstride = _row_tile(r, r1, kw, nsg)
                row = e * hid + r
                t0 = 0
                while t0 < ns:
                    nt = _tile_tokens(ns - t0)
                    _tile(4, nt, down, row * kw, wstride, ds, row * nsg, sstride, hq, hd, hs, slot_ids, s0 + t0,
                          nblk, l2, res, tiled)
                    for j in range(nt):
                        p = s0 + t0 + j
                        for q in range(nrows):
                            out[slot_tok[p], r + q] += slot_w[p] * res[4 * j + q]
                    t0 += nt
                r += nrows


def qexperts8(x, idx, weights, gate, gate_s, up, up_s, down, down_s, out, bits: int = 4,
              tiled: bool = False, tiled_down: bool | None = None) -> np.ndarray:
    """Routed experts of a batch with int8-quantized activations; overwrites out. Arguments and result
    as qbatch.qexperts (int4 banks: gate / up [E, I, H/2], down [E, H, I/2] uint8; layouts `tiled`,
    `tiled_down`); both x and the SwiGLU output h are quantized to int8 per block of 32 (error bound
    above, per stage)."""
    if bits != 4:
        raise ValueError(f"qexperts8 takes int4 banks, not int{bits}")
    tiled_down = tiled if tiled_down is None else tiled_down
    plan = experts_plan(x, idx, weights, gate, gate_s, up, up_s, down, down_s, out, bits, tiled, tiled_down)
    if plan is None:
        return out
    x, (gs_, us, ds), (slot_ids, slot_tok, slot_w, starts, hit) = plan
    T, H = x.shape
    nslot, inter = slot_ids.size, gate.shape[1]
    xq, xd, xs = act_buffers(T, H)
    h = np.empty((nslot, inter), np.float32)  # [S, I]
    hq, hd, hs = act_buffers(nslot, inter)
    gsh = act_group(inter, ds, bits)
    if EXPERT_CHUNK % SPAN:
        raise AssertionError("EXPERT_CHUNK must be a multiple of a span")
    _quantize_rows8(x, xq, xd, xs, act_group(H, gs_, bits))
    _experts_gate_up8(xq, xd, xs, H // 32, gate, gs_, up, us, hit, starts, slot_tok, h, hq, hd, hs, gsh, tiled)
    _experts_down8(hq, hd, hs, down, ds, hit, starts, slot_ids, slot_tok, slot_w, out, inter // 32, tiled_down)
    return out
