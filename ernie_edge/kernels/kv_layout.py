"""The KV cache's memory layout: allocation, writes, reads, and each element's offset in a tile.

Legend: T new tokens, S cache capacity (positions), Nkv KV heads, D head dim, KT = KV_TILE
positions per cache tile, NT = S / KT tiles.

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
contiguous run instead of a slice of every row.

Each element's offset within a tile is written once, as LLVM IR (`k_offset`, `v_offset`), and used
by kv_write (`_kpos`, `_vpos`) and the prefill's loads (`k_code`, `v_code`).
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import intrinsic

from . import ir
from ._jit import njit
from .ir import F32, I8, I16

KV_TILE = 32  # KT: positions per cache tile
KV_BLOCK = 256  # allocation granularity of new_kv_cache (positions; a multiple of KV_TILE)
KV_DTYPES = ("f16", "i8")
CODE_DTYPES = {"f16": np.uint16, "i8": np.int8}  # the cache array's dtype per kv_dtype
V_CHUNK = 64  # int8 V tiles store their dims in chunks of this many (see the module doc)


# ---- allocation, writes and reads ----------------------------------------------------------------

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
    dt = CODE_DTYPES[kv_dtype]
    return np.zeros((n_kv_heads, nt, te), dt), np.zeros((n_kv_heads, nt, te), dt)


def cache_dtype(k_cache) -> str:
    """The kv_dtype ("f16" or "i8") of a cache array."""
    return next(name for name, dt in CODE_DTYPES.items() if k_cache.dtype == dt)


def check_cache(k_cache, v_cache, head_dim=None) -> int:
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


def split_views(cache, head_dim: int, is_k: bool):
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
    d = check_cache(k_cache, v_cache)
    nkv, nt, _ = k_cache.shape
    if k.shape != (T, nkv, d) or v.shape != k.shape:
        raise ValueError(f"kv_write shapes: k {k.shape}, v {v.shape}, cache {k_cache.shape}")
    if start < 0 or start + T > nt * KV_TILE:
        raise ValueError(f"positions {start}..{start + T - 1} do not fit a cache of {nt * KV_TILE} positions")
    _kv_write(np.ascontiguousarray(k, np.float32), np.ascontiguousarray(v, np.float32), k_cache.reshape(-1),
              v_cache.reshape(-1), nt, start)


@njit()
def _kv_write(k, v, kflat, vflat, ntc, start):
    """Store k, v [T, Nkv, D] into the flat caches at positions start..: fp16 bits (rounded to nearest
    even, as numpy's astype), or int8 codes with one scale per position and head (symmetric), the
    scales after the D*KT codes of each tile. Elements go where `_kpos` / `_vpos` say."""
    T, nkv, D = k.shape
    te = kflat.shape[0] // (nkv * ntc)
    for t in range(T):
        tile, j = (start + t) // KV_TILE, (start + t) % KV_TILE
        for g in range(nkv):
            toff = (g * ntc + tile) * te
            for x, flat, is_k in ((k[t, g], kflat, True), (v[t, g], vflat, False)):
                if is_i8(flat):
                    amax = np.float32(0.0)
                    for d in range(D):
                        amax = max(amax, abs(x[d]))
                    scale = amax / np.float32(127.0)
                    inv = np.float32(1.0) / scale if amax > 0 else np.float32(0.0)
                    for d in range(D):
                        off = _kpos(flat, d, j) if is_k else _vpos(flat, d, j, D)
                        flat[toff + off] = np.int8(np.rint(x[d] * inv))
                    _store_f32(flat, toff + D * KV_TILE + 4 * j, scale)
                else:
                    for d in range(D):
                        off = _kpos(flat, d, j) if is_k else _vpos(flat, d, j, D)
                        flat[toff + off] = _f16_bits(x[d])


def kv_read(k_cache, v_cache, start: int, n: int):
    """(k, v) float32 [n, Nkv, D] of positions start .. start+n-1 (for tests and debugging)."""
    d = check_cache(k_cache, v_cache)
    pos = np.arange(start, start + n)
    tile, off = pos // KV_TILE, pos % KV_TILE
    kc, ks = split_views(k_cache, d, is_k=True)
    vc, vs = split_views(v_cache, d, is_k=False)
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


# ---- element offsets within a tile, as LLVM IR ----------------------------------------------------

def v_chunk(builder, c0, d):
    """(byte offset, width) of the int8 V chunk of dims c0 .. (c0 a multiple of V_CHUNK) in a tile of
    head dim d: c0 * KT and min(V_CHUNK, d - c0)."""
    rest = builder.sub(d, c0)
    w = builder.select(builder.icmp_unsigned("<", rest, ir.c64(V_CHUNK)), rest, ir.c64(V_CHUNK))
    return builder.mul(c0, ir.c64(KV_TILE)), w


def k_offset(builder, aty, d, j):
    """Element offset within a K tile of dim d, position j: d*KT + j (f16 [D, KT]) or
    ((d//4)*KT + j)*4 + d%4 (i8 [D/4, KT, 4])."""
    if aty.dtype != types.int8:
        return builder.add(builder.mul(d, ir.c64(KV_TILE)), j)
    grp = builder.add(builder.mul(builder.lshr(d, ir.c64(2)), ir.c64(KV_TILE)), j)
    return builder.add(builder.mul(grp, ir.c64(4)), builder.and_(d, ir.c64(3)))


def v_offset(builder, aty, dim, d, j):
    """Element offset within a V tile (head dim `dim`) of dim d, position j: j*D + d (f16 [KT, D]), or
    in the int8 chunk of dims c0 .. c0+w-1 ([KT/4, w, 4] at byte c0*KT, c0 = d - d % V_CHUNK):
    c0*KT + ((j//4)*w + d - c0)*4 + j%4."""
    if aty.dtype != types.int8:
        return builder.add(builder.mul(j, dim), d)
    c0 = builder.sub(d, builder.urem(d, ir.c64(V_CHUNK)))
    base, w = v_chunk(builder, c0, dim)
    quad = builder.add(builder.mul(builder.lshr(j, ir.c64(2)), w), builder.sub(d, c0))
    return builder.add(base, builder.add(builder.mul(quad, ir.c64(4)), builder.and_(j, ir.c64(3))))


def scale_ptr(context, builder, arrty, arr, toff, d):
    """float* to the KT scales of the int8 tile at byte offset toff (after its D*KT bytes of codes)."""
    p = ir.data_ptr(context, builder, arrty, arr, I8, builder.add(toff, builder.mul(d, ir.c64(KV_TILE))))
    return builder.bitcast(p, F32.as_pointer())


@intrinsic
def is_i8(typingctx, arr):
    """A compile-time constant: is this cache array int8 (kv_dtype "i8")?"""
    sig = types.boolean(arr)

    def codegen(context, builder, signature, args):
        return ir.Constant(ir.IntType(1), int(signature.args[0].dtype == types.int8))

    return sig, codegen


@intrinsic
def _kpos(typingctx, arr, d, j):
    """Offset within a K tile of dim d of position j (`k_offset`)."""
    sig = types.intp(arr, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        return k_offset(builder, signature.args[0], args[1], args[2])

    return sig, codegen


@intrinsic
def _vpos(typingctx, arr, d, j, dim):
    """Offset within a V tile of head dim `dim` of dim d, position j (`v_offset`)."""
    sig = types.intp(arr, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        return v_offset(builder, signature.args[0], args[3], args[1], args[2])

    return sig, codegen


@intrinsic
def _store_f32(typingctx, arr, byte_off, x):
    """Store float32 x at byte offset byte_off of an int8 array (a tile's scale)."""
    sig = types.void(arr, types.intp, types.float32)

    def codegen(context, builder, signature, args):
        p = ir.data_ptr(context, builder, signature.args[0], args[0], I8, args[1])
        builder.store(args[2], builder.bitcast(p, F32.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _f16_bits(typingctx, x):
    """float32 x as IEEE half bits (uint16), rounded to nearest even (ir.f32_to_f16)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return ir.f32_to_f16(builder, args[0])

    return sig, codegen


def _load_code(context, builder, aty, arr, off):
    """The code at element `off` of a cache array as float32: fp16 bits or an int8 code (unscaled)."""
    if aty.dtype == types.uint16:
        return ir.f16_to_f32(builder, builder.load(ir.data_ptr(context, builder, aty, arr, I16, off)))
    return builder.sitofp(builder.load(ir.data_ptr(context, builder, aty, arr, I8, off)), F32)


@intrinsic
def k_code(typingctx, arr, toff, d, j):
    """Key code of dim d, position j in the K tile at flat offset toff, as float32 (unscaled)."""
    sig = types.float32(arr, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        aty, (a, toff, d, j) = signature.args[0], args
        return _load_code(context, builder, aty, a, builder.add(toff, k_offset(builder, aty, d, j)))

    return sig, codegen


@intrinsic
def v_code(typingctx, arr, toff, dim, j, d):
    """Value code of dim d, position j in the V tile at flat offset toff (head dim `dim`), unscaled."""
    sig = types.float32(arr, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        aty, (a, toff, dim, j, d) = signature.args[0], args
        return _load_code(context, builder, aty, a, builder.add(toff, v_offset(builder, aty, dim, d, j)))

    return sig, codegen


@intrinsic
def tile_scale(typingctx, arr, toff, d, j):
    """Scale of position j of the tile at flat offset toff: the stored float32 for int8, 1 for f16."""
    sig = types.float32(arr, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        if aty.dtype == types.uint16:
            return ir.Constant(F32, 1.0)
        sp = scale_ptr(context, builder, aty, args[0], args[1], args[2])
        return builder.load(builder.gep(sp, [args[3]]))

    return sig, codegen
