"""Small-batch quantized matmuls for prefill: int16-quantized activations times packed weights.

Legend: T tokens, K input features, O output features, G weight group size, B = K/32 activation
blocks, E experts, k routed slots per token, S = T*k slots, I expert width, H hidden size,
R rows and N tokens of a register tile.

Why: the exact prefill path (q4_matmul / q8_matmul) dequantizes every weight row to fp32 before
sgemm, which costs the same for 2 tokens as for 512. Here, as in llama.cpp's Q4_0 x Q8_0 gemm,
the activations are quantized once (to int16 per block of 32 by the decode path's quantizer,
kernels/act_quant.py) and each weight block is widened to int16 ONCE per tile of N tokens and dotted
exactly in integers against all of them:

    y[t, o] = sum_b  ws[o, g(b)] * xd[t, b] * sum_{j in b} code[o, j] * xq[t, j]

Error bound, per output (tested in tests/test_kernels_qbatch.py), as for the decode matvec:

    |y[t, o] - (W x_t)[o]| <= sum_b  (max_{j in b} |x_t[j]| / 65534) * sum_{j in b} |W[o, j]|

plus float32 rounding (the per-block integer sums of four rows are added pairwise before the
float conversion; past 2^24 that rounds, a relative 6e-8, far below the activation error).

Register tile: R = 4 weight rows x N <= 4 tokens (`make_tile`; kernels/q56.py's small-batch
matmul uses it on int5 / int6 blocks too; kernels/codes.py widens every format). Per 32-block
the four rows' <8 x i32> dot vectors are folded into one by two levels of pairwise horizontal adds (vphaddd), converted to
float once and scaled by [ws0..ws3, ws0..ws3] * xd[t]: the float epilogue costs a quarter of a
per-row one. Rows are shared out in chunks of CHUNK_ROWS (one parallel region per call); within
a chunk each row quad stays in L1 while every token tile passes over it.

With AVX-512 the 4-row tiles are kernels/dot512.py's (two blocks per step in 512-bit vectors,
the rows folded by unpacks instead of vphaddd). SIMD paths follow kernels/_jit.SIMD: "avxvnni" (vpdpwssd), "avx2" (vpmaddwd), "generic" (plain
LLVM vector IR, e.g. NEON). All paths compute the same integer lanes.
"""

from __future__ import annotations

import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _jit, dot512, ir
from ._jit import njit, pnjit
from .act_quant import act_group, check_tiles, check_weight, log2_sub, quantize_blocks
from .codes import BLOCK_BYTES, block_i16, block_offset
from .ir import F32, F32x4, F32x8, I8, I16, I16x16, I32x8, I32x16, I64

TILE_ROWS = 4  # R
TILE_TOKENS = 4  # N (largest token tile)
CHUNK_ROWS = 16  # output rows per parallel work item (qmatmul)
EXPERT_CHUNK = 128  # expert intermediate rows per work item (qexperts gate/up); multiple of G
DOWN_CHUNK = 32  # hidden rows per work item (qexperts down)


# ---- LLVM IR of the register tile -----------------------------------------------------------------

def _pairs(builder, p16):
    """<16 x i32> -> <8 x i32> of adjacent-pair sums (vpmaddwd's lane layout)."""
    even = builder.shuffle_vector(p16, p16, ir.mask(range(0, 16, 2)))
    odd = builder.shuffle_vector(p16, p16, ir.mask(range(1, 16, 2)))
    return builder.add(even, odd)


def _dot(builder, wlo, whi, xlo, xhi):
    """Lane i: the 4 products of i16 pairs 2i, 2i+1 of (wlo, xlo) and (whi, xhi), exact in i32."""
    if _jit.SIMD == "avxvnni":
        acc = ir.call(builder, "llvm.x86.avx2.pmadd.wd", I32x8, [wlo, xlo])
        return ir.call(builder, "llvm.x86.avx512.vpdpwssd.256", I32x8,
                       [acc, builder.bitcast(whi, I32x8), builder.bitcast(xhi, I32x8)])
    if _jit.SIMD == "avx2":
        return builder.add(ir.call(builder, "llvm.x86.avx2.pmadd.wd", I32x8, [wlo, xlo]),
                           ir.call(builder, "llvm.x86.avx2.pmadd.wd", I32x8, [whi, xhi]))
    lo = builder.mul(builder.sext(wlo, I32x16), builder.sext(xlo, I32x16))
    hi = builder.mul(builder.sext(whi, I32x16), builder.sext(xhi, I32x16))
    return builder.add(_pairs(builder, lo), _pairs(builder, hi))


