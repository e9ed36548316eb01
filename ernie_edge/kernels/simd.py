"""llvmlite intrinsics for the quantized dot products (the loops LLVM does not vectorise itself).

Legend: K input features, B = K/32 activation blocks, G weight group size (32, 64 or 128).

The dot products take int16 activations (x quantized per block of 32, see `act_quant.quantize_act`) and
integer weight codes, so a block of 32 products is an exact integer dot, converted to float and
scaled once per block (llama.cpp's Q4_0 x Q8_0 scheme with 16-bit instead of 8-bit activations:
the activation rounding error is 1/258 of int8's). Each row result is

    sum_b  ws[b >> log2(G/32)] * xd[b] * sum_j code[b, j] * xq[b, j]

(int8 activations, the CPU backend's default decode for int4 weights, go to kernels/dot8.py's row
dots instead: `rows_dot4` / `rows_dot1` pick by the activations' type.)

For int4 the stored nibble is code + 8, so the kernel forms sum_j nibble * xq - xs[b] in
integers, with xs[b] = 8 * sum_j xq[b, j] precomputed per activation block.

Weights are widened to int16 (vpmovzxbw / vpmovsxbw) and multiplied with i16 x i16 -> i32
pair sums. Code paths, fixed by `_jit.SIMD` when a kernel is compiled (the numba cache directory
is per path):
  "avxvnni"  vpdpwssd (AVX-VNNI or AVX512-VNNI/VL): multiply, pair-sum and accumulate in one
  "avx2"     vpmaddwd + vpaddd
  "generic"  plain LLVM vector IR (widen to i32, multiply, add), lowered by LLVM for any CPU
             (NEON on ARM, SSE2 on old x86).
All paths give the same integer block sums (exact: every i32 lane stays below 2^24, so the
conversion to float is exact too); only the float accumulation order differs.

Each intrinsic reads `nrows` consecutive rows starting at flat element offset `woff` of a
C-contiguous weight array (wstride elements per row) and software-prefetches the next group of
rows, so that one core overlaps memory latency with the arithmetic instead of waiting on it.
"""

from __future__ import annotations

from functools import partial

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import _jit, dot8, ir
from .codes import block_offset
from .ir import F32, F32x8, F32x16, I8, I8x16, I8x32, I16, I16x16, I32, I32x8, I32x16, I64


def _prefetch_ahead(builder, wptr, woff, wstride, i, nrows, bytes_per_block):
    """Software-prefetch the next row group's weights, one cache line per 64 bytes consumed.

    The `nrows` rows being read are contiguous (nrows * wstride bytes); block i consumes
    nrows * bytes_per_block of them, so prefetching the same amount of the following
    nrows * wstride bytes keeps the next group's lines in flight while this one computes.
    """
    step = nrows * bytes_per_block
    ahead = builder.add(woff, builder.mul(ir.c64(nrows), wstride))
    ir.prefetch_lines(builder, wptr, builder.add(ahead, builder.mul(i, ir.c64(step))), step)


def _dot_i16(builder, wlo, whi, xlo, xhi, init):
    """init + (wlo . xlo) + (whi . xhi) as <8 x i32> partial sums (exact), all <16 x i16> inputs.

    Only the sum over the 8 lanes is used, so each path may group the 32 products differently.
    "avxvnni": two chained vpdpwssd; "avx2": vpmaddwd twice (i16 x i16 -> pairs summed in i32;
    it only overflows for -32768 * -32768 pairs, and activations are in [-32767, 32767]);
    "generic": widen to i32, multiply, add.
    """
    if _jit.SIMD == "avxvnni":
        acc = ir.call(builder, "llvm.x86.avx512.vpdpwssd.256", I32x8,
                      [init, builder.bitcast(wlo, I32x8), builder.bitcast(xlo, I32x8)])
        return ir.call(builder, "llvm.x86.avx512.vpdpwssd.256", I32x8,
                       [acc, builder.bitcast(whi, I32x8), builder.bitcast(xhi, I32x8)])
    if _jit.SIMD == "avx2":
        plo = ir.call(builder, "llvm.x86.avx2.pmadd.wd", I32x8, [wlo, xlo])
        phi = ir.call(builder, "llvm.x86.avx2.pmadd.wd", I32x8, [whi, xhi])
        return builder.add(init, builder.add(plo, phi))
    prod = builder.add(builder.mul(builder.sext(wlo, I32x16), builder.sext(xlo, I32x16)),
                       builder.mul(builder.sext(whi, I32x16), builder.sext(xhi, I32x16)))
    lo8 = builder.shuffle_vector(prod, prod, ir.mask(range(8)))
    hi8 = builder.shuffle_vector(prod, prod, ir.mask(range(8, 16)))
    return builder.add(init, builder.add(lo8, hi8))


