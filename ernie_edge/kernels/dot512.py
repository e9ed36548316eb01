"""AVX-512 body of qbatch's register tile of four weight rows x up to four tokens (CPUs with AVX-512).

Legend: K input features, B = K/32 activation blocks, G weight group size, P the <16 x i32>
integer dot vector of one row and one token.

qbatch's 256-bit tile (qbatch._tile_body) folds its four rows with vphaddd (three uops each) once
per block and token. Here one step takes FOUR rows x TWO blocks:

- the rows' two blocks are widened once per step for all tokens of the tile: int4 nibbles
  (vpmovzxbw, and 15 / shift 4, minus 8) as [b0 | b1] low and high halves; int8 codes permuted by
  quadwords into [b0 | b1] first and second halves; int5 / int6 pairs in 512-bit vectors
  (kernels/codes.py's pair_i16); the scale vector ws[r, g(b)] (one 32-bit
  load per row when G = 32: both blocks' scales; one 16-bit load when G >= 64: one group);
- per token: the activations shuffled to match, P = two 512-bit vpdpwssd (AVX512-VNNI; vpmaddwd +
  add with AVX512BW only), lanes 0..7 block b0 and 8..15 block b1; the four rows' P fold with two
  levels of unpack + add (128-bit chunk c holds rows 0..3's sums of lanes 4c..4c+3; chunks 0, 1:
  b0, chunks 2, 3: b1); ONE convert and ONE multiply-add with ws * xd[token, b];
- at the end the four chunks add up to the four row results.

Integer exactness: a chunk lane sums 16 products: int4 at most 16 * 8 * 32767 < 2^24 (exact),
int6 at most 16 * 32 * 32767 < 2^24 (exact); int8 up to 16 * 127 * 32767 ~ 2^26, so the conversion may round by a relative 6e-8, far below the
activation quantization error (as qbatch's own vphaddd fold). An odd last block runs as a step
whose second block is zero (never read).

The same scheme for the one-token decode dot (simd.rows_dot4) was 1.14x faster on L2-resident
weights but 7 % slower for whole-model decode on one thread (docs/PERF.md), so decode keeps the
256-bit body.
"""

from __future__ import annotations

from numba.core import cgutils

from . import _jit, ir
from .codes import BLOCK_BYTES, block_i16, block_offset, pair_i16
from .ir import F32, F32x16, I8, I8x16, I8x32, I8x64, I16, I16x16, I16x32, I32, I32x16, I64

F32x2 = ir.VectorType(F32, 2)
F32x4 = ir.VectorType(F32, 4)
I16x4 = ir.VectorType(I16, 4)
I16x8 = ir.VectorType(I16, 8)
I32x4 = ir.VectorType(I32, 4)
I64x4 = ir.VectorType(I64, 4)
I64x8 = ir.VectorType(I64, 8)


def _dot(builder, init, wa, xa, wb, xb):
    """init + wa . xa + wb . xb as <16 x i32> pair sums (all inputs <32 x i16>)."""
    if _jit.VNNI512:  # inline asm: LLVM would split the chained second vpdpwssd into vpmaddwd + vpaddd
        ty = ir.FunctionType(I32x16, [I32x16, I32x16, I32x16])
        acc = init
        for w, x in ((wa, xa), (wb, xb)):
            acc = builder.asm(ty, "vpdpwssd $2, $1, $0", "=v,v,v,0",
                              [builder.bitcast(w, I32x16), builder.bitcast(x, I32x16), acc], False, name="dp")
        return acc
    pa = ir.call(builder, "llvm.x86.avx512.pmaddw.d.512", I32x16, [wa, xa])
    pb = ir.call(builder, "llvm.x86.avx512.pmaddw.d.512", I32x16, [wb, xb])
    return builder.add(init, builder.add(pa, pb))


def _unpack(builder, a, b, width):
    """(unpacklo, unpackhi) of 32-bit (width 1) or 64-bit (width 2) elements within each 128-bit chunk."""
    lo, hi = [], []
    for c in range(4):
        base = 4 * c
        if width == 1:
            lo += [base, 16 + base, base + 1, 17 + base]
            hi += [base + 2, 18 + base, base + 3, 19 + base]
        else:
            lo += [base, base + 1, 16 + base, 17 + base]
            hi += [base + 2, base + 3, 18 + base, 19 + base]
    return builder.shuffle_vector(a, b, ir.mask(lo)), builder.shuffle_vector(a, b, ir.mask(hi))


