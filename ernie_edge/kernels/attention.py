"""GQA attention over an fp16 or int8 KV cache (ERNIE_SPEC §3.2): decode (one query) and blocked
causal prefill.

Legend: T new tokens, S cache capacity (positions), L attended length, Nq query heads, Nkv KV
heads, R = Nq / Nkv query heads per KV head, D head dim, KT = KV_TILE positions per cache tile,
NT = S / KT tiles.

KV cache layout (allocate with `new_kv_cache`, write with `kv_write`, read back with `kv_read`).
Each layer holds k_cache, v_cache arrays [Nkv, NT, tile], one tile per KT = 32 positions:
  "f16"  uint16 bits of float16:  K tile [D, KT] (transposed: positions innermost), V tile [KT, D]
  "i8"   int8 codes, then KT float32 scales (as 4*KT bytes) per tile: K [D/4, KT, 4] + [KT] (four dims
         of a position side by side), V in chunks of V_CHUNK = 64 dims, each [KT/4, w, 4] (four
         positions of a dim side by side; w = 64, or D % 64 for the last chunk) + [KT];
         each group of four is one 32-bit lane of an integer dot-product instruction (vpdpbusd);
         value = code * scale, symmetric, one scale per (position, KV head): scale = max|x| / 127.
fp16 takes 7.5 GB for 131072 positions x 28 layers, int8 3.9 GB. (This layout lives in memory only;
nothing of it is written to disk.) K is transposed within a tile so the score loop runs over
positions innermost (contiguous vector multiply-adds for the R query heads of a KV head, no
horizontal sums) while a whole tile stays one contiguous 4-8 KiB run of memory. int8 V is cut
into chunks of 64 dims, the width of one P.V pass with AVX-512, so that each pass reads one
contiguous 2 KiB run (measured: int8 decode attention at 32k positions ~6 % faster than with
whole rows of D dims per position quad, which each pass read at a 2*D-byte stride).
Query head h reads KV head h // R. Scores are (q . k) * D^-0.5, softmax in float32.

int8 decode works in integers on both sides, like llama.cpp's q8_0 KV cache: q is quantized per head
(symmetric int8) and the scores are exact integer dots (vpdpbusd with VNNI, vpmaddubsw + vpmaddwd
with AVX2, widening multiplies elsewhere); then per tile and head the probabilities times the
positions' V scales are rounded to uint8 relative to their maximum (`_quantize_tile`: error <=
max/510 per position, a quarter of the int8 V codes' own rounding error) and multiplied with the V
codes four positions at a time. Float P.V made the int8 cache's attention compute-bound at 32k
positions on 2 cores (1.35 ms per layer with the cache in L2/L3 against 0.76 ms in integers).
(An int4 cache was tried and dropped: KL divergence vs fp16 0.12 on the small synthetic model,
against 0.002 for int8; commit 5843702.)

Decode reads the cache once per token (it is memory-bound at long context): each work item is one
KV head x one contiguous range of positions, processed in blocks of DECODE_BLOCK positions with an
online softmax; all R query heads are scored from one pass over each K tile and accumulated from
one pass over each V tile. The inner loops are explicit LLVM vector IR (below): vcvtph2ps (or int8
widening) + FMA on zmm registers with AVX-512, ymm with AVX2, NEON on ARM.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _jit, simd
from ._jit import njit, pnjit

KV_TILE = 32  # KT: positions per cache tile
KV_BLOCK = 256  # allocation granularity of new_kv_cache (positions; a multiple of KV_TILE)
DECODE_BLOCK = 256  # positions per online-softmax step in decode (a multiple of KV_TILE)
MAX_SPLIT = 16  # most position ranges one KV head is split into (decode work items per head)
KV_DTYPES = ("f16", "i8")
_CODE_DTYPES = {"f16": np.uint16, "i8": np.int8}  # the cache array's dtype per kv_dtype
P_ONE = 255  # int8 P.V: a tile's largest probability is rounded to this uint8 code
PREFILL_QBLOCK = 16  # queries per prefill work item
PREFILL_KBLOCK = 64  # keys per prefill inner block (a multiple of KV_TILE)
NEG_INF = np.float32(-np.inf)  # a float32 constant keeps the softmax in float32 (a Python -inf is float64)
_MAX_HEADS = 6  # query heads per register tile (accumulators: 6 x 32 lanes)
PREFETCH_TILES = 2 * DECODE_BLOCK // KV_TILE  # decode prefetches the tile this far ahead (two blocks)
V_CHUNK = 64  # int8 V tiles store their dims in chunks of this many (see the module doc)


# ---- cache layout ------------------------------------------------------------------------------

def tile_elems(head_dim: int, kv_dtype: str) -> int:
    """Array elements per tile of KV_TILE positions (uint16 values for f16, bytes for i8)."""
    if kv_dtype == "f16":
        return head_dim * KV_TILE
    if kv_dtype == "i8":
        return (head_dim + 4) * KV_TILE
    raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")


def new_kv_cache(n_kv_heads: int, capacity: int, head_dim: int, kv_dtype: str = "f16"):
    """(k_cache, v_cache) zero-filled [Nkv, NT, tile] arrays for >= capacity positions (rounded up to
    KV_BLOCK). kv_dtype "f16" (uint16 bits of float16) or "i8" (int8 codes + float32 scales)."""
    if head_dim % 16:
        raise ValueError(f"head_dim must be a multiple of 16, got {head_dim}")
    nt = max(1, -(-capacity // KV_BLOCK)) * (KV_BLOCK // KV_TILE)
    te = tile_elems(head_dim, kv_dtype)
    dt = _CODE_DTYPES[kv_dtype]
    return np.zeros((n_kv_heads, nt, te), dt), np.zeros((n_kv_heads, nt, te), dt)


def cache_dtype(k_cache) -> str:
    return next(name for name, dt in _CODE_DTYPES.items() if k_cache.dtype == dt)


def _check_cache(k_cache, v_cache, head_dim=None) -> int:
    """Validate the layout; returns the head dim D."""
    if k_cache.dtype not in (np.uint16, np.int8) or k_cache.ndim != 3:
        raise ValueError("k_cache / v_cache must be uint16 or int8 [Nkv, NT, tile] arrays (see new_kv_cache)")
    nkv, nt, te = k_cache.shape
    d = te // KV_TILE - (0 if k_cache.dtype == np.uint16 else 4)
    if (v_cache.dtype != k_cache.dtype or v_cache.shape != k_cache.shape or te % KV_TILE or d <= 0 or d % 16
            or (head_dim is not None and d != head_dim)):
        raise ValueError(f"cache shapes k {k_cache.shape} {k_cache.dtype}, v {v_cache.shape} {v_cache.dtype} "
                         f"do not match (head_dim {head_dim}; see new_kv_cache)")
    if not (k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
        raise ValueError("k_cache / v_cache must be C-contiguous")
    return d


def _split_views(cache, head_dim: int, is_k: bool):
    """(codes, scales) of one cache array. codes: f16 K [Nkv, NT, D, KT], i8 K [Nkv, NT, D/4, KT,
    4] (views), V [Nkv, NT, KT, D] (a float16 view, or int8 gathered from its chunks: a copy); scales
    float32 [Nkv, NT, KT] or None."""
    nkv, nt, _ = cache.shape
    if cache.dtype == np.uint16:
        shape = (nkv, nt, head_dim, KV_TILE) if is_k else (nkv, nt, KV_TILE, head_dim)
        return cache.view(np.float16).reshape(shape), None
    n = head_dim * KV_TILE
    if is_k:
        codes = cache[:, :, :n].reshape(nkv, nt, head_dim // 4, KV_TILE, 4)
    else:  # chunks [KT/4, w, 4] -> [KT, D]
        parts = []
        for c0 in range(0, head_dim, V_CHUNK):
            w = min(V_CHUNK, head_dim - c0)
            chunk = cache[:, :, c0 * KV_TILE:(c0 + w) * KV_TILE].reshape(nkv, nt, KV_TILE // 4, w, 4)
            parts.append(chunk.transpose(0, 1, 2, 4, 3).reshape(nkv, nt, KV_TILE, w))
        codes = np.concatenate(parts, axis=-1)
    return codes, cache[:, :, n:].view(np.float32)


def kv_write(k, v, k_cache, v_cache, start: int) -> None:
    """Store k, v float32 [T, Nkv, D] (post-RoPE) at positions start .. start+T-1 (rounded to fp16,
    or quantized to int8 with one scale per position and KV head)."""
    T = k.shape[0]
    d = _check_cache(k_cache, v_cache)
    nkv, nt, _ = k_cache.shape
    if k.shape != (T, nkv, d) or v.shape != k.shape:
        raise ValueError(f"kv_write shapes: k {k.shape}, v {v.shape}, cache {k_cache.shape}")
    if start < 0 or start + T > nt * KV_TILE:
        raise ValueError(f"positions {start}..{start + T - 1} do not fit a cache of {nt * KV_TILE} positions")
    if k_cache.dtype == np.int8:
        _kv_write_i8(np.ascontiguousarray(k, np.float32), np.ascontiguousarray(v, np.float32),
                     k_cache.reshape(-1), v_cache.reshape(-1), nt, start)
        return
    kc, _ = _split_views(k_cache, d, is_k=True)
    vc, _ = _split_views(v_cache, d, is_k=False)
    t = 0
    while t < T:
        tile, off = divmod(start + t, KV_TILE)
        n = min(KV_TILE - off, T - t)
        kc[:, tile, :, off:off + n] = k[t:t + n].transpose(1, 2, 0)  # [Nkv, D, n]
        vc[:, tile, off:off + n] = v[t:t + n].transpose(1, 0, 2)  # [Nkv, n, D]
        t += n


@njit()
def _kv_write_i8(k, v, kflat, vflat, ntc, start):
    """Quantize k, v [T, Nkv, D] (symmetric int8, one scale per position and head) into the flat
    int8 caches: K codes at _kpos, V codes at _vpos, scales after the D*KT codes of each tile."""
    T, nkv, D = k.shape
    te = kflat.shape[0] // (nkv * ntc)
    for t in range(T):
        tile, j = (start + t) // KV_TILE, (start + t) % KV_TILE
        for g in range(nkv):
            toff = (g * ntc + tile) * te
            for x, flat, is_k in ((k[t, g], kflat, True), (v[t, g], vflat, False)):
                amax = np.float32(0.0)
                for d in range(D):
                    amax = max(amax, abs(x[d]))
                scale = amax / np.float32(127.0)
                inv = np.float32(1.0) / scale if amax > 0 else np.float32(0.0)
                for d in range(D):
                    off = _kpos(flat, d, j) if is_k else _vpos(flat, d, j, D)
                    flat[toff + off] = np.int8(np.rint(x[d] * inv))
                _store_f32(flat, toff + D * KV_TILE + 4 * j, scale)


def kv_read(k_cache, v_cache, start: int, n: int):
    """(k, v) float32 [n, Nkv, D] of positions start .. start+n-1 (for tests and debugging)."""
    d = _check_cache(k_cache, v_cache)
    pos = np.arange(start, start + n)
    tile, off = pos // KV_TILE, pos % KV_TILE
    kc, ks = _split_views(k_cache, d, is_k=True)
    vc, vs = _split_views(v_cache, d, is_k=False)
    if ks is None:
        k = kc[:, tile, :, off]  # [n, Nkv, D] (numpy puts the split fancy index first)
    else:
        k = kc[:, tile, :, off].reshape(n, -1, d)  # [n, Nkv, D/4, 4] -> [n, Nkv, D]
    k = k.astype(np.float32)
    v = vc[:, tile, off].astype(np.float32).transpose(1, 0, 2)  # [Nkv, n, D] -> [n, Nkv, D]
    if ks is not None:
        k *= ks[:, tile, off].T[..., None]
        v *= vs[:, tile, off].T[..., None]
    return k, v


# ---- vector intrinsics (explicit LLVM vector IR: zmm on AVX-512, ymm pairs on AVX2, NEON on ARM) --

_VL = 16  # float lanes per LLVM vector (<16 x float>)
_F32 = ir.FloatType()
_F32V = ir.VectorType(_F32, _VL)
_I32V = ir.VectorType(ir.IntType(32), _VL)


NVEC = 2 if _jit.AVX512 else 1  # <16 x float> vectors per register tile (32 zmm registers with AVX-512)
# P.V register tile: with 32 zmm registers, 4 vectors (64 dims) x up to 6 heads of accumulators
# (28 registers with the V vectors): each probability broadcast then feeds 4 FMAs, not 2.
PV_NVEC = 4 if NVEC == 2 else NVEC
# Software prefetch of the tiles two blocks ahead in decode: measured 10-30 % faster on one thread at
# 32k context (the hardware prefetcher alone leaves DRAM latency exposed between K and V streams).
# Into L2, not L1 (_jit.PREFETCH_LOCALITY, prefetcht1): two blocks of K and V are ~130 KB, four times L1, and
# lines prefetched into L1 were evicted before use. 28 DRAM-resident layers at 32k positions, 2
# threads, AMD EPYC VM: int8 2.0 -> 1.1-1.4 ms per layer, fp16 3.1 -> 2.2 (one block ahead into L1
# before; one block into L2 was 1.3 for int8).
PREFETCH = True
_SUBTILE = _VL * NVEC  # positions per score register tile


def _i64(x):
    return ir.Constant(ir.IntType(64), x)


def _idx(values):
    """A constant <n x i32> shuffle mask."""
    values = list(values)
    return ir.Constant(ir.VectorType(ir.IntType(32), len(values)), values)


def _x86(builder, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _splat(builder, x):
    v = builder.insert_element(ir.Constant(_F32V, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, v, ir.Constant(_I32V, [0] * _VL))


def _fma(builder, a, b, c):
    """a * b + c, contractible to one FMA where the CPU has it (never a libm call)."""
    return builder.fadd(builder.fmul(a, b, flags=("contract",)), c, flags=("contract",))


def _ptr(context, builder, arrty, arr, elem_ty, off):
    """Pointer to flat element `off` (in elem_ty units) of a C-contiguous numba array."""
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(builder.bitcast(data, elem_ty.as_pointer()), [off])


def _half_to_float(builder, raw):
    """<n x i16> IEEE half bits -> <n x float>: fpext (vcvtph2ps; F16C is checked in _jit) on x86,
    exact bit manipulation on the generic path (no compiler-rt call). Inf/NaN do not occur."""
    n = raw.type.count
    f32v, i32v = ir.VectorType(_F32, n), ir.VectorType(ir.IntType(32), n)
    if _jit.SIMD != "generic":
        return builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), n)), f32v)
    h = builder.zext(raw, i32v)
    sign = builder.shl(builder.and_(h, ir.Constant(i32v, [0x8000] * n)), ir.Constant(i32v, [16] * n))
    mag = builder.shl(builder.and_(h, ir.Constant(i32v, [0x7FFF] * n)), ir.Constant(i32v, [13] * n))
    # the magnitude bits read as float32 are the value times 2^-112 (exact, subnormals included)
    f = builder.fmul(builder.bitcast(mag, f32v), ir.Constant(f32v, [2.0 ** 112] * n))
    return builder.bitcast(builder.or_(builder.bitcast(f, i32v), sign), f32v)


def _load_f16(builder, ptr):
    """16 consecutive fp16 cache values at ptr (i16*) -> <16 x float>."""
    raw = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(16), _VL).as_pointer()), align=2)
    return _half_to_float(builder, raw)


def _scale_ptr(context, builder, arrty, arr, toff, d):
    """float* to the KT scales of the int8 tile at byte offset toff (after its D*KT bytes of codes)."""
    p = _ptr(context, builder, arrty, arr, ir.IntType(8), builder.add(toff, builder.mul(d, _i64(KV_TILE))))
    return builder.bitcast(p, _F32.as_pointer())


_VNNI512 = _jit.VNNI512
_I8x64 = ir.VectorType(ir.IntType(8), 4 * _VL)
_I16x32 = ir.VectorType(ir.IntType(16), 2 * _VL)


def _dot4(builder, acc, kb, qb, k_unsigned=False):
    """acc <16 x i32> + sums of 4 adjacent products kb * qb (<64 x i8> each; q signed, k signed, or
    unsigned with k_unsigned: int8 P.V passes its uint8 probabilities as kb and the V codes as qb).

    VNNI: vpdpbusd needs an unsigned operand, so it takes signed k as k + 128 (k xor 0x80) and the
    caller subtracts 128 * sum(q) (`_needs_q_offset`). AVX2, signed k: vpmaddubsw + vpmaddwd with the
    sign trick |q| x (k * sign(q)), |pair| <= 2 * 127 * 127 < 32767; unsigned k: widened to int16 for
    vpmaddwd (`_dot4_avx2_wide`: uint8 x int8 pairs would saturate vpmaddubsw). Generic: widen to i32
    and multiply."""
    i32x8, i8x32 = ir.VectorType(ir.IntType(32), 8), ir.VectorType(ir.IntType(8), 32)
    if _jit.SIMD == "avxvnni":
        ku = kb if k_unsigned else builder.xor(kb, ir.Constant(_I8x64, [-128] * 64))
        if _VNNI512:
            return _x86(builder, "llvm.x86.avx512.vpdpbusd.512", _I32V,
                             [acc, builder.bitcast(ku, _I32V), builder.bitcast(qb, _I32V)])
    halves = []
    for h in range(2):
        lanes, bytes_ = _idx(range(8 * h, 8 * h + 8)), _idx(range(32 * h, 32 * h + 32))
        a = builder.shuffle_vector(acc, acc, lanes)
        if _jit.SIMD == "avxvnni":
            k = builder.shuffle_vector(ku, ku, bytes_)
            q = builder.shuffle_vector(qb, qb, bytes_)
            halves.append(_x86(builder, "llvm.x86.avx512.vpdpbusd.256", i32x8,
                                    [a, builder.bitcast(k, i32x8), builder.bitcast(q, i32x8)]))
        elif _jit.SIMD == "avx2":
            k = builder.shuffle_vector(kb, kb, bytes_)
            q = builder.shuffle_vector(qb, qb, bytes_)
            if k_unsigned:  # uint8 x int8 pairs reach 2 * 255 * 127: too big for vpmaddubsw's int16
                halves.append(builder.add(a, _dot4_avx2_wide(builder, k, q)))
                continue
            aq = _x86(builder, "llvm.x86.avx2.psign.b", i8x32, [q, q])
            sk = _x86(builder, "llvm.x86.avx2.psign.b", i8x32, [k, q])
            p16 = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(ir.IntType(16), 16), [aq, sk])
            ones = ir.Constant(ir.VectorType(ir.IntType(16), 16), [1] * 16)
            halves.append(builder.add(a, _x86(builder, "llvm.x86.avx2.pmadd.wd", i32x8, [p16, ones])))
        else:  # widen, multiply, add the 4 products of each 32-bit lane
            i32x32 = ir.VectorType(ir.IntType(32), 32)
            widen = builder.zext if k_unsigned else builder.sext
            k = widen(builder.shuffle_vector(kb, kb, bytes_), i32x32)
            q = builder.sext(builder.shuffle_vector(qb, qb, bytes_), i32x32)
            prod = builder.mul(k, q)
            parts = [builder.shuffle_vector(prod, prod, _idx(range(i, 32, 4))) for i in range(4)]
            halves.append(builder.add(a, builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))))
    return builder.shuffle_vector(halves[0], halves[1], _idx(range(16)))


def _dot4_avx2_wide(builder, ku, q):
    """<8 x i32> sums of 4 adjacent products of uint8 ku and int8 q (<32 x i8> each), exact: both
    widened to int16, vpmaddwd sums pairs into int32, then adjacent pairs are added."""
    k16, q16 = builder.zext(ku, _I16x32), builder.sext(q, _I16x32)
    pairs = []
    for h in range(2):
        sel = _idx(range(16 * h, 16 * h + 16))
        pairs.append(_x86(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(ir.IntType(32), 8),
                          [builder.shuffle_vector(k16, k16, sel), builder.shuffle_vector(q16, q16, sel)]))
    ps = builder.shuffle_vector(pairs[0], pairs[1], _idx(range(16)))  # ps[i] = products 2i + 2i+1
    return builder.add(builder.shuffle_vector(ps, ps, _idx(range(0, 16, 2))),
                       builder.shuffle_vector(ps, ps, _idx(range(1, 16, 2))))


def _needs_q_offset() -> bool:
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


def _prefetch(builder, ptr):
    """Software prefetch of the cache line at ptr into all cache levels (never faults)."""
    i8p = ir.IntType(8).as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
    i32 = ir.IntType(32)
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, _jit.PREFETCH_LOCALITY),
                      ir.Constant(i32, 1)])


def _prefetch_scales_ahead(builder, scale_ptr, te):
    """Prefetch the KT float32 scales (2 lines) of the int8 tile PREFETCH_TILES ahead."""
    ahead = _ahead(builder, scale_ptr, te, 1)
    for line in range(0, 4 * KV_TILE, 64):
        _prefetch(builder, builder.gep(ahead, [_i64(line)]))


def _ahead(builder, base, te, nbytes_per_elem):
    """Pointer PREFETCH_TILES tiles (of te elements) past base (as i8*, not inbounds)."""
    p = builder.bitcast(base, ir.IntType(8).as_pointer())
    return builder.gep(p, [builder.mul(te, _i64(PREFETCH_TILES * nbytes_per_elem))])


def _store_scores(builder, sbase, sstride, sub, vals):
    for r, row in enumerate(vals):
        for v, val in enumerate(row):
            dst = builder.gep(sbase, [builder.add(builder.mul(_i64(r), sstride), _i64(sub + _VL * v))])
            builder.store(val, builder.bitcast(dst, _F32V.as_pointer()), align=4)


def _tile_elems_of(context, builder, arrty, arr):
    """The array's last dimension (elements per tile) as i64."""
    ary = context.make_array(arrty)(context, builder, arr)
    return cgutils.unpack_tuple(builder, ary.shape, arrty.ndim)[arrty.ndim - 1]


