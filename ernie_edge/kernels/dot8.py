"""The int8-activation byte dot of kernels/qbatch8.py's register tile, and the one-token row dots the
decode matvecs take from it (kernels/simd.py `rows_dot4`, kernels/q56.py `dot4` with int8 activations).

Legend: K input features, B = K/32 activation blocks, G weight group size, a span = 4 blocks = 128
inputs, NS = ceil(B / 4) spans, b bits per code (4, 5, 6), u = code + 2^(b-1) the stored unsigned
code, c a block of a span (0..3), r a row of the 4-row tile.

The activations are quantized to int8 per block of 32 (`act_quant.quantize_spans8`):

    xd[b] = max|x in b| / 127,   xq = round(x / xd)  in [-127, 127]

and every 32-block of a row is an exact integer dot of its UNSIGNED codes u with xq, corrected by
the offset:

    y[o] = sum_b  ws[o, g(b)] * xd[b] * (sum_{j in b} u[o, j] * xq[j] - 2^(b-1) * sum_{j in b} xq[j])

A span of a row unpacks to two <64 x i8> vectors, "lo" (codes 0..15 of its 4 blocks) and "hi"
(codes 16..31); the activations are stored in that order (xq[128 s + 16 c + j] pairs with lo code j
of block c, + 64 with hi). Two vpdpbusd per row and token give 16 i32 lanes, 4 per block; four rows
fold (two unpack levels) into lanes (c, r) = block c of row r, which take the offset term, ONE
convert and ONE multiply-add with ws * xd for 4 rows x 4 blocks (512 codes). The quantizer writes xd
and the block sums already spread to those 16 lanes (xd16, xs16), so a span costs one load each. At
the end the four 128-bit chunks add up to the four rows' results (dot512._chunks_sum).

`accumulate` is that loop for 4 rows and any number of tokens; a token's result does not depend on
the other tokens of the tile, so the one-token row dots (`q4_row8` ...) give bit for bit what the
prefill tiles give that token: the decode of one token, the batched decode and the prefill agree.

Integer exactness: a (row, block) sum is at most 32 * 63 * 127 < 2^18 before the offset term:
exact in i32 and in the float conversion, on every path. Error bound per output, as the int16
kernels' (kernels/q8.py) with 254 in place of 65534:

    |y[o] - (W x)[o]| <= sum_b (max_{j in b} |x[j]| / 254) * sum_{j in b} |W[o, j]|

SIMD paths (kernels/_jit.py) differ only in the byte dot: AVX512-VNNI vpdpbusd (512-bit), AVX-VNNI
vpdpbusd (two 256-bit halves), AVX2 / AVX-512BW vpmaddubsw + vpmaddwd (no saturation: |u * xq| * 2 <=
63 * 127 * 2 < 32767), generic LLVM vector IR. All compute the same integer lanes, so results are
bit-identical across paths.
"""

from __future__ import annotations

from functools import partial

from numba.core import cgutils

from . import _jit, ir
from .codes import BLOCK_BYTES, block_offset, span_u8
from .dot512 import _chunks_sum, _fold4
from .ir import F32, F32x16, I8, I8x64, I16, I16x16, I16x32, I32, I32x8, I32x16, I64, VectorType

SPAN = 128  # inputs per span (4 blocks of 32)
LANES = 16  # xd16 / xs16 values per span: 4 blocks x 4 rows
I16x4, I16x8 = VectorType(I16, 4), VectorType(I16, 8)
I32x4, I64x4 = VectorType(I32, 4), VectorType(I64, 4)


# ---- the byte dot -----------------------------------------------------------------------------------

