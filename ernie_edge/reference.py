"""The ERNIE-4.5 MoE forward pass in plain numpy fp32, line by line with docs/ERNIE_SPEC.md §2-3.

This is the specification that every kernel and the fast path are tested against. It is never
optimised: clarity over speed. Weights come from any `WeightSource` (an HF folder widened from
bf16, or a converted folder dequantized), as float32 arrays with HF names.

Dimension letters: T tokens in this call, S cached positions, H hidden, V vocab, E experts,
K experts per token, Nq/Nkv query/key-value heads, D head dim, I intermediate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .config import ErnieConfig


class WeightSource(Protocol):
    config: ErnieConfig

    def dense(self, name: str) -> np.ndarray:
        """A non-expert tensor by its HF name, as float32."""

    def expert(self, layer: int, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gate [I, H], up [I, H], down [H, I]) of routed expert e in `layer`, as float32."""


# ---- building blocks ---------------------------------------------------------------------------

def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [T, H] -> w * x / sqrt(mean(x^2) + eps). eps inside the sqrt, no (1 + w) offset."""
    x = x.astype(np.float32)
    var = np.mean(x * x, axis=-1, keepdims=True)
    return w * (x * (np.float32(1.0) / np.sqrt(var + np.float32(eps))))


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """[D/2] inv_freq[i] = 1 / theta^(2i/D), computed in fp32 as transformers does."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """x [T, N, D]: INTERLEAVED rotary (pairs (2i, 2i+1) share angle i; ERNIE_SPEC §3.3, P1)."""
    angle = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = np.cos(angle)[:, None, :]  # [T, 1, D/2]
    sin = np.sin(angle)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]  # [T, N, D/2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos + (-x1) * sin
    out[..., 1::2] = x1 * cos + x0 * sin
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray,
              k_start: int = 0) -> np.ndarray:
    """Causal GQA attention. q [T, Nq, D]; k, v [S, Nkv, D] for key positions k_start..k_start+S-1.

    Query head h reads KV head h // (Nq / Nkv) (ERNIE_SPEC P10). Returns [T, Nq * D]."""
    T, Nq, D = q.shape
    S, Nkv, _ = k.shape
    group = Nq // Nkv
    kv_head = np.arange(Nq) // group
    k_h = k[:, kv_head, :].transpose(1, 2, 0)  # [Nq, D, S]
    v_h = v[:, kv_head, :].transpose(1, 0, 2)  # [Nq, S, D]
    scores = (q.transpose(1, 0, 2) @ k_h) * np.float32(D ** -0.5)  # [Nq, T, S]
    visible = (k_start + np.arange(S))[None, :] <= q_positions[:, None]  # [T, S]
    scores = np.where(visible[None], scores, np.float32(-np.inf))
    p = softmax(scores.astype(np.float32), axis=-1)
    out = p @ v_h  # [Nq, T, D]
    return out.transpose(1, 0, 2).reshape(T, Nq * D)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def mlp(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """SwiGLU: down(silu(gate(x)) * up(x)); weights are nn.Linear [out, in]."""
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def route(x: np.ndarray, wg: np.ndarray, bias: np.ndarray | None, k: int,
          norm_min: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Router in fp32 (ERNIE_SPEC §3.5, P3-P5). x [T, H], wg [E, H], bias [E] or None.

    Softmax over all E, pick top-k of (p + bias), weight by the UN-biased p renormalised to 1.
    Returns (idx [T, K] int64, weights [T, K] float32)."""
    logits = x.astype(np.float32) @ wg.astype(np.float32).T  # [T, E]
    p = softmax(logits, axis=-1)
    scores = p if bias is None else p + bias[None, :].astype(np.float32)
    idx = np.argsort(-scores, axis=-1, kind="stable")[:, :k]  # [T, K]
    w = np.take_along_axis(p, idx, axis=-1)
    w = w / np.maximum(w.sum(axis=-1, keepdims=True), np.float32(norm_min))
    return idx, w.astype(np.float32)


# ---- the model ---------------------------------------------------------------------------------

@dataclass
class ReferenceCache:
    """Post-RoPE keys and values per layer, [S, Nkv, D] each, grown by concatenation.

    `length` is the position of the next token. A cache made with start > 0 runs the model as if
    the sequence began at that position with nothing before it (what transformers does for
    position_ids offset and no past); tests use it to check RoPE at large positions."""
    k: list[np.ndarray] = field(default_factory=list)
    v: list[np.ndarray] = field(default_factory=list)
    start: int = 0
    length: int = 0

    def clone(self) -> "ReferenceCache":
        return ReferenceCache(k=list(self.k), v=list(self.v), start=self.start, length=self.length)

    def truncate(self, length: int) -> None:
        """Forget every position >= length (reuse of a shared prompt prefix)."""
        keep = max(0, min(length, self.length) - self.start)
        self.k = [k[:keep] for k in self.k]
        self.v = [v[:keep] for v in self.v]
        self.length = self.start + keep


@dataclass
class RoutingTrace:
    """Expert choices per MoE layer: layer -> [T, K] indices, in the order tokens were run."""
    experts: dict[int, list[np.ndarray]] = field(default_factory=dict)

    def add(self, layer: int, idx: np.ndarray) -> None:
        self.experts.setdefault(layer, []).append(np.sort(idx, axis=-1))

    def layer(self, layer: int) -> np.ndarray:
        return np.concatenate(self.experts[layer], axis=0)


class ReferenceModel:
    """fp32 forward over a WeightSource. `use_correction_bias=False` reproduces the routing of
    Baidu's remote code / MLX (ERNIE_SPEC §3.5 conflict) for comparison."""

    def __init__(self, weights: WeightSource, use_correction_bias: bool = True):
        self.w = weights
        self.config = weights.config
        self.use_correction_bias = use_correction_bias
        self.inv_freq = rope_inv_freq(self.config.dim_head, self.config.rope_theta)

    def new_cache(self, start_position: int = 0) -> ReferenceCache:
        cfg = self.config
        n = cfg.num_hidden_layers
        empty = np.zeros((0, cfg.num_key_value_heads, cfg.dim_head), np.float32)
        return ReferenceCache(k=[empty] * n, v=[empty] * n, start=start_position, length=start_position)

    def forward(self, token_ids, cache: ReferenceCache, trace: RoutingTrace | None = None) -> np.ndarray:
        """Run T new tokens after the cache's S positions. Returns the final-normed hidden [T, H]."""
        cfg = self.config
        ids = np.asarray(token_ids, dtype=np.int64)
        positions = np.arange(cache.length, cache.length + len(ids))
        x = self.w.dense("model.embed_tokens.weight")[ids]  # [T, H], no sqrt(H) scaling
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            h = rms_norm(x, self.w.dense(p + "input_layernorm.weight"), cfg.rms_norm_eps)
            x = x + self._attention(i, h, positions, cache)
            h = rms_norm(x, self.w.dense(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps)
            if cfg.is_moe_layer(i):
                x = x + self._moe(i, h, trace)
            else:
                x = x + mlp(h, *(self.w.dense(p + f"mlp.{n}_proj.weight") for n in ("gate", "up", "down")))
        cache.length += len(ids)
        return rms_norm(x, self.w.dense("model.norm.weight"), cfg.rms_norm_eps)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Tied LM head: [T, H] @ embed^T -> [T, V] (ERNIE_SPEC P8)."""
        return hidden @ self.w.dense("model.embed_tokens.weight").T

    def _attention(self, i: int, h: np.ndarray, positions: np.ndarray, cache: ReferenceCache) -> np.ndarray:
        cfg = self.config
        p = f"model.layers.{i}.self_attn."
        T, D = len(h), cfg.dim_head
        q = (h @ self.w.dense(p + "q_proj.weight").T).reshape(T, cfg.num_attention_heads, D)
        k = (h @ self.w.dense(p + "k_proj.weight").T).reshape(T, cfg.num_key_value_heads, D)
        v = (h @ self.w.dense(p + "v_proj.weight").T).reshape(T, cfg.num_key_value_heads, D)
        q = apply_rope(q, positions, self.inv_freq)
        k = apply_rope(k, positions, self.inv_freq)
        cache.k[i] = np.concatenate([cache.k[i], k])  # the cache holds post-RoPE keys
        cache.v[i] = np.concatenate([cache.v[i], v])
        a = attention(q, cache.k[i], cache.v[i], positions, cache.start)  # [T, Nq * D]
        return a @ self.w.dense(p + "o_proj.weight").T

    def _moe(self, i: int, h: np.ndarray, trace: RoutingTrace | None) -> np.ndarray:
        cfg = self.config
        p = f"model.layers.{i}.mlp."
        bias = None
        if cfg.moe_use_aux_free and self.use_correction_bias:
            bias = self.w.dense(p + "moe_statics.e_score_correction_bias").reshape(-1)
        idx, weights = route(h, self.w.dense(p + "gate.weight"), bias, cfg.moe_k, cfg.moe_norm_min)
        if trace is not None:
            trace.add(i, idx)
        y = np.zeros_like(h)  # [T, H]
        for e in np.unique(idx):  # ascending expert id, as transformers accumulates (P13)
            tokens, slots = np.nonzero(idx == e)
            out = mlp(h[tokens], *self.w.expert(i, int(e)))
            y[tokens] += out * weights[tokens, slots][:, None]
        if cfg.moe_num_shared_experts:
            s = mlp(h, *(self.w.dense(p + f"shared_experts.{n}_proj.weight") for n in ("gate", "up", "down")))
            y = y + s  # the shared expert is added last, unweighted (P6)
        return y
