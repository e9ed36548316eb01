"""The attention kernels' LLVM vector IR: scores (q . k for a K tile) and P.V (probabilities times a
V tile) for R query heads at once, explicit because LLVM does not vectorise these loops by itself;
plus the vector max, the uint8 rounding of int8 P.V's probabilities, and a branch-free exp.

Legend: Nq query heads, R query heads per KV head, D head dim, KT = KV_TILE positions per tile.

Vectors are <16 x float>: with AVX-512 (_jit.AVX512) a register tile holds NVEC = 2 of them per
head and the fp16 P.V pass PV_NVEC = 4 (each broadcast probability feeds 4 FMAs; 28 of the 32 zmm
registers); with AVX2 LLVM lowers each to a pair of ymm registers, on ARM to NEON. fp16 values are
widened by vcvtph2ps (or exact bit manipulation on the generic path) and multiplied in float32.

int8 caches work in integers on both sides, like llama.cpp's q8_0 KV cache: q is quantized per head
(symmetric int8) and the scores are exact integer dots (vpdpbusd with VNNI, vpmaddubsw + vpmaddwd
with AVX2, widening multiplies elsewhere); then per tile and head the probabilities times the
positions' V scales are rounded to uint8 relative to their maximum (`quantize_tile`: error <=
max/510 per position, a quarter of the int8 V codes' own rounding error) and multiplied with the V
codes four positions at a time, which keeps the int8 cache's attention memory-bound.

Every kernel software-prefetches the tile PREFETCH_TILES ahead (the hardware prefetcher alone
leaves DRAM latency exposed between the K and V streams), into L2 (_jit.PREFETCH_LOCALITY): two
blocks of K and V are about four times L1. Element offsets within a tile are kv_layout.py's.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _jit, ir, simd
from ._jit import njit
from .ir import F32, I8, I8x16, I8x32, I8x64, I16, I16x16, I16x32, I32, I32x8
from .kv_layout import KV_TILE, V_CHUNK, scale_ptr, v_chunk

VL = 16  # float lanes per LLVM vector (<16 x float>)
F32V, I32V = ir.F32x16, ir.I32x16
NVEC = 2 if _jit.AVX512 else 1  # <16 x float> vectors per head in a score register tile
PV_NVEC = 4 if NVEC == 2 else NVEC  # vectors per head in an fp16 P.V pass (64 dims with AVX-512)
SUBTILE = VL * NVEC  # positions per score register tile
MAX_HEADS = 6  # query heads per register tile (accumulators: 6 x 32 lanes)
DECODE_BLOCK = 256  # positions per online-softmax step in decode (a multiple of KV_TILE)
PREFETCH_TILES = 2 * DECODE_BLOCK // KV_TILE  # the kernels prefetch the tile this far ahead (two blocks)
P_ONE = 255  # int8 P.V: a tile's largest probability is rounded to this uint8 code
P_TINY = 1e-30  # a tile whose largest probability is below this adds nothing (zeroed)
NEG_INF = np.float32(-np.inf)  # a float32 constant keeps the softmax in float32 (a Python -inf is float64)


def _load_f16(builder, ptr):
    """16 consecutive fp16 cache values at ptr (i16*) -> <16 x float>."""
    raw = builder.load(builder.bitcast(ptr, I16x16.as_pointer()), align=2)
    return ir.f16_to_f32(builder, raw)


def _dot4(builder, acc, kb, qb, k_unsigned=False):
    """acc <16 x i32> + sums of 4 adjacent products kb * qb (<64 x i8> each; q signed, k signed, or
    unsigned with k_unsigned: int8 P.V passes its uint8 probabilities as kb and the V codes as qb).

    VNNI: vpdpbusd needs an unsigned operand, so it takes signed k as k + 128 (k xor 0x80) and the
    caller subtracts 128 * sum(q) (`needs_q_offset`). AVX2, signed k: vpmaddubsw + vpmaddwd with the
    sign trick |q| x (k * sign(q)), |pair| <= 2 * 127 * 127 < 32767; unsigned k: widened to int16 for
    vpmaddwd (`_dot4_avx2_wide`: uint8 x int8 pairs would saturate vpmaddubsw). Generic: widen to i32
    and multiply."""
    if _jit.SIMD == "avxvnni":
        ku = kb if k_unsigned else builder.xor(kb, ir.Constant(I8x64, [-128] * 64))
        if _jit.VNNI512:
            return ir.call(builder, "llvm.x86.avx512.vpdpbusd.512", I32V,
                           [acc, builder.bitcast(ku, I32V), builder.bitcast(qb, I32V)])
    halves = []
    for h in range(2):
        lanes, bytes_ = ir.mask(range(8 * h, 8 * h + 8)), ir.mask(range(32 * h, 32 * h + 32))
        a = builder.shuffle_vector(acc, acc, lanes)
        if _jit.SIMD == "avxvnni":
            k = builder.shuffle_vector(ku, ku, bytes_)
            q = builder.shuffle_vector(qb, qb, bytes_)
            halves.append(ir.call(builder, "llvm.x86.avx512.vpdpbusd.256", I32x8,
                                  [a, builder.bitcast(k, I32x8), builder.bitcast(q, I32x8)]))
        elif _jit.SIMD == "avx2":
            k = builder.shuffle_vector(kb, kb, bytes_)
            q = builder.shuffle_vector(qb, qb, bytes_)
            if k_unsigned:  # uint8 x int8 pairs reach 2 * 255 * 127: too big for vpmaddubsw's int16
                halves.append(builder.add(a, _dot4_avx2_wide(builder, k, q)))
                continue
            aq = ir.call(builder, "llvm.x86.avx2.psign.b", I8x32, [q, q])
            sk = ir.call(builder, "llvm.x86.avx2.psign.b", I8x32, [k, q])
            p16 = ir.call(builder, "llvm.x86.avx2.pmadd.ub.sw", I16x16, [aq, sk])
            ones = ir.Constant(I16x16, [1] * 16)
            halves.append(builder.add(a, ir.call(builder, "llvm.x86.avx2.pmadd.wd", I32x8, [p16, ones])))
        else:  # widen, multiply, add the 4 products of each 32-bit lane
            i32x32 = ir.VectorType(I32, 32)
            widen = builder.zext if k_unsigned else builder.sext
            k = widen(builder.shuffle_vector(kb, kb, bytes_), i32x32)
            q = builder.sext(builder.shuffle_vector(qb, qb, bytes_), i32x32)
            prod = builder.mul(k, q)
            parts = [builder.shuffle_vector(prod, prod, ir.mask(range(i, 32, 4))) for i in range(4)]
            halves.append(builder.add(a, builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))))
    return builder.shuffle_vector(halves[0], halves[1], ir.mask(range(16)))


def _dot4_avx2_wide(builder, ku, q):
    """<8 x i32> sums of 4 adjacent products of uint8 ku and int8 q (<32 x i8> each), exact: both
    widened to int16, vpmaddwd sums pairs into int32, then adjacent pairs are added."""
    k16, q16 = builder.zext(ku, I16x32), builder.sext(q, I16x32)
    pairs = []
    for h in range(2):
        sel = ir.mask(range(16 * h, 16 * h + 16))
        pairs.append(ir.call(builder, "llvm.x86.avx2.pmadd.wd", I32x8,
                             [builder.shuffle_vector(k16, k16, sel), builder.shuffle_vector(q16, q16, sel)]))
    ps = builder.shuffle_vector(pairs[0], pairs[1], ir.mask(range(16)))  # ps[i] = products 2i + 2i+1
    return builder.add(builder.shuffle_vector(ps, ps, ir.mask(range(0, 16, 2))),
                       builder.shuffle_vector(ps, ps, ir.mask(range(1, 16, 2))))


def needs_q_offset() -> bool:
    """Whether int8 scores must subtract 128 * sum(q) (vpdpbusd takes k + 128)."""
    return _jit.SIMD == "avxvnni"


def _make_qk(nr):
    """Scores of `nr` query heads h0 .. h0+nr-1 for one K tile at flat element offset toff:
    s[soff + r*sstride + j] = q[h0 + r] . k_j for j < KT (q already scaled by D^-0.5).
    Args (kc, toff, D, q, qi, qsc, qsum, h0, s, soff, sstride). f16 cache: q float32 [Nq, D].
    Also prefetches the tile PREFETCH_TILES ahead (one line per loop step).
    int8 cache: q as int8 codes qi [Nq, D] with scales qsc [Nq] and code sums qsum [Nq] (int32)."""

    def typer(typingctx, kc, toff, d, q, qi, qsc, qsum, h0, s, soff, sstride):
        sig = types.void(kc, types.intp, types.intp, q, qi, qsc, qsum, types.intp, s, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            kc, toff, d, q, qi, qsc, qsum, h0, s, soff, sstride = args
            kty, _, _, qty, qity, qscty, qsumty, _, sty, _, _ = signature.args
            if kty.dtype == types.int8:
                _qk_int(context, builder, kty, kc, toff, d, qity, qi, qscty, qsc, qsumty, qsum, h0, sty, s, soff,
                       sstride, nr)
            else:
                _qk_f16(context, builder, kty, kc, toff, d, qty, q, h0, sty, s, soff, sstride, nr)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


def _prefetch_scales_ahead(builder, scale_ptr, te):
    """Prefetch the KT float32 scales (2 lines) of the int8 tile PREFETCH_TILES ahead."""
    ahead = _ahead(builder, scale_ptr, te, 1)
    for line in range(0, 4 * KV_TILE, 64):
        ir.prefetch(builder, builder.gep(ahead, [ir.c64(line)]))


def _ahead(builder, base, te, nbytes_per_elem):
    """Pointer PREFETCH_TILES tiles (of te elements) past base (as i8*, not inbounds)."""
    p = builder.bitcast(base, I8.as_pointer())
    return builder.gep(p, [builder.mul(te, ir.c64(PREFETCH_TILES * nbytes_per_elem))])


def _store_scores(builder, sbase, sstride, sub, vals):
    for r, row in enumerate(vals):
        for v, val in enumerate(row):
            dst = builder.gep(sbase, [builder.add(builder.mul(ir.c64(r), sstride), ir.c64(sub + VL * v))])
            builder.store(val, builder.bitcast(dst, F32V.as_pointer()), align=4)


def _qk_f16(context, builder, kty, kc, toff, d, qty, q, h0, sty, s, soff, sstride, nr):
    kbase = ir.data_ptr(context, builder, kty, kc, I16, toff)
    te = ir.last_dim(context, builder, kty, kc)
    qbase = ir.data_ptr(context, builder, qty, q, F32, builder.mul(h0, d))
    sbase = ir.data_ptr(context, builder, sty, s, F32, soff)
    zero = ir.Constant(F32V, [0.0] * VL)
    accs = [[cgutils.alloca_once(builder, F32V) for _ in range(NVEC)] for _ in range(nr)]
    for sub in range(0, KV_TILE, SUBTILE):
        for row in accs:
            for a in row:
                builder.store(zero, a)
        with cgutils.for_range(builder, d) as loop:
            kp = builder.gep(kbase, [builder.add(builder.mul(loop.index, ir.c64(KV_TILE)), ir.c64(sub))])
            if sub == 0:  # a row of KT fp16 keys is one 64-byte line
                ir.prefetch(builder, _ahead(builder, kp, te, 2))
            kv = [_load_f16(builder, builder.gep(kp, [ir.c64(VL * v)])) for v in range(NVEC)]
            for r in range(nr):
                qd = builder.load(builder.gep(qbase, [builder.add(builder.mul(ir.c64(r), d), loop.index)]))
                qv = ir.splat(builder, qd, F32V)
                for v in range(NVEC):
                    builder.store(ir.fma(builder, qv, kv[v], builder.load(accs[r][v])), accs[r][v])
        _store_scores(builder, sbase, sstride, sub, [[builder.load(a) for a in row] for row in accs])


def _qk_int(context, builder, kty, kc, toff, d, qity, qi, qscty, qsc, qsumty, qsum, h0, sty, s, soff, sstride, nr):
    """Integer scores. int8 K tile codes [D/4, KT, 4]: one <64 x i8> load = 16 positions x 4 dims."""
    kbase = ir.data_ptr(context, builder, kty, kc, I8, toff)
    qibase = ir.data_ptr(context, builder, qity, qi, I32, builder.mul(h0, builder.udiv(d, ir.c64(4))))
    qscbase = ir.data_ptr(context, builder, qscty, qsc, F32, h0)
    qsumbase = ir.data_ptr(context, builder, qsumty, qsum, I32, h0)
    sbase = ir.data_ptr(context, builder, sty, s, F32, soff)
    kscale = scale_ptr(context, builder, kty, kc, toff, d)
    te = ir.last_dim(context, builder, kty, kc)
    # the KT scales (two lines) of the tile ahead: the group loop prefetches only its codes
    _prefetch_scales_ahead(builder, kscale, te)
    d4 = builder.udiv(d, ir.c64(4))
    group_bytes = 4 * KV_TILE  # one 4-dim group of the tile's KT positions
    q_offset = 128 if needs_q_offset() else 0  # vpdpbusd takes k + 128 (see _dot4)
    zero = ir.Constant(I32V, [0] * VL)
    accs = [[cgutils.alloca_once(builder, I32V) for _ in range(NVEC)] for _ in range(nr)]
    for sub in range(0, KV_TILE, SUBTILE):
        for row in accs:
            for a in row:
                builder.store(zero, a)
        with cgutils.for_range(builder, d4) as loop:
            gp = builder.gep(kbase, [builder.mul(loop.index, ir.c64(group_bytes))])
            if sub == 0:  # the group's two lines
                ahead = _ahead(builder, gp, te, 1)
                for line in range(0, group_bytes, 64):
                    ir.prefetch(builder, builder.gep(ahead, [ir.c64(line)]))
            kp = builder.gep(gp, [ir.c64(4 * sub)])
            kv = [ir.load_vec(builder, kp, ir.c64(4 * VL * v), I8x64) for v in range(NVEC)]
            for r in range(nr):
                q4 = builder.load(builder.gep(qibase, [builder.add(builder.mul(ir.c64(r), d4), loop.index)]), align=1)
                qb = builder.bitcast(ir.splat(builder, q4, I32V), I8x64)  # the 4 codes in every lane
                for v in range(NVEC):
                    builder.store(_dot4(builder, builder.load(accs[r][v]), kv[v], qb), accs[r][v])
        ks = [ir.load_vec(builder, kscale, ir.c64(sub + VL * v), F32V, align=4) for v in range(NVEC)]
        vals = []
        for r in range(nr):
            dot = [builder.load(a) for a in accs[r]]
            if q_offset:
                off = builder.mul(builder.load(builder.gep(qsumbase, [ir.c64(r)])), ir.Constant(I32, q_offset))
                offv = ir.splat(builder, off, I32V)
                dot = [builder.sub(x, offv) for x in dot]
            qs = ir.splat(builder, builder.load(builder.gep(qscbase, [ir.c64(r)])), F32V)
            vals.append([builder.fmul(builder.fmul(builder.sitofp(x, F32V), qs), ks[v]) for v, x in enumerate(dot)])
        _store_scores(builder, sbase, sstride, sub, vals)


def _acc_ptr(builder, abase, r, d, d0, v):
    """<16 x float>* to acc[r, d0 + 16 v : +16] of a [R, D] accumulator at abase."""
    off = builder.add(builder.mul(ir.c64(r), d), builder.add(d0, ir.c64(VL * v)))
    return builder.bitcast(builder.gep(abase, [off]), F32V.as_pointer())


def _dim_passes(builder, d, emit):
    """emit(d0, nvec) for the passes of P.V over D dims: PV_NVEC vectors of 16 dims at a time, then
    16 at a time for the dims past the last full pass (D % 64)."""
    step = VL * PV_NVEC
    nfull = builder.udiv(d, ir.c64(step))
    with cgutils.for_range(builder, nfull) as loop:
        emit(builder.mul(loop.index, ir.c64(step)), PV_NVEC)
    if PV_NVEC > 1:
        nrest = builder.udiv(builder.urem(d, ir.c64(step)), ir.c64(VL))
        with cgutils.for_range(builder, nrest) as loop:
            emit(builder.add(builder.mul(nfull, ir.c64(step)), builder.mul(loop.index, ir.c64(VL))), 1)


def _emit_pv_pass(context, builder, vbase, d, n, pbase, pstride, abase, d0, nvec, nr, te):
    """acc[r, d0 : d0 + 16*nvec] += sum_{j<n} p[r, j] * v[j, d0 : ...] for nr heads (fp16 V)."""
    aptrs = [[_acc_ptr(builder, abase, r, d, d0, v) for v in range(nvec)] for r in range(nr)]
    accs = [[cgutils.alloca_once(builder, F32V) for _ in range(nvec)] for _ in range(nr)]
    for r in range(nr):
        for v in range(nvec):
            builder.store(builder.load(aptrs[r][v], align=4), accs[r][v])
    with cgutils.for_range(builder, n) as loop:
        j = loop.index
        row = builder.gep(vbase, [builder.add(builder.mul(j, d), d0)])
        # every 64-byte line of this pass's part of the row, PREFETCH_TILES tiles ahead
        ahead = _ahead(builder, row, te, 2)
        for line in range(0, 2 * nvec * VL, 64):
            ir.prefetch(builder, builder.gep(ahead, [ir.c64(line)]))
        vv = [_load_f16(builder, builder.gep(row, [ir.c64(VL * v)])) for v in range(nvec)]
        for r in range(nr):
            pj = builder.load(builder.gep(pbase, [builder.add(builder.mul(ir.c64(r), pstride), j)]))
            pv = ir.splat(builder, pj, F32V)
            for v in range(nvec):
                builder.store(ir.fma(builder, pv, vv[v], builder.load(accs[r][v])), accs[r][v])
    for r in range(nr):
        for v in range(nvec):
            builder.store(builder.load(accs[r][v]), aptrs[r][v], align=4)


def _make_pv(nr):
    """acc[aoff + r*D + :] += sum_{j<n} p[poff + r*pstride + j] * v[j, :] for one fp16 V tile and `nr`
    heads. Args (vc, toff, D, n, p, poff, pstride, acc, aoff); n <= KT valid positions."""

    def typer(typingctx, vc, toff, d, n, p, poff, pstride, acc, aoff):
        sig = types.void(vc, types.intp, types.intp, types.intp, p, types.intp, types.intp, acc, types.intp)

        def codegen(context, builder, signature, args):
            vc, toff, d, n, p, poff, pstride, acc, aoff = args
            vty, _, _, _, pty, _, _, aty, _ = signature.args
            vbase = ir.data_ptr(context, builder, vty, vc, I16, toff)
            pbase = ir.data_ptr(context, builder, pty, p, F32, poff)
            abase = ir.data_ptr(context, builder, aty, acc, F32, aoff)
            te = ir.last_dim(context, builder, vty, vc)
            _dim_passes(builder, d, lambda d0, nvec: _emit_pv_pass(context, builder, vbase, d, n, pbase, pstride, abase,
                                                                   d0, nvec, nr, te))
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


def _emit_pv_int_pass(context, builder, vbase, d, nquads, pbase, pstride, scbase, qstride, abase, d0, nvec, nr, te):
    """acc[r, d0 : d0 + 16*nvec] += psc[r] * sum_quads pq . codes for one int8 V tile: per quad of
    positions, one <64 x i8> load of 16 dims x 4 positions against each head's 4 uint8 probabilities."""
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(I32V, [0] * VL)) for _ in range(nvec)]
            for _ in range(nr)]
    dim_bytes = 4  # bytes of one dim's 4 codes in a quad row
    c0 = builder.sub(d0, builder.urem(d0, ir.c64(V_CHUNK)))  # the chunk holding dims d0 ..
    cbase, w = v_chunk(builder, c0, d)
    pass_base = builder.gep(vbase, [builder.add(cbase, builder.mul(builder.sub(d0, c0), ir.c64(dim_bytes)))])
    with cgutils.for_range(builder, nquads) as loop:
        row = builder.gep(pass_base, [builder.mul(loop.index, builder.mul(w, ir.c64(dim_bytes)))])
        ahead = _ahead(builder, row, te, 1)
        for line in range(0, dim_bytes * nvec * VL, 64):
            ir.prefetch(builder, builder.gep(ahead, [ir.c64(line)]))
        vv = [ir.load_vec(builder, row, ir.c64(dim_bytes * VL * v), I8x64) for v in range(nvec)]
        for r in range(nr):
            pp = builder.gep(pbase, [builder.add(builder.mul(ir.c64(r), pstride), builder.mul(loop.index, ir.c64(4)))])
            pw = builder.load(builder.bitcast(pp, I32.as_pointer()), align=1)
            pv = builder.bitcast(ir.splat(builder, pw, I32V), I8x64)
            for v in range(nvec):
                builder.store(_dot4(builder, builder.load(accs[r][v]), pv, vv[v], k_unsigned=True), accs[r][v])
    for r in range(nr):
        dots = [builder.load(a) for a in accs[r]]
        psc = ir.splat(builder, builder.load(builder.gep(scbase, [builder.mul(ir.c64(r), qstride)])), F32V)
        for v in range(nvec):
            ap = _acc_ptr(builder, abase, r, d, d0, v)
            builder.store(ir.fma(builder, builder.sitofp(dots[v], F32V), psc, builder.load(ap, align=4)), ap, align=4)


