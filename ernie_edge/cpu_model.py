"""The fast forward pass on the CPU: straight-line orchestration of the numba kernels over the
memory-mapped edge folder. It does not know how a weight is stored: `matvec` / `matmul` pick the
kernel from the QTensor's format. The numpy reference (reference.py) is the specification it is
tested against.

Decode (one token) runs on preallocated scratch buffers; its matvecs round the activations to int16
per block of 32 and multiply with integers (error bound in kernels/q8.py). Prefill runs in chunks of
PREFILL_CHUNK tokens: routed experts grouped by expert, each expert's weights read once per chunk
(kernels/qbatch.py, the same int16 activations); dense matmuls use the same integer kernels up to
QBATCH_MAX_T tokens and exact-fp32 tiled sgemm above that (benchmarks/results/qbatch.json).

Dimension letters: T tokens, H hidden, V vocab, Nq/Nkv heads, D head dim, E experts, K routed
experts per token, I expert width, S shared-expert width, F dense-MLP width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ErnieConfig
from .kernels import attention, moe, norm, q4, q8, qbatch
from .kernels.rope import apply_rope
from .kv_cache import KVCache
from .reference import RoutingTrace
from .weights import QTensor

PREFILL_CHUNK = 512
QBATCH_MAX_T = 64  # integer small-batch matmul is faster up to here (benchmarks/qbatch.py)


# ---- weight-format dispatch ------------------------------------------------------------------------

def matvec(w: QTensor, x: np.ndarray, out: np.ndarray, act: q8.ActScratch) -> np.ndarray:
    """out [O] = W x."""
    if w.quant in ("q4", "q8"):
        return q8.matvec(x, w.data, w.scales, out, act, _bits(w))
    np.dot(w.data.astype(np.float32, copy=False), x, out=out)  # f16 / f32 recipes
    return out


def matmul(w: QTensor, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out [T, O] = X W^T."""
    if w.quant in ("q4", "q8") and len(x) <= QBATCH_MAX_T:
        return qbatch.qmatmul(x, w.data, w.scales, out, _bits(w))
    if w.quant == "q4":
        return q4.q4_matmul(x, w.data, w.scales, out)
    if w.quant == "q8":
        return q8.q8_matmul(x, w.data, w.scales, out)
    np.dot(x, w.data.astype(np.float32, copy=False).T, out=out)
    return out


def embed_rows(w: QTensor, ids: np.ndarray) -> np.ndarray:
    """Rows of the (quantized) embedding, dequantized: [T, H] float32."""
    scales = None if w.scales is None else w.scales[ids]
    return QTensor(w.quant, w.data[ids], scales, w.group_size, (len(ids), w.shape[1])).dequantize()


def _bits(w: QTensor) -> int:
    return 4 if w.quant == "q4" else 8


def _quantized(*ws: QTensor) -> bool:
    """All of ws in one integer format (q4 or q8), as the fused decode kernels take them."""
    return ws[0].quant in ("q4", "q8") and all(w.quant == ws[0].quant for w in ws)


# ---- weights of one layer --------------------------------------------------------------------------

@dataclass
class Layer:
    in_norm: np.ndarray
    post_norm: np.ndarray
    q: QTensor
    k: QTensor
    v: QTensor
    o: QTensor
    moe: bool
    router: np.ndarray | None = None  # fp32 [E, H]
    bias: np.ndarray | None = None  # fp32 [E]
    gate_bank: QTensor | None = None  # [E, I, H]
    up_bank: QTensor | None = None
    down_bank: QTensor | None = None  # [E, H, I]
    gate: QTensor | None = None  # shared expert [S, H] or dense MLP [F, H]
    up: QTensor | None = None
    down: QTensor | None = None


def _load_layer(ck, cfg: ErnieConfig, i: int, use_bias: bool) -> Layer:
    p = f"model.layers.{i}."
    f32 = lambda name: np.ascontiguousarray(ck.dense(name), np.float32)  # noqa: E731 (small tensors)
    layer = Layer(in_norm=f32(p + "input_layernorm.weight"), post_norm=f32(p + "post_attention_layernorm.weight"),
                  q=ck.qtensor(p + "self_attn.q_proj.weight"), k=ck.qtensor(p + "self_attn.k_proj.weight"),
                  v=ck.qtensor(p + "self_attn.v_proj.weight"), o=ck.qtensor(p + "self_attn.o_proj.weight"),
                  moe=cfg.is_moe_layer(i))
    if layer.moe:
        layer.router = f32(p + "mlp.gate.weight")
        if use_bias and cfg.moe_use_aux_free:
            layer.bias = f32(p + "mlp.moe_statics.e_score_correction_bias").reshape(-1)
        layer.gate_bank, layer.up_bank, layer.down_bank = (ck.expert_bank(i, n) for n in ("gate", "up", "down"))
        if cfg.moe_num_shared_experts:
            layer.gate, layer.up, layer.down = (ck.qtensor(p + f"mlp.shared_experts.{n}_proj.weight")
                                                for n in ("gate", "up", "down"))
    else:
        layer.gate, layer.up, layer.down = (ck.qtensor(p + f"mlp.{n}_proj.weight") for n in ("gate", "up", "down"))
    return layer


