"""THE ernie-edge quantization formats. The numpy functions here are the specification; every
kernel (numba CPU, numba.cuda) is tested against `dequantize_*` below.

Formats (all symmetric, group-wise along the input dimension, one fp16 scale per group):

  q4  ("int4-sym-g{G}")   4.5 bits/weight at G=32 (4 + 16/32).
      A weight row W[o, :] of length K (K % G == 0) is cut into K/G groups of G consecutive
      elements. Group g of row o has scale s = scales[o, g] (float16) and G integer codes
      q[j] in [-8, 7]; the weight is  w = s * q.
      Packing: the group's G codes become G/2 bytes. Byte j (0 <= j < G/2) holds
        low  nibble = q[j]       + 8
        high nibble = q[j + G/2] + 8
      (llama.cpp Q4_0 order: a SIMD load of the group's bytes gives elements 0..G/2-1 from the low
      nibbles and G/2..G-1 from the high nibbles, with no shuffles.)
      Arrays:  packed uint8 [..., O, K/2]   scales float16 [..., O, K/G]
  q8  ("int8-sym-g{G}")   8.5 bits/weight at G=32.
      codes int8 [..., O, K] in [-127, 127], w = s * q;  scales float16 [..., O, K/G]
  q5, q6  ("int5-sym-g{G}", "int6-sym-g{G}")   5.5 / 6.5 bits/weight at G=32.
      codes q in [-16, 15] / [-32, 31], w = s * q, stored as u = q + 16 / q + 32 in b bits.
      Each block of 32 consecutive codes (a group holds G/32 blocks) takes 4b bytes:
        bytes 0..15    low nibbles, in the q4 g32 order: byte j = (u[j] & 15) | (u[j + 16] & 15) << 4
        bytes 16..     h = b - 4 high bits per code in 4h bytes: byte 16 + i holds u[i + 4h t] >> 4
                       at bits h t .. h t + h - 1, for t = 0 .. 8/h - 1
                       (q5: 4 bytes, bit t of byte i is bit 4 of u[i + 4t];
                        q6: 8 bytes, bits 2t, 2t+1 of byte i are u[i + 8t] >> 4)
      Arrays:  packed uint8 [..., O, K*b/8]   scales float16 [..., O, K/G]

Scales are finite float16. In q4, q5 and q6 they may be NEGATIVE (the group's largest-magnitude
weight goes to the most negative code whatever its sign, as in llama.cpp Q4_0), so kernels must
keep the scale's sign bit; q8 scales are >= 0. A group that quantizes to zero has scale +0.

Leading axes ("...") are the expert axis for expert banks: [E, O, K/2] with the expert axis
outermost, so one expert's projection is one contiguous slice. Kernels read exactly this layout;
nothing is repacked at load time.

`quantize_q4` / `quantize_q5` / `quantize_q6` / `quantize_q8` are the reference quantizers the converter uses (numba, compiled on
first call and cached); the method is described above them.
"""

from __future__ import annotations

import numba
import numpy as np

from .table import GROUP_SIZES

DEFAULT_GROUP_SIZE = 32
Q4_MIN, Q4_MAX = -8, 7
Q8_MAX = 127
QN_BITS = (5, 6)  # the int5 / int6 formats (q5, q6)
FP16_MAX = 65504.0


def check_group_size(k: int, group_size: int, what: str = "tensor") -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size {group_size} not supported (choose one of {GROUP_SIZES})")
    if k % group_size:
        raise ValueError(f"{what}: input dimension {k} is not a multiple of group_size {group_size}")


# ---- int4 ------------------------------------------------------------------------------------