def _qk_f16(context, builder, kty, kc, toff, d, qty, q, h0, sty, s, soff, sstride, nr):
    kbase = _ptr(context, builder, kty, kc, ir.IntType(16), toff)
    te = _tile_elems_of(context, builder, kty, kc)
    qbase = _ptr(context, builder, qty, q, _F32, builder.mul(h0, d))
    sbase = _ptr(context, builder, sty, s, _F32, soff)
    zero = ir.Constant(_F32V, [0.0] * _VL)
    accs = [[cgutils.alloca_once(builder, _F32V) for _ in range(NVEC)] for _ in range(nr)]
    for sub in range(0, KV_TILE, _SUBTILE):
        for row in accs:
            for a in row:
                builder.store(zero, a)
        with cgutils.for_range(builder, d) as loop:
            kp = builder.gep(kbase, [builder.add(builder.mul(loop.index, _i64(KV_TILE)), _i64(sub))])
            if PREFETCH and sub == 0:  # a row of KT fp16 keys is one 64-byte line
                _prefetch(builder, _ahead(builder, kp, te, 2))
            kv = [_load_f16(builder, builder.gep(kp, [_i64(_VL * v)])) for v in range(NVEC)]
            for r in range(nr):
                qv = _splat(builder, builder.load(builder.gep(qbase, [builder.add(builder.mul(_i64(r), d), loop.index)])))
                for v in range(NVEC):
                    builder.store(_fma(builder, qv, kv[v], builder.load(accs[r][v])), accs[r][v])
        _store_scores(builder, sbase, sstride, sub, [[builder.load(a) for a in row] for row in accs])