# vphaddd(a, b) = [a0+a1 a2+a3 b0+b1 b2+b3 | a4+a5 a6+a7 b4+b5 b6+b7]; b_i is element 8 + i of (a, b)
_HADD_EVEN = [0, 2, 8, 10, 4, 6, 12, 14]


def _hadd(builder, a, b):
    """vphaddd(a, b) (pairwise sums within each 128-bit half; the same lanes on every path)."""
    if _jit.SIMD != "generic":
        return ir.call(builder, "llvm.x86.avx2.phadd.d", I32x8, [a, b])
    even = builder.shuffle_vector(a, b, ir.mask(_HADD_EVEN))
    odd = builder.shuffle_vector(a, b, ir.mask([i + 1 for i in _HADD_EVEN]))
    return builder.add(even, odd)


def _tile_body(context, builder, sig, args, nrows, ntok, bits):
    """res[j * nrows + r] = dot(weight row r, activation row toks[t0 + j]) for r < nrows, j < ntok.

    args: (w, woff, wstride, s, soff, sstride, xq, xd, toks, t0, nblk, log2sub, res, tiled)
      w      weights (uint8 packed int4 / int5 / int6 or int8 codes, any shape, C-contiguous;
             `bits` per code, layouts in kernels/codes.py); row r of the tile starts at flat
             element woff + r * wstride, or, `tiled`, the rows are the 4-row tile at woff
             (`codes.block_offset`)
      s      uint16 fp16 scales; row r's first at soff + r * sstride; block b uses group b >> log2sub
      xq/xd  int16 [*, 32 * nblk] quantized activations and float32 [*, nblk] block scales
      toks   int64 row numbers of xq/xd; the tile's tokens are toks[t0 .. t0 + ntok)
      res    float32 output, at least nrows * ntok
    """
    (w, woff, wstride, s, soff, sstride, xq, xd, toks, t0, nblk, log2sub, res, tiled) = args
    wty, _, _, sty, _, _, xqty, xdty, tty, _, _, _, rty, _ = sig.args
    wptr = ir.data_ptr(context, builder, wty, w, I8)
    sptr = ir.data_ptr(context, builder, sty, s, I16)
    xqptr = ir.data_ptr(context, builder, xqty, xq, I16)
    xdptr = ir.data_ptr(context, builder, xdty, xd, F32)
    tptr = ir.data_ptr(context, builder, tty, toks, I64)
    rptr = ir.data_ptr(context, builder, rty, res, F32)
    bpb = BLOCK_BYTES[bits]  # weight bytes per 32-block and row
    kq = builder.mul(nblk, ir.c64(32))
    xrows = [builder.load(builder.gep(tptr, [builder.add(t0, ir.c64(j))])) for j in range(ntok)]
    xoffs = [builder.mul(row, kq) for row in xrows]
    doffs = [builder.mul(row, nblk) for row in xrows]
    soffs = [builder.add(soff, builder.mul(ir.c64(r), sstride)) for r in range(nrows)]
    ahead = builder.add(woff, builder.mul(ir.c64(nrows), wstride))  # the next tile's rows
    zero = ir.Constant(F32x8, [0.0] * 8)
    accs = [cgutils.alloca_once_value(builder, zero) for _ in range(ntok)]
    with cgutils.for_range(builder, nblk) as loop:
        i = loop.index
        ir.prefetch_lines(builder, wptr, builder.add(ahead, builder.mul(i, ir.c64(nrows * bpb))), nrows * bpb)
        g = builder.lshr(i, log2sub)
        wv = [block_i16(builder, wptr, block_offset(builder, woff, wstride, r, i, bits, tiled), bits)
              for r in range(nrows)]
        ws = [ir.f16_to_f32(builder, builder.load(builder.gep(sptr, [builder.add(so, g)]))) for so in soffs]
        if nrows == 4:
            wsv = ir.Constant(F32x8, ir.Undefined)
            for lane in range(8):
                wsv = builder.insert_element(wsv, ws[lane % 4], ir.c32(lane))
        for j in range(ntok):
            x0 = builder.add(xoffs[j], builder.mul(i, ir.c64(32)))
            xlo = ir.load_vec(builder, xqptr, x0, I16x16)
            xhi = ir.load_vec(builder, xqptr, builder.add(x0, ir.c64(16)), I16x16)
            xdj = ir.splat(builder, builder.load(builder.gep(xdptr, [builder.add(doffs[j], i)])), F32x8)
            p = [_dot(builder, lo, hi, xlo, xhi) for lo, hi in wv]
            if nrows == 4:  # lanes [r0 r1 r2 r3 | r0 r1 r2 r3] (low / high 128-bit halves)
                p32, scale = _hadd(builder, _hadd(builder, p[0], p[1]), _hadd(builder, p[2], p[3])), \
                    builder.fmul(wsv, xdj)
            else:
                p32, scale = p[0], builder.fmul(ir.splat(builder, ws[0], F32x8), xdj)
            f = builder.sitofp(p32, F32x8)
            acc = builder.load(accs[j])
            builder.store(builder.fadd(acc, builder.fmul(f, scale, flags=("contract",)), flags=("contract",)),
                          accs[j])
    for j in range(ntok):
        acc = builder.load(accs[j])
        if nrows == 4:
            lo = builder.shuffle_vector(acc, acc, ir.mask(range(4)))
            hi = builder.shuffle_vector(acc, acc, ir.mask(range(4, 8)))
            dst = builder.bitcast(builder.gep(rptr, [ir.c64(4 * j)]), F32x4.as_pointer())
            builder.store(builder.fadd(lo, hi), dst, align=4)
        else:
            builder.store(ir.hsum8(builder, acc), builder.gep(rptr, [ir.c64(j)]))
    return context.get_dummy_value()