def _make_pv_int(nr):
    """Integer P.V of one int8 V tile for `nr` heads: acc[aoff + r*D + :] += psc * (pq . codes); pq uint8
    [.., pstride] quantized probabilities (zero past n), psc float32 [.., qstride] the tile's scale per
    head. Args (vc, toff, D, n, pq, poff, pstride, psc, qoff, qstride, acc, aoff); n <= KT valid positions."""

    def typer(typingctx, vc, toff, d, n, pq, poff, pstride, psc, qoff, qstride, acc, aoff):
        sig = types.void(vc, types.intp, types.intp, types.intp, pq, types.intp, types.intp, psc,
                         types.intp, types.intp, acc, types.intp)

        def codegen(context, builder, signature, args):
            vc, toff, d, n, pq, poff, pstride, psc, qoff, qstride, acc, aoff = args
            vty, _, _, _, pqty, _, _, pscty, _, _, aty, _ = signature.args
            vbase = ir.data_ptr(context, builder, vty, vc, I8, toff)
            pbase = ir.data_ptr(context, builder, pqty, pq, I8, poff)
            scbase = ir.data_ptr(context, builder, pscty, psc, F32, qoff)
            abase = ir.data_ptr(context, builder, aty, acc, F32, aoff)
            te = ir.last_dim(context, builder, vty, vc)
            _prefetch_scales_ahead(builder, scale_ptr(context, builder, vty, vc, toff, d), te)
            nquads = builder.udiv(builder.add(n, ir.c64(3)), ir.c64(4))
            _dim_passes(builder, d, lambda d0, nvec: _emit_pv_int_pass(
                context, builder, vbase, d, nquads, pbase, pstride, scbase, qstride, abase, d0, nvec, nr, te))
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


