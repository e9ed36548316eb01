"""int4 ("int4-sym-g{G}", llama.cpp Q4_0 nibble order) prefill kernels: the exact float32 matmul
and the row dequantization it tiles.

Legend: T tokens, K input features, O output features, G group size.

Layout (ernie_edge/formats/quant.py): packed uint8 [.., O, K/2], byte j of a group holds code j in
the low nibble and code j + G/2 in the high nibble, both stored +8; scales fp16 [.., O, K/G] (pass
the float16 array or its uint16 view). The int4 decode kernels are q8.py's, shared by both formats
(`q8.matvec`, `q8.matvec3`, `q8.experts_gate_up_silu`, `q8.experts_down_weighted` with bits=4).
"""

from __future__ import annotations

import numpy as np

from . import q8, simd
from ._jit import njit
from .act_quant import check_contig, check_tiles, check_weight


@njit()
def _q4_dequant_rows(packed, s, r0, tile, tiled):
    """tile[i, :] = dequantized row r0 + i of packed int4 [O, K/2] (float32, exact; tiled: stored
    in 4-row tiles). Serial: the prefill matmul runs it in each of its worker threads."""
    n, K = tile.shape
    nsg = s.shape[1]
    kw = packed.shape[1]
    for i in range(n):
        wo = q8.row_start(r0 + i, kw, 64, tiled)
        simd.q4_dequant_row(packed, wo, s, (r0 + i) * nsg, K // nsg, tile, i * K, K, tiled)


# The serial row dequantizers of int4 / int8 codes, (data, scales as uint16, r0, tile, tiled) -> tile,
# exact (decode's embedding lookup, cpu_weights.QuantLinear.bind_row).
DEQUANT_ROWS = {4: _q4_dequant_rows, 8: q8._q8_dequant_rows}


def q4_dequant_rows(packed, scales, r0: int, tile, tiled: bool = False) -> np.ndarray:
    """tile float32 [n, K] = rows r0 .. r0+n-1 of the int4 matrix, dequantized (= formats.dequantize_q4)."""
    s = check_weight(packed, scales, tile.shape[1], 4, ndim=2)
    check_tiles(packed, tile.shape[1], tiled)
    if not 0 <= r0 <= packed.shape[0] - tile.shape[0]:
        raise ValueError(f"rows {r0}..{r0 + tile.shape[0]} out of range for {packed.shape[0]} rows")
    check_contig(tile=tile)
    _q4_dequant_rows(packed, s, r0, tile, tiled)
    return tile


def q4_matmul(X, packed, scales, out, tiled: bool = False) -> np.ndarray:
    """out float32 [T, O] = X W^T for int4 W (in 4-row tiles where `tiled`); X float32 [T, K] (any T >= 1).

    Prefill path, exact float32: W is dequantized ~2 MB of rows at a time into a cache-resident
    tile and multiplied with all T tokens by sgemm, so each weight byte is read once per batch.
    """
    s = q8.check_matmul(X, packed, scales, out, 4)
    check_tiles(packed, X.shape[1], tiled)
    return q8.tiled_matmul(X, packed, s, out, _q4_dequant_rows, tiled=tiled)