def pack_q4(codes: np.ndarray, group_size: int) -> np.ndarray:
    """codes int [..., K] in [-8, 7] -> packed uint8 [..., K/2] (layout in the module doc)."""
    *lead, k = codes.shape
    g = codes.reshape(*lead, k // group_size, group_size).astype(np.int16) + 8
    half = group_size // 2
    packed = (g[..., :half] | (g[..., half:] << 4)).astype(np.uint8)
    return packed.reshape(*lead, k // 2)


def unpack_q4(packed: np.ndarray, group_size: int) -> np.ndarray:
    """packed uint8 [..., K/2] -> codes int8 [..., K] in [-8, 7]."""
    *lead, k2 = packed.shape
    half = group_size // 2
    b = packed.reshape(*lead, k2 // half, half)
    lo = (b & 0x0F).astype(np.int8) - 8
    hi = (b >> 4).astype(np.int8) - 8
    return np.concatenate([lo, hi], axis=-1).reshape(*lead, k2 * 2)


def dequantize_q4(packed: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """The spec: float32 [..., K] = scale[group] * code."""
    codes = unpack_q4(packed, group_size).astype(np.float32)
    *lead, k = codes.shape
    s = scales.astype(np.float32)[..., :, None]
    return (codes.reshape(*lead, k // group_size, group_size) * s).reshape(*lead, k)


# ---- int8 ------------------------------------------------------------------------------------

def dequantize_q8(codes: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    *lead, k = codes.shape
    s = scales.astype(np.float32)[..., :, None]
    return (codes.astype(np.float32).reshape(*lead, k // group_size, group_size) * s).reshape(*lead, k)


# ---- int5 / int6 --------------------------------------------------------------------------------

def _qn_layout(bits: int) -> tuple[int, int, int]:
    """(high bits per code h, high-bit bytes per block of 32 = 4h, code offset 2^(bits-1))."""
    if bits not in QN_BITS:
        raise ValueError(f"bits {bits} not supported (choose one of {QN_BITS})")
    h = bits - 4
    return h, 4 * h, 1 << (bits - 1)


def pack_qn(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes int [..., K] in [-2^(b-1), 2^(b-1) - 1] -> packed uint8 [..., K*b/8] (module doc)."""
    h, nqh, offset = _qn_layout(bits)
    *lead, k = codes.shape
    u = codes.reshape(*lead, k // 32, 32).astype(np.int32) + offset  # [..., B, 32]
    lo = u & 15
    ql = lo[..., :16] | (lo[..., 16:] << 4)  # [..., B, 16]
    hi = (u >> 4).reshape(*lead, k // 32, 8 // h, nqh)  # [..., B, t, i]: code i + 4h t
    qh = np.zeros((*lead, k // 32, nqh), np.int32)
    for t in range(8 // h):
        qh |= hi[..., t, :] << (h * t)
    return np.concatenate([ql, qh], axis=-1).astype(np.uint8).reshape(*lead, k * bits // 8)


def unpack_qn(packed: np.ndarray, bits: int) -> np.ndarray:
    """packed uint8 [..., K*b/8] -> codes int8 [..., K]."""
    h, nqh, offset = _qn_layout(bits)
    *lead, kb = packed.shape
    blocks = kb // (4 * bits)
    b = packed.reshape(*lead, blocks, 4 * bits).astype(np.int16)
    ql, qh = b[..., :16], b[..., 16:]  # [..., B, 16], [..., B, 4h]
    hi = np.stack([(qh >> (h * t)) & ((1 << h) - 1) for t in range(8 // h)], axis=-2)  # [..., B, t, i]
    hi = hi.reshape(*lead, blocks, 32)
    lo = np.concatenate([ql & 15, ql >> 4], axis=-1)  # [..., B, 32]
    return ((lo | (hi << 4)) - offset).astype(np.int8).reshape(*lead, blocks * 32)


def dequantize_qn(packed: np.ndarray, scales: np.ndarray, group_size: int, bits: int) -> np.ndarray:
    """The spec of q5 / q6: float32 [..., K] = scale[group] * code."""
    return dequantize_q8(unpack_qn(packed, bits), scales, group_size)


def dequantize_q5(packed: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    return dequantize_qn(packed, scales, group_size, 5)


def dequantize_q6(packed: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    return dequantize_qn(packed, scales, group_size, 6)


# ---- reference quantizers ------------------------------------------------------------------------
#
# Scale search, llama.cpp `make_qx_quants` style, judged with the fp16 scale dequant will use.
# For each group and each candidate divisor d:
#   1. codes  q = clamp(rint(w * d / m))        m: the group's pivot (below)
#   2. scale  s = fp16(sum(w q) / sum(q q))      least-squares scale for those codes, fp16-rounded
#   3. error  sum((w - s q)^2) = sum(w^2) - 2 s sum(w q) + s^2 sum(q q)      (float64)
# The candidate with the smallest error wins (the first on ties). The stored codes are then
# clamp(rint(w / s)), the best codes for that fp16 scale: the stored error is at most the searched
# one, and every element that is not clamped lies within |s|/2 of its weight.
#
# q4: the pivot is the group's largest-magnitude element WITH its sign, and the divisors are
#     -7.1 .. -8.9, so the pivot lands near code -8, the end of [-8, 7] with the extra step.
#     The scale is negative when the pivot is positive (as in llama.cpp Q4_0, d = max / -8);
#     w = s * q is unchanged. This lowers the RMS error by ~7% against scales kept positive.
# q5, q6: as q4, with the pivot near code -16 / -32 (divisors -15.1 .. -16.9 / -31.1 .. -32.9).
# q8: [-127, 127] is symmetric: the pivot is max|w|, scales are >= 0, divisors 127 .. 112
#     (past 112, clipping the largest values costs more than the finer step gains).
#
# No fastmath and no threads: every sum runs in a fixed order with plain IEEE operations (no
# reassociation, no fused multiply-add), so the output is bit-identical for the same input, with
# or without the JIT. The kernels release the GIL: the converter may quantize tensors in threads.

Q4_DIVISORS = np.array([-(80 + k) / 10 for k in range(-9, 10)])  # -7.1 .. -8.9
Q8_DIVISORS = np.array([float(Q8_MAX - k) for k in range(16)])  # 127 .. 112
QN_DIVISORS = {b: np.array([-((1 << (b - 1)) * 10 + k) / 10 for k in range(-9, 10)]) for b in QN_BITS}
Q4_VALUE_LIMIT = FP16_MAX * 8  # a larger |w| would need an fp16 scale above FP16_MAX
Q8_VALUE_LIMIT = FP16_MAX * Q8_MAX
_BLOCK = 64  # groups searched together, transposed so the inner loops run across groups
_jit = numba.njit(nogil=True, cache=True)


class QuantizationError(ValueError):
    """A tensor cannot be quantized: a NaN/Inf, or a magnitude no fp16 scale reaches.

    `index` is the position (a tuple into the input array) of the first offending element; the
    converter adds the tensor name."""

    def __init__(self, message: str, index: tuple[int, ...]):
        super().__init__(message)
        self.index = index


def quantize_q4(w: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """float [..., K] -> (packed uint8 [..., K/2], scales float16 [..., K/G]) in the q4 layout.

    Raises ValueError: K % group_size != 0, unsupported group size, and (QuantizationError)
    NaN/Inf or |w| > Q4_VALUE_LIMIT."""
    w32 = _prepare(w, group_size, Q4_VALUE_LIMIT, "int4")
    *lead, k = w32.shape
    groups = w32.reshape(-1, group_size)  # [N, G]
    scales = _search_scales(groups, Q4_DIVISORS, True, -8.0, Q4_MIN, Q4_MAX)  # [N], fp16 values
    packed = np.empty((groups.shape[0], group_size // 2), np.uint8)  # [N, G/2]
    _encode_q4(groups, scales, packed)
    return packed.reshape(*lead, k // 2), scales.astype(np.float16).reshape(*lead, k // group_size)


def quantize_q8(w: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """float [..., K] -> (codes int8 [..., K] in [-127, 127], scales float16 [..., K/G]).

    Raises ValueError: K % group_size != 0, unsupported group size, and (QuantizationError)
    NaN/Inf or |w| > Q8_VALUE_LIMIT."""
    w32 = _prepare(w, group_size, Q8_VALUE_LIMIT, "int8")
    *lead, k = w32.shape
    groups = w32.reshape(-1, group_size)  # [N, G]
    scales = _search_scales(groups, Q8_DIVISORS, False, 127.0, -Q8_MAX, Q8_MAX)  # [N], fp16 values
    codes = np.empty(groups.shape, np.int8)  # [N, G]
    _encode_q8(groups, scales, codes)
    return codes.reshape(*lead, k), scales.astype(np.float16).reshape(*lead, k // group_size)


def quantize_qn(w: np.ndarray, group_size: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """float [..., K] -> (packed uint8 [..., K*b/8], scales float16 [..., K/G]) in the q5 / q6
    layout (bits 5 / 6). Raises as quantize_q4, with the limit FP16_MAX * 2^(b-1)."""
    _, _, offset = _qn_layout(bits)
    w32 = _prepare(w, group_size, FP16_MAX * offset, f"int{bits}")
    *lead, k = w32.shape
    groups = w32.reshape(-1, group_size)  # [N, G]
    scales = _search_scales(groups, QN_DIVISORS[bits], True, -float(offset), -offset, offset - 1)  # [N]
    packed = np.empty((groups.shape[0], group_size * bits // 8), np.uint8)  # [N, G*b/8]
    _encode_qn(groups, scales, packed, bits)
    return packed.reshape(*lead, k * bits // 8), scales.astype(np.float16).reshape(*lead, k // group_size)


def quantize_q5(w: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    return quantize_qn(w, group_size, 5)


def quantize_q6(w: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    return quantize_qn(w, group_size, 6)


def quant_error_stats(w: np.ndarray, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """Quantize and dequantize `w`: {"rel_rms": ||w - deq|| / ||w|| (0 for all zeros),
    "max_abs": max |w - deq|, "bits_per_weight": ...}."""
    w32 = np.asarray(w, np.float32)
    if bits == 4:
        deq = dequantize_q4(*quantize_q4(w32, group_size), group_size)
    elif bits == 8:
        deq = dequantize_q8(*quantize_q8(w32, group_size), group_size)
    elif bits in QN_BITS:
        deq = dequantize_qn(*quantize_qn(w32, group_size, bits), group_size, bits)
    else:
        raise ValueError(f"bits {bits} not supported (choose 4, 5, 6 or 8)")
    diff = (w32 - deq).astype(np.float64)
    norm = float(np.sqrt(np.sum(np.square(w32, dtype=np.float64))))
    err = float(np.sqrt(np.sum(diff * diff)))
    return {"rel_rms": err / norm if norm else 0.0,
            "max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0,
            "bits_per_weight": bits + 16.0 / group_size}


def _prepare(w: np.ndarray, group_size: int, limit: float, what: str) -> np.ndarray:
    """Check a quantizer's input; return it as C-contiguous float32 [..., K]."""
    w = np.asarray(w)
    if w.ndim == 0:
        raise ValueError("cannot quantize a scalar: the input needs a last (input) dimension")
    if w.dtype.kind != "f" and w.dtype.name != "bfloat16":
        raise ValueError(f"cannot quantize dtype {w.dtype}: expected a floating-point array")
    check_group_size(w.shape[-1], group_size)
    finite = np.isfinite(w)
    if not finite.all():
        index = np.unravel_index(int(np.argmin(finite)), w.shape)
        index = tuple(int(i) for i in index)
        raise QuantizationError(f"non-finite value {w[index]} at index {list(index)}: "
                                "NaN/Inf weights cannot be quantized", index)
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    if w32.size and max(float(w32.max()), -float(w32.min())) > limit:
        index = np.unravel_index(int(np.argmax(np.abs(w32) > limit)), w.shape)
        index = tuple(int(i) for i in index)
        raise QuantizationError(
            f"value {w32[index]} at index {list(index)} is too large for {what} with an fp16 "
            f"scale (|w| must be <= {limit:g}); keep this tensor in f32", index)
    return w32


# ---- numba kernels of the quantizers (strict IEEE arithmetic, see above) -------------------------

@_jit
def _round_f16(x):
    """float64 -> the nearest float16 value (ties to even), as float64; +-inf past FP16_MAX."""
    a = abs(x)
    if a < 6.103515625e-05:  # below 2**-14 float16 values are multiples of 2**-24
        r = np.rint(a * 16777216.0) / 16777216.0
    else:  # keep 10 of float64's 52 fraction bits, ties to even (a carry may bump the exponent)
        bits = np.float64(a).view(np.uint64)
        odd = (bits >> np.uint64(42)) & np.uint64(1)
        bits = (bits + np.uint64(0x1FFFFFFFFFF) + odd) & np.uint64(0xFFFFFC0000000000)
        r = np.uint64(bits).view(np.float64)
        if r > FP16_MAX:
            r = np.inf
    return -r if x < 0 else r


@_jit
def _search_block(wt, pivot, n, divisors, fallback, qmin, qmax, best_scale):
    """Best fp16 scale for each of the first n groups of wt (float32 [G, BLOCK], transposed)."""
    G = wt.shape[0]
    sw2 = np.zeros(n)  # [n] sum w^2
    for j in range(G):
        for b in range(n):
            v = np.float64(wt[j, b])
            sw2[b] += v * v
    best_err = np.full(n, np.inf)
    for b in range(n):  # used only if every candidate overflows fp16 (|w| near the limit)
        best_scale[b] = _round_f16(np.float64(pivot[b]) / fallback)
    inv = np.empty(n, np.float32)  # [n] d / pivot
    slx = np.empty(n)  # [n] sum w q
    sl2 = np.empty(n)  # [n] sum q q
    lo, hi = np.float32(qmin), np.float32(qmax)
    for d in divisors:
        for b in range(n):
            inv[b] = np.float32(d / pivot[b]) if pivot[b] != 0 else np.float32(0.0)
            slx[b] = 0.0
            sl2[b] = 0.0
        for j in range(G):
            for b in range(n):
                v = wt[j, b]
                q = min(max(np.rint(v * inv[b]), lo), hi)
                slx[b] += np.float64(v) * np.float64(q)
                sl2[b] += np.float64(q * q)
        for b in range(n):
            if sl2[b] > 0:
                s = _round_f16(slx[b] / sl2[b])
                err = sw2[b] - 2.0 * s * slx[b] + s * s * sl2[b]
                if abs(s) <= FP16_MAX and err < best_err[b]:
                    best_err[b] = err
                    best_scale[b] = s


@_jit
def _search_scales(groups, divisors, signed, fallback, qmin, qmax):
    """groups float32 [N, G] -> scales float32 [N], each exactly a float16 value (0, never -0,
    for a group that quantizes to zero). signed: pivot keeps its sign (q4); fallback: the plain
    scale is pivot / fallback, used only where every candidate overflows."""
    N, G = groups.shape
    scales = np.zeros(N, np.float32)
    wt = np.empty((G, _BLOCK), np.float32)  # [G, B]
    pivot = np.empty(_BLOCK, np.float32)  # [B]
    best = np.empty(_BLOCK)  # [B]
    for start in range(0, N, _BLOCK):
        n = min(_BLOCK, N - start)
        for b in range(n):
            m = np.float32(0.0)
            for j in range(G):
                v = groups[start + b, j]
                wt[j, b] = v
                if abs(v) > abs(m):
                    m = v
            pivot[b] = m if signed else abs(m)
        _search_block(wt, pivot, n, divisors, fallback, qmin, qmax, best)
        for b in range(n):
            scales[start + b] = np.float32(best[b]) if best[b] != 0 else np.float32(0.0)
    return scales


@_jit
def _encode_q4(groups, scales, packed):
    """packed uint8 [N, G/2] <- codes clamp(rint(w / s), -8, 7) of groups [N, G], q4 nibble order."""
    N, G = groups.shape
    half = G // 2
    codes = np.empty(G, np.uint8)  # [G] q + 8
    for i in range(N):
        s = scales[i]
        for j in range(G):
            q = np.rint(groups[i, j] / s) if s != 0 else np.float32(0.0)
            codes[j] = np.uint8(np.int32(min(max(q, np.float32(Q4_MIN)), np.float32(Q4_MAX))) + 8)
        for j in range(half):
            packed[i, j] = codes[j] | (codes[j + half] << np.uint8(4))


@_jit
def _encode_q8(groups, scales, codes):
    """codes int8 [N, G] <- clamp(rint(w / s), -127, 127) of groups [N, G]."""
    N, G = groups.shape
    lo, hi = np.float32(-Q8_MAX), np.float32(Q8_MAX)
    for i in range(N):
        s = scales[i]
        for j in range(G):
            q = np.rint(groups[i, j] / s) if s != 0 else np.float32(0.0)
            codes[i, j] = np.int8(min(max(q, lo), hi))


@_jit
def _encode_qn(groups, scales, packed, bits):
    """packed uint8 [N, G*b/8] <- codes clamp(rint(w / s)) of groups [N, G] in the q5 / q6 layout."""
    N, G = groups.shape
    h = bits - 4
    nqh = 4 * h
    offset = 1 << (bits - 1)
    lo, hi = np.float32(-offset), np.float32(offset - 1)
    u = np.empty(32, np.int32)  # [32] codes + offset of one block
    for i in range(N):
        s = scales[i]
        for b in range(G // 32):
            for j in range(32):
                q = np.rint(groups[i, 32 * b + j] / s) if s != 0 else np.float32(0.0)
                u[j] = np.int32(min(max(q, lo), hi)) + offset
            base = b * 4 * bits
            for j in range(16):
                packed[i, base + j] = np.uint8((u[j] & 15) | ((u[j + 16] & 15) << 4))
            for c in range(nqh):
                v = 0
                for t in range(8 // h):
                    v |= (u[c + nqh * t] >> 4) << (h * t)
                packed[i, base + 16 + c] = np.uint8(v)
