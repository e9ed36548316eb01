"""int4 ("int4-sym-g{G}", llama.cpp Q4_0 nibble order) kernels: decode matvecs, MoE expert
groups, and the prefill matmul.

Legend: T tokens, K input features, O output features, G group size, E experts in a bank,
k routed slots, I expert intermediate size, H hidden size.

Layout (ernie_edge/formats/quant.py): packed uint8 [.., O, K/2], byte j of a group holds code j in the low
nibble and code j + G/2 in the high nibble, both stored +8; scales fp16 [.., O, K/G] (pass the
float16 array or its uint16 view). The decode kernels and their error bound are described in
q8.py (they are shared: the int16-activation dot is the same for both formats).
"""

from __future__ import annotations

import numpy as np

from . import q8, simd
from ._jit import njit
from .q8 import ActScratch

__all__ = ["ActScratch", "q4_matvec", "q4_matvec3", "q4_experts_gate_up_silu", "q4_experts_down_weighted",
           "q4_matmul", "q4_dequant_rows"]


def q4_matvec(x, packed, scales, out, act: ActScratch) -> np.ndarray:
    """out float32 [O] = W x for int4 W (packed uint8 [O, K/2], scales fp16 [O, K/G]); x float32 [K].

    Decode path: x is quantized to int16 per block of 32 into `act` (ActScratch(K) or larger);
    error bound in q8.py. One parallel region, rows split across threads.
    """
    return q8.matvec(x, packed, scales, out, act, bits=4)


def q4_matvec3(x, wq, sq, out_q, wk, sk, out_k, wv, sv, out_v, act: ActScratch):
    """Three int4 matvecs of one x in ONE parallel region (e.g. q, k, v): out_* = W_* x."""
    return q8.matvec3(x, [(wq, sq, out_q), (wk, sk, out_k), (wv, sv, out_v)], act, 4)


def q4_experts_gate_up_silu(x, gate_packed, gate_scales, up_packed, up_scales, expert_ids, out_h,
                            act: ActScratch) -> np.ndarray:
    """out_h float32 [k, I] = silu(G_e x) * (U_e x), e = expert_ids[j], for all k slots in ONE
    parallel region. Banks: packed uint8 [E, I, K/2], scales fp16 [E, I, K/G]; x float32 [K]."""
    return q8.experts_gate_up_silu(x, gate_packed, gate_scales, up_packed, up_scales, expert_ids, out_h,
                                   act, 4)


def q4_experts_down_weighted(h, down_packed, down_scales, expert_ids, weights, out,
                             act: ActScratch) -> np.ndarray:
    """out float32 [H] = sum_j weights[j] * D_e h[j], e = expert_ids[j], summed in ascending expert
    id (ERNIE_SPEC P13) starting from 0; overwrites out. h float32 [k, I]; bank uint8 [E, H, I/2],
    scales fp16 [E, H, I/G]; weights float32 [k]; act = ActScratch(I, rows=k) or larger."""
    return q8.experts_down_weighted(h, down_packed, down_scales, expert_ids, weights, out, act, 4)


@njit()
def _q4_dequant_rows(packed, s, r0, tile):
    """tile[i, :] = dequantized row r0 + i of packed int4 [O, K/2] (float32, exact). Serial: the
    prefill matmul runs it between multi-threaded sgemm calls, whose threads still spin."""
    n, K = tile.shape
    nsg = s.shape[1]
    kw = packed.shape[1]
    for i in range(n):
        simd.q4_dequant_row(packed, (r0 + i) * kw, s, (r0 + i) * nsg, K // nsg, tile, i * K, K)


def q4_dequant_rows(packed, scales, r0: int, tile) -> np.ndarray:
    """tile float32 [n, K] = rows r0 .. r0+n-1 of the int4 matrix, dequantized (= formats.dequantize_q4)."""
    s = q8.as_u16(scales)
    q8.check_weight(packed, s, tile.shape[1], 4)
    if not 0 <= r0 <= packed.shape[0] - tile.shape[0]:
        raise ValueError(f"rows {r0}..{r0 + tile.shape[0]} out of range for {packed.shape[0]} rows")
    q8.check_contig(tile=tile)
    _q4_dequant_rows(packed, s, r0, tile)
    return tile


def q4_matmul(X, packed, scales, out) -> np.ndarray:
    """out float32 [T, O] = X W^T for int4 W; X float32 [T, K] (any T >= 1).

    Prefill path, exact float32: W is dequantized ~2 MB of rows at a time into a cache-resident
    tile and multiplied with all T tokens by sgemm, so each weight byte is read once per batch.
    """
    s = q8.check_matmul(X, packed, scales, out, 4)
    return q8.tiled_matmul(X, packed, s, out, _q4_dequant_rows)