def _qk_int(context, builder, kty, kc, toff, d, qity, qi, qscty, qsc, qsumty, qsum, h0, sty, s, soff, sstride, nr):
    """Integer scores. int8 K tile codes [D/4, KT, 4]: one <64 x i8> load = 16 positions x 4 dims."""
    kbase = _ptr(context, builder, kty, kc, ir.IntType(8), toff)
    qibase = _ptr(context, builder, qity, qi, ir.IntType(32), builder.mul(h0, builder.udiv(d, _i64(4))))
    qscbase = _ptr(context, builder, qscty, qsc, _F32, h0)
    qsumbase = _ptr(context, builder, qsumty, qsum, ir.IntType(32), h0)
    sbase = _ptr(context, builder, sty, s, _F32, soff)
    kscale = _scale_ptr(context, builder, kty, kc, toff, d)
    te = _tile_elems_of(context, builder, kty, kc)
    if PREFETCH:  # the KT scales (two lines) of the tile ahead: the group loop prefetches only its codes
        _prefetch_scales_ahead(builder, kscale, te)
    d4 = builder.udiv(d, _i64(4))
    group_bytes = 4 * KV_TILE  # one 4-dim group of the tile's KT positions
    q_offset = 128 if _needs_q_offset() else 0  # vpdpbusd takes k + 128 (module doc of _dot4)
    zero = ir.Constant(_I32V, [0] * _VL)
    accs = [[cgutils.alloca_once(builder, _I32V) for _ in range(NVEC)] for _ in range(nr)]
    for sub in range(0, KV_TILE, _SUBTILE):
        for row in accs:
            for a in row:
                builder.store(zero, a)
        with cgutils.for_range(builder, d4) as loop:
            gp = builder.gep(kbase, [builder.mul(loop.index, _i64(group_bytes))])
            if PREFETCH and sub == 0:  # the group's two lines
                ahead = _ahead(builder, gp, te, 1)
                for line in range(0, group_bytes, 64):
                    _prefetch(builder, builder.gep(ahead, [_i64(line)]))
            kp = builder.gep(gp, [_i64(4 * sub)])
            kv = [builder.load(builder.bitcast(builder.gep(kp, [_i64(4 * _VL * v)]), _I8x64.as_pointer()), align=1)
                  for v in range(NVEC)]
            for r in range(nr):
                q4 = builder.load(builder.gep(qibase, [builder.add(builder.mul(_i64(r), d4), loop.index)]), align=1)
                qv = builder.insert_element(ir.Constant(_I32V, ir.Undefined), q4, ir.Constant(ir.IntType(32), 0))
                qb = builder.bitcast(builder.shuffle_vector(qv, qv, ir.Constant(_I32V, [0] * _VL)), _I8x64)
                for v in range(NVEC):
                    builder.store(_dot4(builder, builder.load(accs[r][v]), kv[v], qb), accs[r][v])
        ks = [builder.load(builder.bitcast(builder.gep(kscale, [_i64(sub + _VL * v)]), _F32V.as_pointer()), align=4)
              for v in range(NVEC)]
        vals = []
        for r in range(nr):
            dot = [builder.load(a) for a in accs[r]]
            if q_offset:
                off = builder.mul(builder.load(builder.gep(qsumbase, [_i64(r)])), ir.Constant(ir.IntType(32), q_offset))
                offv = builder.insert_element(ir.Constant(_I32V, ir.Undefined), off, ir.Constant(ir.IntType(32), 0))
                offv = builder.shuffle_vector(offv, offv, ir.Constant(_I32V, [0] * _VL))
                dot = [builder.sub(x, offv) for x in dot]
            qs = _splat(builder, builder.load(builder.gep(qscbase, [_i64(r)])))
            vals.append([builder.fmul(builder.fmul(builder.sitofp(x, _F32V), qs), ks[v]) for v, x in enumerate(dot)])
        _store_scores(builder, sbase, sstride, sub, vals)


