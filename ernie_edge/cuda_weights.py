"""Weights on the GPU that carry their CUDA kernels: the CUDA backend's binding of the format table
(as cpu_weights.py is the CPU's). Each stored tensor is uploaded once, from the memory map, in its
file layout (ernie_edge/formats/quant.py): q4 / q8 codes and fp16 scales as they are (the codes
also viewed as 32-bit words for the matvecs), f16 / f32 tensors widened to float32.

  format   decode (one token)                     prefill (T tokens)
  q4, q8   quant_matvec: one warp per row         quant_matmul: shared-memory tiles
  f16/f32  quant_matvec.fmatvec                   quant_matmul.fmatmul

A SwiGLU (layer 0's MLP, a shared expert) whose gate and up share one integer format runs as a
one-expert bank through the fused expert kernels; otherwise one matrix at a time.

Legend: O output rows, K inputs, E experts, I expert width, T tokens, H hidden.
"""

from __future__ import annotations

import numpy as np

from .kernels.cuda import norm_rope, quant_matmul, quant_matvec
from .formats.layout import untile_rows
from .weights import QTensor


def _to_device(a: np.ndarray):
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(a))


def _rows(t: QTensor) -> np.ndarray:
    """The codes by rows: the device kernels read one warp per row (codes in 4-row tiles,
    formats/layout.py, are put back in row order once, on the host, at upload)."""
    return untile_rows(t.data, t.format.bits) if t.tiled else t.data


class DeviceQuant:
    """A q4 / q8 matrix [O, K] or bank [E, O, K] on the device, its codes by rows."""

    def __init__(self, t: QTensor):
        self.shape, self.bits, self.group_size = t.shape, t.format.bits, t.group_size
        self.codes = _to_device(_rows(t))  # uint8 [..., O, K/2] or int8 [..., O, K]
        self.words = self.codes.view(np.uint32)  # the same bytes as 32-bit words
        self.scales = _to_device(t.scales.view(np.float16))  # [..., O, K/G]
        self.nbytes = t.nbytes

    def matvec(self, x, out, accumulate: bool = False) -> None:
        quant_matvec.matvec(self.words, self.scales, self.bits, self.group_size, x, out, accumulate)

    def matmul(self, X, out, accumulate: bool = False) -> None:
        quant_matmul.matmul(X, self.codes, self.scales, self.bits, self.group_size, out, accumulate)

    def bank(self):
        """(words, scales) as a bank [E, O, NW] (a matrix becomes a one-expert bank)."""
        if len(self.shape) == 3:
            return self.words, self.scales
        return self.words.reshape(1, *self.words.shape), self.scales.reshape(1, *self.scales.shape)

    def byte_bank(self):
        """(codes, scales) as a bank [E, O, ...] for the grouped matmuls."""
        if len(self.shape) == 3:
            return self.codes, self.scales
        return self.codes.reshape(1, *self.codes.shape), self.scales.reshape(1, *self.scales.shape)


class DeviceFloat:
    """An f16 / f32 matrix [O, K] on the device as float32."""

    bits = None
    group_size = None

    def __init__(self, t: QTensor):
        self.shape = t.shape
        self.w = _to_device(np.asarray(t.data, np.float32))
        self.nbytes = self.w.nbytes

    def matvec(self, x, out, accumulate: bool = False) -> None:
        quant_matvec.fmatvec(self.w, x, out, accumulate)

    def matmul(self, X, out, accumulate: bool = False) -> None:
        quant_matmul.fmatmul(X, self.w, out, accumulate)


class DeviceDequantized(DeviceFloat):
    """A format the device kernels do not read yet (q5, q6: the default recipe's dense roles):
    dequantized on the host once, at upload, by its format row's reference function, and run as
    float32. Correct, but 4 bytes per weight on the device instead of 0.7-0.8."""

    def __init__(self, t: QTensor):
        self.shape = t.shape
        self.w = _to_device(np.ascontiguousarray(t.dequantize(), np.float32))
        self.nbytes = self.w.nbytes


CUDA_KERNELS = {"q4": DeviceQuant, "q8": DeviceQuant, "q5": DeviceDequantized, "q6": DeviceDequantized,
                "f16": DeviceFloat, "f32": DeviceFloat}


def upload(t: QTensor):
    """The device weight object of a stored tensor, by its format's row."""
    return CUDA_KERNELS[t.quant](t)


def _same_format(*ws) -> bool:
    """Whether the fused kernels can take ws together: one integer format and group size."""
    return all(w.bits is not None for w in ws) and len({(w.bits, w.group_size) for w in ws}) == 1