def _halves(builder, v, n):
    """The two halves of a vector of n elements."""
    return (builder.shuffle_vector(v, v, ir.mask(range(n // 2))),
            builder.shuffle_vector(v, v, ir.mask(range(n // 2, n))))


def _join(builder, a, b, n):
    return builder.shuffle_vector(a, b, ir.mask(range(n)))


def _dot8(builder, acc, u, x):
    """acc + the byte dot of u (<64 x i8>, unsigned) and x (<64 x i8>, signed) as <16 x i32>: lane l
    adds the 4 products of bytes 4l .. 4l + 3."""
    if _jit.VNNI512:
        return ir.call(builder, "llvm.x86.avx512.vpdpbusd.512", I32x16,
                       [acc, builder.bitcast(u, I32x16), builder.bitcast(x, I32x16)])
    if _jit.SIMD == "avxvnni":
        parts = [ir.call(builder, "llvm.x86.avx512.vpdpbusd.256", I32x8,
                         [a, builder.bitcast(uh, I32x8), builder.bitcast(xh, I32x8)])
                 for a, uh, xh in zip(_halves(builder, acc, 16), _halves(builder, u, 64), _halves(builder, x, 64))]
        return _join(builder, parts[0], parts[1], 16)
    if _jit.SIMD == "avx2" and _jit.AVX512:  # AVX-512BW without VNNI
        p16 = ir.call(builder, "llvm.x86.avx512.pmaddubs.w.512", I16x32, [u, x])
        ones = ir.Constant(I16x32, [1] * 32)
        return builder.add(acc, ir.call(builder, "llvm.x86.avx512.pmaddw.d.512", I32x16, [p16, ones]))
    if _jit.SIMD == "avx2":
        ones = ir.Constant(I16x16, [1] * 16)
        parts = [ir.call(builder, "llvm.x86.avx2.pmadd.wd", I32x8,
                         [ir.call(builder, "llvm.x86.avx2.pmadd.ub.sw", I16x16, [uh, xh]), ones])
                 for uh, xh in zip(_halves(builder, u, 64), _halves(builder, x, 64))]
        return builder.add(acc, _join(builder, parts[0], parts[1], 16))
    prod = builder.mul(builder.zext(u, VectorType(I32, 64)), builder.sext(x, VectorType(I32, 64)))
    for n in (64, 32):  # adjacent pairs, twice: lane l = bytes 4l .. 4l + 3
        prod = builder.add(builder.shuffle_vector(prod, prod, ir.mask(range(0, n, 2))),
                           builder.shuffle_vector(prod, prod, ir.mask(range(1, n, 2))))
    return builder.add(acc, prod)


# ---- scales of one span: lanes (c, r) = ws[r, g(4 s + c)] -------------------------------------------

def _span_scales_full(builder, sptr, soffs, span, log2sub, slot):
    """Store the <16 x float> scales of a whole span into slot: lane 4c + r = row r's scale of the
    group of block 4 span + c (G = 32: 4 groups, G = 64: 2, G = 128: 1; chosen by log2sub)."""
    def g32():  # each row: its 4 scales in one 64-bit load, then a transpose
        v = ir.Constant(I64x4, ir.Undefined)
        for r, so in enumerate(soffs):
            p = builder.bitcast(builder.gep(sptr, [builder.add(so, builder.mul(span, ir.c64(4)))]), I64.as_pointer())
            v = builder.insert_element(v, builder.load(p, align=2), ir.c32(r))
        f = ir.f16_to_f32(builder, builder.bitcast(v, I16x16))  # lane 4r + c
        builder.store(builder.shuffle_vector(f, f, ir.mask([4 * r + c for c in range(4) for r in range(4)])), slot)

    def g64():  # each row: 2 scales in one 32-bit load
        v = ir.Constant(I32x4, ir.Undefined)
        for r, so in enumerate(soffs):
            p = builder.bitcast(builder.gep(sptr, [builder.add(so, builder.mul(span, ir.c64(2)))]), I32.as_pointer())
            v = builder.insert_element(v, builder.load(p, align=2), ir.c32(r))
        f = ir.f16_to_f32(builder, builder.bitcast(v, I16x8))  # lane 2r + g
        builder.store(builder.shuffle_vector(f, f, ir.mask([2 * r + c // 2 for c in range(4) for r in range(4)])), slot)

    def g128():  # each row: 1 scale
        v = ir.Constant(I16x4, ir.Undefined)
        for r, so in enumerate(soffs):
            v = builder.insert_element(v, builder.load(builder.gep(sptr, [builder.add(so, span)])), ir.c32(r))
        f = ir.f16_to_f32(builder, v)
        builder.store(builder.shuffle_vector(f, f, ir.mask([0, 1, 2, 3] * 4)), slot)

    ir.switch(builder, log2sub, {0: g32, 1: g64, 2: g128})


def _span_scales_blocks(builder, sptr, soffs, blocks, log2sub):
    """<16 x float> scales, lane 4c + r = row r's scale of block blocks[c]'s group (any G)."""
    v = ir.Constant(I16x16, ir.Undefined)
    for c, b in enumerate(blocks):
        g = builder.lshr(b, log2sub)
        for r, so in enumerate(soffs):
            v = builder.insert_element(v, builder.load(builder.gep(sptr, [builder.add(so, g)])), ir.c32(4 * c + r))
    return ir.f16_to_f32(builder, v)


# ---- 4 rows x n tokens ---------------------------------------------------------------------------------

def accumulate(builder, wptr, sptr, xqptr, xdptr, xsptr, woff, wstride, soff, sstride, qoffs, doffs, nblk,
               log2sub, bits, tiled):
    """The <16 x float> accumulators (lanes (c, r), module doc) of 4 weight rows x len(qoffs) tokens.

    wptr     packed uint8 weights (kernels/codes.py layouts), row r at byte woff + r * wstride
             (wstride 0: four copies of one row)
    sptr     uint16 fp16 scales, row r's first at soff + r * sstride; block b uses group b >> log2sub
    xqptr    int8 activations in the span order, token j's at qoffs[j]; xdptr float32 / xsptr int32:
             the block scales and block sums spread to the lanes, token j's at doffs[j]
    The nblk % 4 blocks of a last, partial span read block nblk - 1 in place of the missing ones
    (their activations, scales and sums are zero). Software-prefetches the next 4 rows.
    tiled    (an i1 value) the 4 rows are the 4-row tile at woff (wstride: the row bytes;
             `codes.block_offset`); tiles have whole spans only (nblk % 4 == 0)"""
    ntok = len(qoffs)
    bpb = BLOCK_BYTES[bits]
    soffs = [builder.add(soff, builder.mul(ir.c64(r), sstride)) for r in range(4)]
    ahead = builder.add(woff, builder.mul(ir.c64(4), wstride))  # the next tile's rows
    accs = [cgutils.alloca_once_value(builder, ir.Constant(F32x16, [0.0] * 16)) for _ in range(ntok)]
    scale_slot = cgutils.alloca_once(builder, F32x16)
    zero = ir.Constant(I32x16, [0] * 16)
    offset_shift = ir.Constant(I32x16, [bits - 1] * 16)

    def step(span, full):
        b0 = builder.mul(span, ir.c64(4))
        if full:
            blocks = [builder.add(b0, ir.c64(c)) for c in range(4)]
            ir.prefetch_lines(builder, wptr, builder.add(ahead, builder.mul(span, ir.c64(16 * bpb))), 16 * bpb)
            _span_scales_full(builder, sptr, soffs, span, log2sub, scale_slot)
            ws = builder.load(scale_slot)
        else:  # missing blocks read the last one (in bounds); their activations are zero
            last = builder.sub(nblk, ir.c64(1))
            blocks = [builder.select(builder.icmp_unsigned("<", builder.add(b0, ir.c64(c)), nblk),
                                     builder.add(b0, ir.c64(c)), last) for c in range(4)]
            ws = _span_scales_blocks(builder, sptr, soffs, blocks, log2sub)
        codes = [span_u8(builder, wptr, [block_offset(builder, woff, wstride, r, b, bits, tiled) for b in blocks],
                         bits, full) for r in range(4)]
        for j in range(ntok):
            q0 = builder.add(qoffs[j], builder.mul(span, ir.c64(SPAN)))
            xlo = ir.load_vec(builder, xqptr, q0, I8x64)
            xhi = ir.load_vec(builder, xqptr, builder.add(q0, ir.c64(64)), I8x64)
            p = [_dot8(builder, _dot8(builder, zero, lo, xlo), hi, xhi) for lo, hi in codes]
            d0 = builder.add(doffs[j], builder.mul(span, ir.c64(LANES)))
            sums = builder.shl(ir.load_vec(builder, xsptr, d0, I32x16, align=4), offset_shift)
            f = builder.sitofp(builder.sub(_fold4(builder, p), sums), F32x16)
            scale = builder.fmul(ws, ir.load_vec(builder, xdptr, d0, F32x16, align=4))
            builder.store(ir.fma(builder, f, scale, builder.load(accs[j])), accs[j])

    with cgutils.for_range(builder, builder.lshr(nblk, ir.c64(2))) as loop:
        step(loop.index, True)
    with builder.if_then(builder.icmp_unsigned("!=", builder.and_(nblk, ir.c64(3)), ir.c64(0))):
        step(builder.lshr(nblk, ir.c64(2)), False)
    return [builder.load(a) for a in accs]


# ---- one token: the decode row dots ------------------------------------------------------------------

def _row_dot(context, builder, sig, args, nrows, bits):
    """Rows r .. r + nrows - 1 (nrows 4, or 1: four copies of one row) of W x for ONE token, as the
    int16 row dots of kernels/simd.py take them: (w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk,
    log2sub, tiled), with xq int8 [128 NS], xd float32 / xs int32 [16 NS] (`act_quant.quantize_spans8`);
    tiled: the 4 rows are the 4-row tile at woff (`accumulate`)."""
    (w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled) = args
    wty, _, _, sty, _, _, xqty, xdty, xsty, _, _, _ = sig.args
    if nrows == 1:  # four copies of the row, as the prefill tiles' tail
        wstride = sstride = ir.c64(0)
    acc = accumulate(builder, ir.data_ptr(context, builder, wty, w, I8), ir.data_ptr(context, builder, sty, s, I16),
                     ir.data_ptr(context, builder, xqty, xq, I8), ir.data_ptr(context, builder, xdty, xd, F32),
                     ir.data_ptr(context, builder, xsty, xs, I32), woff, wstride, soff, sstride,
                     [ir.c64(0)], [ir.c64(0)], nblk, log2sub, bits, tiled)[0]
    rows = _chunks_sum(builder, acc)
    return [builder.extract_element(rows, ir.c32(r)) for r in range(nrows)]


# (w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled) of one token: row1 -> float32,
# row4 -> the 4-tuple of rows r .. r + 3; the int8-activation twins of simd.q4_dot1 / q4_dot4 and
# q56's q5 / q6 row dots.
q4_row1, q4_row4 = (ir.row_dot_intrinsic(n, partial(_row_dot, nrows=n, bits=4)) for n in (1, 4))
q5_row1, q5_row4 = (ir.row_dot_intrinsic(n, partial(_row_dot, nrows=n, bits=5)) for n in (1, 4))
q6_row1, q6_row4 = (ir.row_dot_intrinsic(n, partial(_row_dot, nrows=n, bits=6)) for n in (1, 4))