def _dim_passes(builder, d, emit):
    """emit(d0, nvec) for the passes of P.V over D dims: PV_NVEC vectors of 16 dims at a time, then
    16 at a time for the dims past the last full pass (D % 64)."""
    step = _VL * PV_NVEC
    nfull = builder.udiv(d, _i64(step))
    with cgutils.for_range(builder, nfull) as loop:
        emit(builder.mul(loop.index, _i64(step)), PV_NVEC)
    if PV_NVEC > 1:
        nrest = builder.udiv(builder.urem(d, _i64(step)), _i64(_VL))
        with cgutils.for_range(builder, nrest) as loop:
            emit(builder.add(builder.mul(nfull, _i64(step)), builder.mul(loop.index, _i64(_VL))), 1)


def _emit_pv_pass(context, builder, vbase, d, n, pbase, pstride, abase, d0, nvec, nr, te):
    """acc[r, d0 : d0 + 16*nvec] += sum_{j<n} p[r, j] * v[j, d0 : ...] for nr heads (fp16 V)."""
    aptrs = [[builder.bitcast(builder.gep(abase, [builder.add(builder.mul(_i64(r), d), builder.add(d0, _i64(_VL * v)))]),
                              _F32V.as_pointer()) for v in range(nvec)] for r in range(nr)]
    accs = [[cgutils.alloca_once(builder, _F32V) for _ in range(nvec)] for _ in range(nr)]
    for r in range(nr):
        for v in range(nvec):
            builder.store(builder.load(aptrs[r][v], align=4), accs[r][v])
    with cgutils.for_range(builder, n) as loop:
        j = loop.index
        row = builder.gep(vbase, [builder.add(builder.mul(j, d), d0)])
        if PREFETCH:  # every 64-byte line of this pass's part of the row, PREFETCH_TILES tiles ahead
            ahead = _ahead(builder, row, te, 2)
            for line in range(0, 2 * nvec * _VL, 64):
                _prefetch(builder, builder.gep(ahead, [_i64(line)]))
        vv = [_load_f16(builder, builder.gep(row, [_i64(_VL * v)])) for v in range(nvec)]
        for r in range(nr):
            pj = builder.load(builder.gep(pbase, [builder.add(builder.mul(_i64(r), pstride), j)]))
            pv = _splat(builder, pj)
            for v in range(nvec):
                builder.store(_fma(builder, pv, vv[v], builder.load(accs[r][v])), accs[r][v])
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
            vbase = _ptr(context, builder, vty, vc, ir.IntType(16), toff)
            pbase = _ptr(context, builder, pty, p, _F32, poff)
            abase = _ptr(context, builder, aty, acc, _F32, aoff)
            te = _tile_elems_of(context, builder, vty, vc)
            _dim_passes(builder, d, lambda d0, nvec: _emit_pv_pass(context, builder, vbase, d, n, pbase, pstride, abase,
                                                                   d0, nvec, nr, te))
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


def _v_chunk(builder, c0, d):
    """(byte offset, width) of the int8 V chunk of dims c0 .. (c0 a multiple of V_CHUNK) in a tile of
    head dim d: c0 * KT and min(V_CHUNK, d - c0)."""
    rest = builder.sub(d, c0)
    w = builder.select(builder.icmp_unsigned("<", rest, _i64(V_CHUNK)), rest, _i64(V_CHUNK))
    return builder.mul(c0, _i64(KV_TILE)), w