# ---- decode scratch ---------------------------------------------------------------------------------

class DecodeBuffers:
    """Every activation buffer one decode step needs, allocated once per model."""

    def __init__(self, cfg: ErnieConfig):
        H, k = cfg.hidden_size, max(cfg.moe_k, 1)
        widest = max(H, cfg.q_dim, cfg.intermediate_size, cfg.moe_intermediate_size,
                     cfg.shared_intermediate_size or 1)
        self.x = np.zeros(H, np.float32)  # residual stream
        self.h = np.zeros(H, np.float32)  # normed input of a block
        self.q = np.zeros((1, cfg.num_attention_heads, cfg.dim_head), np.float32)
        self.k = np.zeros((1, cfg.num_key_value_heads, cfg.dim_head), np.float32)
        self.v = np.zeros((1, cfg.num_key_value_heads, cfg.dim_head), np.float32)
        self.attn = np.zeros((cfg.num_attention_heads, cfg.dim_head), np.float32)
        self.o = np.zeros(H, np.float32)
        self.y = np.zeros(H, np.float32)
        self.idx = np.zeros((1, k), np.int64)
        self.w = np.zeros((1, k), np.float32)
        self.route_work = np.zeros((3, max(cfg.moe_num_experts, 1)), np.float32)
        self.he = np.zeros((k, cfg.moe_intermediate_size), np.float32)
        self.g = np.zeros(widest, np.float32)
        self.u = np.zeros(widest, np.float32)
        self.act = q8.ActScratch(-(-widest // 32) * 32, rows=k)
        self.act_shared = q8.ActScratch(-(-widest // 32) * 32)  # the shared expert's, beside the routed ones
        self.one = np.ones(1, np.float32)  # the shared expert's weight in a fused down projection
        self.pos = np.zeros(1, np.int64)
        self.zero_id = np.zeros(1, np.int64)  # expert id 0 of a one-expert bank
        self.logits = np.zeros(cfg.vocab_size, np.float32)


# ---- the model --------------------------------------------------------------------------------------

class CpuModel:
    """Fast forward over an EdgeCheckpoint. Same interface as reference.ReferenceModel."""

    def __init__(self, ck, use_correction_bias: bool = True, max_context: int | None = None,
                 kv_dtype: str = "f16"):
        self.ck = ck
        self.config = cfg = ck.config
        self.max_context = max_context
        self.kv_dtype = kv_dtype
        self.embed = ck.qtensor("model.embed_tokens.weight")  # [V, H], also the tied LM head
        self.final_norm = np.ascontiguousarray(ck.dense("model.norm.weight"), np.float32)
        self.layers = [_load_layer(ck, cfg, i, use_correction_bias) for i in range(cfg.num_hidden_layers)]
        self.buf = DecodeBuffers(cfg)
        self.attn_scratch: attention.DecodeScratch | None = None

    def new_cache(self, start_position: int = 0) -> KVCache:
        return KVCache(self.config, start=start_position, max_context=self.max_context, kv_dtype=self.kv_dtype)

    def forward(self, token_ids, cache: KVCache, trace: RoutingTrace | None = None) -> np.ndarray:
        """Run T new tokens after the cache; returns the final-normed hidden states [T, H]."""
        ids = np.asarray(token_ids, dtype=np.int64)
        cache.reserve(len(ids))
        if len(ids) == 1:
            return self._decode(int(ids[0]), cache, trace)[None, :].copy()
        out = [self._prefill(ids[s:s + PREFILL_CHUNK], cache, trace) for s in range(0, len(ids), PREFILL_CHUNK)]
        return np.concatenate(out)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Tied LM head: [T, H] -> [T, V]."""
        if len(hidden) == 1:
            matvec(self.embed, np.ascontiguousarray(hidden[0]), self.buf.logits, self.buf.act)
            return self.buf.logits[None, :].copy()
        out = np.empty((len(hidden), self.config.vocab_size), np.float32)
        return matmul(self.embed, np.ascontiguousarray(hidden, np.float32), out)

    # ---- one token ----------------------------------------------------------------------------

    def _decode(self, token: int, cache: KVCache, trace: RoutingTrace | None) -> np.ndarray:
        cfg, b = self.config, self.buf
        i_cache = cache.used  # cache slot of this token
        b.pos[0] = cache.length
        if self.attn_scratch is None or self.attn_scratch.max_len < cache.capacity:
            self.attn_scratch = attention.DecodeScratch(cfg.num_attention_heads, cfg.dim_head, cache.capacity)
        b.x[:] = embed_rows(self.embed, np.array([token]))[0]
        for li, L in enumerate(self.layers):
            norm.rmsnorm(b.x, L.in_norm, cfg.rms_norm_eps, b.h)
            self._qkv_decode(L, b)
            apply_rope(b.q, b.pos, cache.cos, cache.sin, cache.start)
            apply_rope(b.k, b.pos, cache.cos, cache.sin, cache.start)
            attention.kv_write(b.k, b.v, cache.k[li], cache.v[li], i_cache)
            attention.attention_decode(b.q[0], cache.k[li], cache.v[li], i_cache + 1, b.attn, self.attn_scratch)
            matvec(L.o, b.attn.reshape(-1), b.o, b.act)
            norm.add_rmsnorm(b.x, b.o, L.post_norm, cfg.rms_norm_eps, b.h)
            if L.moe:
                self._moe_decode(li, L, b, trace)
            else:
                self._mlp_decode(L, b, b.y)
            b.x += b.y
        cache.length += 1
        norm.rmsnorm(b.x, self.final_norm, cfg.rms_norm_eps, b.h)
        return b.h

    def _qkv_decode(self, L: Layer, b: DecodeBuffers) -> None:
        q, k, v = b.q.reshape(-1), b.k.reshape(-1), b.v.reshape(-1)
        if L.q.quant == L.k.quant == L.v.quant and L.q.quant in ("q4", "q8"):
            q8.matvec3(b.h, [(L.q.data, L.q.scales, q), (L.k.data, L.k.scales, k), (L.v.data, L.v.scales, v)], b.act,
                       _bits(L.q))
        else:
            for w, out in ((L.q, q), (L.k, k), (L.v, v)):
                matvec(w, b.h, out, b.act)

    def _mlp_decode(self, L: Layer, b: DecodeBuffers, out: np.ndarray) -> np.ndarray:
        """SwiGLU MLP (layer-0 dense MLP or the shared expert) of b.h into out."""
        n = L.gate.shape[0]
        g = b.g[:n]
        if L.gate.quant == L.up.quant and L.gate.quant in ("q4", "q8"):
            # gate, up and silu in one parallel region: the MLP as a one-expert bank [1, n, H].
            q8.experts_gate_up_silu(b.h, L.gate.data[None], L.gate.scales[None], L.up.data[None], L.up.scales[None],
                                    b.zero_id, g[None], b.act, _bits(L.gate))
        else:
            u = b.u[:n]
            matvec(L.gate, b.h, g, b.act)
            matvec(L.up, b.h, u, b.act)
            norm.silu_mul(g, u, g)
        return matvec(L.down, g, out, b.act)

    def _moe_decode(self, li: int, L: Layer, b: DecodeBuffers, trace: RoutingTrace | None) -> None:
        cfg = self.config
        moe.route(b.h, L.router, L.bias, cfg.moe_k, b.idx, b.w, cfg.moe_norm_min, work=b.route_work)
        if trace is not None:
            trace.add(li, b.idx)
        ids, weights = b.idx[0], b.w[0]
        if L.gate is not None and _quantized(L.gate_bank, L.up_bank, L.down_bank) and _quantized(L.gate, L.up, L.down):
            # Routed experts and the shared expert in two parallel regions (gate+up, down) instead
            # of four; the shared expert's output is still added last (ERNIE_SPEC P6, P13).
            n = L.gate.shape[0]
            g = b.g[:n][None]  # the shared expert as a one-expert bank [1, n]
            q8.experts_pair_gate_up_silu(
                b.h, (L.gate_bank.data, L.gate_bank.scales, L.up_bank.data, L.up_bank.scales, ids, b.he,
                      _bits(L.gate_bank)),
                (L.gate.data[None], L.gate.scales[None], L.up.data[None], L.up.scales[None], b.zero_id, g,
                 _bits(L.gate)), b.act, b.act_shared)
            q8.experts_pair_down_weighted(
                (b.he, L.down_bank.data, L.down_bank.scales, ids, weights, _bits(L.down_bank)),
                (g, L.down.data[None], L.down.scales[None], b.zero_id, b.one, _bits(L.down)),
                b.y, b.act, b.act_shared)
            return
        q8.experts_gate_up_silu(b.h, L.gate_bank.data, L.gate_bank.scales, L.up_bank.data, L.up_bank.scales, ids, b.he,
                                b.act, _bits(L.gate_bank))
        q8.experts_down_weighted(b.he, L.down_bank.data, L.down_bank.scales, ids, weights, b.y, b.act,
                                 _bits(L.down_bank))
        if L.gate is not None:
            self._mlp_decode(L, b, b.o)  # shared expert, added last (ERNIE_SPEC P6, P13)
            b.y += b.o

    # ---- a chunk of tokens ----------------------------------------------------------------------

    def _prefill(self, ids: np.ndarray, cache: KVCache, trace: RoutingTrace | None) -> np.ndarray:
        cfg = self.config
        T, D = len(ids), cfg.dim_head
        i0 = cache.used
        positions = np.arange(cache.length, cache.length + T, dtype=np.int64)
        x = embed_rows(self.embed, ids)  # [T, H]
        h = np.empty_like(x)
        q = np.empty((T, cfg.num_attention_heads, D), np.float32)
        k = np.empty((T, cfg.num_key_value_heads, D), np.float32)
        v = np.empty_like(k)
        a = np.empty_like(q)
        o = np.empty_like(x)
        y = np.empty_like(x)
        for li, L in enumerate(self.layers):
            norm.rmsnorm(x, L.in_norm, cfg.rms_norm_eps, h)
            matmul(L.q, h, q.reshape(T, -1))
            matmul(L.k, h, k.reshape(T, -1))
            matmul(L.v, h, v.reshape(T, -1))
            apply_rope(q, positions, cache.cos, cache.sin, cache.start)
            apply_rope(k, positions, cache.cos, cache.sin, cache.start)
            attention.kv_write(k, v, cache.k[li], cache.v[li], i0)
            attention.attention_prefill(q, cache.k[li], cache.v[li], i0, a)
            matmul(L.o, a.reshape(T, -1), o)
            norm.add_rmsnorm(x, o, L.post_norm, cfg.rms_norm_eps, h)
            if L.moe:
                self._moe_prefill(li, L, h, y, trace)
            else:
                self._mlp_prefill(L, h, y)
            x += y
        cache.length += T
        norm.rmsnorm(x, self.final_norm, cfg.rms_norm_eps, h)
        return h

    def _mlp_prefill(self, L: Layer, h: np.ndarray, out: np.ndarray) -> np.ndarray:
        T = len(h)
        if T <= QBATCH_MAX_T and L.gate.quant == L.up.quant == L.down.quant and L.gate.quant in ("q4", "q8"):
            # The MLP as a one-expert bank with weight 1.0 (exact): gate, up, silu, down fused.
            return qbatch.qexperts(h, np.zeros((T, 1), np.int64), np.ones((T, 1), np.float32),
                                   L.gate.data[None], L.gate.scales[None], L.up.data[None], L.up.scales[None],
                                   L.down.data[None], L.down.scales[None], out, _bits(L.gate))
        n = L.gate.shape[0]
        g = np.empty((len(h), n), np.float32)
        u = np.empty_like(g)
        matmul(L.gate, h, g)
        matmul(L.up, h, u)
        norm.silu_mul(g, u, g)
        return matmul(L.down, g, out)

    def _moe_prefill(self, li: int, L: Layer, h: np.ndarray, y: np.ndarray, trace: RoutingTrace | None) -> None:
        cfg = self.config
        idx = np.empty((len(h), cfg.moe_k), np.int64)
        w = np.empty((len(h), cfg.moe_k), np.float32)
        moe.route(h, L.router, L.bias, cfg.moe_k, idx, w, cfg.moe_norm_min)
        if trace is not None:
            trace.add(li, idx)
        qbatch.qexperts(h, idx, w, L.gate_bank.data, L.gate_bank.scales, L.up_bank.data, L.up_bank.scales,
                        L.down_bank.data, L.down_bank.scales, y, _bits(L.gate_bank))
        if L.gate is not None:
            y += self._mlp_prefill(L, h, np.empty_like(y))