class DeviceQKV:
    def __init__(self, q: QTensor, k: QTensor, v: QTensor):
        self.q, self.k, self.v = upload(q), upload(k), upload(v)
        self.fused = _same_format(self.q, self.k, self.v)

    def matvec(self, x, q_out, k_out, v_out) -> None:
        if self.fused:
            quant_matvec.matvec3((self.q.words, self.q.scales), (self.k.words, self.k.scales),
                                 (self.v.words, self.v.scales), self.q.bits, self.q.group_size, x, q_out, k_out, v_out)
            return
        for w, out in ((self.q, q_out), (self.k, k_out), (self.v, v_out)):
            w.matvec(x, out)

    def matmul(self, X, q_out, k_out, v_out) -> None:
        for w, out in ((self.q, q_out), (self.k, k_out), (self.v, v_out)):
            w.matmul(X, out)


class DeviceSwiGLU:
    """down(silu(gate x) * up x): layer 0's dense MLP or a shared expert, as a one-expert bank."""

    def __init__(self, gate: QTensor, up: QTensor, down: QTensor):
        self.gate, self.up, self.down = upload(gate), upload(up), upload(down)
        self.width = gate.shape[0]
        self.fused = _same_format(self.gate, self.up) and self.down.bits is not None

    def gate_up_args(self):
        """(gate words, gate scales, up words, up scales, bits, G) of the decode expert kernels."""
        return (*self.gate.bank(), *self.up.bank(), self.gate.bits, self.gate.group_size)

    def down_args(self):
        return (*self.down.bank(), self.down.bits, self.down.group_size)

    def decode_unfused(self, x, h, out, accumulate: bool) -> None:
        """out (+)= down(silu(gate x) * up x), one matrix at a time; h: scratch [2, width]."""
        self.gate.matvec(x, h[0])
        self.up.matvec(x, h[1])
        norm_rope.silu_mul(h[0], h[1], h[0])
        self.down.matvec(h[0], out, accumulate)

    def prefill(self, X, tiles, ident, hbuf, out) -> None:
        """out [T, H] = the MLP of X [T, H]; tiles: one-expert tiles over T (DeviceExperts.tiles),
        ident: arange(T) and ones(T) on the device; hbuf [T, 2 width] scratch."""
        T = X.shape[0]
        if self.fused:
            perm, ones = ident
            g = hbuf.reshape(-1)[:T * self.width].reshape(T, self.width)
            quant_matmul.grouped_gate_up(X, perm, tiles, self.gate.byte_bank(), self.up.byte_bank(), self.gate.bits,
                                         self.gate.group_size, g)
            quant_matmul.grouped_down(g, tiles, self.down.byte_bank(), self.down.bits, self.down.group_size, ones, out)
            return
        flat = hbuf.reshape(-1)
        g = flat[:T * self.width].reshape(T, self.width)
        u = flat[T * self.width:2 * T * self.width].reshape(T, self.width)
        self.gate.matmul(X, g)
        self.up.matmul(X, u)
        norm_rope.silu_mul(g.reshape(-1), u.reshape(-1), g.reshape(-1))
        self.down.matmul(g, out)


class DeviceExperts:
    """A MoE layer's routed experts on the device: gate / up [E, I, H], down [E, H, I] banks."""

    def __init__(self, gate: QTensor, up: QTensor, down: QTensor):
        self.gate, self.up, self.down = upload(gate), upload(up), upload(down)
        self.width = gate.shape[1]

    @staticmethod
    def fits(gate: QTensor, up: QTensor, down: QTensor) -> bool:
        """Whether the device kernels take these banks (gate and up of one integer format)."""
        return (gate.format.grouped and down.format.grouped and gate.quant == up.quant
                and gate.group_size == up.group_size)

    def gate_up_args(self):
        return (self.gate.words, self.gate.scales, self.up.words, self.up.scales, self.gate.bits, self.gate.group_size)

    def down_args(self):
        return (self.down.words, self.down.scales, self.down.bits, self.down.group_size)

    def prefill(self, X, perm, tiles, row_w, hbuf, ybuf) -> None:
        """ybuf [R, H] = row_w[i] * expert(X[perm[i]]) for the grouped rows (moe.group_tokens)."""
        R = perm.shape[0]
        h = hbuf.reshape(-1)[:R * self.width].reshape(R, self.width)
        quant_matmul.grouped_gate_up(X, perm, tiles, (self.gate.codes, self.gate.scales),
                                     (self.up.codes, self.up.scales), self.gate.bits, self.gate.group_size, h)
        quant_matmul.grouped_down(h, tiles, (self.down.codes, self.down.scales), self.down.bits,
                                  self.down.group_size, row_w, ybuf)


def one_expert_tiles(T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tile list of T tokens through a one-expert bank (a dense MLP or a shared expert)."""
    starts = np.arange(0, T, quant_matmul.BT, dtype=np.int64)
    return np.zeros(len(starts), np.int64), starts, np.minimum(quant_matmul.BT, T - starts).astype(np.int64)

