"""The fast forward pass on the CPU: straight-line orchestration of the numba kernels over the
memory-mapped edge folder. It does not know how a weight is stored: each weight carries its
kernels (cpu_weights.py, chosen from the format table at load). The numpy reference
(reference.py) is the specification it is tested against.

Three entry points, one layer loop each:
- decode: one token on preallocated scratch buffers (nothing is allocated per token), its weight
  kernels bound to them once (DecodePlan);
- prefill: chunks of PREFILL_CHUNK tokens of one sequence (dense weights as one matmul, routed
  experts grouped by expert so each is read once per chunk);
- decode_batch: one new token of each of B sequences, each with its own KV cache (the dense weights
  and each routed expert read once for all B; attention per sequence over its own cache). A row's
  result does not depend on which other sequences share the step.

Each layer ends with the residual add fused into the next layer's input norm (or the final norm):
`add_rmsnorm(x, mlp_out, next_norm)`, in all three loops, so a token's row has the same bits in each.

Dimension letters: T tokens, B sequences, H hidden, V vocab, Nq/Nkv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ErnieConfig
from .cpu_weights import MoE, QKV, ExpertBank, Scratch, SwiGLU, head, linear
from .kernels import attention, norm
from .kernels._jit import get_threads
from .kernels.rope import apply_rope
from .kv_cache import KVCache
from .reference import RoutingTrace

PREFILL_CHUNK = 512
# How a prompt's prefill rounds the activations its integer kernels take: "i8" int8 per block of 32
# (kernels/qbatch8.py, the fast default), "i16" int16 below QBATCH_MAX_T tokens and exact float32
# above (slower; a KLD of ~1e-5 against the float reference instead of ~1e-3). decode_acts takes the
# same two: "i8" the int8 row dots of kernels/dot8.py in the decode kernels (the default; a token's
# row has the same bits in decode, decode_batch and prefill), "i16" the int16 ones.
PREFILL_ACTS = ("i8", "i16")


@dataclass
class Layer:
    in_norm: np.ndarray  # fp32 [H]
    post_norm: np.ndarray  # fp32 [H]
    qkv: QKV
    o: object  # a cpu_weights Linear
    mlp: SwiGLU | MoE  # layer 0's dense MLP, or a MoE layer


def _load_layer(ck, cfg: ErnieConfig, i: int, use_bias: bool) -> Layer:
    p = f"model.layers.{i}."
    f32 = lambda name: np.ascontiguousarray(ck.dense(name), np.float32)  # noqa: E731 (small tensors)
    attn = lambda n: ck.qtensor(p + f"self_attn.{n}_proj.weight")  # noqa: E731
    if cfg.is_moe_layer(i):
        bias = None
        if use_bias and cfg.moe_use_aux_free:
            bias = f32(p + "mlp.moe_statics.e_score_correction_bias").reshape(-1)
        shared = None
        if cfg.moe_num_shared_experts:
            shared = SwiGLU(*(ck.qtensor(p + f"mlp.shared_experts.{n}_proj.weight") for n in ("gate", "up", "down")))
        experts = ExpertBank(*(ck.expert_bank(i, n) for n in ("gate", "up", "down")))
        mlp = MoE(i, f32(p + "mlp.gate.weight"), bias, experts, shared, cfg.moe_k, cfg.moe_norm_min)
    else:
        mlp = SwiGLU(*(ck.qtensor(p + f"mlp.{n}_proj.weight") for n in ("gate", "up", "down")))
    return Layer(in_norm=f32(p + "input_layernorm.weight"), post_norm=f32(p + "post_attention_layernorm.weight"),
                 qkv=QKV(attn("q"), attn("k"), attn("v")), o=linear(attn("o")), mlp=mlp)


class DecodeBuffers:
    """Every activation buffer one decode step needs, allocated once per model."""

    def __init__(self, cfg: ErnieConfig):
        H = cfg.hidden_size
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
        self.pos = np.zeros(1, np.int64)
        self.logits = np.zeros(cfg.vocab_size, np.float32)
        self.head_in = np.zeros(H, np.float32)  # the LM head's input (a copy of the hidden state asked for)
        self.scratch = Scratch(widest, cfg.moe_k, cfg.moe_num_experts, cfg.moe_intermediate_size)


def _plan_key(s: Scratch) -> tuple[bool, int]:
    """What a DecodePlan is built for: the activation rounding and the kernels' thread count."""
    return s.act8, get_threads()


@dataclass
class BoundAttention:
    """A cache's decode attention steps (CpuModel._attention_steps) and what they were bound to."""
    model: "CpuModel"
    threads: int
    scratch: attention.DecodeScratch
    cos: np.ndarray
    start: int
    k: list
    v: list
    steps: list