def _rows_dot(context, builder, sig, args, nrows, unpack):
    """Shared body of the q4 / q8 row-dot intrinsics for `nrows` rows at once.

    args: (w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled)
      w       weight array (u8 packed nibbles or i8 codes), woff flat offset of row 0's start,
              wstride elements between consecutive rows; tiled: the rows are the 4-row tile at
              woff (codes.block_offset)
      s       uint16 fp16 scales, soff offset of row 0's first scale, sstride scales per row
      xq/xd/xs  quantized activation (int16 [K]), block scales (f32 [B]), int4 offset term
              (int32 [B], 8 * sum of the block's xq; unused for int8 weights)
      nblk    number of 32-blocks B;  log2sub = log2(G / 32) (weight group -> activation block)

    Per block: the exact integer sum_j code_j * xq_j (for int4: nibble * xq minus the offset term,
    still in integers), converted to float and multiplied by ws * xd once.
    """
    (w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled) = args
    wty, _, _, sty, _, _, xqty, xdty, xsty, _, _, _ = sig.args
    wptr = ir.data_ptr(context, builder, wty, w, I8)
    sptr = ir.data_ptr(context, builder, sty, s, I16)
    xqptr = ir.data_ptr(context, builder, xqty, xq, I16)
    xdptr = ir.data_ptr(context, builder, xdty, xd, F32)
    xsptr = ir.data_ptr(context, builder, xsty, xs, I32)
    zero8 = ir.Constant(F32x8, [0.0] * 8)
    izero8 = ir.Constant(I32x8, [0] * 8)
    accs = [cgutils.alloca_once_value(builder, zero8) for _ in range(nrows)]
    bytes_per_block = 16 if unpack else 32
    with cgutils.for_range(builder, nblk) as loop:
        i = loop.index
        _prefetch_ahead(builder, wptr, woff, wstride, i, nrows, bytes_per_block)
        x0 = builder.mul(i, ir.c64(32))
        xlo = ir.load_vec(builder, xqptr, x0, I16x16)
        xhi = ir.load_vec(builder, xqptr, builder.add(x0, ir.c64(16)), I16x16)
        xdi = builder.load(builder.gep(xdptr, [i]))
        if unpack:  # nibbles are code + 8: start every block's sum at -8 * sum(xq) (in lane 0)
            init = builder.insert_element(izero8, builder.neg(builder.load(builder.gep(xsptr, [i]))), ir.c32(0))
        else:
            init = izero8
        g = builder.lshr(i, log2sub)
        for r in range(nrows):
            rr = ir.c64(r)
            wo = block_offset(builder, woff, wstride, r, i, 4 if unpack else 8, tiled)
            srow = builder.add(soff, builder.mul(rr, sstride))
            ws = ir.f16_to_f32(builder, builder.load(builder.gep(sptr, [builder.add(srow, g)])))
            if unpack:
                raw = builder.zext(ir.load_vec(builder, wptr, wo, I8x16), I16x16)
                wlo = builder.and_(raw, ir.Constant(I16x16, [15] * 16))
                whi = builder.lshr(raw, ir.Constant(I16x16, [4] * 16))
            else:
                wlo = builder.sext(ir.load_vec(builder, wptr, wo, I8x16), I16x16)
                whi = builder.sext(ir.load_vec(builder, wptr, builder.add(wo, ir.c64(16)), I8x16), I16x16)
            p32 = _dot_i16(builder, wlo, whi, xlo, xhi, init)
            f = builder.sitofp(p32, F32x8)
            dv = ir.splat(builder, builder.fmul(ws, xdi), F32x8)
            acc = builder.load(accs[r])
            builder.store(builder.fadd(acc, builder.fmul(f, dv, flags=("contract",)), flags=("contract",)), accs[r])
    return [ir.hsum8(builder, builder.load(accs[r])) for r in range(nrows)]