# The intrinsics for 1..MAX_HEADS heads (attention_decode dispatches on the count).
qk1, qk2, qk3, qk4, qk5, qk6 = (_make_qk(n) for n in range(1, MAX_HEADS + 1))
pvi1, pvi2, pvi3, pvi4, pvi5, pvi6 = (_make_pv_int(n) for n in range(1, MAX_HEADS + 1))
pv1, pv2, pv3, pv4, pv5, pv6 = (_make_pv(n) for n in range(1, MAX_HEADS + 1))


@intrinsic
def vmax(typingctx, a, off, n, init):
    """max(init, a[off], .., a[off + n - 1]) of a float32 array, 16 lanes at a time (LLVM does not
    vectorise a max reduction by itself without the no-NaN fast-math flag)."""
    sig = types.float32(a, types.intp, types.intp, types.float32)

    def codegen(context, builder, signature, args):
        a, off, n, init = args
        base = ir.data_ptr(context, builder, signature.args[0], a, F32, off)
        acc = cgutils.alloca_once_value(builder, ir.splat(builder, init, F32V))
        nv = builder.udiv(n, ir.c64(VL))
        with cgutils.for_range(builder, nv) as loop:
            p = builder.bitcast(builder.gep(base, [builder.mul(loop.index, ir.c64(VL))]), F32V.as_pointer())
            x, m = builder.load(p, align=4), builder.load(acc)
            builder.store(builder.select(builder.fcmp_ordered(">", x, m), x, m), acc)
        m = builder.load(acc)
        best = cgutils.alloca_once_value(builder, builder.extract_element(m, ir.c32(0)))
        for i in range(1, VL):
            x, b = builder.extract_element(m, ir.c32(i)), builder.load(best)
            builder.store(builder.select(builder.fcmp_ordered(">", x, b), x, b), best)
        with cgutils.for_range(builder, builder.sub(n, builder.mul(nv, ir.c64(VL)))) as loop:
            x = builder.load(builder.gep(base, [builder.add(builder.mul(nv, ir.c64(VL)), loop.index)]))
            b = builder.load(best)
            builder.store(builder.select(builder.fcmp_ordered(">", x, b), x, b), best)
        return builder.load(best)

    return sig, codegen