def _emit_pv_int_pass(context, builder, vbase, d, nquads, pbase, pstride, scbase, qstride, abase, d0, nvec, nr, te):
    """acc[r, d0 : d0 + 16*nvec] += psc[r] * sum_quads pq . codes for one int8 V tile: per quad of
    positions, one <64 x i8> load of 16 dims x 4 positions against each head's 4 uint8 probabilities."""
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(_I32V, [0] * _VL)) for _ in range(nvec)]
            for _ in range(nr)]
    dim_bytes = 4  # bytes of one dim's 4 codes in a quad row
    c0 = builder.sub(d0, builder.urem(d0, _i64(V_CHUNK)))  # the chunk holding dims d0 ..
    cbase, w = _v_chunk(builder, c0, d)
    pass_base = builder.gep(vbase, [builder.add(cbase, builder.mul(builder.sub(d0, c0), _i64(dim_bytes)))])
    with cgutils.for_range(builder, nquads) as loop:
        row = builder.gep(pass_base, [builder.mul(loop.index, builder.mul(w, _i64(dim_bytes)))])
        if PREFETCH:
            ahead = _ahead(builder, row, te, 1)
            for line in range(0, dim_bytes * nvec * _VL, 64):
                _prefetch(builder, builder.gep(ahead, [_i64(line)]))
        vv = [builder.load(builder.bitcast(builder.gep(row, [_i64(dim_bytes * _VL * v)]), _I8x64.as_pointer()), align=1)
              for v in range(nvec)]
        for r in range(nr):
            pp = builder.gep(pbase, [builder.add(builder.mul(_i64(r), pstride), builder.mul(loop.index, _i64(4)))])
            pw = builder.load(builder.bitcast(pp, ir.IntType(32).as_pointer()), align=1)
            pv = builder.insert_element(ir.Constant(_I32V, ir.Undefined), pw, ir.Constant(ir.IntType(32), 0))
            pv = builder.bitcast(builder.shuffle_vector(pv, pv, ir.Constant(_I32V, [0] * _VL)), _I8x64)
            for v in range(nvec):
                builder.store(_dot4(builder, builder.load(accs[r][v]), pv, vv[v], k_unsigned=True), accs[r][v])
    for r in range(nr):
        dots = [builder.load(a) for a in accs[r]]
        psc = _splat(builder, builder.load(builder.gep(scbase, [builder.mul(_i64(r), qstride)])))
        for v in range(nvec):
            ap = builder.bitcast(builder.gep(abase, [builder.add(builder.mul(_i64(r), d), builder.add(d0, _i64(_VL * v)))]),
                                 _F32V.as_pointer())
            builder.store(_fma(builder, builder.sitofp(dots[v], _F32V), psc, builder.load(ap, align=4)), ap, align=4)


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
            vbase = _ptr(context, builder, vty, vc, ir.IntType(8), toff)
            pbase = _ptr(context, builder, pqty, pq, ir.IntType(8), poff)
            scbase = _ptr(context, builder, pscty, psc, _F32, qoff)
            abase = _ptr(context, builder, aty, acc, _F32, aoff)
            te = _tile_elems_of(context, builder, vty, vc)
            if PREFETCH:
                _prefetch_scales_ahead(builder, _scale_ptr(context, builder, vty, vc, toff, d), te)
            nquads = builder.udiv(builder.add(n, _i64(3)), _i64(4))
            _dim_passes(builder, d, lambda d0, nvec: _emit_pv_int_pass(
                context, builder, vbase, d, nquads, pbase, pstride, scbase, qstride, abase, d0, nvec, nr, te))
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


_qk1, _qk2, _qk3, _qk4, _qk5, _qk6 = (_make_qk(n) for n in range(1, _MAX_HEADS + 1))
_pvi1, _pvi2, _pvi3, _pvi4, _pvi5, _pvi6 = (_make_pv_int(n) for n in range(1, _MAX_HEADS + 1))
_pv1, _pv2, _pv3, _pv4, _pv5, _pv6 = (_make_pv(n) for n in range(1, _MAX_HEADS + 1))


@intrinsic
def _vmax(typingctx, a, off, n, init):
    """max(init, a[off], .., a[off + n - 1]) of a float32 array, 16 lanes at a time (LLVM does not
    vectorise a max reduction by itself without the no-NaN fast-math flag)."""
    sig = types.float32(a, types.intp, types.intp, types.float32)

    def codegen(context, builder, signature, args):
        a, off, n, init = args
        base = _ptr(context, builder, signature.args[0], a, _F32, off)
        acc = cgutils.alloca_once_value(builder, _splat(builder, init))
        nv = builder.udiv(n, _i64(_VL))
        with cgutils.for_range(builder, nv) as loop:
            p = builder.bitcast(builder.gep(base, [builder.mul(loop.index, _i64(_VL))]), _F32V.as_pointer())
            x, m = builder.load(p, align=4), builder.load(acc)
            builder.store(builder.select(builder.fcmp_ordered(">", x, m), x, m), acc)
        m = builder.load(acc)
        best = cgutils.alloca_once_value(builder, builder.extract_element(m, ir.Constant(ir.IntType(32), 0)))
        for i in range(1, _VL):
            x, b = builder.extract_element(m, ir.Constant(ir.IntType(32), i)), builder.load(best)
            builder.store(builder.select(builder.fcmp_ordered(">", x, b), x, b), best)
        with cgutils.for_range(builder, builder.sub(n, builder.mul(nv, _i64(_VL)))) as loop:
            x = builder.load(builder.gep(base, [builder.add(builder.mul(nv, _i64(_VL)), loop.index)]))
            b = builder.load(best)
            builder.store(builder.select(builder.fcmp_ordered(">", x, b), x, b), best)
        return builder.load(best)

    return sig, codegen