# q4: w is packed uint8 [.., O, K/2]; q8: w is int8 codes [.., O, K]. Both: s is the uint16 view of
# the fp16 scales [.., O, K/G]. dot1 returns a float32, dot4 a 4-tuple for rows r..r+3.
q4_dot1 = ir.row_dot_intrinsic(1, partial(_rows_dot, nrows=1, unpack=True))
q4_dot4 = ir.row_dot_intrinsic(4, partial(_rows_dot, nrows=4, unpack=True))
q8_dot1 = ir.row_dot_intrinsic(1, partial(_rows_dot, nrows=1, unpack=False))
q8_dot4 = ir.row_dot_intrinsic(4, partial(_rows_dot, nrows=4, unpack=False))


def rows_dot4(w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled):
    """Four consecutive rows' quantized dots; picks q4 (w uint8) or q8 (w int8) at compile time, and
    kernels/dot8.py's int4 row dot when the activations are int8 (xq int8 in the span order)."""
    raise NotImplementedError("rows_dot4 is only callable from numba-compiled code")


def rows_dot1(w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled):
    """One row's quantized dot; picks q4 (w uint8) or q8 (w int8) at compile time."""
    raise NotImplementedError("rows_dot1 is only callable from numba-compiled code")


@overload(rows_dot4, inline="always")
def _rows_dot4_impl(w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled):
    if xq.dtype == types.int8:  # int8 activations (act_quant.quantize_row8): int4 weights only
        dot = dot8.q4_row4
    else:
        dot = q4_dot4 if w.dtype == types.uint8 else q8_dot4
    return lambda w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled: dot(
        w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled)


@overload(rows_dot1, inline="always")
def _rows_dot1_impl(w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled):
    if xq.dtype == types.int8:
        dot = dot8.q4_row1
    else:
        dot = q4_dot1 if w.dtype == types.uint8 else q8_dot1
    return lambda w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled: dot(
        w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled)


# ---- dequantization of whole rows (prefill tiles) ----------------------------------------------

def _dequant_row(context, builder, sig, args, unpack):
    """out[ooff + j] = float(code[j]) * scale[group(j)] for one row of K values, as vector ops.

    args: (w, woff, s, soff, gs, out, ooff, k, tiled). For int4, 32-block b = (group g, chunk c)
    takes the 16 bytes at block b's offset (woff + 16 b by rows; in 4-row tiles, woff being the row's
    first block, `codes.block_offset`), whose low nibbles are values g*gs + 16c + (0..15) and high
    nibbles the same + gs/2 (the Q4_0 order of ernie_edge/formats/quant.py). int8 rows are never
    tiled.
    """
    (w, woff, s, soff, gs, out, ooff, k, tiled) = args
    wty, _, sty, _, _, oty, _, _, _ = sig.args
    wptr = ir.data_ptr(context, builder, wty, w, I8)
    sptr = ir.data_ptr(context, builder, sty, s, I16)
    optr = ir.data_ptr(context, builder, oty, out, F32)
    nblk = builder.udiv(k, ir.c64(32))
    chunks = builder.udiv(gs, ir.c64(32))
    half = builder.udiv(gs, ir.c64(2))

    def store16(vals_i8, base, scale):
        v = builder.sitofp(builder.sext(vals_i8, I32x16), F32x16)
        p = builder.bitcast(builder.gep(optr, [base]), F32x16.as_pointer())
        builder.store(builder.fmul(v, ir.splat(builder, scale, F32x16)), p, align=4)

    with cgutils.for_range(builder, nblk) as loop:
        b = loop.index
        g = builder.udiv(b, chunks)
        c = builder.urem(b, chunks)
        scale = ir.f16_to_f32(builder, builder.load(builder.gep(sptr, [builder.add(soff, g)])))
        obase = builder.add(ooff, builder.add(builder.mul(g, gs), builder.mul(c, ir.c64(16))))
        if unpack:
            raw = ir.load_vec(builder, wptr, block_offset(builder, woff, ir.c64(0), 0, b, 4, tiled), I8x16)
            eight = ir.Constant(I8x16, [8] * 16)
            lo = builder.sub(builder.and_(raw, ir.Constant(I8x16, [15] * 16)), eight)
            hi = builder.sub(builder.lshr(raw, ir.Constant(I8x16, [4] * 16)), eight)
            store16(lo, obase, scale)
            store16(hi, builder.add(obase, half), scale)
        else:
            raw = ir.load_vec(builder, wptr, builder.add(woff, builder.mul(b, ir.c64(32))), I8x32)
            ob = builder.add(ooff, builder.mul(b, ir.c64(32)))
            store16(builder.shuffle_vector(raw, raw, ir.mask(range(16))), ob, scale)
            store16(builder.shuffle_vector(raw, raw, ir.mask(range(16, 32))), builder.add(ob, ir.c64(16)), scale)
    return context.get_dummy_value()


