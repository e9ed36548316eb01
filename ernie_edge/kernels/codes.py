"""One 32-block of a weight row widened to signed int16 codes (or four blocks as unsigned bytes),
for every packed format: the one place in the kernels' LLVM IR that knows the byte layout of a
block (ernie_edge/formats/quant.py).

Legend: b bits per code, h = b - 4 high bits per code (int5 / int6), u = code + 2^(b-1) the
stored unsigned value.

A block of 32 codes takes 4b bytes of a row (BLOCK_BYTES):
  int4  16 bytes: byte j = u_j | u_{j+16} << 4 (the q4 g32 order; for G >= 64 the activation
        quantizer reorders x instead, kernels/act_quant.py)
  int5 / int6  those 16 nibble bytes, then 4h bytes of high bits: byte i holds u_{i + 4h t} >> 4
        at bits h t, t = 0 .. 8/h - 1
  int8  32 signed bytes, the codes themselves
`block_i16` returns (codes 0..15, codes 16..31) as <16 x i16>, the halves that multiply the
activations x[32b : 32b + 16] and x[32b + 16 : 32b + 32] (in the quantizer's block order);
`pair_i16` two blocks at once in 512-bit vectors; `span_u8` four blocks as unsigned bytes (the
int8-activation prefill tiles). `block_offset` is where a row's block starts, in a matrix stored by
rows or in 4-row tiles (formats/layout.py), for every row dot and register tile.
"""

from __future__ import annotations

from . import _jit, ir
from .ir import I8, I8x16, I8x64, I16, I16x16, I16x32, VectorType

BLOCK_BYTES = {4: 16, 5: 20, 6: 24, 8: 32}


def block_offset(builder, woff, wstride, r, b, bits, tiled):
    """Byte offset of block b (i64) of row r (an int) of a 4-row group at woff: in a matrix stored by
    rows (rows wstride bytes apart), or, where `tiled` (an i1 value), in 4-row
    tiles (formats/layout.py: row r's block b at woff + 16 bpb (b >> 2) + 4 bpb r + bpb (b & 3),
    bpb = BLOCK_BYTES[bits]). One formula for both: rows are `pitch` apart and a row's spans
    (4 blocks) `span` apart, (wstride, 4 bpb) by rows and (4 bpb, 16 bpb) in tiles."""
    bpb = BLOCK_BYTES[bits]
    pitch = builder.select(tiled, ir.c64(4 * bpb), wstride)
    span = builder.select(tiled, ir.c64(16 * bpb), ir.c64(4 * bpb))
    in_span = builder.mul(builder.and_(b, ir.c64(3)), ir.c64(bpb))
    return builder.add(builder.add(woff, builder.mul(ir.c64(r), pitch)),
                       builder.add(builder.mul(builder.lshr(b, ir.c64(2)), span), in_span))


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


def _span_u8_512(builder, wptr, off, bits):
    """`span_u8` of a whole int5 / int6 span (4 blocks back to back from byte off: 80 / 96 bytes)
    from two 64-byte loads, its first and its last 64 bytes. Every byte the codes need sits at a
    multiple of 4 (int5) or 8 (int6) bytes, so each gather from the two registers - the nibble bytes
    of the 4 blocks, and the high-bit bytes spread to the lanes of codes 0..15 and of codes 16..31 -
    is one two-register permute of dwords / qwords (vpermt2d / vpermt2q, AVX-512F), where
    `_high_bits8` takes 8 loads and the inserts that join them: int6 decode ~7 % faster with the
    weights in L2 (docs/PERF.md). The same bytes, so the same codes."""
    h, bpb = bits - 4, BLOCK_BYTES[bits]
    nqh, span = 4 * h, 4 * bpb
    first = ir.load_vec(builder, wptr, off, I8x64)
    last = ir.load_vec(builder, wptr, builder.add(off, ir.c64(span - 64)), I8x64)

    def gather(positions):  # span byte p: first[p] below 64, else last[p - (span - 64)] (lane 64 + ...)
        return builder.shuffle_vector(first, last, ir.mask([p if p < 64 else 64 + p - (span - 64)
                                                            for p in positions]))

    nib = gather([c * bpb + j for c in range(4) for j in range(16)])
    high = []
    for half in (0, 16):  # codes 0..15 (lo) and 16..31 (hi) of each block
        spread = gather([c * bpb + 16 + (half + j) % nqh for c in range(4) for j in range(16)])
        high.append(_high_at_bit4(builder, spread, half, bits))
    lo = builder.or_(builder.and_(nib, ir.Constant(I8x64, [15] * 64)), high[0])
    hi = builder.or_(builder.lshr(nib, ir.Constant(I8x64, [4] * 64)), high[1])
    return lo, hi


