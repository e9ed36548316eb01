"""llvmlite intrinsics for the quantized dot products (the loops LLVM does not vectorise itself).

Legend: K input features, B = K/32 activation blocks, G weight group size (32, 64 or 128).

The dot products take int16 activations (x quantized per block of 32, see `q8.quantize_act`) and
integer weight codes, so a block of 32 products is an exact integer dot, converted to float and
scaled once per block (llama.cpp's Q4_0 x Q8_0 scheme with 16-bit instead of 8-bit activations:
the activation rounding error is 1/258 of int8's). Each row result is

    sum_b  ws[b >> log2(G/32)] * xd[b] * sum_j code[b, j] * xq[b, j]

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
rows: without the prefetch one core reads int4 weights at ~6 GB/s instead of ~13 (it waits on
memory latency instead of overlapping it with the arithmetic).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import _jit

# llvm.prefetch locality of the weight prefetches: 2 = prefetcht1 (into L2, not L1). Into L1 (3), the
# next row group's lines pushed out the lines being read: whole-model decode on the AMD EPYC VM went
# from 7.3-7.8 to 9.0-11.1 tok/s with L2 (three alternating A/B runs of `ernie-edge bench`).
PREFETCH_LOCALITY = 2
_I8x16 = ir.VectorType(ir.IntType(8), 16)
_I8x32 = ir.VectorType(ir.IntType(8), 32)
_I16x16 = ir.VectorType(ir.IntType(16), 16)
_I32x8 = ir.VectorType(ir.IntType(32), 8)
_F32x8 = ir.VectorType(ir.FloatType(), 8)
_F32 = ir.FloatType()
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _idx(values):
    """A constant <n x i32> shuffle mask."""
    values = list(values)
    return ir.Constant(ir.VectorType(_I32, len(values)), values)


def _data_ptr(context, builder, arrty, arr, elem_ty):
    """Pointer to the first element of a numba array, cast to `elem_ty*`."""
    ary = context.make_array(arrty)(context, builder, arr)
    return builder.bitcast(ary.data, elem_ty.as_pointer())


def _x86(builder, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(fn, args)


def _fp16_to_f32(builder, h16):
    """IEEE half (as i16) -> float. x86 paths: LLVM's fpext (vcvtsh2ss / vcvtph2ps, F16C is checked
    in _jit). Generic path: exact bit manipulation, so no compiler-rt helper is needed."""
    if _jit.SIMD != "generic":
        return builder.fpext(builder.bitcast(h16, ir.HalfType()), _F32)
    h32 = builder.zext(h16, _I32)
    sign = builder.shl(builder.and_(h32, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 16))
    mag = builder.shl(builder.and_(h32, ir.Constant(_I32, 0x7FFF)), ir.Constant(_I32, 13))
    # The magnitude bits read as an f32 are the value times 2^-112 (exact for normal and subnormal
    # halves); multiply back. Inf/NaN scales do not occur (the format rejects them).
    f = builder.fmul(builder.bitcast(mag, _F32), ir.Constant(_F32, 2.0 ** 112))
    return builder.bitcast(builder.or_(builder.bitcast(f, _I32), sign), _F32)


def _hsum8(builder, v):
    """Horizontal sum of a <8 x float>."""
    lo = builder.shuffle_vector(v, v, _idx(range(4)))
    hi = builder.shuffle_vector(v, v, _idx(range(4, 8)))
    s4 = builder.fadd(lo, hi)
    a = builder.shuffle_vector(s4, s4, _idx([0, 1]))
    b = builder.shuffle_vector(s4, s4, _idx([2, 3]))
    s2 = builder.fadd(a, b)
    return builder.fadd(builder.extract_element(s2, ir.Constant(_I32, 0)),
                        builder.extract_element(s2, ir.Constant(_I32, 1)))


def _prefetch_ahead(builder, wptr, woff, wstride, i, nrows, bytes_per_block):
    """Software-prefetch the next row group's weights, one cache line per 64 bytes consumed.

    The `nrows` rows being read are contiguous (nrows * wstride bytes); block i consumes
    nrows * bytes_per_block of them, so prefetching the same amount of the following
    nrows * wstride bytes keeps the next group's lines in flight while this one computes.
    Without it a single core reads int4 weights at ~6 GB/s instead of ~13 (memory latency).
    """
    step = nrows * bytes_per_block
    ahead = builder.add(woff, builder.mul(ir.Constant(_I64, nrows), wstride))
    base = builder.add(ahead, builder.mul(i, ir.Constant(_I64, step)))
    fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
    for line in range(0, step, 64):
        p = builder.gep(wptr, [builder.add(base, ir.Constant(_I64, line))])
        builder.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, PREFETCH_LOCALITY), ir.Constant(_I32, 1)])


def _dot_i16(builder, wlo, whi, xlo, xhi, init):
    """init + (wlo . xlo) + (whi . xhi) as <8 x i32> partial sums (exact), all <16 x i16> inputs.

    Only the sum over the 8 lanes is used, so each path may group the 32 products differently.
    "avxvnni": two chained vpdpwssd; "avx2": vpmaddwd twice (i16 x i16 -> pairs summed in i32;
    it only overflows for -32768 * -32768 pairs, and activations are in [-32767, 32767]);
    "generic": widen to i32, multiply, add.
    """
    if _jit.SIMD == "avxvnni":
        acc = _x86(builder, "llvm.x86.avx512.vpdpwssd.256", _I32x8,
                   [init, builder.bitcast(wlo, _I32x8), builder.bitcast(xlo, _I32x8)])
        return _x86(builder, "llvm.x86.avx512.vpdpwssd.256", _I32x8,
                    [acc, builder.bitcast(whi, _I32x8), builder.bitcast(xhi, _I32x8)])
    if _jit.SIMD == "avx2":
        plo = _x86(builder, "llvm.x86.avx2.pmadd.wd", _I32x8, [wlo, xlo])
        phi = _x86(builder, "llvm.x86.avx2.pmadd.wd", _I32x8, [whi, xhi])
        return builder.add(init, builder.add(plo, phi))
    vi = ir.VectorType(_I32, 16)
    prod = builder.add(builder.mul(builder.sext(wlo, vi), builder.sext(xlo, vi)),
                       builder.mul(builder.sext(whi, vi), builder.sext(xhi, vi)))
    lo8 = builder.shuffle_vector(prod, prod, _idx(range(8)))
    hi8 = builder.shuffle_vector(prod, prod, _idx(range(8, 16)))
    return builder.add(init, builder.add(lo8, hi8))


def _load_vec(builder, ptr, offset, vty):
    """Unaligned load of a vector of type vty at ptr + offset (elements of ptr's type)."""
    return builder.load(builder.bitcast(builder.gep(ptr, [offset]), vty.as_pointer()), align=1)


def _rows_dot(context, builder, sig, args, nrows, unpack):
    """Shared body of the q4 / q8 row-dot intrinsics for `nrows` rows at once.

    args: (w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub)
      w       weight array (u8 packed nibbles or i8 codes), woff flat offset of row 0's start,
              wstride elements between consecutive rows
      s       uint16 fp16 scales, soff offset of row 0's first scale, sstride scales per row
      xq/xd/xs  quantized activation (int16 [K]), block scales (f32 [B]), int4 offset term
              (int32 [B], 8 * sum of the block's xq; unused for int8 weights)
      nblk    number of 32-blocks B;  log2sub = log2(G / 32) (weight group -> activation block)

    Per block: the exact integer sum_j code_j * xq_j (for int4: nibble * xq minus the offset term,
    still in integers), converted to float and multiplied by ws * xd once.
    """
    (w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub) = args
    wty, _, _, sty, _, _, xqty, xdty, xsty, _, _ = sig.args
    wptr = _data_ptr(context, builder, wty, w, ir.IntType(8))
    sptr = _data_ptr(context, builder, sty, s, _I16)
    xqptr = _data_ptr(context, builder, xqty, xq, _I16)
    xdptr = _data_ptr(context, builder, xdty, xd, _F32)
    xsptr = _data_ptr(context, builder, xsty, xs, _I32)
    zero8 = ir.Constant(_F32x8, [0.0] * 8)
    izero8 = ir.Constant(_I32x8, [0] * 8)
    accs = [cgutils.alloca_once_value(builder, zero8) for _ in range(nrows)]
    bytes_per_block = 16 if unpack else 32
    with cgutils.for_range(builder, nblk) as loop:
        i = loop.index
        _prefetch_ahead(builder, wptr, woff, wstride, i, nrows, bytes_per_block)
        x0 = builder.mul(i, ir.Constant(_I64, 32))
        xlo = _load_vec(builder, xqptr, x0, _I16x16)
        xhi = _load_vec(builder, xqptr, builder.add(x0, ir.Constant(_I64, 16)), _I16x16)
        xdi = builder.load(builder.gep(xdptr, [i]))
        if unpack:  # nibbles are code + 8: start every block's sum at -8 * sum(xq) (in lane 0)
            init = builder.insert_element(izero8, builder.neg(builder.load(builder.gep(xsptr, [i]))),
                                          ir.Constant(_I32, 0))
        else:
            init = izero8
        g = builder.lshr(i, log2sub)
        for r in range(nrows):
            rr = ir.Constant(_I64, r)
            wrow = builder.add(woff, builder.mul(rr, wstride))
            wo = builder.add(wrow, builder.mul(i, ir.Constant(_I64, bytes_per_block)))
            srow = builder.add(soff, builder.mul(rr, sstride))
            ws = _fp16_to_f32(builder, builder.load(builder.gep(sptr, [builder.add(srow, g)])))
            if unpack:
                raw = builder.zext(_load_vec(builder, wptr, wo, _I8x16), _I16x16)
                wlo = builder.and_(raw, ir.Constant(_I16x16, [15] * 16))
                whi = builder.lshr(raw, ir.Constant(_I16x16, [4] * 16))
            else:
                wlo = builder.sext(_load_vec(builder, wptr, wo, _I8x16), _I16x16)
                whi = builder.sext(_load_vec(builder, wptr, builder.add(wo, ir.Constant(_I64, 16)), _I8x16),
                                   _I16x16)
            p32 = _dot_i16(builder, wlo, whi, xlo, xhi, init)
            f = builder.sitofp(p32, _F32x8)
            d = builder.fmul(ws, xdi)
            dv = builder.insert_element(ir.Constant(_F32x8, ir.Undefined), d, ir.Constant(_I32, 0))
            dv = builder.shuffle_vector(dv, dv, ir.Constant(_I32x8, [0] * 8))
            acc = builder.load(accs[r])
            builder.store(builder.fadd(acc, builder.fmul(f, dv, flags=("contract",)), flags=("contract",)), accs[r])
    return [_hsum8(builder, builder.load(accs[r])) for r in range(nrows)]


def _make_rows_dot(nrows, unpack):
    def typer(typingctx, w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub):
        ret = types.float32 if nrows == 1 else types.UniTuple(types.float32, nrows)
        sig = ret(w, types.intp, types.intp, s, types.intp, types.intp, xq, xd, xs, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            vals = _rows_dot(context, builder, signature, args, nrows, unpack)
            if nrows == 1:
                return vals[0]
            return context.make_tuple(builder, signature.return_type, vals)

        return sig, codegen

    return intrinsic(typer)


# q4: w is packed uint8 [.., O, K/2]; q8: w is int8 codes [.., O, K]. Both: s is the uint16 view of
# the fp16 scales [.., O, K/G]. dot1 returns a float32, dot4 a 4-tuple for rows r..r+3.
q4_dot1 = _make_rows_dot(1, unpack=True)
q4_dot4 = _make_rows_dot(4, unpack=True)
q8_dot1 = _make_rows_dot(1, unpack=False)
q8_dot4 = _make_rows_dot(4, unpack=False)


@intrinsic
def f16_to_f32(typingctx, h):
    """uint16 bits of an IEEE half -> float32 (vcvtph2ps on x86; exact bit manipulation elsewhere)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return _fp16_to_f32(builder, args[0])

    return sig, codegen


def rows_dot4(w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub):
    """Four consecutive rows' quantized dots; picks q4 (w uint8) or q8 (w int8) at compile time."""
    raise NotImplementedError("rows_dot4 is only callable from numba-compiled code")


def rows_dot1(w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub):
    """One row's quantized dot; picks q4 (w uint8) or q8 (w int8) at compile time."""
    raise NotImplementedError("rows_dot1 is only callable from numba-compiled code")


@overload(rows_dot4, inline="always")
def _rows_dot4_impl(w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub):
    dot = q4_dot4 if w.dtype == types.uint8 else q8_dot4
    return lambda w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub: dot(
        w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub)


@overload(rows_dot1, inline="always")
def _rows_dot1_impl(w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub):
    dot = q4_dot1 if w.dtype == types.uint8 else q8_dot1
    return lambda w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub: dot(
        w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub)


# ---- dequantization of whole rows (prefill tiles) ----------------------------------------------

def _dequant_row(context, builder, sig, args, unpack):
    """out[ooff + j] = float(code[j]) * scale[group(j)] for one row of K values, as vector ops.

    args: (w, woff, s, soff, gs, out, ooff, k). For int4, 32-block b = (group g, chunk c) takes
    bytes woff + g*gs/2 + 16c .. +16 whose low nibbles are values g*gs + 16c + (0..15) and high
    nibbles the same + gs/2 (the Q4_0 order of ernie_edge/formats/quant.py).
    """
    (w, woff, s, soff, gs, out, ooff, k) = args
    wty, _, sty, _, _, oty, _, _ = sig.args
    wptr = _data_ptr(context, builder, wty, w, ir.IntType(8))
    sptr = _data_ptr(context, builder, sty, s, _I16)
    optr = _data_ptr(context, builder, oty, out, _F32)
    nblk = builder.udiv(k, ir.Constant(_I64, 32))
    chunks = builder.udiv(gs, ir.Constant(_I64, 32))
    half = builder.udiv(gs, ir.Constant(_I64, 2))
    f16 = ir.VectorType(_F32, 16)
    i16x32 = ir.VectorType(_I32, 16)

    def store16(vals_i8, base, scale):
        v = builder.sitofp(builder.sext(vals_i8, i16x32), f16)
        sv = builder.insert_element(ir.Constant(f16, ir.Undefined), scale, ir.Constant(_I32, 0))
        sv = builder.shuffle_vector(sv, sv, ir.Constant(i16x32, [0] * 16))
        p = builder.bitcast(builder.gep(optr, [base]), f16.as_pointer())
        builder.store(builder.fmul(v, sv), p, align=4)

    with cgutils.for_range(builder, nblk) as loop:
        b = loop.index
        g = builder.udiv(b, chunks)
        c = builder.urem(b, chunks)
        scale = _fp16_to_f32(builder, builder.load(builder.gep(sptr, [builder.add(soff, g)])))
        obase = builder.add(ooff, builder.add(builder.mul(g, gs), builder.mul(c, ir.Constant(_I64, 16))))
        if unpack:
            wb = builder.add(woff, builder.add(builder.mul(g, half), builder.mul(c, ir.Constant(_I64, 16))))
            raw = builder.load(builder.bitcast(builder.gep(wptr, [wb]), _I8x16.as_pointer()), align=1)
            eight = ir.Constant(_I8x16, [8] * 16)
            lo = builder.sub(builder.and_(raw, ir.Constant(_I8x16, [15] * 16)), eight)
            hi = builder.sub(builder.lshr(raw, ir.Constant(_I8x16, [4] * 16)), eight)
            store16(lo, obase, scale)
            store16(hi, builder.add(obase, half), scale)
        else:
            wb = builder.add(woff, builder.mul(b, ir.Constant(_I64, 32)))
            raw = builder.load(builder.bitcast(builder.gep(wptr, [wb]), _I8x32.as_pointer()), align=1)
            ob = builder.add(ooff, builder.mul(b, ir.Constant(_I64, 32)))
            store16(builder.shuffle_vector(raw, raw, _idx(range(16))), ob, scale)
            store16(builder.shuffle_vector(raw, raw, _idx(range(16, 32))), builder.add(ob, ir.Constant(_I64, 16)),
                    scale)
    return context.get_dummy_value()


def _make_dequant_row(unpack):
    def typer(typingctx, w, woff, s, soff, gs, out, ooff, k):
        sig = types.void(w, types.intp, s, types.intp, types.intp, out, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            return _dequant_row(context, builder, signature, args, unpack)

        return sig, codegen

    return intrinsic(typer)


# (w, woff, s, soff, gs, out, ooff, k): one row of K weights -> float32 out[ooff : ooff + K]
q4_dequant_row = _make_dequant_row(unpack=True)
q8_dequant_row = _make_dequant_row(unpack=False)


@intrinsic
def f32_from_bits(typingctx, bits):
    """int32 bit pattern -> float32 (a bitcast)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _F32)

    return sig, codegen


@intrinsic
def fetch_add(typingctx, counter, index, value):
    """Atomically add `value` to int64 counter[index]; returns the old value (lock xadd). The
    decode kernels claim their work units with it (kernels/q8.py `_next_unit`)."""
    sig = types.int64(counter, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        arr, idx, val = args
        ptr = builder.gep(_data_ptr(context, builder, signature.args[0], arr, _I64), [idx])
        return builder.atomic_rmw("add", ptr, val, "monotonic")

    return sig, codegen
