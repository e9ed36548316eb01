"""Where a packed matrix's rows lie in its stored bytes: by rows, or in 4-row tiles.

Legend: O output rows, K inputs, b bits per code (4, 5, 6), KW = K b / 8 bytes per row, a span =
128 codes = 4 blocks of 32 = 16 b bytes of one row (formats/quant.py gives a block's bytes).

  rows    row r at byte r KW, as formats/quant.py packs it.
  tiles4  the rows in groups of 4: tile t (rows 4t .. 4t + 3) at byte 4t KW holds its rows span by
          span, span s of row 4t + i at byte 4t KW + 16 b (4 s + i).

The decode kernels read 4 rows at a time; by rows those are four streams side by side, in tiles one
sequential stream (an expert-shaped int4 matrix read 5-17 % faster from DRAM, docs/PERF.md). A
matrix has tiles when O % 4 == 0 and K % 128 == 0 (`has_tiles`). Only the codes move: the scales
keep their [O, K/G] layout, and an expert bank [E, O, KW] is tiled one expert at a time. The
manifest names each tensor's layout (`tiles4`, or none: rows); int8 and float tensors are stored by
rows. kernels/codes.py's `block_offset` is this formula in the kernels' IR.
"""

from __future__ import annotations

import numpy as np

ROWS, TILES4 = "rows", "tiles4"
LAYOUTS = (ROWS, TILES4)
TILE_ROWS = 4
SPAN_CODES = 128
TILED_BITS = (4, 5, 6)  # the packed formats that may be stored in tiles


def has_tiles(o: int, k: int) -> bool:
    """Whether an [o, k] matrix (k logical inputs) has a `tiles4` form."""
    return o % TILE_ROWS == 0 and k % SPAN_CODES == 0


def storage_layout(bits: int, shape: tuple[int, ...]) -> str:
    """The layout the converter stores a tensor of `bits`-bit codes and logical `shape` in: tiles for
    a packed int4 / int5 / int6 matrix (or bank) that has them, else rows."""
    tiled = bits in TILED_BITS and len(shape) >= 2 and has_tiles(shape[-2], shape[-1])
    return TILES4 if tiled else ROWS


def _check(data: np.ndarray, bits: int) -> tuple[int, int]:
    if bits not in TILED_BITS:
        raise ValueError(f"only int{'/int'.join(map(str, TILED_BITS))} codes are stored in tiles, not int{bits}")
    if data.ndim < 2 or data.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8 [.., O, K*{bits}/8], got {data.dtype} {data.shape}")
    o, kw = data.shape[-2:]
    if not has_tiles(o, kw * 8 // bits):
        raise ValueError(f"int{bits} codes {data.shape} have no 4-row tiles (O % 4 == 0 and K % 128 == 0)")
    return o, kw


def tile_rows(data: np.ndarray, bits: int) -> np.ndarray:
    """A `tiles4` copy of packed codes [.., O, KW] stored by rows (same shape and bytes, reordered)."""
    o, kw = _check(data, bits)
    lead, span = data.shape[:-2], 16 * bits
    t = data.reshape(*lead, o // 4, 4, kw // span, span)
    return np.ascontiguousarray(np.swapaxes(t, -3, -2)).reshape(data.shape)


def untile_rows(data: np.ndarray, bits: int) -> np.ndarray:
    """The by-rows copy of `tiles4` codes [.., O, KW]: the inverse of `tile_rows`."""
    o, kw = _check(data, bits)
    lead, span = data.shape[:-2], 16 * bits
    t = data.reshape(*lead, o // 4, kw // span, 4, span)
    return np.ascontiguousarray(np.swapaxes(t, -3, -2)).reshape(data.shape)


def tiled_rows(data: np.ndarray, bits: int, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of `tiles4` codes [O, KW], by rows: [len(ids), KW] (only their tiles are read)."""
    _check(data, bits)
    ids = np.asarray(ids, np.int64)
    tiles, at = np.unique(ids // TILE_ROWS, return_inverse=True)
    rows = untile_rows(data.reshape(-1, TILE_ROWS, data.shape[-1])[tiles].reshape(-1, data.shape[-1]), bits)
    return rows.reshape(len(tiles), TILE_ROWS, -1)[at.reshape(-1), ids % TILE_ROWS]