def _fold4(builder, p):
    """Four <16 x i32> row vectors -> one: chunk c lane r = sum of p[r]'s lanes 4c..4c+3."""
    lo, hi = _unpack(builder, p[0], p[1], 1)
    s01 = builder.add(lo, hi)
    lo, hi = _unpack(builder, p[2], p[3], 1)
    s23 = builder.add(lo, hi)
    lo, hi = _unpack(builder, s01, s23, 2)
    return builder.add(lo, hi)


def _pair_weights(builder, wptr, wo, bits, single):
    """Row weights of blocks b0, b1 (b1 zero when `single`) as (first halves, second halves), each
    <32 x i16> = [b0's 16 | b1's 16] signed codes (block layouts in kernels/codes.py)."""
    if bits == 4:
        if single:
            raw = ir.load_vec(builder, wptr, wo, I8x16)
            raw = builder.shuffle_vector(raw, ir.Constant(I8x16, [0] * 16), ir.mask(range(32)))
        else:
            raw = ir.load_vec(builder, wptr, wo, I8x32)
        wide = builder.zext(raw, I16x32)
        lo = builder.and_(wide, ir.Constant(I16x32, [15] * 32))
        hi = builder.lshr(wide, ir.Constant(I16x32, [4] * 32))
        eight = ir.Constant(I16x32, [8] * 32)
        return builder.sub(lo, eight), builder.sub(hi, eight)
    if bits == 8:
        if single:
            raw = ir.load_vec(builder, wptr, wo, I8x32)
            raw = builder.shuffle_vector(raw, ir.Constant(I8x32, [0] * 32), ir.mask(range(64)))
        else:
            raw = ir.load_vec(builder, wptr, wo, I8x64)
        q = builder.bitcast(raw, I64x8)  # quadwords: b0 = 0..3, b1 = 4..7
        first = builder.bitcast(builder.shuffle_vector(q, q, ir.mask([0, 1, 4, 5])), I8x32)
        second = builder.bitcast(builder.shuffle_vector(q, q, ir.mask([2, 3, 6, 7])), I8x32)
        return builder.sext(first, I16x32), builder.sext(second, I16x32)
    if not single:  # int5 / int6
        return pair_i16(builder, wptr, wo, bits)
    lo0, hi0 = block_i16(builder, wptr, wo, bits)
    zero = ir.Constant(I16x16, [0] * 16)
    return (builder.shuffle_vector(lo0, zero, ir.mask(range(32))),
            builder.shuffle_vector(hi0, zero, ir.mask(range(32))))


def _pair_x(builder, xqptr, x0, single):
    """Activations of blocks b0, b1 (starting at element x0) as (first halves, second halves), each
    <32 x i16> = [b0's 16 | b1's 16], matching `_pair_weights`."""
    xa = ir.load_vec(builder, xqptr, x0, I16x32)  # [b0 x0..15 | b0 x16..31]
    if single:
        xb = ir.Constant(I16x32, [0] * 32)
    else:
        xb = ir.load_vec(builder, xqptr, builder.add(x0, ir.c64(32)), I16x32)
    return (builder.shuffle_vector(xa, xb, ir.mask(list(range(16)) + list(range(32, 48)))),
            builder.shuffle_vector(xa, xb, ir.mask(list(range(16, 32)) + list(range(48, 64)))))


def _pair_xd(builder, xdptr, d0, single):
    """<16 x float>: lanes 0..7 the activation block scale xd[d0], lanes 8..15 xd[d0 + 1] (0 if single)."""
    if single:
        xd = builder.insert_element(ir.Constant(F32x2, [0.0, 0.0]), builder.load(builder.gep(xdptr, [d0])), ir.c32(0))
    else:
        xd = ir.load_vec(builder, xdptr, d0, F32x2, align=4)
    return builder.shuffle_vector(xd, xd, ir.mask([0] * 8 + [1] * 8))


def _pair_scales(builder, sptr, soffs, b0, log2sub, g32, single):
    """<16 x float> fp16 weight scales: lanes 0..7 rows 0..3 (twice) of block b0, 8..15 of b1."""
    g0 = builder.lshr(b0, log2sub)
    if g32 and not single:  # one 32-bit load per row: the scales of groups b0 and b0 + 1
        v = ir.Constant(I32x4, ir.Undefined)
        for r, so in enumerate(soffs):
            p = builder.bitcast(builder.gep(sptr, [builder.add(so, g0)]), I32.as_pointer())
            v = builder.insert_element(v, builder.load(p, align=2), ir.c32(r))
        f = ir.f16_to_f32(builder, builder.bitcast(v, I16x8))  # [r0b0 r0b1 r1b0 r1b1 ...]
        order = [0, 2, 4, 6] * 2 + [1, 3, 5, 7] * 2
        return builder.shuffle_vector(f, f, ir.mask(order))
    v = ir.Constant(I16x4, ir.Undefined)
    for r, so in enumerate(soffs):
        v = builder.insert_element(v, builder.load(builder.gep(sptr, [builder.add(so, g0)])), ir.c32(r))
    f = ir.f16_to_f32(builder, v)
    if single:
        return builder.shuffle_vector(f, ir.Constant(F32x4, [0.0] * 4), ir.mask([0, 1, 2, 3] * 2 + [4] * 8))
    return builder.shuffle_vector(f, f, ir.mask([0, 1, 2, 3] * 4))