def make_tile(nrows, bits=None):
    """The register tile intrinsic of nrows (4 or 1) weight rows x nt tokens, nt = 1..4 given at
    run time as the last argument (one unrolled body per nt, chosen by a switch); the other
    arguments are `_tile_body`'s. bits 5 / 6 for int5 / int6 weights, None for int4 (uint8) or
    int8 (int8) by the weights' dtype."""
    def typer(typingctx, w, woff, wstride, s, soff, sstride, xq, xd, toks, t0, nblk, log2sub, res, tiled, nt):
        sig = types.void(w, types.intp, types.intp, s, types.intp, types.intp, xq, xd, toks, types.intp,
                         types.intp, types.intp, res, types.boolean, types.intp)
        b = bits or (4 if w.dtype == types.uint8 else 8)

        def codegen(context, builder, signature, args):
            body_sig = types.void(*signature.args[:-1])

            def body(ntok):
                if nrows == 4 and _jit.AVX512:
                    dot512.tile4(context, builder, body_sig, args[:-1], ntok, b)
                else:
                    _tile_body(context, builder, body_sig, args[:-1], nrows, ntok, b)

            ir.switch(builder, args[-1], {n: (lambda n=n: body(n)) for n in range(1, TILE_TOKENS + 1)})
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


_tile4, _tile1 = make_tile(4), make_tile(1)


@njit(inline="always")
def _tile(nrows, nt, w, woff, wstride, s, soff, sstride, xq, xd, toks, t0, nblk, l2, res, tiled):
    """One register tile: nrows (4 or 1) weight rows x nt (1..4) tokens -> res[j * nrows + r];
    tiled: the 4 rows are a 4-row tile."""
    if nrows == 4:
        _tile4(w, woff, wstride, s, soff, sstride, xq, xd, toks, t0, nblk, l2, res, tiled, nt)
    else:
        _tile1(w, woff, wstride, s, soff, sstride, xq, xd, toks, t0, nblk, l2, res, False, nt)


