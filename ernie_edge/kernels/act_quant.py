"""The activation quantizers of the integer kernels, int16 (decode matvecs in q8.py / q56.py,
small-batch matmuls in qbatch.py) and int8 (kernels/dot8.py: prefill, and decode with
`decode_acts="i8"`), and the checks of the quantized weights they are dotted with.

Legend: K input features, B = K/32 activation blocks, G weight group size (32, 64 or 128).

Activations are quantized in blocks of ACT_BLOCK = 32 values (llama.cpp's Q8_0 with 16-bit values):
xd[b] = max|block| / ACT_MAX and xq = round-half-even(x / xd[b]), computed in float64 so that
denormal blocks quantize correctly. Block b holds the 32 values one 16-byte chunk of an int4 row
multiplies: with weight group size gs, block b = (group g, chunk c) takes x[g*gs + 16c : +16] (low
nibbles) then x[g*gs + gs/2 + 16c : +16] (high nibbles); for gs = 32 (and for int8 weights, which
pass 32) that is simply x[32b : 32b + 32]. The weight layouts are ernie_edge/formats/quant.py's.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from ._jit import njit

ACT_BLOCK = 32  # activation values per quantization block
ACT_MAX = 32767  # activations are quantized to [-ACT_MAX, ACT_MAX] (int16 without -32768)


@njit(inline="always")
def _block_scale(x, gs, b, qmax):
    """Block b of x in the block order for group size gs (module doc): (lo, hi, d, inv) where the
    block is x[lo : lo + 16] then x[hi : hi + 16], d = max|block| / qmax its scale and inv = qmax /
    max|block| (float64: qmax / amax overflows float32 when amax is a float32 denormal; 0 for a
    zero block)."""
    chunks = gs // 32
    g, c = b // chunks, b % chunks
    lo = g * gs + 16 * c
    hi = lo + gs // 2
    amax = np.float32(0.0)
    for j in range(16):
        amax = max(amax, abs(x[lo + j]), abs(x[hi + j]))
    inv = qmax / np.float64(amax) if amax > 0 else 0.0
    return lo, hi, amax / np.float32(qmax), inv


@njit(inline="always")
def quantize_blocks(x, xq, xd, xs, gs, b0, b1):
    """Blocks b0..b1 of one row: x float32 [K] -> xq int16 [K], xd float32 [B], xs int32 [B]
    (xs[b] = 8 * sum of the block's xq: the int4 kernels' offset term). Block order in the module doc."""
    for b in range(b0, b1):
        lo, hi, d, inv = _block_scale(x, gs, b, ACT_MAX)
        total = 0
        for j in range(16):
            q0 = np.int32(np.rint(np.float64(x[lo + j]) * inv))
            q1 = np.int32(np.rint(np.float64(x[hi + j]) * inv))
            xq[32 * b + j] = q0
            xq[32 * b + 16 + j] = q1
            total += q0 + q1
        xd[b] = d
        xs[b] = 8 * total


ACT8_MAX = 127  # prefill's int8 activations (kernels/qbatch8.py): [-127, 127]


@njit(inline="always")
def quantize_spans8(x, xq, xd, xs, gs, b0, b1):
    """Blocks b0..b1 of one row to int8 in qbatch8.py's span order: x float32 [K] -> xq int8
    [128 NS] (block b = 4s + c: its first 16 values at 128s + 16c, its last 16 at 128s + 64 + 16c),
    xd float32 [16 NS] and xs int32 [16 NS] (block c's scale and sum of xq at lanes 16s + 4c .. + 3).
    Block order and rounding as `quantize_blocks`, with ACT8_MAX."""
    for b in range(b0, b1):
        lo, hi, d, inv = _block_scale(x, gs, b, ACT8_MAX)
        base = 128 * (b // 4) + 16 * (b % 4)
        total = 0
        for j in range(16):
            q0 = np.int32(np.rint(np.float64(x[lo + j]) * inv))
            q1 = np.int32(np.rint(np.float64(x[hi + j]) * inv))
            xq[base + j] = q0
            xq[base + 64 + j] = q1
            total += q0 + q1
        lane = 16 * (b // 4) + 4 * (b % 4)
        for r in range(4):
            xd[lane + r] = d
            xs[lane + r] = total


@njit(inline="always")
def quantize_row8(x, xq, xd, xs, gs):
    """A whole row by `quantize_spans8`, and the missing blocks of a partial last span zeroed (a
    reused buffer may hold another row's values there; the tiles read them as zero)."""
    nblk = x.shape[0] // 32
    quantize_spans8(x, xq, xd, xs, gs, 0, nblk)
    for b in range(nblk, 4 * ((nblk + 3) // 4)):
        base, lane = 128 * (b // 4) + 16 * (b % 4), 16 * (b // 4) + 4 * (b % 4)
        for j in range(16):
            xq[base + j] = 0
            xq[base + 64 + j] = 0
        for r in range(4):
            xd[lane + r] = 0.0
            xs[lane + r] = 0


def _quantize_row(x, xq, xd, xs, gs):
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_quantize_row, inline="always")
def _quantize_row_impl(x, xq, xd, xs, gs):
    if xq.dtype == types.int8:
        return lambda x, xq, xd, xs, gs: quantize_row8(x, xq, xd, xs, gs)
    return lambda x, xq, xd, xs, gs: quantize_blocks(x, xq, xd, xs, gs, 0, x.shape[0] // 32)


@njit()
def quantize_act(x, xq, xd, xs, gs):
    """A whole row x float32 [K], by the type of xq: int16 xq [K] -> `quantize_blocks` (xd float32 /
    xs int32 [K/32]); int8 xq [128 NS] -> `quantize_row8` (xd float32 / xs int32 [16 NS])."""
    _quantize_row(x, xq, xd, xs, gs)


@njit()
def log2_sub(nb, nsg):
    """log2(G / 32) for K/32 = nb activation blocks and nsg weight groups per row."""
    sub = nb // nsg
    l2 = 0
    while (1 << l2) < sub:
        l2 += 1
    return l2


def act_group(k: int, s: np.ndarray, bits: int) -> int:
    """The `gs` argument of the quantizer: the weight group size for int4 (the block order follows
    the nibbles), 32 for int8."""
    return k // s.shape[-1] if bits == 4 else 32


# ---- argument checks of the quantized weights -------------------------------------------------

def as_u16(scales: np.ndarray) -> np.ndarray:
    """fp16 scales as the uint16 view the kernels take (accepts float16 or uint16)."""
    if scales.dtype == np.float16:
        return scales.view(np.uint16)
    if scales.dtype != np.uint16:
        raise TypeError(f"scales must be float16 or their uint16 view, got {scales.dtype}")
    return scales


def check_contig(**arrays: np.ndarray) -> None:
    for name, a in arrays.items():
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (shape {a.shape}, strides {a.strides})")


def live(a: np.ndarray, dtype, name: str) -> np.ndarray:
    """`a` itself, checked to be C-contiguous `dtype`. A bound kernel call (the decode kernels'
    `bind_*`) reads the caller's arrays again on every call, so it must never hold a converted copy."""
    if a.dtype != dtype or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype).name} array (it is bound, not copied), "
                         f"got {a.dtype} {a.shape}")
    return a


def check_tiles(w: np.ndarray, k: int, tiled: bool, what: str = "weight") -> None:
    """A weight said to be stored in 4-row tiles (ernie_edge/formats/layout.py) must have them: its
    output rows (w.shape[-2]) a multiple of 4 and its input length k a multiple of 128."""
    if tiled and (w.shape[-2] % 4 or k % 128):
        raise ValueError(f"{what}: {w.shape} with inputs of length {k} has no 4-row tiles "
                         f"(rows % 4 == 0 and K % 128 == 0)")


def check_weight(w: np.ndarray, s: np.ndarray, k: int, bits: int, what: str = "weight",
                 ndim: int | None = None) -> np.ndarray:
    """Check that w [.., O, K*bits/8] (uint8 packed int4 or int8 codes; `ndim` dimensions when given)
    and its scales s [.., O, K/G] take an input of length k; returns s as uint16."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    want = np.uint8 if bits == 4 else np.int8
    if w.dtype != want or (ndim is not None and w.ndim != ndim):
        dims = "" if ndim is None else f" with {ndim} dimensions"
        raise ValueError(f"{what}: int{bits} weights must be {np.dtype(want).name}{dims}, got {w.dtype} {w.shape}")
    s = as_u16(s)
    kw = k // 2 if bits == 4 else k
    if k % ACT_BLOCK or w.shape[-1] != kw:
        raise ValueError(f"{what}: shape {w.shape} does not take an input of length {k} (int{bits})")
    if s.shape[:-1] != w.shape[:-1] or s.shape[-1] == 0 or k % s.shape[-1]:
        raise ValueError(f"{what}: scales {s.shape} do not match weights {w.shape}")
    g = k // s.shape[-1]
    if g not in (32, 64, 128):
        raise ValueError(f"{what}: scales {s.shape} give group size {g}, not 32, 64 or 128")
    check_contig(**{what: w, f"{what} scales": s})
    return s