class DecodePlan:
    """Each layer's weight kernels bound to the decode buffers (cpu_weights' `bind_*`): checked once
    here, then called every token with no argument checks, views or wrappers in between (with cold
    caches after a layer's weight stream, those cost ~0.1-0.4 ms per MoE layer, docs/PERF.md). Built
    for one activation rounding (`act8`) and thread count: `key`."""

    def __init__(self, model: "CpuModel"):
        b, s = model.buf, model.buf.scratch
        self.key = _plan_key(s)
        eps = model.config.rms_norm_eps
        self.in_norm = norm.bind_rmsnorm(b.x, model.layers[0].in_norm, eps, b.h)  # before layer 0
        self.post_norm = [norm.bind_add_rmsnorm(b.x, b.o, L.post_norm, eps, b.h) for L in model.layers]
        self.next_norm = [norm.bind_add_rmsnorm(b.x, b.y, w, eps, b.h) for w in model.next_norms]
        q, k, v = b.q.reshape(-1), b.k.reshape(-1), b.v.reshape(-1)
        self.qkv = [L.qkv.bind_matvec(b.h, q, k, v, s) for L in model.layers]
        self.o = [L.o.bind_matvec(b.attn.reshape(-1), b.o, s) for L in model.layers]
        self.mlp = [L.mlp.bind_decode(b.h, b.y, s) for L in model.layers]
        self.lm_head = model.lm_head.bind_matvec(b.head_in, b.logits, s)
        self.embed_row = model.lm_head.bind_row(b.x)  # the token's embedding (the same tied matrix)


