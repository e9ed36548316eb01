"""The llvmlite toolkit of the kernels' intrinsics, written once: types, constants, pointers into
numba arrays, vector loads, splats, horizontal reductions, fp16 -> f32, intrinsic calls and
software prefetch, the row dots' intrinsic signature. simd.py, q56.py, dot8.py, qbatch.py,
kv_layout.py and attention_ir.py build their LLVM IR with it.

The llvmlite.ir classes the kernels use are re-exported here, so that a kernel module needs one
namespace (`from . import ir`: `ir.Constant`, `ir.VectorType`, `ir.splat`, ...).

Code-generation choices (the SIMD path, F16C, the prefetch locality) come from kernels/_jit.py.
"""

from __future__ import annotations

from llvmlite.ir import (Constant, FloatType, FunctionType, HalfType, IntType, Undefined,  # noqa: F401
                         VectorType, VoidType)
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _jit

I8, I16, I32, I64 = IntType(8), IntType(16), IntType(32), IntType(64)
F32 = FloatType()
I8x16, I8x32, I8x64 = VectorType(I8, 16), VectorType(I8, 32), VectorType(I8, 64)
I16x16, I16x32 = VectorType(I16, 16), VectorType(I16, 32)
I32x8, I32x16 = VectorType(I32, 8), VectorType(I32, 16)
F32x4, F32x8, F32x16 = VectorType(F32, 4), VectorType(F32, 8), VectorType(F32, 16)


def c32(v):
    """An i32 constant."""
    return Constant(I32, v)


def c64(v):
    """An i64 constant."""
    return Constant(I64, v)


def mask(values):
    """A constant <n x i32> shuffle mask."""
    values = list(values)
    return Constant(VectorType(I32, len(values)), values)


def data_ptr(context, builder, arrty, arr, elem_ty, off=None):
    """Pointer to the first element of a C-contiguous numba array as `elem_ty*`, or to its flat
    element `off` (in elem_ty units) when given."""
    data = context.make_array(arrty)(context, builder, arr).data
    ptr = builder.bitcast(data, elem_ty.as_pointer())
    return ptr if off is None else builder.gep(ptr, [off])


def last_dim(context, builder, arrty, arr):
    """The array's last dimension as i64."""
    ary = context.make_array(arrty)(context, builder, arr)
    return cgutils.unpack_tuple(builder, ary.shape, arrty.ndim)[arrty.ndim - 1]


def load_vec(builder, ptr, offset, vty, align=1):
    """Unaligned load of a vector of type vty at ptr + offset (elements of ptr's type)."""
    return builder.load(builder.bitcast(builder.gep(ptr, [offset]), vty.as_pointer()), align=align)


def splat(builder, scalar, vty):
    """<n x T> with every lane `scalar`."""
    v = builder.insert_element(Constant(vty, Undefined), scalar, c32(0))
    return builder.shuffle_vector(v, v, Constant(VectorType(I32, vty.count), [0] * vty.count))


def fma(builder, a, b, c):
    """a * b + c, contractible to one FMA where the CPU has it (never a libm call)."""
    return builder.fadd(builder.fmul(a, b, flags=("contract",)), c, flags=("contract",))


def hsum8(builder, v):
    """Horizontal sum of a <8 x float>: (lanes 0-3 + 4-7), then pairs, then the last two."""
    lo = builder.shuffle_vector(v, v, mask(range(4)))
    hi = builder.shuffle_vector(v, v, mask(range(4, 8)))
    s4 = builder.fadd(lo, hi)
    s2 = builder.fadd(builder.shuffle_vector(s4, s4, mask([0, 1])), builder.shuffle_vector(s4, s4, mask([2, 3])))
    return builder.fadd(builder.extract_element(s2, c32(0)), builder.extract_element(s2, c32(1)))