# ---- activation quantization ------------------------------------------------------------------------

@njit()
def _quantize_rows(x, xq, xd, xs, gs):
    """Every row of x float32 [T, K] -> xq int16 [T, K], xd float32 [T, B], xs int32 [T, B]."""
    for t in range(x.shape[0]):
        quantize_blocks(x[t], xq[t], xd[t], xs[t], gs, 0, xd.shape[1])


def quantize_rows(x: np.ndarray, gs: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [T, K] -> (xq int16 [T, K], xd float32 [T, K/32]) as the kernels take them; gs is
    the int4 weight group size (block order in act_quant.py) or 32 for int8 weights. For tests and
    tools."""
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] % 32 or gs not in (32, 64, 128) or x.shape[1] % gs:
        raise ValueError(f"quantize_rows: x {x.shape} must be [T, K] with K a multiple of 32 and of gs={gs}")
    xq = np.empty(x.shape, np.int16)
    xd = np.empty((x.shape[0], x.shape[1] // 32), np.float32)
    _quantize_rows(x, xq, xd, np.empty(xd.shape, np.int32), gs)
    return xq, xd


# ---- qmatmul --------------------------------------------------------------------------------------

@njit(inline="always")
def _rows_all_tokens(nrows, w, woff, wstride, s, soff, sstride, xq, xd, toks, ntoks, nblk, l2, res,
                     out, r, tiled):
    """out[toks[t], r .. r + nrows) for all ntoks tokens, a register tile of tokens at a time."""
    for t0 in range(0, ntoks, TILE_TOKENS):
        nt = min(TILE_TOKENS, ntoks - t0)
        _tile(nrows, nt, w, woff, wstride, s, soff, sstride, xq, xd, toks, t0, nblk, l2, res, tiled)
        for j in range(nt):
            for q in range(nrows):
                out[toks[t0 + j], r + q] = res[j * nrows + q]


@pnjit()
def _qmatmul(x, w, s, out, xq, xd, xs, toks, gs, tiled):
    """out [T, O] = X W^T: quantize X (serial), then one parallel region over row chunks (of whole
    tiles: CHUNK_ROWS % 4 == 0)."""
    O, kw, nsg = w.shape[0], w.shape[1], s.shape[1]
    T, nblk = xd.shape
    l2 = log2_sub(nblk, nsg)
    _quantize_rows(x, xq, xd, xs, gs)
    nchunks = (O + CHUNK_ROWS - 1) // CHUNK_ROWS
    for c in prange(nchunks):
        res = np.empty(TILE_ROWS * TILE_TOKENS, np.float32)
        r, r1 = c * CHUNK_ROWS, min(O, (c + 1) * CHUNK_ROWS)
        while r + TILE_ROWS <= r1:
            _rows_all_tokens(TILE_ROWS, w, r * kw, kw, s, r * nsg, nsg, xq, xd, toks, T, nblk, l2, res, out, r, tiled)
            r += TILE_ROWS
        while r < r1:  # stored by rows (tiles have none)
            _rows_all_tokens(1, w, r * kw, kw, s, r * nsg, nsg, xq, xd, toks, T, nblk, l2, res, out, r, False)
            r += 1


def qmatmul(X, w, scales, out, bits: int, tiled: bool = False) -> np.ndarray:
    """out float32 [T, O] = X W^T with X quantized to int16 per block of 32 (error bound above).

    X float32 [T, K]; w packed uint8 [O, K/2] (bits=4) or int8 codes [O, K] (bits=8); scales
    fp16 (or its uint16 view) [O, K/G], G in 32/64/128. One parallel region over output rows;
    each weight block is unpacked once per tile of 4 tokens. Faster than q4_matmul / q8_matmul
    for small T (see benchmarks/qbatch.py for the crossover); overwrites out. tiled: w is stored
    in 4-row tiles.
    """
    X = np.ascontiguousarray(X, np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be float32 [T, K], got {X.shape}")
    T, K = X.shape
    s = check_weight(w, scales, K, bits, "weight", ndim=2)
    check_tiles(w, K, tiled)
    if out.shape != (T, w.shape[0]) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 [{T}, {w.shape[0]}], got {out.dtype} {out.shape}")
    if T == 0:
        return out
    xq = np.empty((T, K), np.int16)  # [T, K]
    xd = np.empty((T, K // 32), np.float32)  # [T, B]
    xs = np.empty((T, K // 32), np.int32)  # [T, B] (the quantizer's int4 offset term; unused here)
    _qmatmul(X, w, s, out, xq, xd, xs, np.arange(T, dtype=np.int64), act_group(K, s, bits), tiled)
    return out


# ---- qexperts ---------------------------------------------------------------------------------------

@njit()
def _group_slots(idx, weights, n_experts, slot_ids, slot_tok, slot_w, starts):
    """Sort the T*k slots by (expert, token) into slot_tok (token) and slot_w (routing weight);
    starts [E + 1] delimits each expert's slots; slot_ids = 0..S-1 (the rows of h)."""
    T, k = idx.shape
    counts = np.zeros(n_experts + 1, np.int64)
    for t in range(T):
        for j in range(k):
            counts[idx[t, j] + 1] += 1
    for e in range(n_experts):
        counts[e + 1] += counts[e]
    for e in range(n_experts + 1):  # not starts[:] = counts: its shape check compiles ~2 s of error formatting
        starts[e] = counts[e]
    for t in range(T):
        for j in range(k):
            e = idx[t, j]
            p = counts[e]
            counts[e] += 1
            slot_tok[p] = t
            slot_w[p] = weights[t, j]
            slot_ids[p] = p


@njit(inline="always")
def _silu(g):
    return g / (np.float32(1.0) + np.exp(-g))


@pnjit()
def _experts_gate_up(x, xq, xd, xs, gate, gs_, up, us, hit, starts, slot_tok, h, hq, hd, hs, gsx, gsh, tiled):
    """h[slot] = silu(G_e x[t]) * (U_e x[t]) for every slot (sorted by expert), quantized into
    hq / hd. One parallel region over (row chunk, expert) items, chunk-major so that a static
    split gives every thread the same mix of busy and idle experts."""
    inter, kw, nsg = gate.shape[1], gate.shape[2], gs_.shape[2]
    nblk = xd.shape[1]
    l2 = log2_sub(nblk, nsg)
    _quantize_rows(x, xq, xd, xs, gsx)
    nhit = hit.shape[0]
    nchunks = (inter + EXPERT_CHUNK - 1) // EXPERT_CHUNK
    for item in prange(nchunks * nhit):
        c, e = item // nhit, hit[item % nhit]
        s0, ns = starts[e], starts[e + 1] - starts[e]
        gres = np.empty(TILE_ROWS * TILE_TOKENS, np.float32)
        ures = np.empty(TILE_ROWS * TILE_TOKENS, np.float32)
        r, r1 = c * EXPERT_CHUNK, min(inter, (c + 1) * EXPERT_CHUNK)
        while r < r1:
            nrows = TILE_ROWS if r + TILE_ROWS <= r1 else 1
            row = e * inter + r
            for t0 in range(0, ns, TILE_TOKENS):
                nt = min(TILE_TOKENS, ns - t0)
                _tile(nrows, nt, gate, row * kw, kw, gs_, row * nsg, nsg, xq, xd, slot_tok, s0 + t0, nblk, l2, gres,
                      tiled)
                _tile(nrows, nt, up, row * kw, kw, us, row * nsg, nsg, xq, xd, slot_tok, s0 + t0, nblk, l2, ures,
                      tiled)
                for j in range(nt):
                    for q in range(nrows):
                        h[s0 + t0 + j, r + q] = _silu(gres[j * nrows + q]) * ures[j * nrows + q]
            r += nrows
        b0, b1 = (c * EXPERT_CHUNK) // 32, r1 // 32
        for p in range(s0, s0 + ns):
            quantize_blocks(h[p], hq[p], hd[p], hs[p], gsh, b0, b1)


@pnjit()
def _experts_down(hq, hd, down, ds, hit, starts, slot_ids, slot_tok, slot_w, out, tiled):
    """out[t] = sum over t's slots in ascending expert id of w * D_e h[slot], starting from 0.
    One parallel region over chunks of output rows; each item walks the experts in ascending id."""
    hid, kw, nsg = down.shape[1], down.shape[2], ds.shape[2]
    nblk = hd.shape[1]
    l2 = log2_sub(nblk, nsg)
    T = out.shape[0]
    nchunks = (hid + DOWN_CHUNK - 1) // DOWN_CHUNK
    for c in prange(nchunks):
        res = np.empty(TILE_ROWS * TILE_TOKENS, np.float32)
        r0, r1 = c * DOWN_CHUNK, min(hid, (c + 1) * DOWN_CHUNK)
        for t in range(T):
            for r in range(r0, r1):
                out[t, r] = 0.0
        for e in hit:  # ascending expert id (docs/ERNIE_SPEC.md P13)
            s0, ns = starts[e], starts[e + 1] - starts[e]
            r = r0
            while r < r1:
                nrows = TILE_ROWS if r + TILE_ROWS <= r1 else 1
                row = e * hid + r
                for t0 in range(0, ns, TILE_TOKENS):
                    nt = min(TILE_TOKENS, ns - t0)
                    _tile(nrows, nt, down, row * kw, kw, ds, row * nsg, nsg, hq, hd, slot_ids, s0 + t0, nblk, l2, res,
                          tiled)
                    for j in range(nt):
                        p = s0 + t0 + j
                        for q in range(nrows):
                            out[slot_tok[p], r + q] += slot_w[p] * res[j * nrows + q]
                r += nrows


def check_experts(x, idx, weights, gate, gate_s, up, up_s, down, down_s, out, bits: int, tiled: bool = False,
                  tiled_down: bool = False):
    """The checks of qexperts' (and qbatch8.qexperts8's) arguments: (x float32 contiguous, idx
    int64, weights float32, (gate, up, down scales as uint16))."""
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or out.shape != x.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"x and out must be float32 [T, H] (out C-contiguous), got x {x.shape}, "
                         f"out {out.dtype} {out.shape}")
    T, H = x.shape
    gs_ = check_weight(gate, gate_s, H, bits, "gate bank", ndim=3)
    us = check_weight(up, up_s, H, bits, "up bank", ndim=3)
    E, inter = gate.shape[0], gate.shape[1]
    ds = check_weight(down, down_s, inter, bits, "down bank", ndim=3)
    check_tiles(gate, H, tiled, "gate bank")
    check_tiles(down, inter, tiled_down, "down bank")
    if up.shape != gate.shape or us.shape != gs_.shape or down.shape[:2] != (E, H):
        raise ValueError(f"banks disagree: gate {gate.shape} / scales {gs_.shape}, up {up.shape} / "
                         f"{us.shape}, down {down.shape} (want [E, H, I'] for E={E}, H={H})")
    idx = np.ascontiguousarray(idx, np.int64)
    weights = np.ascontiguousarray(weights, np.float32)
    if idx.ndim != 2 or idx.shape[0] != T or weights.shape != idx.shape:
        raise ValueError(f"idx {idx.shape} and weights {weights.shape} must be [T, k] for T={T}")
    if idx.size and (idx.min() < 0 or idx.max() >= E):
        raise ValueError(f"expert ids must be in [0, {E}), got {idx.min()}..{idx.max()}")
    return x, idx, weights, (gs_, us, ds)