class CpuModel:
    """Fast forward over an EdgeCheckpoint. Same interface as reference.ReferenceModel."""

    def __init__(self, ck, use_correction_bias: bool = True, max_context: int | None = None,
                 kv_dtype: str = "f16", prefill_acts: str = "i8", decode_acts: str = "i8"):
        if prefill_acts not in PREFILL_ACTS:
            raise ValueError(f"prefill_acts {prefill_acts!r} is not one of {', '.join(PREFILL_ACTS)}")
        self.ck = ck
        self.prefill_acts = prefill_acts
        self.config = cfg = ck.config
        self.max_context = max_context
        self.kv_dtype = kv_dtype
        self.embed = ck.qtensor("model.embed_tokens.weight")  # [V, H] rows looked up per token
        self.lm_head = head(self.embed)  # the same tensor: tied word embeddings
        self.final_norm = np.ascontiguousarray(ck.dense("model.norm.weight"), np.float32)
        self.layers = [_load_layer(ck, cfg, i, use_correction_bias) for i in range(cfg.num_hidden_layers)]
        self.buf = DecodeBuffers(cfg)
        self.decode_acts = decode_acts  # checked by the setter
        self.attn_scratch: attention.DecodeScratch | None = None
        self._plan: DecodePlan | None = None
        # the norm after each layer's residual add: the next layer's input norm, the final norm last
        self.next_norms = [L.in_norm for L in self.layers[1:]] + [self.final_norm]

    @property
    def decode_acts(self) -> str:
        return "i8" if self.buf.scratch.act8 else "i16"

    @decode_acts.setter
    def decode_acts(self, acts: str) -> None:
        if acts not in PREFILL_ACTS:
            raise ValueError(f"decode_acts {acts!r} is not one of {', '.join(PREFILL_ACTS)}")
        self.buf.scratch.act8 = acts == "i8"

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
            self.buf.head_in[:] = hidden[0]
            self._decode_plan().lm_head()
            return self.buf.logits[None, :].copy()
        out = np.empty((len(hidden), self.config.vocab_size), np.float32)
        return self.lm_head.matmul(np.ascontiguousarray(hidden, np.float32), out)

    def _decode_scratch(self, capacity: int) -> attention.DecodeScratch:
        if self.attn_scratch is None or self.attn_scratch.max_len < capacity:
            cfg = self.config
            self.attn_scratch = attention.DecodeScratch(cfg.num_attention_heads, cfg.dim_head, capacity)
        return self.attn_scratch

    # ---- one token ----------------------------------------------------------------------------

    def _decode_plan(self) -> DecodePlan:
        if self._plan is None or self._plan.key != _plan_key(self.buf.scratch):
            self._plan = DecodePlan(self)
        return self._plan

    def _attention_steps(self, cache: KVCache) -> list:
        """Each layer's decode attention as one bound call over this cache's arrays
        (attention.bind_decode_step), kept on the cache (`cache.bound`, so that it goes with the
        cache) and bound again when the cache grows (new arrays), the scratch or the thread count
        changes, or another model decodes with it."""
        scratch = self._decode_scratch(cache.capacity)
        got = cache.bound
        if not (isinstance(got, BoundAttention) and got.model is self and got.threads == get_threads()
                and got.scratch is scratch and got.cos is cache.cos and got.start == cache.start
                and all(a is c for a, c in zip(got.k, cache.k)) and all(a is c for a, c in zip(got.v, cache.v))):
            b = self.buf
            steps = attention.bind_decode_step(b.q, b.k, b.v, b.pos, cache.cos, cache.sin, cache.start, cache.k,
                                               cache.v, b.attn, scratch)
            got = cache.bound = BoundAttention(self, get_threads(), scratch, cache.cos, cache.start, list(cache.k),
                                               list(cache.v), steps)
        return got.steps

    def _decode(self, token: int, cache: KVCache, trace: RoutingTrace | None) -> np.ndarray:
        b, s = self.buf, self.buf.scratch
        plan = self._decode_plan()
        i_cache = cache.used  # cache slot of this token
        b.pos[0] = cache.length
        plan.embed_row(token)  # -> b.x
        plan.in_norm()  # b.x -> b.h
        steps = self._attention_steps(cache)
        attention.check_step(i_cache, cache.length, cache.k[0], cache.cos, cache.start)
        for li, L in enumerate(self.layers):
            plan.qkv[li]()  # b.h -> b.q, b.k, b.v
            steps[li](i_cache)  # RoPE of b.q and b.k, b.k and b.v into the cache, attention -> b.attn
            plan.o[li]()  # b.attn -> b.o
            plan.post_norm[li]()  # b.x += b.o; b.h = the post-attention norm of b.x
            if trace is None:
                plan.mlp[li]()  # b.h -> b.y
            else:
                L.mlp.decode(b.h, b.y, s, trace)
            plan.next_norm[li]()  # b.x += b.y; b.h = the next layer's input norm (the final norm last)
        cache.length += 1
        return b.h

    # ---- a chunk of tokens of one sequence ------------------------------------------------------

    def _activations(self, T: int):
        """Buffers of T tokens' activations: h, o, y [T, H]; q, attention out [T, Nq, D]; k, v [T, Nkv, D]."""
        cfg = self.config
        H, D = cfg.hidden_size, cfg.dim_head
        q = np.empty((T, cfg.num_attention_heads, D), np.float32)
        k = np.empty((T, cfg.num_key_value_heads, D), np.float32)
        return (np.empty((T, H), np.float32), q, k, np.empty_like(k), np.empty_like(q),
                np.empty((T, H), np.float32), np.empty((T, H), np.float32))

    def _prefill(self, ids: np.ndarray, cache: KVCache, trace: RoutingTrace | None) -> np.ndarray:
        cfg = self.config
        T = len(ids)
        i0 = cache.used
        positions = np.arange(cache.length, cache.length + T, dtype=np.int64)
        act8 = self.prefill_acts == "i8"
        x = self.embed.rows(ids)  # [T, H]
        h, q, k, v, a, o, y = self._activations(T)
        norm.rmsnorm(x, self.layers[0].in_norm, cfg.rms_norm_eps, h)
        for li, L in enumerate(self.layers):
            L.qkv.matmul(h, q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1), act8)
            apply_rope(q, positions, cache.cos, cache.sin, cache.start)
            apply_rope(k, positions, cache.cos, cache.sin, cache.start)
            attention.kv_write(k, v, cache.k[li], cache.v[li], i0)
            attention.attention_prefill(q, cache.k[li], cache.v[li], i0, a)
            L.o.matmul(a.reshape(T, -1), o, act8)
            norm.add_rmsnorm(x, o, L.post_norm, cfg.rms_norm_eps, h)
            L.mlp.prefill(h, y, trace, act8=act8)
            norm.add_rmsnorm(x, y, self.next_norms[li], cfg.rms_norm_eps, h)
        cache.length += T
        return h

    # ---- one token of each of B sequences --------------------------------------------------------

    def decode_batch(self, token_ids, caches: list[KVCache]) -> np.ndarray:
        """Append token_ids[b] to caches[b] for every b; returns the next-token logits [B, V]."""
        cfg = self.config
        ids = np.asarray(token_ids, dtype=np.int64)
        B = len(ids)
        for cache in caches:
            cache.reserve(1)
        attn_scratch = self._decode_scratch(max(c.capacity for c in caches))
        act8 = self.buf.scratch.act8
        x = self.embed.rows(ids)  # [B, H]
        h, q, k, v, a, o, y = self._activations(B)
        norm.rmsnorm(x, self.layers[0].in_norm, cfg.rms_norm_eps, h)
        for li, L in enumerate(self.layers):
            L.qkv.matmul(h, q.reshape(B, -1), k.reshape(B, -1), v.reshape(B, -1), act8)
            for j, c in enumerate(caches):  # attention: each sequence over its own cache
                pos = np.array([c.length], np.int64)
                apply_rope(q[j:j + 1], pos, c.cos, c.sin, c.start)
                apply_rope(k[j:j + 1], pos, c.cos, c.sin, c.start)
                attention.kv_write(k[j:j + 1], v[j:j + 1], c.k[li], c.v[li], c.used)
                attention.attention_decode(q[j], c.k[li], c.v[li], c.used + 1, a[j], attn_scratch)
            L.o.matmul(a.reshape(B, -1), o, act8)
            norm.add_rmsnorm(x, o, L.post_norm, cfg.rms_norm_eps, h)
            L.mlp.prefill(h, y, act8=act8)
            norm.add_rmsnorm(x, y, self.next_norms[li], cfg.rms_norm_eps, h)
        for c in caches:
            c.length += 1
        out = np.empty((B, cfg.vocab_size), np.float32)
        return self.lm_head.matmul(h, out, act8)
