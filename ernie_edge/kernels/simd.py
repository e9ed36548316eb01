"""llvmlite intrinsics: the inner loops LLVM does not vectorise by itself.

Legend: K input features, B = K/32 activation blocks, G weight group size (32, 64 or 128).

The dot products take int8 activations (x quantized per block of 32 by `quantize_act`, see
q4.py) and integer weight codes, so a block of 32 products is one vpmaddubsw + vpmaddwd
(u8 x i8 -> i16 pairs -> i32), converted to float and scaled once per block, exactly like
llama.cpp's Q4_0 x Q8_0 AVX2 path. Each row result is

    sum_b  ws[b] * (xd[b] * sum_j wcode[b, j] * xq[b, j])

where for int4 the codes are stored +8, so the kernel forms sum_j (wcode+8) * xq and subtracts
ws[b] * xs[b] with xs[b] = 8 * xd[b] * sum_j xq[b, j] (precomputed per activation block).

The intrinsics take raw arrays plus flat element offsets: the arrays must be C-contiguous.
They exist only when `_jit.SIMD == "avx2"`; kernels call them through `numba.literal_unroll`-free
module-level dispatch chosen at import (see q4.py / q8.py).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

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
    """IEEE half (as i16) -> float, via LLVM's fpext (vcvtph2ps on F16C hardware)."""
    return builder.fpext(builder.bitcast(h16, ir.HalfType()), _F32)


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


def _ones16(builder):
    return ir.Constant(_I16x16, [1] * 16)


def _block_i32(builder, wbytes32, xq32):
    """<32 x u8> weights (0..255 but here < 128 in magnitude use) x <32 x i8> activations -> <8 x i32>."""
    p16 = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _I16x16, [wbytes32, xq32])
    return _x86(builder, "llvm.x86.avx2.pmadd.wd", _I32x8, [p16, _ones16(builder)])


def _concat16(builder, a, b):
    return builder.shuffle_vector(a, b, _idx(range(32)))


def _rows_dot(context, builder, sig, args, nrows, unpack):
    """Shared body of the q4 / q8 row-dot intrinsics for `nrows` rows at once.

    args: (w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub)
      w       weight array (u8 packed nibbles or i8 codes), woff flat offset of row 0's start,
              wstride elements between consecutive rows
      s       uint16 fp16 scales, soff offset of row 0's first scale, sstride scales per row
      xq/xd/xs  quantized activation (int8 [K]), block scales (f32 [B]), int4 offset term (f32 [B])
      nblk    number of 32-blocks B;  log2sub = log2(G / 32) (weight group -> activation block)
    """
    (w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub) = args
    wty, _, _, sty, _, _, xqty, xdty, xsty, _, _ = sig.args
    wptr = _data_ptr(context, builder, wty, w, ir.IntType(8))
    sptr = _data_ptr(context, builder, sty, s, _I16)
    xqptr = _data_ptr(context, builder, xqty, xq, ir.IntType(8))
    xdptr = _data_ptr(context, builder, xdty, xd, _F32)
    xsptr = _data_ptr(context, builder, xsty, xs, _F32)
    zero8 = ir.Constant(_F32x8, [0.0] * 8)
    accs = [cgutils.alloca_once_value(builder, zero8) for _ in range(nrows)]
    corrs = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(nrows)]
    bytes_per_block = 16 if unpack else 32
    with cgutils.for_range(builder, nblk) as loop:
        i = loop.index
        xv = builder.load(builder.bitcast(builder.gep(xqptr, [builder.mul(i, ir.Constant(_I64, 32))]),
                                          _I8x32.as_pointer()), align=1)
        xdi = builder.load(builder.gep(xdptr, [i]))
        xsi = builder.load(builder.gep(xsptr, [i]))
        g = builder.lshr(i, log2sub)
        for r in range(nrows):
            rr = ir.Constant(_I64, r)
            wrow = builder.add(woff, builder.mul(rr, wstride))
            wo = builder.add(wrow, builder.mul(i, ir.Constant(_I64, bytes_per_block)))
            wp = builder.gep(wptr, [wo])
            srow = builder.add(soff, builder.mul(rr, sstride))
            ws = _fp16_to_f32(builder, builder.load(builder.gep(sptr, [builder.add(srow, g)])))
            if unpack:
                raw = builder.load(builder.bitcast(wp, _I8x16.as_pointer()), align=1)
                lo = builder.and_(raw, ir.Constant(_I8x16, [15] * 16))
                hi = builder.lshr(raw, ir.Constant(_I8x16, [4] * 16))
                p32 = _block_i32(builder, _concat16(builder, lo, hi), xv)
            else:
                # signed x signed via the sign trick: |w| (u8) * (x * sign(w)) (i8)
                wv = builder.load(builder.bitcast(wp, _I8x32.as_pointer()), align=1)
                aw = _x86(builder, "llvm.x86.avx2.psign.b", _I8x32, [wv, wv])
                sx = _x86(builder, "llvm.x86.avx2.psign.b", _I8x32, [xv, wv])
                p32 = _block_i32(builder, aw, sx)
            f = builder.sitofp(p32, _F32x8)
            d = builder.fmul(ws, xdi)
            dv = builder.insert_element(ir.Constant(_F32x8, ir.Undefined), d, ir.Constant(_I32, 0))
            dv = builder.shuffle_vector(dv, dv, ir.Constant(_I32x8, [0] * 8))
            acc = builder.load(accs[r])
            builder.store(builder.fadd(acc, builder.fmul(f, dv, flags=("contract",)), flags=("contract",)), accs[r])
            if unpack:
                builder.store(builder.fadd(builder.load(corrs[r]), builder.fmul(ws, xsi)), corrs[r])
    out = []
    for r in range(nrows):
        out.append(builder.fsub(_hsum8(builder, builder.load(accs[r])), builder.load(corrs[r])))
    return out


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


q4_dot1 = _make_rows_dot(1, unpack=True)
q4_dot2 = _make_rows_dot(2, unpack=True)
q4_dot4 = _make_rows_dot(4, unpack=True)
q8_dot1 = _make_rows_dot(1, unpack=False)
q8_dot2 = _make_rows_dot(2, unpack=False)
q8_dot4 = _make_rows_dot(4, unpack=False)


@intrinsic
def f16_to_f32(typingctx, h):
    """uint16 bits of an IEEE half -> float32 (portable: exact bit manipulation, no F16C needed)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        h32 = builder.zext(args[0], _I32)
        sign = builder.shl(builder.and_(h32, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 16))
        mag = builder.shl(builder.and_(h32, ir.Constant(_I32, 0x7FFF)), ir.Constant(_I32, 13))
        # magnitude bits reinterpreted as f32 are the value scaled by 2^-112 (exact for normals
        # and subnormals); scale back. Inf/NaN scales are rejected by the format.
        f = builder.fmul(builder.bitcast(mag, _F32), ir.Constant(_F32, 2.0 ** 112))
        bits = builder.or_(builder.bitcast(f, _I32), sign)
        return builder.bitcast(bits, _F32)

    return sig, codegen