def experts_plan(x, idx, weights, gate, gate_s, up, up_s, down, down_s, out, bits: int, tiled: bool = False,
                 tiled_down: bool = False):
    """What qexperts (and qbatch8.qexperts8) start from: (x, (gate, up, down scales), the slots of
    `group_slots`) after `check_experts`; None, with out zeroed, when there is no token or slot."""
    x, idx, weights, scales = check_experts(x, idx, weights, gate, gate_s, up, up_s, down, down_s, out, bits, tiled,
                                            tiled_down)
    if x.shape[0] == 0 or idx.shape[1] == 0:
        out[...] = 0.0
        return None
    return x, scales, group_slots(idx, weights, gate.shape[0])


def group_slots(idx: np.ndarray, weights: np.ndarray, n_experts: int):
    """The T*k slots sorted by (expert, token): (slot_ids, slot_tok, slot_w, starts [E + 1], hit:
    the ascending ids of the experts with tokens)."""
    nslot = idx.size
    slot_ids = np.empty(nslot, np.int64)  # [S] identity: the rows of h / hq
    slot_tok = np.empty(nslot, np.int64)  # [S] token of each slot, slots sorted by (expert, token)
    slot_w = np.empty(nslot, np.float32)  # [S] routing weight
    starts = np.empty(n_experts + 1, np.int64)  # [E + 1]
    _group_slots(idx, weights, n_experts, slot_ids, slot_tok, slot_w, starts)
    hit = np.nonzero(np.diff(starts))[0].astype(np.int64)
    return slot_ids, slot_tok, slot_w, starts, hit


