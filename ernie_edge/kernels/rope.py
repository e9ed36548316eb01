"""Interleaved rotary embedding (docs/ERNIE_SPEC.md §3.3): pair i = dims (2i, 2i+1) of every head,
angle = fp32(position) * inv_freq[i], inv_freq[i] = 1 / theta^(2i/D) in fp32.

Legend: T tokens, N heads, D head dim, P table positions.
"""

from __future__ import annotations

import numpy as np

from ._jit import njit


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """inv_freq float32 [D/2] computed in fp32 as transformers does (docs/ERNIE_SPEC.md §3.3)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def rope_tables(n_positions: int, head_dim: int, theta: float, start: int = 0):
    """(cos, sin) float32 [P, D/2] for positions start .. start+P-1; angle is one fp32 multiply.

    131072 positions x 64 pairs take 64 MiB for both tables; build them for the context you use.
    """
    inv_freq = rope_inv_freq(head_dim, theta)
    pos = np.arange(start, start + n_positions, dtype=np.int64).astype(np.float32)
    angle = pos[:, None] * inv_freq[None, :]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


@njit()
def _apply_rope(x, positions, cos, sin, table_start):
    T, N, D = x.shape
    for t in range(T):
        p = positions[t] - table_start
        for n in range(N):
            for i in range(D // 2):
                c, s = cos[p, i], sin[p, i]
                x0, x1 = x[t, n, 2 * i], x[t, n, 2 * i + 1]
                # HF order x*C + R(x)*S: first x0*c, then (-x1)*s, then the sum (docs/ERNIE_SPEC.md §3.3).
                x[t, n, 2 * i] = x0 * c + (-x1) * s
                x[t, n, 2 * i + 1] = x1 * c + x0 * s


def check_rope(x, positions, cos, sin) -> None:
    """The shapes and types `_apply_rope` needs (positions int64 [T], as apply_rope makes them)."""
    if x.dtype != np.float32 or x.ndim != 3 or not x.flags.c_contiguous or x.shape[2] % 2:
        raise ValueError(f"x must be C-contiguous float32 [T, N, D] with even D, got {x.dtype} {x.shape}")
    if positions.shape != (x.shape[0],) or cos.shape != sin.shape or cos.shape[1] != x.shape[2] // 2:
        raise ValueError(f"rope shapes: x {x.shape}, positions {positions.shape}, cos {cos.shape}")
    if positions.dtype != np.int64 or cos.dtype != np.float32 or sin.dtype != np.float32:
        raise ValueError(f"rope types: positions {positions.dtype} (int64), cos {cos.dtype}, sin {sin.dtype} (float32)")


def apply_rope(x, positions, cos, sin, table_start: int = 0) -> np.ndarray:
    """Rotate x float32 [T, N, D] IN PLACE; positions int [T]; cos/sin from rope_tables(start=table_start)."""
    positions = np.ascontiguousarray(positions, np.int64)
    check_rope(x, positions, cos, sin)
    if positions.size and (positions.min() < table_start or positions.max() >= table_start + cos.shape[0]):
        raise ValueError(f"positions {positions.min()}..{positions.max()} outside the rope table "
                         f"[{table_start}, {table_start + cos.shape[0]})")
    _apply_rope(x, positions, cos, sin, table_start)
    return x