@intrinsic
def quantize_tile(typingctx, sc, soff, vc, voff, m, pq, poff, psc, qoff):
    """int8 V, one head and tile: p[j] = sc[soff + j] * (V scale j, the float32s at byte voff of vc) for
    j < m (0 past m); pq[poff + j] = round(p[j] / s) as uint8 with s = max(p) / P_ONE, psc[qoff] = s. A tile
    with max p < P_TINY (<= 1e-30 of the block's largest probability, which is 1) is zeroed. Two
    <16 x float> vectors per KT = 32 positions."""
    sig = types.void(sc, types.intp, vc, types.intp, types.intp, pq, types.intp, psc, types.intp)

    def codegen(context, builder, signature, args):
        sc, soff, vc, voff, m, pq, poff, psc, qoff = args
        scty, _, vty, _, _, pqty, _, pscty, _ = signature.args
        sp = ir.data_ptr(context, builder, scty, sc, F32, soff)
        vs = builder.bitcast(ir.data_ptr(context, builder, vty, vc, I8, voff), F32.as_pointer())
        pp = ir.data_ptr(context, builder, pqty, pq, I8, poff)
        mv = builder.trunc(m, I32)
        mvec = ir.splat(builder, mv, I32V)
        zero = ir.Constant(F32V, [0.0] * VL)
        xs = []
        for v in range(KV_TILE // VL):
            p = builder.load(builder.bitcast(builder.gep(sp, [ir.c64(VL * v)]), F32V.as_pointer()), align=4)
            s = builder.load(builder.bitcast(builder.gep(vs, [ir.c64(VL * v)]), F32V.as_pointer()), align=1)
            valid = builder.icmp_signed("<", ir.mask(range(VL * v, VL * v + VL)), mvec)
            xs.append(builder.select(valid, builder.fmul(p, s), zero))
        fmax = lambda b, x, y: b.select(b.fcmp_ordered(">", x, y), x, y)  # noqa: E731
        mx = ir.hreduce(builder, fmax(builder, xs[0], xs[1]), fmax)
        ok = builder.fcmp_ordered(">=", mx, ir.Constant(F32, P_TINY))
        inv = builder.select(ok, builder.fdiv(ir.Constant(F32, float(P_ONE)), mx), ir.Constant(F32, 0.0))
        invv, half = ir.splat(builder, inv, F32V), ir.Constant(F32V, [0.5] * VL)
        for v, x in enumerate(xs):
            c = builder.fptosi(builder.fadd(builder.fmul(x, invv), half), I32V)
            dst = builder.bitcast(builder.gep(pp, [ir.c64(VL * v)]), I8x16.as_pointer())
            builder.store(builder.trunc(c, I8x16), dst, align=1)
        scale = builder.select(ok, builder.fdiv(mx, ir.Constant(F32, float(P_ONE))), ir.Constant(F32, 0.0))
        builder.store(scale, ir.data_ptr(context, builder, pscty, psc, F32, qoff))
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def exp_nonpos(x):
    """float32 exp(x) for x <= 0 (softmax after subtracting the max), within ~2 ulp of expf.

    Cephes' expf, branch-free so that LLVM vectorises the softmax loops (numba's np.exp is a scalar
    libm call per element). Below -87 it returns 0 (exp(-87) ~ 1.6e-38 is negligible next to the max
    term, and an exact 0 keeps P.V free of denormal products, which are slow on x86).
    """
    tiny = x < np.float32(-87.0)
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    return np.float32(0.0) if tiny else y * simd.f32_from_bits((np.int32(n) + np.int32(127)) << 23)