def qexperts(x, idx, weights, gate, gate_s, up, up_s, down, down_s, out, bits: int, tiled: bool = False,
             tiled_down: bool | None = None) -> np.ndarray:
    """Routed experts of a batch with int16-quantized activations; overwrites out.

    out[t] = sum over t's k slots, in ascending expert id starting from 0 (docs/ERNIE_SPEC.md P13), of
    weights[t, j] * D_e(silu(G_e x[t]) * U_e x[t]),  e = idx[t, j].
    x float32 [T, H]; idx int [T, k] (distinct experts per token); weights float32 [T, k];
    gate / up banks [E, I, H/2] uint8 (bits=4) or [E, I, H] int8 (bits=8), down bank [E, H, I/2] or
    [E, H, I], each with fp16 scales [E, rows, K/G]; each expert of gate and up in 4-row tiles
    where `tiled`, of down where `tiled_down` (None: as `tiled`); out float32 [T, H].

    Tokens are grouped by expert, so each hit expert's weights are unpacked once per tile of 4 of
    its tokens. Two parallel regions: gate/up/silu over (row chunk, expert) items, then down over
    chunks of hidden rows. Both x and the SwiGLU output h are quantized (error bound in the module
    doc, applied to each of the two stages).
    """
    tiled_down = tiled if tiled_down is None else tiled_down
    plan = experts_plan(x, idx, weights, gate, gate_s, up, up_s, down, down_s, out, bits, tiled, tiled_down)
    if plan is None:
        return out
    x, (gs_, us, ds), (slot_ids, slot_tok, slot_w, starts, hit) = plan
    T, H = x.shape
    nslot, inter = slot_ids.size, gate.shape[1]
    xq = np.empty((T, H), np.int16)  # [T, H]
    xd = np.empty((T, H // 32), np.float32)
    xs = np.empty((T, H // 32), np.int32)  # the quantizer's int4 offset terms (unused here)
    h = np.empty((nslot, inter), np.float32)  # [S, I]
    hq = np.empty((nslot, inter), np.int16)
    hd = np.empty((nslot, inter // 32), np.float32)
    hs = np.empty((nslot, inter // 32), np.int32)
    gsh = act_group(inter, ds, bits)
    if EXPERT_CHUNK % gsh:
        raise AssertionError("EXPERT_CHUNK must be a multiple of every group size")
    _experts_gate_up(x, xq, xd, xs, gate, gs_, up, us, hit, starts, slot_tok, h, hq, hd, hs, act_group(H, gs_, bits),
                     gsh, tiled)
    _experts_down(hq, hd, down, ds, hit, starts, slot_ids, slot_tok, slot_w, out, tiled_down)
    return out
