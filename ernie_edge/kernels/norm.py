"""RMSNorm and SwiGLU (docs/ERNIE_SPEC.md §3.1, §3.4). Serial kernels: a row of 2560 takes ~1 µs, less
than waking a thread pool would cost.

Legend: T tokens, H hidden size, I intermediate size.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from ._jit import njit
from .act_quant import live


@njit()
def _rmsnorm(x, w, eps, out):
    T, H = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for j in range(H):
            ss += x[t, j] * x[t, j]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(H) + eps)
        for j in range(H):
            out[t, j] = w[j] * (x[t, j] * inv)


@njit()
def _add_rmsnorm(h, delta, w, eps, out):
    T, H = h.shape
    for t in range(T):
        ss = np.float32(0.0)
        for j in range(H):
            v = h[t, j] + delta[t, j]
            h[t, j] = v
            ss += v * v
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(H) + eps)
        for j in range(H):
            out[t, j] = w[j] * (h[t, j] * inv)


@njit()
def _silu_mul(g, u, out):
    n = g.shape[0]
    for i in range(n):
        out[i] = g[i] / (np.float32(1.0) + np.exp(-g[i])) * u[i]


def _rows(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype != np.float32 or not a.flags.c_contiguous or a.ndim not in (1, 2):
        raise ValueError(f"{name} must be a C-contiguous float32 [T, H] or [H] array, got {a.dtype} {a.shape}")
    return a.reshape(1, -1) if a.ndim == 1 else a


def rmsnorm(x, w, eps: float, out) -> np.ndarray:
    """out [T, H] = w * (x / sqrt(mean(x^2) + eps)), float32; x [T, H] or [H], w [H]. out may be x."""
    bind_rmsnorm(x, np.ascontiguousarray(w, np.float32), eps, out)()
    return out


def bind_rmsnorm(x, w, eps: float, out):
    """`rmsnorm` as a call to repeat (decode): x, w and out are bound, not copied."""
    x2, o2 = _rows(x, "x"), _rows(out, "out")
    if o2.shape != x2.shape or w.shape != (x2.shape[1],):
        raise ValueError(f"rmsnorm shapes: x {x.shape}, w {w.shape}, out {out.shape}")
    return partial(_rmsnorm, x2, live(w, np.float32, "norm weight"), np.float32(eps), o2)


def add_rmsnorm(h, delta, w, eps: float, out) -> np.ndarray:
    """Residual add fused with the next norm: h += delta (in place), then out = rmsnorm(h, w, eps)."""
    bind_add_rmsnorm(h, delta, np.ascontiguousarray(w, np.float32), eps, out)()
    return out


def bind_add_rmsnorm(h, delta, w, eps: float, out):
    """`add_rmsnorm` as a call to repeat (decode): h, delta, w and out are bound, not copied."""
    h2, d2, o2 = _rows(h, "h"), _rows(delta, "delta"), _rows(out, "out")
    if d2.shape != h2.shape or o2.shape != h2.shape or w.shape != (h2.shape[1],):
        raise ValueError(f"add_rmsnorm shapes: h {h.shape}, delta {delta.shape}, w {w.shape}, out {out.shape}")
    return partial(_add_rmsnorm, h2, d2, live(w, np.float32, "norm weight"), np.float32(eps), o2)


def silu_mul(g, u, out) -> np.ndarray:
    """SwiGLU activation: out = silu(g) * u = g * sigmoid(g) * u, float32, any shape (contiguous)."""
    for name, a in (("g", g), ("u", u), ("out", out)):
        if a.dtype != np.float32 or not a.flags.c_contiguous or a.shape != g.shape:
            raise ValueError(f"silu_mul: {name} must be C-contiguous float32 of shape {g.shape}")
    _silu_mul(g.reshape(-1), u.reshape(-1), out.reshape(-1))
    return out