def _concat4(builder, parts):
    """Four <16 x T> -> <64 x T>."""
    a = builder.shuffle_vector(parts[0], parts[1], ir.mask(range(32)))
    b = builder.shuffle_vector(parts[2], parts[3], ir.mask(range(32)))
    return builder.shuffle_vector(a, b, ir.mask(range(64)))


def _high_bits8(builder, wptr, offs, bits):
    """The high bits of 4 int5 / int6 blocks (at byte offsets offs) moved to bit 4, as (lo, hi)
    <64 x i8> in kernels/qbatch8.py's span order. Code j's high bits sit in byte j % 4h of its
    block's high-bit bytes, at bit h (j // 4h)."""
    h = bits - 4
    nqh = 4 * h
    hq = VectorType(I8, nqh)
    raw = [ir.load_vec(builder, wptr, builder.add(o, ir.c64(16)), hq) for o in offs]
    pair = [builder.shuffle_vector(raw[0], raw[1], ir.mask(range(2 * nqh))),
            builder.shuffle_vector(raw[2], raw[3], ir.mask(range(2 * nqh)))]
    allq = builder.shuffle_vector(pair[0], pair[1], ir.mask(range(4 * nqh)))  # <16h x i8>, block c at c * 4h
    out = []
    for half in (0, 16):  # codes 0..15 (lo) and 16..31 (hi) of each block
        lanes = [c * nqh + (half + j) % nqh for c in range(4) for j in range(16)]
        out.append(_high_at_bit4(builder, builder.shuffle_vector(allq, allq, ir.mask(lanes)), half, bits))
    return out


def _high_at_bit4(builder, spread, half, bits):
    """<64 x i8> lane 16c + j = the high bits of code half + j of block c, moved to bit 4, from
    `spread`, whose lane 16c + j holds the byte with them (at bit h ((half + j) // 4h)). Within a
    16-bit word both bytes have the same bit position, so one mask and one per-word shift (left for
    codes 0..15, right for 16..31) moves them."""
    h = bits - 4
    t = [(half + j) // (4 * h) for _ in range(4) for j in range(16)]
    keep = ir.Constant(I8x64, [((1 << h) - 1) << (h * ti) for ti in t])
    field = builder.bitcast(builder.and_(spread, keep), I16x32)
    shift = [4 - h * ti for ti in t[0::2]]  # per 16-bit word (both bytes alike)
    if half == 0:
        moved = builder.shl(field, ir.Constant(I16x32, shift))
    else:
        moved = builder.lshr(field, ir.Constant(I16x32, [-v for v in shift]))
    return builder.bitcast(moved, I8x64)


def span_u8(builder, wptr, offs, bits, contiguous):
    """The UNSIGNED codes u of the 4 int4 / int5 / int6 blocks at byte offsets offs (i64 values) as
    (lo, hi) <64 x i8> (kernels/qbatch8.py's span): lo holds codes 0..15 of block c at bytes 16c ..
    16c + 15, hi codes 16..31. `contiguous`: int4
    blocks back to back (one 64-byte load)."""
    if bits in (5, 6) and contiguous and _jit.AVX512:
        return _span_u8_512(builder, wptr, offs[0], bits)
    if bits == 4 and contiguous:
        nib = ir.load_vec(builder, wptr, offs[0], I8x64)
    else:
        nib = _concat4(builder, [ir.load_vec(builder, wptr, o, I8x16) for o in offs])
    lo = builder.and_(nib, ir.Constant(I8x64, [15] * 64))
    hi = builder.lshr(nib, ir.Constant(I8x64, [4] * 64))
    if bits in (5, 6):
        hb_lo, hb_hi = _high_bits8(builder, wptr, offs, bits)
        lo, hi = builder.or_(lo, hb_lo), builder.or_(hi, hb_hi)
    elif bits != 4:
        raise ValueError(f"no int8-activation tile for int{bits} weights")
    return lo, hi
