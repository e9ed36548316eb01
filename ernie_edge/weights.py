"""Typed containers for stored weights: what a kernel needs to read one tensor of an edge folder.

A `QTensor` holds read-only numpy views straight into the memory-mapped files (zero copy): the
codes (or plain values) and, for q4/q8, the fp16 scales as their uint16 bits (numba cannot take
float16 arrays). The layout is the format table's (ernie_edge/formats/table.py), unchanged:

  quant  data                        scales
  q4     uint8  [..., O, K/2]        uint16 [..., O, K/G]   (fp16 bits)
  q8     int8   [..., O, K]          uint16 [..., O, K/G]
  f16    float16 [...]               None
  f32    float32 [...]               None

For an expert bank the leading axis is the expert: [E, O, ...], one expert one contiguous slice.
Packed codes (q4 / q5 / q6) may be stored in 4-row tiles (`layout` "tiles4", formats/layout.py):
the same shape, rows reordered within each group of 4; `rows()` and `dequantize()` undo it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats.layout import ROWS, TILES4, tiled_rows, untile_rows
from .formats.table import FORMATS, Format, get_format


@dataclass(frozen=True)
class QTensor:
    """One stored weight. `shape` is the logical (dequantized) shape; group_size is 0 for f16/f32;
    layout "rows" or "tiles4" (formats/layout.py)."""

    quant: str
    data: np.ndarray
    scales: np.ndarray | None
    group_size: int
    shape: tuple[int, ...]
    layout: str = ROWS

    @property
    def tiled(self) -> bool:
        """Whether the codes are stored in 4-row tiles (the kernels' `tiled` flag)."""
        return self.layout == TILES4

    @property
    def format(self) -> Format:
        """Its row of the format table (ernie_edge/formats/table.py)."""
        return get_format(self.quant)

    @property
    def nbytes(self) -> int:
        """Bytes on disk (codes + scales)."""
        return self.data.nbytes + (0 if self.scales is None else self.scales.nbytes)

    @property
    def bits_per_weight(self) -> float:
        count = int(np.prod(self.shape, dtype=np.int64))
        return 8.0 * self.nbytes / count if count else 0.0

    def expert(self, e: int) -> "QTensor":
        """Slice expert e of a bank [E, O, ...] (a view, no copy)."""
        if len(self.shape) != 3:
            raise ValueError(f"expert() needs a bank [E, O, K]; this tensor has shape {self.shape}")
        scales = None if self.scales is None else self.scales[e]
        return QTensor(self.quant, self.data[e], scales, self.group_size, self.shape[1:], self.layout)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of a matrix [R, K], dequantized: float32 [len(ids), K] (embedding lookups)."""
        scales = None if self.scales is None else self.scales[ids]
        data = tiled_rows(self.data, self.format.bits, ids) if self.tiled else self.data[ids]
        return self.format.dequantize(data, scales, self.group_size or None).reshape(len(ids), -1)

    def dequantize(self) -> np.ndarray:
        """The weight as a new float32 array of `shape` (ernie_edge/formats/quant.py is the spec)."""
        if self.quant not in FORMATS:
            raise ValueError(f"unknown quant {self.quant!r} (known: {', '.join(FORMATS)})")
        data = untile_rows(self.data, self.format.bits) if self.tiled else self.data
        return self.format.dequantize(data, self.scales, self.group_size or None).reshape(self.shape)