def _make_dequant_row(unpack):
    def typer(typingctx, w, woff, s, soff, gs, out, ooff, k, tiled):
        sig = types.void(w, types.intp, s, types.intp, types.intp, out, types.intp, types.intp, types.boolean)

        def codegen(context, builder, signature, args):
            return _dequant_row(context, builder, signature, args, unpack)

        return sig, codegen

    return intrinsic(typer)


# (w, woff, s, soff, gs, out, ooff, k, tiled): one row of K weights -> float32 out[ooff : ooff + K]
q4_dequant_row = _make_dequant_row(unpack=True)
q8_dequant_row = _make_dequant_row(unpack=False)


@intrinsic
def f32_from_bits(typingctx, bits):
    """int32 bit pattern -> float32 (a bitcast)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], F32)

    return sig, codegen


def _counter(context, builder, signature, args):
    """Pointer to int64 counter[index], the first two arguments of the counter intrinsics."""
    return builder.gep(ir.data_ptr(context, builder, signature.args[0], args[0], I64), [args[1]])


def _make_fetch_add(ordering: str):
    def typer(typingctx, counter, index, value):
        sig = types.int64(counter, types.intp, types.int64)

        def codegen(context, builder, signature, args):
            return builder.atomic_rmw("add", _counter(context, builder, signature, args), args[2], ordering)

        return sig, codegen

    return intrinsic(typer)


# fetch_add(counter, index, value): atomically add value to int64 counter[index]; returns the old
# value (lock xadd). The decode kernels claim their work units with it (kernels/q8.py `_next_unit`).
fetch_add = _make_fetch_add("monotonic")


# ---- phases inside one parallel region (kernels/moe.py's routed gate/up region) ------------------
# A kernel that runs two dependent phases in one region hands results from one thread to another
# through a counter: the writer's fetch_add_sync releases what it wrote before, the reader's
# load_acquire of the value it waits for sees all of it.

# fetch_add_sync: `fetch_add` that also orders this thread's earlier writes before it and its later
# reads after it (acq_rel): the thread that sees the count complete sees everything counted.
fetch_add_sync = _make_fetch_add("acq_rel")


@intrinsic
def load_acquire(typingctx, counter, index):
    """int64 counter[index], read atomically; later reads see what was written before the store or
    fetch_add_sync that wrote it (acquire)."""
    sig = types.int64(counter, types.intp)

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_counter(context, builder, signature, args), "acquire", 8)

    return sig, codegen


@intrinsic
def store_release(typingctx, counter, index, value):
    """counter[index] = value, atomically, after every earlier write of this thread (release)."""
    sig = types.void(counter, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        builder.store_atomic(args[2], _counter(context, builder, signature, args), "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def spin_pause(typingctx):
    """One spin-wait step: x86 `pause` (frees the core's pipeline for its sibling and saves power),
    nothing elsewhere (the wait loop's atomic load keeps it a wait)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _jit.IS_X86:
            ir.call(builder, "llvm.x86.sse2.pause", ir.VoidType(), [])
        return context.get_dummy_value()

    return sig, codegen