@intrinsic
def _store_f32(typingctx, arr, byte_off, x):
    """Store float32 x at byte offset byte_off of an int8 array (a tile's scale)."""
    sig = types.void(arr, types.intp, types.float32)

    def codegen(context, builder, signature, args):
        p = _ptr(context, builder, signature.args[0], args[0], ir.IntType(8), args[1])
        builder.store(args[2], builder.bitcast(p, _F32.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


def _make_dtype_test(dtypes):
    @intrinsic
    def test(typingctx, arr):
        sig = types.boolean(arr)

        def codegen(context, builder, signature, args):
            return ir.Constant(ir.IntType(1), int(signature.args[0].dtype in dtypes))

        return sig, codegen

    return test


# A compile-time constant: is this cache array int8 (kv_dtype "i8")?
_is_i8 = _make_dtype_test((types.int8,))


def _k_offset(builder, aty, d, j):
    """Element offset within a K tile of dim d, position j: d*KT + j (f16 [D, KT]) or
    ((d//4)*KT + j)*4 + d%4 (i8 [D/4, KT, 4])."""
    if aty.dtype != types.int8:
        return builder.add(builder.mul(d, _i64(KV_TILE)), j)
    grp = builder.add(builder.mul(builder.lshr(d, _i64(2)), _i64(KV_TILE)), j)
    return builder.add(builder.mul(grp, _i64(4)), builder.and_(d, _i64(3)))


def _v_offset(builder, aty, dim, d, j):
    """Element offset within a V tile (head dim `dim`) of dim d, position j: j*D + d (f16 [KT, D]), or
    in the int8 chunk of dims c0 .. c0+w-1 ([KT/4, w, 4] at byte c0*KT, c0 = d - d % V_CHUNK):
    c0*KT + ((j//4)*w + d - c0)*4 + j%4."""
    if aty.dtype != types.int8:
        return builder.add(builder.mul(j, dim), d)
    c0 = builder.sub(d, builder.urem(d, _i64(V_CHUNK)))
    base, w = _v_chunk(builder, c0, dim)
    quad = builder.add(builder.mul(builder.lshr(j, _i64(2)), w), builder.sub(d, c0))
    return builder.add(base, builder.add(builder.mul(quad, _i64(4)), builder.and_(j, _i64(3))))


@intrinsic
def _kpos(typingctx, arr, d, j):
    """Offset within a K tile of dim d of position j (`_k_offset`)."""
    sig = types.intp(arr, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        return _k_offset(builder, signature.args[0], args[1], args[2])

    return sig, codegen


@intrinsic
def _vpos(typingctx, arr, d, j, dim):
    """Offset within a V tile of head dim `dim` of dim d, position j (`_v_offset`)."""
    sig = types.intp(arr, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        return _v_offset(builder, signature.args[0], args[3], args[1], args[2])

    return sig, codegen


def _load_code(context, builder, aty, arr, off):
    """The code at element `off` of a cache array as float32: fp16 bits or an int8 code (unscaled)."""
    if aty.dtype == types.uint16:
        x = builder.load(_ptr(context, builder, aty, arr, ir.IntType(16), off))
        v = builder.insert_element(ir.Constant(ir.VectorType(ir.IntType(16), 1), ir.Undefined), x,
                                   ir.Constant(ir.IntType(32), 0))
        return builder.extract_element(_half_to_float(builder, v), ir.Constant(ir.IntType(32), 0))
    return builder.sitofp(builder.load(_ptr(context, builder, aty, arr, ir.IntType(8), off)), _F32)


@intrinsic
def _k_code(typingctx, arr, toff, d, j):
    """Key code of dim d, position j in the K tile at flat offset toff, as float32 (unscaled)."""
    sig = types.float32(arr, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        aty, (a, toff, d, j) = signature.args[0], args
        return _load_code(context, builder, aty, a, builder.add(toff, _k_offset(builder, aty, d, j)))

    return sig, codegen


@intrinsic
def _v_code(typingctx, arr, toff, dim, j, d):
    """Value code of dim d, position j in the V tile at flat offset toff (head dim `dim`), unscaled."""
    sig = types.float32(arr, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        aty, (a, toff, dim, j, d) = signature.args[0], args
        return _load_code(context, builder, aty, a, builder.add(toff, _v_offset(builder, aty, dim, d, j)))

    return sig, codegen


@intrinsic
def _tile_scale(typingctx, arr, toff, d, j):
    """Scale of position j of the tile at flat offset toff: the stored float32 for int8, 1 for f16."""
    sig = types.float32(arr, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        if aty.dtype == types.uint16:
            return ir.Constant(_F32, 1.0)
        sp = _scale_ptr(context, builder, aty, args[0], args[1], args[2])
        return builder.load(builder.gep(sp, [args[3]]))

    return sig, codegen


# ---- decode -------------------------------------------------------------------------------------

@njit(inline="always")
def _head_chunks(R):
    """(number, size) of the register tiles that cover R heads (at most _MAX_HEADS each)."""
    nch = (R + _MAX_HEADS - 1) // _MAX_HEADS
    return nch, (R + nch - 1) // nch


@njit(inline="always")
def _qk_heads(kc, toff, D, q, qi, qsc, qsum, h0, s, soff, sstride, R):
    """Scores of heads h0 .. h0+R-1 against one K tile into s[soff + r*sstride + j]."""
    nch, size = _head_chunks(R)
    for c in range(nch):
        r0 = c * size
        nr = min(size, R - r0)
        h, so = h0 + r0, soff + r0 * sstride
        if nr == 1:
            _qk1(kc, toff, D, q, qi, qsc, qsum, h, s, so, sstride)
        elif nr == 2:
            _qk2(kc, toff, D, q, qi, qsc, qsum, h, s, so, sstride)
        elif nr == 3:
            _qk3(kc, toff, D, q, qi, qsc, qsum, h, s, so, sstride)
        elif nr == 4:
            _qk4(kc, toff, D, q, qi, qsc, qsum, h, s, so, sstride)
        elif nr == 5:
            _qk5(kc, toff, D, q, qi, qsc, qsum, h, s, so, sstride)
        else:
            _qk6(kc, toff, D, q, qi, qsc, qsum, h, s, so, sstride)


@njit(inline="always")
def _pv_heads(vc, toff, D, n, p, poff, pstride, acc, R):
    """acc[r, :] += p[r, poff : poff+n] . V tile rows 0..n-1 for R heads (acc [R, D])."""
    nch, size = _head_chunks(R)
    for c in range(nch):
        r0 = c * size
        nr = min(size, R - r0)
        po, ao = r0 * pstride + poff, r0 * D
        if nr == 1:
            _pv1(vc, toff, D, n, p, po, pstride, acc, ao)
        elif nr == 2:
            _pv2(vc, toff, D, n, p, po, pstride, acc, ao)
        elif nr == 3:
            _pv3(vc, toff, D, n, p, po, pstride, acc, ao)
        elif nr == 4:
            _pv4(vc, toff, D, n, p, po, pstride, acc, ao)
        elif nr == 5:
            _pv5(vc, toff, D, n, p, po, pstride, acc, ao)
        else:
            _pv6(vc, toff, D, n, p, po, pstride, acc, ao)


@njit(inline="always")
def _pv_heads_int(vc, toff, D, n, pq, poff, pstride, psc, t, qstride, acc, R):
    """Integer P.V of one int8 V tile (tile t of the block) for R heads (acc [R, D])."""
    nch, size = _head_chunks(R)
    for c in range(nch):
        r0 = c * size
        nr = min(size, R - r0)
        po, qo, ao = r0 * pstride + poff, r0 * qstride + t, r0 * D
        if nr == 1:
            _pvi1(vc, toff, D, n, pq, po, pstride, psc, qo, qstride, acc, ao)
        elif nr == 2:
            _pvi2(vc, toff, D, n, pq, po, pstride, psc, qo, qstride, acc, ao)
        elif nr == 3:
            _pvi3(vc, toff, D, n, pq, po, pstride, psc, qo, qstride, acc, ao)
        elif nr == 4:
            _pvi4(vc, toff, D, n, pq, po, pstride, psc, qo, qstride, acc, ao)
        elif nr == 5:
            _pvi5(vc, toff, D, n, pq, po, pstride, psc, qo, qstride, acc, ao)
        else:
            _pvi6(vc, toff, D, n, pq, po, pstride, psc, qo, qstride, acc, ao)


P_TINY = 1e-30  # a tile whose largest probability is below this adds nothing (zeroed)


def _hreduce(builder, v, op):
    """Reduce a <16 x T> vector to its lane-0 scalar with op(builder, a, b), halving 4 times."""
    n = v.type.count
    while n > 1:
        n //= 2
        v = op(builder, builder.shuffle_vector(v, v, _idx(range(n))), builder.shuffle_vector(v, v, _idx(range(n, 2 * n))))
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


@intrinsic
def _quantize_tile(typingctx, sc, soff, vc, voff, m, pq, poff, psc, qoff):
    """int8 V, one head and tile: p[j] = sc[soff + j] * (V scale j, the float32s at byte voff of vc) for
    j < m (0 past m); pq[poff + j] = round(p[j] / s) as uint8 with s = max(p) / P_ONE, psc[qoff] = s. A tile
    with max p < P_TINY (<= 1e-30 of the block's largest probability, which is 1) is zeroed. Two
    <16 x float> vectors per KT = 32 positions."""
    sig = types.void(sc, types.intp, vc, types.intp, types.intp, pq, types.intp, psc, types.intp)

    def codegen(context, builder, signature, args):
        sc, soff, vc, voff, m, pq, poff, psc, qoff = args
        scty, _, vty, _, _, pqty, _, pscty, _ = signature.args
        sp = _ptr(context, builder, scty, sc, _F32, soff)
        vs = builder.bitcast(_ptr(context, builder, vty, vc, ir.IntType(8), voff), _F32.as_pointer())
        pp = _ptr(context, builder, pqty, pq, ir.IntType(8), poff)
        mv = builder.trunc(m, ir.IntType(32))
        mvec = builder.shuffle_vector(builder.insert_element(ir.Constant(_I32V, ir.Undefined), mv,
                                                             ir.Constant(ir.IntType(32), 0)), ir.Constant(_I32V, ir.Undefined),
                                      ir.Constant(_I32V, [0] * _VL))
        zero = ir.Constant(_F32V, [0.0] * _VL)
        xs = []
        for v in range(KV_TILE // _VL):
            p = builder.load(builder.bitcast(builder.gep(sp, [_i64(_VL * v)]), _F32V.as_pointer()), align=4)
            s = builder.load(builder.bitcast(builder.gep(vs, [_i64(_VL * v)]), _F32V.as_pointer()), align=1)
            valid = builder.icmp_signed("<", _idx(range(_VL * v, _VL * v + _VL)), mvec)
            xs.append(builder.select(valid, builder.fmul(p, s), zero))
        fmax = lambda b, x, y: b.select(b.fcmp_ordered(">", x, y), x, y)  # noqa: E731
        mx = _hreduce(builder, fmax(builder, xs[0], xs[1]), fmax)
        ok = builder.fcmp_ordered(">=", mx, ir.Constant(_F32, P_TINY))
        inv = builder.select(ok, builder.fdiv(ir.Constant(_F32, float(P_ONE)), mx), ir.Constant(_F32, 0.0))
        invv, half = _splat(builder, inv), ir.Constant(_F32V, [0.5] * _VL)
        for v, x in enumerate(xs):
            c = builder.fptosi(builder.fadd(builder.fmul(x, invv), half), _I32V)
            dst = builder.bitcast(builder.gep(pp, [_i64(_VL * v)]), ir.VectorType(ir.IntType(8), _VL).as_pointer())
            builder.store(builder.trunc(c, ir.VectorType(ir.IntType(8), _VL)), dst, align=1)
        scale = builder.select(ok, builder.fdiv(mx, ir.Constant(_F32, float(P_ONE))), ir.Constant(_F32, 0.0))
        builder.store(scale, _ptr(context, builder, pscty, psc, _F32, qoff))
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _quantize_probs(v_cache, toff0, te, D, sc, n, pq, psc):
    """int8 V: the block's probabilities times the positions' V scales, rounded to uint8 per head and
    tile (`_quantize_tile`): pq [R, B], psc [R, B/KT]."""
    KT = KV_TILE
    R, B = sc.shape
    for t in range((n + KT - 1) // KT):
        voff = toff0 + t * te + D * KT  # this tile's V scales
        for r in range(R):
            _quantize_tile(sc, r * B + t * KT, v_cache, voff, min(KT, n - t * KT), pq, r * B + t * KT,
                           psc, r * (B // KT) + t)


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


@njit(inline="always")
def _softmax_step(sc, n, m, l, acc):
    """Online softmax over one block: scores sc[r, :n] -> exp(s - new max) in place; rescales the
    running sum l[r] and accumulator acc[r, :] to the new max m[r]."""
    R, D = acc.shape
    for r in range(R):
        row = sc[r]
        mx = _vmax(row, 0, n, m[r])
        f = exp_nonpos(m[r] - mx)
        tot = np.float32(0.0)
        for j in range(n):
            e = exp_nonpos(row[j] - mx)
            row[j] = e
            tot += e
        l[r] = l[r] * f + tot
        m[r] = mx
        if f != np.float32(1.0):
            for d in range(D):
                acc[r, d] *= f


@pnjit()
def _attention_decode(qs, qi, qsc, qsum, k_cache, v_cache, length, nsplit, mpart, lpart, apart, spart,
                      pqpart, pscpart, out):
    nq, D = qs.shape
    if _is_i8(k_cache):
        _quantize_q(qs, qi.reshape(nq, D), qsc, qsum)
    nkv, ntc, te = k_cache.shape
    R = nq // nkv
    B, KT = DECODE_BLOCK, KV_TILE
    nblk = (length + B - 1) // B
    for item in prange(nkv * nsplit):
        g, sp = item // nsplit, item % nsplit
        b0, b1 = sp * nblk // nsplit, (sp + 1) * nblk // nsplit
        # This item's softmax state is its slice of the per-split outputs (nothing allocated here).
        sc = spart[sp, g * R:(g + 1) * R]  # [R, B] scores, then probabilities, of one block
        acc = apart[sp, g * R:(g + 1) * R]  # [R, D] unnormalised P.V
        m = mpart[sp, g * R:(g + 1) * R]  # [R] running max
        l = lpart[sp, g * R:(g + 1) * R]  # [R] running sum
        pq = pqpart[sp, g * R:(g + 1) * R]  # [R, B] int8 V: uint8 probabilities of one block
        psc = pscpart[sp, g * R:(g + 1) * R]  # [R, B/KT] their scale per tile
        m[:] = NEG_INF
        l[:] = 0.0
        acc[:] = 0.0
        for b in range(b0, b1):
            n = min(B, length - b * B)
            tile0 = g * ntc + b * (B // KT)
            for t in range((n + KT - 1) // KT):
                _qk_heads(k_cache, (tile0 + t) * te, D, qs, qi, qsc, qsum, g * R, sc, t * KT, B, R)
            _softmax_step(sc, n, m, l, acc)
            if _is_i8(v_cache):
                _quantize_probs(v_cache, tile0 * te, te, D, sc, n, pq, psc)
                for t in range((n + KT - 1) // KT):
                    _pv_heads_int(v_cache, (tile0 + t) * te, D, min(KT, n - t * KT), pq, t * KT, B, psc, t,
                                  B // KT, acc, R)
            else:
                for t in range((n + KT - 1) // KT):
                    _pv_heads(v_cache, (tile0 + t) * te, D, min(KT, n - t * KT), sc, t * KT, B, acc, R)
    _combine_splits(mpart, lpart, apart, nsplit, out)


@njit(inline="always")
def _quantize_q(qs, qi, qsc, qsum):
    """Symmetric int8 per query head: qi = round(qs / qsc), qsc = max|qs| / 127, qsum = sum(qi)."""
    nq, D = qs.shape
    for h in range(nq):
        amax = np.float32(0.0)
        for d in range(D):
            amax = max(amax, abs(qs[h, d]))
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        tot = 0
        for d in range(D):
            c = np.int32(np.floor(qs[h, d] * inv + np.float32(0.5)))
            qi[h, d] = c
            tot += c
        qsc[h] = amax / np.float32(127.0)
        qsum[h] = tot


@njit()
def _combine_splits(m, l, acc, nsplit, out):
    """Flash-decoding merge: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c per head.
    (A separate function: numba treats names shared with a prange body as reductions.)"""
    nq, D = out.shape
    for h in range(nq):
        big = NEG_INF
        for c in range(nsplit):
            big = max(big, m[c, h])
        denom = np.float32(0.0)
        for d in range(D):
            out[h, d] = 0.0
        for c in range(nsplit):
            f = np.exp(m[c, h] - big)
            denom += f * l[c, h]
            for d in range(D):
                out[h, d] += f * acc[c, h, d]
        inv = np.float32(1.0) / denom
        for d in range(D):
            out[h, d] *= inv


class DecodeScratch:
    """Per-model buffers of `attention_decode` for up to `max_len` positions: the scaled query and
    each position range's partial softmax state (max, sum, unnormalised P.V)."""

    def __init__(self, n_heads: int, head_dim: int, max_len: int):
        self.max_len = max_len
        self.qs = np.empty((n_heads, head_dim), np.float32)
        self.qi = np.empty(n_heads * head_dim, np.int8)  # int8 caches: q codes [Nq, D], scales, code sums
        self.qsc = np.empty(n_heads, np.float32)
        self.qsum = np.empty(n_heads, np.int32)
        self.m = np.empty((MAX_SPLIT, n_heads), np.float32)
        self.l = np.empty((MAX_SPLIT, n_heads), np.float32)
        self.acc = np.empty((MAX_SPLIT, n_heads, head_dim), np.float32)
        self.scores = np.empty((MAX_SPLIT, n_heads, DECODE_BLOCK), np.float32)  # one block's, per item
        # int8 caches: the block's probabilities as uint8 codes, with a scale per tile
        self.pq = np.zeros((MAX_SPLIT, n_heads, DECODE_BLOCK), np.uint8)
        self.psc = np.zeros((MAX_SPLIT, n_heads, DECODE_BLOCK // KV_TILE), np.float32)


def decode_splits(n_kv_heads: int, length: int, threads: int | None = None) -> int:
    """Position ranges per KV head: enough work items for every thread, each >= 1 block."""
    threads = _jit.get_threads() if threads is None else threads
    nblk = -(-length // DECODE_BLOCK)
    return max(1, min(nblk, MAX_SPLIT, -(-threads // n_kv_heads)))


def attention_decode(q, k_cache, v_cache, length: int, out, scratch: DecodeScratch) -> np.ndarray:
    """out float32 [Nq, D] = softmax(q K^T * D^-0.5) V over cache positions 0 .. length-1.

    q float32 [Nq, D] (post-RoPE) for the token at position length-1, whose k/v must already be in
    the cache (kv_write). One parallel region; work items are KV head x position range; each K and
    V tile is read once for the R query heads that share it; cost is linear in length.
    """
    nq, d = q.shape
    dc = _check_cache(k_cache, v_cache, d)
    nkv, nt, _ = k_cache.shape
    if q.dtype != np.float32 or not q.flags.c_contiguous or nq % nkv:
        raise ValueError(f"attention_decode: q must be C-contiguous float32 [Nq, D], Nq % Nkv == 0; "
                         f"got {q.dtype} {q.shape} for {nkv} KV heads of dim {dc}")
    if not 1 <= length <= min(nt * KV_TILE, scratch.max_len):
        raise ValueError(f"length {length} outside 1..{min(nt * KV_TILE, scratch.max_len)} (cache / scratch size)")
    if out.shape != q.shape or out.dtype != np.float32 or scratch.acc.shape[1:] != (nq, d):
        raise ValueError(f"attention_decode: out {out.shape} / scratch do not match q {q.shape}")
    np.multiply(q, np.float32(d ** -0.5), out=scratch.qs)
    _attention_decode(scratch.qs, scratch.qi, scratch.qsc, scratch.qsum, k_cache, v_cache, length,
                      decode_splits(nkv, length), scratch.m, scratch.l, scratch.acc, scratch.scores, scratch.pq,
                      scratch.psc, out)
    return out


# ---- prefill ------------------------------------------------------------------------------------

@njit(inline="always")
def _load_kt(k_cache, g, k0, n, kt):
    """kt[d, j] = float32 key d of position k0 + j, for j < n (k0 a multiple of KV_TILE)."""
    D = kt.shape[0]
    ntc, te = k_cache.shape[1], k_cache.shape[2]
    for j0 in range(0, n, KV_TILE):
        toff = (g * ntc + (k0 + j0) // KV_TILE) * te
        m = min(KV_TILE, n - j0)
        for d in range(D):
            for j in range(m):
                kt[d, j0 + j] = _k_code(k_cache, toff, d, j) * _tile_scale(k_cache, toff, D, j)


@njit(inline="always")
def _load_v(v_cache, g, k0, n, vb):
    """vb[j, :] = float32 value row of position k0 + j, for j < n (k0 a multiple of KV_TILE)."""
    D = vb.shape[1]
    ntc, te = v_cache.shape[1], v_cache.shape[2]
    for j0 in range(0, n, KV_TILE):
        toff = (g * ntc + (k0 + j0) // KV_TILE) * te
        for j in range(min(KV_TILE, n - j0)):
            s = _tile_scale(v_cache, toff, D, j)
            for d in range(D):
                vb[j0 + j, d] = _v_code(v_cache, toff, D, j, d) * s


@njit(inline="always")
def _scores(qrow, scale, kt, n, s):
    """s[j] = (qrow * scale) . k_j for j < n; keys innermost, four head dims per pass (D % 4 == 0)."""
    D = qrow.shape[0]
    for j in range(n):
        s[j] = 0.0
    for d in range(0, D, 4):
        q0, q1 = qrow[d] * scale, qrow[d + 1] * scale
        q2, q3 = qrow[d + 2] * scale, qrow[d + 3] * scale
        for j in range(n):
            s[j] += q0 * kt[d, j] + q1 * kt[d + 1, j] + q2 * kt[d + 2, j] + q3 * kt[d + 3, j]


@njit(inline="always")
def _add_pv(p, vb, n, acc):
    """acc[:] += sum_j p[j] * vb[j, :] for j < n, four positions per pass."""
    D = acc.shape[0]
    n4 = n - n % 4
    for j in range(0, n4, 4):
        p0, p1, p2, p3 = p[j], p[j + 1], p[j + 2], p[j + 3]
        for d in range(D):
            acc[d] += p0 * vb[j, d] + p1 * vb[j + 1, d] + p2 * vb[j + 2, d] + p3 * vb[j + 3, d]
    for j in range(n4, n):
        pj = p[j]
        for d in range(D):
            acc[d] += pj * vb[j, d]


@pnjit()
def _attention_prefill(q, k_cache, v_cache, p0, out):
    T, nq, D = q.shape
    nkv = k_cache.shape[0]
    rep = nq // nkv
    scale = np.float32(D ** -0.5)
    QB, KB = PREFILL_QBLOCK, PREFILL_KBLOCK
    nqb = (T + QB - 1) // QB
    for item in prange(nkv * nqb):
        g, b = item // nqb, item % nqb
        t0 = b * QB
        t1 = min(T, t0 + QB)
        kt = np.empty((D, KB), np.float32)
        vb = np.empty((KB, D), np.float32)
        sc = np.empty(KB, np.float32)
        mx = np.full((QB, rep), -np.inf, np.float32)
        tot = np.zeros((QB, rep), np.float32)
        acc = np.zeros((QB, rep, D), np.float32)
        last = p0 + t1  # keys 0 .. last-1 are visible to some query of the block
        for k0 in range(0, last, KB):
            n = min(KB, last - k0)
            _load_kt(k_cache, g, k0, n, kt)
            _load_v(v_cache, g, k0, n, vb)
            for t in range(t0, t1):
                nv = min(n, p0 + t + 1 - k0)  # causal: key position <= query position
                if nv <= 0:
                    continue
                for r in range(rep):
                    h = g * rep + r
                    _scores(q[t, h], scale, kt, nv, sc)
                    cmax = NEG_INF
                    for j in range(nv):
                        cmax = max(cmax, sc[j])
                    old = mx[t - t0, r]
                    new = max(old, cmax)
                    f = exp_nonpos(old - new)
                    tsum = tot[t - t0, r] * f
                    a = acc[t - t0, r]
                    for d in range(D):
                        a[d] *= f
                    for j in range(nv):
                        e = exp_nonpos(sc[j] - new)
                        sc[j] = e
                        tsum += e
                    _add_pv(sc, vb, nv, a)
                    mx[t - t0, r] = new
                    tot[t - t0, r] = tsum
        for t in range(t0, t1):
            for r in range(rep):
                inv = np.float32(1.0) / tot[t - t0, r]
                for d in range(D):
                    out[t, g * rep + r, d] = acc[t - t0, r, d] * inv


def attention_prefill(q, k_cache, v_cache, start: int, out) -> np.ndarray:
    """Blocked causal attention: out float32 [T, Nq, D] for queries q [T, Nq, D] at positions
    start .. start+T-1, each attending to cached positions 0 .. its own (k/v of the T new tokens
    must already be written with kv_write). Online softmax over key blocks of 64; parallel over
    KV heads x blocks of 16 queries."""
    T, nq, d = q.shape
    _check_cache(k_cache, v_cache, d)
    nkv, nt, _ = k_cache.shape
    if q.dtype != np.float32 or not q.flags.c_contiguous or nq % nkv or d % 4:
        raise ValueError(f"attention_prefill: q must be C-contiguous float32 [T, Nq, D], Nq % Nkv == 0, "
                         f"D % 4 == 0; got {q.dtype} {q.shape} for {nkv} KV heads")
    if start < 0 or start + T > nt * KV_TILE:
        raise ValueError(f"positions {start}..{start + T - 1} outside a cache of {nt * KV_TILE}")
    if out.shape != q.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"attention_prefill: out {out.shape} must match q {q.shape} (float32, contiguous)")
    _attention_prefill(q, k_cache, v_cache, start, out)
    return out
