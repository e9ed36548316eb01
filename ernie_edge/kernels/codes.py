"""One 32-block of a weight row widened to signed int16 codes, for every packed format: the one
place in the kernels' LLVM IR that knows the byte layout of a block (ernie_edge/formats/quant.py).

Legend: b bits per code, h = b - 4 high bits per code (int5 / int6), u = code + 2^(b-1) the
stored unsigned value.

A block of 32 codes takes 4b bytes of a row (BLOCK_BYTES):
  int4  16 bytes: byte j = u_j | u_{j+16} << 4 (the q4 g32 order; for G >= 64 the activation
        quantizer reorders x instead, kernels/act_quant.py)
  int5 / int6  those 16 nibble bytes, then 4h bytes of high bits: byte i holds u_{i + 4h t} >> 4
        at bits h t, t = 0 .. 8/h - 1
  int8  32 signed bytes, the codes themselves
`block_i16` returns (codes 0..15, codes 16..31) as <16 x i16>, the halves that multiply the
activations x[32b : 32b + 16] and x[32b + 16 : 32b + 32] (in the quantizer's block order).
"""

from __future__ import annotations

from . import ir
from .ir import I8, I8x16, I16, I16x16, I16x32, VectorType

BLOCK_BYTES = {4: 16, 5: 20, 6: 24, 8: 32}


def high_bits(builder, wptr, wo, bits):
    """The high bits of an int5 / int6 block's 32 codes, already at bit 4: (codes 0..15, codes
    16..31) as <16 x i16>. Lane l of the first half reads byte l % 4h at bit h (l // 4h); the
    second half the same bytes 4 bits higher."""
    h = bits - 4
    nqh = 4 * h
    raw = ir.load_vec(builder, wptr, builder.add(wo, ir.c64(16)), VectorType(I8, nqh))
    raw = builder.zext(raw, VectorType(I16, nqh))
    spread = builder.shuffle_vector(raw, raw, ir.mask([lane % nqh for lane in range(16)]))
    t = [lane // nqh for lane in range(16)]
    keep = ir.Constant(I16x16, [((1 << h) - 1) << (h * ti) for ti in t])
    to_bit4 = ir.Constant(I16x16, [1 << (4 - h * ti) for ti in t])
    first = builder.mul(builder.and_(spread, keep), to_bit4)
    second = builder.mul(builder.and_(builder.lshr(spread, ir.Constant(I16x16, [4] * 16)), keep), to_bit4)
    return first, second


def block_i16(builder, wptr, wo, bits):
    """The signed codes of the block at byte wo of wptr (an i8*) as (codes 0..15, codes 16..31),
    each <16 x i16>, for bits 4, 5, 6 or 8."""
    if bits == 8:
        lo = builder.sext(ir.load_vec(builder, wptr, wo, I8x16), I16x16)
        hi = builder.sext(ir.load_vec(builder, wptr, builder.add(wo, ir.c64(16)), I8x16), I16x16)
        return lo, hi
    nib = builder.zext(ir.load_vec(builder, wptr, wo, I8x16), I16x16)
    lo = builder.and_(nib, ir.Constant(I16x16, [15] * 16))
    hi = builder.lshr(nib, ir.Constant(I16x16, [4] * 16))
    if bits in (5, 6):
        hi0, hi1 = high_bits(builder, wptr, wo, bits)
        lo, hi = builder.or_(lo, hi0), builder.or_(hi, hi1)
    elif bits != 4:
        raise ValueError(f"no block layout for int{bits}")
    offset = ir.Constant(I16x16, [1 << (bits - 1)] * 16)
    return builder.sub(lo, offset), builder.sub(hi, offset)


def pair_i16(builder, wptr, wo, bits):
    """Two consecutive int5 / int6 blocks (at byte wo and wo + BLOCK_BYTES) widened together in
    512-bit vectors: (first, second), each <32 x i16> = [b0's 16 | b1's 16], first holding codes
    0..15 and second codes 16..31 of each block (the lanes of kernels/dot512.py's steps)."""
    h, bb = bits - 4, BLOCK_BYTES[bits]
    nqh = 4 * h
    b1 = builder.add(wo, ir.c64(bb))
    nib = builder.shuffle_vector(ir.load_vec(builder, wptr, wo, I8x16), ir.load_vec(builder, wptr, b1, I8x16),
                                 ir.mask(range(32)))
    nib = builder.zext(nib, I16x32)
    hq = VectorType(I8, nqh)
    raw = builder.shuffle_vector(ir.load_vec(builder, wptr, builder.add(wo, ir.c64(16)), hq),
                                 ir.load_vec(builder, wptr, builder.add(b1, ir.c64(16)), hq), ir.mask(range(2 * nqh)))
    raw = builder.zext(raw, VectorType(I16, 2 * nqh))
    lanes = [lane % nqh for lane in range(16)]
    spread = builder.shuffle_vector(raw, raw, ir.mask(lanes + [nqh + lane for lane in lanes]))
    t = [lane // nqh for lane in range(16)] * 2
    keep = ir.Constant(I16x32, [((1 << h) - 1) << (h * ti) for ti in t])
    to_bit4 = ir.Constant(I16x32, [1 << (4 - h * ti) for ti in t])
    hb0 = builder.mul(builder.and_(spread, keep), to_bit4)
    hb1 = builder.mul(builder.and_(builder.lshr(spread, ir.Constant(I16x32, [4] * 32)), keep), to_bit4)
    offset = ir.Constant(I16x32, [1 << (bits - 1)] * 32)
    first = builder.or_(builder.and_(nib, ir.Constant(I16x32, [15] * 32)), hb0)
    second = builder.or_(builder.lshr(nib, ir.Constant(I16x32, [4] * 32)), hb1)
    return builder.sub(first, offset), builder.sub(second, offset)