def hreduce(builder, v, op):
    """Reduce a <n x T> vector (n a power of 2) to its lane-0 scalar with op(builder, a, b), halving."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo, hi = builder.shuffle_vector(v, v, mask(range(n))), builder.shuffle_vector(v, v, mask(range(n, 2 * n)))
        v = op(builder, lo, hi)
    return builder.extract_element(v, c32(0))


def f16_to_f32(builder, h):
    """IEEE half bits (i16 or <n x i16>) -> float (or <n x float>).

    x86 paths: LLVM's fpext (vcvtph2ps; _jit.F16C). Generic path: exact bit manipulation, so no
    compiler-rt helper is needed. Inf/NaN halves do not occur (the formats reject them)."""
    n = h.type.count if isinstance(h.type, VectorType) else 0
    f32 = VectorType(F32, n) if n else F32
    if _jit.F16C:
        return builder.fpext(builder.bitcast(h, VectorType(HalfType(), n) if n else HalfType()), f32)
    i32 = VectorType(I32, n) if n else I32

    def const(ty, x):
        return Constant(ty, [x] * n if n else x)

    h32 = builder.zext(h, i32)
    sign = builder.shl(builder.and_(h32, const(i32, 0x8000)), const(i32, 16))
    mag = builder.shl(builder.and_(h32, const(i32, 0x7FFF)), const(i32, 13))
    # The magnitude bits read as an f32 are the value times 2^-112 (exact for normal and subnormal
    # halves); multiply back.
    f = builder.fmul(builder.bitcast(mag, f32), const(f32, 2.0 ** 112))
    return builder.bitcast(builder.or_(builder.bitcast(f, i32), sign), f32)


def f32_to_f16(builder, f):
    """float -> IEEE half bits (i16), rounded to nearest even as numpy's astype(float16) does
    (overflow to inf, subnormal halves exact, NaN to a quiet NaN).

    x86 paths: LLVM's fptrunc (vcvtps2ph). Generic path: bit manipulation, so no compiler-rt helper
    is needed: normal halves round the dropped 13 mantissa bits to nearest even by adding 0xfff plus
    the kept lowest bit; halves below 2^-14 come from adding 0.5 to |f|, which lines the mantissa up
    with the half's subnormal step so that the float add itself rounds to nearest even."""
    if _jit.F16C:
        return builder.bitcast(builder.fptrunc(f, HalfType()), I16)
    u = builder.bitcast(f, I32)
    sign = builder.and_(builder.lshr(u, c32(16)), c32(0x8000))
    a = builder.and_(u, c32(0x7FFFFFFF))
    lsb = builder.and_(builder.lshr(a, c32(13)), c32(1))
    normal = builder.lshr(builder.sub(builder.add(a, builder.add(c32(0xFFF), lsb)), c32(0x38000000)), c32(13))
    half = Constant(F32, 0.5)
    small = builder.sub(builder.bitcast(builder.fadd(builder.bitcast(a, F32), half), I32), c32(0x3F000000))
    r = builder.select(builder.icmp_unsigned("<", a, c32(0x38800000)), small, normal)  # |f| < 2^-14
    r = builder.select(builder.icmp_unsigned(">=", a, c32(0x477FF000)), c32(0x7C00), r)  # rounds past 65504
    r = builder.select(builder.icmp_unsigned(">", a, c32(0x7F800000)), c32(0x7E00), r)  # NaN
    return builder.trunc(builder.or_(r, sign), I16)


def switch(builder, value, cases):
    """Emit cases[k]() for the code path where the integer `value` equals k (a dict of
    callables that build IR); any other value does nothing. Continues after the switch."""
    end = builder.append_basic_block("switch.end")
    sw = builder.switch(value, end)
    for k, emit in cases.items():
        block = builder.append_basic_block(f"switch.case{k}")
        sw.add_case(Constant(value.type, k), block)
        builder.position_at_end(block)
        emit()
        builder.branch(end)
    builder.position_at_end(end)


def call(builder, name, ret, args):
    """Call the LLVM intrinsic `name` (e.g. "llvm.x86.avx2.pmadd.wd") returning `ret`."""
    fnty = FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def prefetch(builder, ptr):
    """Software prefetch (read) of the cache line at ptr, at _jit.PREFETCH_LOCALITY; never faults."""
    i8p = I8.as_pointer()
    if ptr.type != i8p:
        ptr = builder.bitcast(ptr, i8p)
    fnty = FunctionType(VoidType(), [i8p, I32, I32, I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
    builder.call(fn, [ptr, c32(0), c32(_jit.PREFETCH_LOCALITY), c32(1)])


def prefetch_lines(builder, ptr, offset, nbytes):
    """Prefetch one cache line per 64 bytes of ptr[offset : offset + nbytes] (ptr an i8*)."""
    for line in range(0, nbytes, 64):
        prefetch(builder, builder.gep(ptr, [builder.add(offset, c64(line))]))


def row_dot_intrinsic(nrows, body):
    """A numba intrinsic with the quantized row dots' signature (kernels/simd.py, q56.py, dot8.py):
    (w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled) -> float32 for one row,
    or the tuple of nrows float32 of rows r .. r + nrows - 1; tiled (a bool): w is stored in 4-row
    tiles (kernels/codes.py `block_offset`). body(context, builder, sig, args) returns the nrows
    values."""
    def typer(typingctx, w, woff, wstride, s, soff, sstride, xq, xd, xs, nblk, log2sub, tiled):
        ret = types.float32 if nrows == 1 else types.UniTuple(types.float32, nrows)
        sig = ret(w, types.intp, types.intp, s, types.intp, types.intp, xq, xd, xs, types.intp, types.intp,
                  types.boolean)

        def codegen(context, builder, signature, args):
            vals = body(context, builder, signature, args)
            return vals[0] if nrows == 1 else context.make_tuple(builder, signature.return_type, vals)

        return sig, codegen

    return intrinsic(typer)
