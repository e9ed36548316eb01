"""Weights that carry their CPU kernels: the CPU backend's binding of the format table.

The forward pass (cpu_model.py) never asks how a weight is stored: it calls `w.matmul(X, out)`,
`mlp.prefill(h, out)`, and binds `w.bind_matvec(x, out)`, `mlp.bind_decode(h, out)` for decode, as
mlx-lm's model files call their layers. Which kernel
runs is chosen once, at load, from each tensor's row of ernie_edge/formats/table.py:

  format   decode (one token)                       batch of T tokens (`matmul`)
  q4, q8   q8.matvec: int16 activations x codes     T <= QBATCH_MAX_T: qbatch.qmatmul (same scheme)
                                                    else exact fp32: dequantized tiles + sgemm
  q5, q6   q56.matvec (same scheme)                 T <= QBATCH_MAX_T: q56.matmul_small (same scheme)
                                                    else exact fp32: dequantized tiles + sgemm
  f16/f32  BLAS sgemv on a float32 matrix           BLAS sgemm
           (f16 is widened once at load: twice its file size in RAM; f32 stays mapped)

int8 activations (`act8`, kernels/dot8.py): a prompt's prefill passes act8=True (prefill_acts "i8",
the default), and so do the one-token decode (Scratch.act8) and the batched decode with decode_acts
"i8" (the default): q4, q5 and q6 matrices and q4 expert banks then take their input rounded to int8
per block of 32 and dotted by vpdpbusd, in the prefill tiles (kernels/qbatch8.py) at every T and in
the decode kernels above (their row dots dispatch on the activations' type); q8 and float matrices
ignore it. A token's row comes out bit for bit the same from the one-token decode, the batched
decode and the prefill tiles (for the formats that take act8).

Fused kernels are picked at load too, when the tensors involved share q4 or q8 (FUSED), or q5 or
q6: q, k and v in one parallel region (q8.matvec3, q56.matvec3); gate, up and SwiGLU in one (an
MLP is a one-expert bank; q56.gate_up_silu); a MoE layer's routed experts (q4 / q8) and its shared
expert in two regions instead of four or five (q8.experts_pair_*, or q56.pair_* for a q5 / q6
shared expert). A new backend (CUDA) binds its own classes to the same rows.

Decode binds: `bind_matvec` / `bind_decode` return the decode kernel call on fixed buffers
(kernels' `bind_*`: checked once, then called every token by cpu_model.DecodePlan); the methods
above stay the checked one-shot form, and a weight without a bound kernel binds that.

Legend: T tokens, H hidden, K input features, O output features, E experts, k routed slots per
token, I expert width.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from .kernels import moe, norm, q4, q8, q56, qbatch, qbatch8, routed
from .formats.layout import has_tiles, tile_rows
from .kernels.act_quant import check_weight
from .weights import QTensor

QBATCH_MAX_T = 64  # the integer small-batch matmul beats the exact fp32 one up to here (benchmarks/qbatch.py)
FUSED = ("q4", "q8")  # the formats the fused multi-matrix kernels of q8.py / qbatch.py take


def _run_in_order(calls) -> None:
    for call in calls:
        call()


def in_order(*calls):
    """One call that makes `calls` in order (a block's bound kernels)."""
    return partial(_run_in_order, calls)


class Scratch:
    """The buffers the decode kernels of one layer's weights need, allocated once per model."""

    def __init__(self, widest: int, k: int, n_experts: int, expert_width: int):
        k = max(k, 1)
        self.act8 = False  # q4 / q5 / q6 decode kernels take int8 activations (module doc; CpuModel.decode_acts)
        self.act = q8.ActScratch(-(-widest // 32) * 32, rows=k)  # x quantized to int16 (+ work claims)
        self.act_shared = q8.ActScratch(-(-widest // 32) * 32)  # the shared expert's, beside the routed ones
        self.g = np.zeros(widest, np.float32)  # gate (then SwiGLU) output of an MLP
        self.u = np.zeros(widest, np.float32)  # up output, when not fused
        self.he = np.zeros((k, expert_width), np.float32)  # [k, I] SwiGLU output per routed slot
        self.idx = np.zeros((1, k), np.int64)  # chosen experts
        self.w = np.zeros((1, k), np.float32)  # their weights
        self.route_work = np.zeros((3, max(n_experts, 1)), np.float32)
        self.shared_out = np.zeros(0, np.float32)  # sized on first use by MoE.decode
        self.zero_id = np.zeros(1, np.int64)  # expert id 0 of a one-expert bank
        self.one = np.ones(1, np.float32)  # the shared expert's weight in a fused down projection


# ---- one matrix -----------------------------------------------------------------------------------

class QuantLinear:
    """W [O, K] in q4 or q8: integer decode kernels, small-batch integer or exact fp32 prefill."""

    def __init__(self, t: QTensor):
        self.shape, self.bits = t.shape, t.format.bits
        self.data, self.scales, self.tiled = t.data, t.scales, t.tiled

    def matvec(self, x: np.ndarray, out: np.ndarray, s: Scratch) -> np.ndarray:
        """out [O] = W x."""
        return q8.matvec(x, self.data, self.scales, out, s.act, self.bits, s.act8, self.tiled)

    def bind_matvec(self, x: np.ndarray, out: np.ndarray, s: Scratch):
        return q8.bind_matvec(x, self.data, self.scales, out, s.act, self.bits, s.act8, self.tiled)

    def matmul(self, X: np.ndarray, out: np.ndarray, act8: bool = False) -> np.ndarray:
        """out [T, O] = X W^T (int8 activations for q4 when act8)."""
        if act8 and self.bits == 4:
            return qbatch8.qmatmul8(X, self.data, self.scales, out, 4, self.tiled)
        if len(X) <= QBATCH_MAX_T:
            return qbatch.qmatmul(X, self.data, self.scales, out, self.bits, self.tiled)
        if self.bits == 4:
            return q4.q4_matmul(X, self.data, self.scales, out, self.tiled)
        return q8.q8_matmul(X, self.data, self.scales, out)

    def bind_row(self, out: np.ndarray):
        """`row(i)`: out float32 [K] = row i of W, dequantized (exact, as QTensor.rows: decode's
        embedding lookup, compiled instead of numpy's unpacking)."""
        s = check_weight(self.data, self.scales, self.shape[1], self.bits, ndim=2)
        return _RowCall(q4.DEQUANT_ROWS[self.bits], self.data, s, self.shape[1], out, self.tiled)

    def bank(self):
        """(data, scales) as a one-expert bank [1, O, ...], for the fused expert kernels."""
        return self.data[None], self.scales[None]


class PackedLinear:
    """W [O, K] in q5 or q6: kernels/q56.py's matvec and matmul. `bits` is None (the fused q4 / q8
    kernels do not take it); QKV, SwiGLU and MoE use q56.py's fused kernels by `packed_bits`."""

    bits = None

    def __init__(self, t: QTensor):
        self.shape, self.nbits = t.shape, t.format.bits
        self.data, self.scales, self.tiled = t.data, t.scales, t.tiled

    def matvec(self, x: np.ndarray, out: np.ndarray, s: Scratch) -> np.ndarray:
        return q56.matvec(x, self.data, self.scales, out, s.act, self.nbits, s.act8, self.tiled)

    def bind_matvec(self, x: np.ndarray, out: np.ndarray, s: Scratch):
        return q56.bind_matvec(x, self.data, self.scales, out, s.act, self.nbits, s.act8, self.tiled)

    def bind_row(self, out: np.ndarray):
        """`row(i)`: out float32 [K] = row i of W, dequantized (exact, as QTensor.rows)."""
        s = q56.check_weight(self.data, self.scales, self.shape[1], self.nbits)
        return _RowCall(q56.DEQUANT_ROWS[self.nbits], self.data, s, self.shape[1], out, self.tiled)

    def matmul(self, X: np.ndarray, out: np.ndarray, act8: bool = False) -> np.ndarray:
        if act8:
            return qbatch8.qmatmul8(X, self.data, self.scales, out, self.nbits, self.tiled)
        small = len(X) <= QBATCH_MAX_T
        return (q56.matmul_small if small else q56.matmul_exact)(X, self.data, self.scales, out, self.nbits,
                                                                 self.tiled)


class TiledHead(PackedLinear):
    """The LM head of a folder that stores it by rows (converted before the 4-row tiles of
    formats/layout.py): a q5 / q6 matrix read whole by every decoded token (q6: 203 MB of the 2.05
    GB a token of the 28-layer default recipe). Its one-token decode matvec reads a tiled copy (a
    thread's 4 rows one sequential stream, ~8 % faster from DRAM than the rows side by side,
    docs/PERF.md), made at the first such bind (anonymous memory, the matrix's size); prefill, the
    batched decode and row lookups read the mapped matrix. A head stored in tiles needs no copy."""

    def __init__(self, t: QTensor):
        super().__init__(t)
        self.tiles: np.ndarray | None = None

    def bind_matvec(self, x: np.ndarray, out: np.ndarray, s: Scratch):
        if self.tiled or not has_tiles(*self.shape):
            return super().bind_matvec(x, out, s)
        if self.tiles is None:
            self.tiles = tile_rows(self.data, self.nbits)
            self.tiles.flags.writeable = False  # as the mapped weights: the kernels compiled for those take it
        return q56.bind_matvec(x, self.tiles, self.scales, out, s.act, self.nbits, s.act8, tiled=True)


class FloatLinear:
    """W [O, K] in f16 or f32, multiplied by BLAS as float32 (f16 widened once, here)."""

    bits = None
    tiled = False  # float matrices are stored by rows

    def __init__(self, t: QTensor):
        self.shape = t.shape
        self.w = np.ascontiguousarray(t.data, np.float32)  # [O, K]; a view for f32

    def matvec(self, x: np.ndarray, out: np.ndarray, s: Scratch) -> np.ndarray:
        np.dot(self.w, x, out=out)
        return out

    def bind_matvec(self, x: np.ndarray, out: np.ndarray, s: Scratch):
        return partial(self.matvec, x, out, s)

    def bind_row(self, out: np.ndarray):
        """`row(i)`: out [K] = row i of W."""
        return _RowCall(_float_rows, self.w, None, self.shape[1], out)

    def matmul(self, X: np.ndarray, out: np.ndarray, act8: bool = False) -> np.ndarray:
        np.dot(X, self.w.T, out=out)
        return out


def _float_rows(w: np.ndarray, scales: None, r0: int, tile: np.ndarray, tiled: bool) -> None:
    tile[:] = w[r0:r0 + len(tile)]


class _RowCall:
    """A bound row lookup: row(i) writes row i of a quantized matrix into `out` through a compiled
    dequantizer `fn(data, scales, r0, tile, tiled)` (or a float copy); i is checked (the kernels do
    not bounds-check)."""

    def __init__(self, fn, data: np.ndarray, scales: np.ndarray | None, k: int, out: np.ndarray,
                 tiled: bool = False):
        if out.dtype != np.float32 or out.shape != (k,) or not out.flags.c_contiguous:
            raise ValueError(f"row out must be C-contiguous float32 [{k}], got {out.dtype} {out.shape}")
        self.fn, self.data, self.scales, self.tile, self.rows = fn, data, scales, out[None], data.shape[0]
        self.tiled = tiled

    def __call__(self, i: int) -> None:
        if not 0 <= i < self.rows:
            raise IndexError(f"row {i} is outside the matrix's {self.rows} rows")
        self.fn(self.data, self.scales, i, self.tile, self.tiled)


CPU_KERNELS = {"q4": QuantLinear, "q5": PackedLinear, "q6": PackedLinear, "q8": QuantLinear,
               "f16": FloatLinear, "f32": FloatLinear}


def linear(t: QTensor):
    """The CPU weight object of a stored matrix, by its format's row."""
    return CPU_KERNELS[t.quant](t)


def head(t: QTensor):
    """The CPU weight object of the LM head: `linear`, with a tiled decode copy where q5 / q6
    (TiledHead)."""
    return TiledHead(t) if CPU_KERNELS[t.quant] is PackedLinear else linear(t)


def shared_bits(*ws) -> int | None:
    """The integer format (4 or 8) every one of ws is stored in, or None: the fused kernels take
    weights of one integer format."""
    bits = {w.bits for w in ws}
    return bits.pop() if len(bits) == 1 and None not in bits else None


def packed_bits(*ws) -> int | None:
    """The bits (5 or 6) every one of ws is stored in, when all are q5 or all q6 (kernels/q56.py's
    fused kernels), else None."""
    bits = {w.nbits if isinstance(w, PackedLinear) else None for w in ws}
    return bits.pop() if len(bits) == 1 and None not in bits else None


def same_layout(*ws) -> bool:
    """Whether ws are all stored by rows or all in 4-row tiles: the kernels that read several
    matrices in one loop (q, k and v; gate and up) take one layout flag for them."""
    return len({w.tiled for w in ws}) == 1


# ---- groups of matrices -------------------------------------------------------------------------------

class QKV:
    """The q, k and v projections, which read the same input."""

    def __init__(self, q: QTensor, k: QTensor, v: QTensor):
        self.q, self.k, self.v = linear(q), linear(k), linear(v)
        fused = same_layout(self.q, self.k, self.v)
        self.bits = shared_bits(self.q, self.k, self.v) if fused else None
        self.packed = packed_bits(self.q, self.k, self.v) if fused else None

    def bind_matvec(self, x, q_out, k_out, v_out, s: Scratch):
        """The decode matvecs of one token as a bound call: one parallel region for the three when
        they share a format."""
        pairs = ((self.q, q_out), (self.k, k_out), (self.v, v_out))
        mats = [(w.data, w.scales, out) for w, out in pairs]
        if self.bits:
            return q8.bind_matvec3(x, mats, s.act, self.bits, s.act8, self.q.tiled)
        if self.packed:
            return q56.bind_matvec3(x, mats, s.act, self.packed, s.act8, self.q.tiled)
        return in_order(*(w.bind_matvec(x, out, s) for w, out in pairs))

    def matmul(self, X, q_out, k_out, v_out, act8: bool = False) -> None:
        for w, out in ((self.q, q_out), (self.k, k_out), (self.v, v_out)):
            w.matmul(X, out, act8)


class SwiGLU:
    """down(silu(gate x) * up x): layer 0's dense MLP, or a MoE layer's shared expert."""

    def __init__(self, gate: QTensor, up: QTensor, down: QTensor):
        self.gate, self.up, self.down = linear(gate), linear(up), linear(down)
        self.width = gate.shape[0]
        fused = same_layout(self.gate, self.up)  # (the same shape: always)
        self.gate_up_bits = shared_bits(self.gate, self.up) if fused else None
        self.bits = shared_bits(self.gate, self.up, self.down) if fused else None
        self.gate_up_packed = packed_bits(self.gate, self.up) if fused else None
        self.packed = packed_bits(self.gate, self.up, self.down) if fused else None

    def gate_up_silu(self, x: np.ndarray, s: Scratch) -> np.ndarray:
        """silu(gate x) * up x into s.g[:width]; returns that view."""
        g = s.g[:self.width]
        if self.gate_up_bits:  # gate, up and silu in one parallel region: the MLP as a one-expert bank
            q8.experts_gate_up_silu(x, *self.gate.bank(), *self.up.bank(), s.zero_id, g[None], s.act,
                                    self.gate_up_bits, s.act8, self.gate.tiled)
        elif self.gate_up_packed:
            q56.gate_up_silu(x, self.gate.data, self.gate.scales, self.up.data, self.up.scales, g, s.act,
                             self.gate_up_packed, s.act8, self.gate.tiled)
        else:
            u = s.u[:self.width]
            self.gate.matvec(x, g, s)
            self.up.matvec(x, u, s)
            norm.silu_mul(g, u, g)
        return g

    def decode(self, x: np.ndarray, out: np.ndarray, s: Scratch, trace=None) -> np.ndarray:
        """out [H] = the MLP of one token x [H]."""
        return self.down.matvec(self.gate_up_silu(x, s), out, s)

    def bind_gate_up_silu(self, x: np.ndarray, s: Scratch):
        """`gate_up_silu` as a bound call (into s.g[:width])."""
        g = s.g[:self.width]
        if self.gate_up_bits:
            return q8.bind_experts_gate_up_silu(x, *self.gate.bank(), *self.up.bank(), s.zero_id, g[None], s.act,
                                                self.gate_up_bits, s.act8, self.gate.tiled)
        if self.gate_up_packed:
            return q56.bind_gate_up_silu(x, self.gate.data, self.gate.scales, self.up.data, self.up.scales, g, s.act,
                                         self.gate_up_packed, s.act8, self.gate.tiled)
        return partial(self.gate_up_silu, x, s)

    def bind_decode(self, x: np.ndarray, out: np.ndarray, s: Scratch):
        """`decode` as a bound call."""
        return in_order(self.bind_gate_up_silu(x, s), self.down.bind_matvec(s.g[:self.width], out, s))

    def prefill(self, X: np.ndarray, out: np.ndarray, trace=None, act8: bool = False) -> np.ndarray:
        """out [T, H] = the MLP of T tokens X [T, H]."""
        T = len(X)
        if act8 and self.bits == 4:  # a one-expert bank, as below
            return qbatch8.qexperts8(X, np.zeros((T, 1), np.int64), np.ones((T, 1), np.float32),
                                     *self.gate.bank(), *self.up.bank(), *self.down.bank(), out,
                                     tiled=self.gate.tiled, tiled_down=self.down.tiled)
        if T <= QBATCH_MAX_T and self.bits:  # fused as a one-expert bank with weight 1.0 (exact)
            return qbatch.qexperts(X, np.zeros((T, 1), np.int64), np.ones((T, 1), np.float32),
                                   *self.gate.bank(), *self.up.bank(), *self.down.bank(), out, self.bits,
                                   self.gate.tiled, self.down.tiled)
        g = np.empty((T, self.width), np.float32)
        u = np.empty_like(g)
        self.gate.matmul(X, g, act8)
        self.up.matmul(X, u, act8)
        norm.silu_mul(g, u, g)
        return self.down.matmul(g, out, act8)


class ExpertBank:
    """The routed experts of one MoE layer: gate/up [E, I, H], down [E, H, I] (logical shapes)."""

    def __init__(self, gate: QTensor, up: QTensor, down: QTensor):
        self.banks = (gate, up, down)
        self.width = gate.shape[1]
        fmts = {t.quant for t in self.banks}
        self.bits = gate.format.bits if len(fmts) == 1 and gate.quant in FUSED and gate.layout == up.layout else None
        self.tiled, self.tiled_down = gate.tiled, down.tiled  # gate and up share theirs: the same shape
        # Mixed, q5 / q6 or float banks (a width no group size divides) run one expert at a time.
        self._per_expert = None if self.bits else [
            tuple(linear(t.expert(e)) for t in self.banks) for e in range(gate.shape[0])]

    def arrays(self, proj: int):
        """(data, scales) of projection 0 (gate), 1 (up) or 2 (down)."""
        return self.banks[proj].data, self.banks[proj].scales

    def gate_up_silu(self, x: np.ndarray, ids: np.ndarray, out_h: np.ndarray, s: Scratch) -> np.ndarray:
        """out_h [k, I] = silu(G_e x) * U_e x for each chosen expert e = ids[j]."""
        if self.bits:
            return q8.experts_gate_up_silu(x, *self.arrays(0), *self.arrays(1), ids, out_h, s.act, self.bits,
                                           s.act8, self.tiled)
        u = s.u[:self.width]
        for j, e in enumerate(ids):
            gate, up, _ = self._per_expert[e]
            gate.matvec(x, out_h[j], s)
            up.matvec(x, u, s)
            norm.silu_mul(out_h[j], u, out_h[j])
        return out_h

    def down_weighted(self, h, ids, weights, out, s: Scratch) -> np.ndarray:
        """out [H] = sum_j weights[j] * D_e h[j], in ascending expert id (docs/ERNIE_SPEC.md P13)."""
        if self.bits:
            return q8.experts_down_weighted(h, *self.arrays(2), ids, weights, out, s.act, self.bits, s.act8,
                                            self.tiled_down)
        out[:] = 0.0
        y = np.empty_like(out)
        for j in np.argsort(ids, kind="stable"):
            self._per_expert[ids[j]][2].matvec(h[j], y, s)
            out += weights[j] * y
        return out

    def prefill(self, X: np.ndarray, idx: np.ndarray, weights: np.ndarray, out: np.ndarray,
                act8: bool = False) -> np.ndarray:
        """out [T, H] = each token's weighted routed experts; tokens grouped per expert."""
        if act8 and self.bits == 4:
            return qbatch8.qexperts8(X, idx, weights, *self.arrays(0), *self.arrays(1), *self.arrays(2), out,
                                     tiled=self.tiled, tiled_down=self.tiled_down)
        if self.bits:
            return qbatch.qexperts(X, idx, weights, *self.arrays(0), *self.arrays(1), *self.arrays(2), out,
                                   self.bits, self.tiled, self.tiled_down)
        out[:] = 0.0
        for e in np.unique(idx):  # ascending expert id
            rows, slot = np.nonzero(idx == e)
            gate, up, down = self._per_expert[e]
            g = np.empty((len(rows), self.width), np.float32)
            u = np.empty_like(g)
            gate.matmul(X[rows], g, act8)
            up.matmul(X[rows], u, act8)
            norm.silu_mul(g, u, g)
            y = np.empty((len(rows), out.shape[1]), np.float32)
            down.matmul(g, y, act8)
            out[rows] += weights[rows, slot][:, None] * y
        return out


class MoE:
    """A MoE layer: router (fp32, with the correction bias), routed experts, optional shared expert."""

    def __init__(self, layer: int, router: np.ndarray, bias: np.ndarray | None, experts: ExpertBank,
                 shared: SwiGLU | None, k: int, norm_min: float):
        self.layer, self.router, self.bias = layer, router, bias  # fp32 [E, H], [E] or None
        self.experts, self.shared = experts, shared
        self.k, self.norm_min = k, norm_min
        # Routed and shared experts in two parallel regions (gate+up, down) instead of four (or
        # five): a q4 / q8 shared expert by kernels/q8.py, a q5 / q6 one by kernels/q56.py.
        self.paired = experts.bits is not None and shared is not None and shared.bits is not None
        self.paired_packed = experts.bits is not None and shared is not None and shared.packed is not None

    def route(self, X, idx, weights, trace=None, work=None) -> None:
        moe.route(X, self.router, self.bias, self.k, idx, weights, self.norm_min, work=work)
        if trace is not None:
            trace.add(self.layer, idx)

    def decode(self, x: np.ndarray, out: np.ndarray, s: Scratch, trace=None) -> np.ndarray:
        """out [H] = routed experts + shared expert of one token x [H]."""
        x = np.ascontiguousarray(x, np.float32)
        self.route(x, s.idx, s.w, trace, work=s.route_work)
        paired = self.bind_paired(x, out, s)
        if paired is not None:
            for call in paired:
                call()
            return out
        ids, weights = s.idx[0], s.w[0]
        self.experts.gate_up_silu(x, ids, s.he, s)
        self.experts.down_weighted(s.he, ids, weights, out, s)
        if self.shared is not None:  # added last (docs/ERNIE_SPEC.md P6, P13)
            if s.shared_out.shape != out.shape:
                s.shared_out = np.zeros_like(out)
            out += self.shared.decode(x, s.shared_out, s)
        return out

    def bind_decode(self, x: np.ndarray, out: np.ndarray, s: Scratch):
        """`decode` (without a trace) as a bound call: the paired expert kernels, the router in the
        first one's parallel region (kernels/routed.py)."""
        route = moe.router_args(x, self.router, self.bias, self.k, s.idx, s.w, self.norm_min, s.route_work)
        paired = self.bind_paired(x, out, s, route)
        if paired is None:
            return partial(self.decode, x, out, s)
        return in_order(*paired)

    def bind_paired(self, x, out, s: Scratch, route: tuple | None = None):
        """The routed experts (s.idx, s.w) with the shared expert, in two parallel regions, as two
        bound calls (gate, up and SwiGLU; the down projections, the shared one added last); None when
        they do not pair: a q4 / q8 shared expert by kernels/q8.py, a q5 / q6 one by kernels/q56.py.
        route: moe.router_args of x, to route x in the first region (s.idx, s.w are then its
        output); None: s.idx and s.w hold the routing already."""
        ids, weights = s.idx[0], s.w[0]
        sh, ex = self.shared, self.experts
        gate_up_weights = (*ex.arrays(0), *ex.arrays(1))
        routed_gate_up = (*gate_up_weights, ids, s.he, ex.bits, ex.tiled)
        routed_down = (s.he, *ex.arrays(2), ids, weights, ex.bits, ex.tiled_down)
        if self.paired:
            g = s.g[:sh.width][None]  # the shared expert as a one-expert bank [1, S]
            shared = (*sh.gate.bank(), *sh.up.bank(), s.zero_id, g, sh.bits, sh.gate.tiled)
            if route is None:
                gate_up = q8.bind_experts_pair_gate_up_silu(x, routed_gate_up, shared, s.act, s.act_shared, s.act8)
            else:
                gate_up = routed.bind_experts_pair_gate_up_silu(route, x, (*gate_up_weights, s.he, ex.bits, ex.tiled),
                                                                shared, s.act, s.act_shared, s.act8)
            shared_down = (g, *sh.down.bank(), s.zero_id, s.one, sh.bits, sh.down.tiled)
            return gate_up, q8.bind_experts_pair_down_weighted(routed_down, shared_down, out, s.act, s.act_shared,
                                                               s.act8)
        if self.paired_packed:
            g = s.g[:sh.width]
            shared = (sh.gate.data, sh.gate.scales, sh.up.data, sh.up.scales, g, sh.packed, sh.gate.tiled)
            if route is None:
                gate_up = q56.bind_pair_gate_up_silu(x, routed_gate_up, shared, s.act, s.act_shared, s.act8)
            else:
                gate_up = routed.bind_pair_gate_up_silu(route, x, (*gate_up_weights, s.he, ex.bits, ex.tiled), shared,
                                                        s.act, s.act_shared, s.act8)
            shared_down = (g, sh.down.data, sh.down.scales, sh.packed, sh.down.tiled)
            return gate_up, q56.bind_pair_down_weighted(routed_down, shared_down, out, s.act, s.act_shared, s.act8)
        return None

    def prefill(self, X: np.ndarray, out: np.ndarray, trace=None, act8: bool = False) -> np.ndarray:
        """out [T, H] = routed experts (grouped by expert) + shared expert of T tokens X [T, H]."""
        idx = np.empty((len(X), self.k), np.int64)
        weights = np.empty((len(X), self.k), np.float32)
        self.route(X, idx, weights, trace)
        self.experts.prefill(X, idx, weights, out, act8)
        if self.shared is not None:
            out += self.shared.prefill(X, np.empty_like(out), act8=act8)
        return out