def _blocks(builder, nblk, log2sub, step):
    """Call step(b0, index, g32, single) for every pair of blocks (a loop for G = 32 and one for
    G >= 64, chosen once), then for the odd last block (single)."""
    npairs = builder.lshr(nblk, ir.c64(1))

    def loop(g32):
        with cgutils.for_range(builder, npairs) as lp:
            step(builder.mul(lp.index, ir.c64(2)), lp.index, g32, False)

    with builder.if_else(builder.icmp_unsigned("==", log2sub, ir.c64(0))) as (is_g32, other):
        with is_g32:
            loop(True)
        with other:
            loop(False)
    with builder.if_then(builder.icmp_unsigned("!=", builder.and_(nblk, ir.c64(1)), ir.c64(0))):
        step(builder.sub(nblk, ir.c64(1)), None, False, True)


def _chunks_sum(builder, v):
    """<4 x float>: the four 128-bit chunks of v added (the four rows' results)."""
    q = [builder.shuffle_vector(v, v, ir.mask(range(4 * c, 4 * c + 4))) for c in range(4)]
    return builder.fadd(builder.fadd(q[0], q[1]), builder.fadd(q[2], q[3]))


def tile4(context, builder, sig, args, ntok, bits):
    """qbatch's register tile for four weight rows x ntok tokens (the arguments of qbatch._tile_body):
    each step widens the four rows' two blocks once and dots them with every token of the tile;
    res[4 j + r] = the dot of row r with token j. Codes are made signed (int4: nibble - 8) once per
    step, so no offset term is needed."""
    (w, woff, wstride, s, soff, sstride, xq, xd, toks, t0, nblk, log2sub, res, tiled) = args
    wty, _, _, sty, _, _, xqty, xdty, tty, _, _, _, rty, _ = sig.args
    wptr, sptr = ir.data_ptr(context, builder, wty, w, I8), ir.data_ptr(context, builder, sty, s, I16)
    xqptr, xdptr = ir.data_ptr(context, builder, xqty, xq, I16), ir.data_ptr(context, builder, xdty, xd, F32)
    tptr, rptr = ir.data_ptr(context, builder, tty, toks, I64), ir.data_ptr(context, builder, rty, res, F32)
    rows = [builder.load(builder.gep(tptr, [builder.add(t0, ir.c64(j))])) for j in range(ntok)]
    xoffs = [builder.mul(row, builder.mul(nblk, ir.c64(32))) for row in rows]
    doffs = [builder.mul(row, nblk) for row in rows]
    soffs = [builder.add(soff, builder.mul(ir.c64(r), sstride)) for r in range(4)]
    bpb = BLOCK_BYTES[bits]
    ahead = builder.add(woff, builder.mul(ir.c64(4), wstride))
    accs = [cgutils.alloca_once_value(builder, ir.Constant(F32x16, [0.0] * 16)) for _ in range(ntok)]
    zero = ir.Constant(I32x16, [0] * 16)

    def step(b0, index, g32, single):
        if index is not None:
            ir.prefetch_lines(builder, wptr, builder.add(ahead, builder.mul(index, ir.c64(8 * bpb))), 8 * bpb)
        wv = [_pair_weights(builder, wptr, block_offset(builder, woff, wstride, r, b0, bits, tiled), bits, single)
              for r in range(4)]
        ws = _pair_scales(builder, sptr, soffs, b0, log2sub, g32, single)
        for j in range(ntok):
            first, second = _pair_x(builder, xqptr, builder.add(xoffs[j], builder.mul(b0, ir.c64(32))), single)
            f = builder.sitofp(_fold4(builder, [_dot(builder, zero, wa, first, wb, second) for wa, wb in wv]), F32x16)
            scale = builder.fmul(ws, _pair_xd(builder, xdptr, builder.add(doffs[j], b0), single))
            builder.store(ir.fma(builder, f, scale, builder.load(accs[j])), accs[j])

    _blocks(builder, nblk, log2sub, step)
    for j in range(ntok):
        dst = builder.bitcast(builder.gep(rptr, [ir.c64(4 * j)]), F32x4.as_pointer())
        builder.store(_chunks_sum(builder, builder.load(accs[j])), dst, align=4)
    return context.get_dummy_value()
