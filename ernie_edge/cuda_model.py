"""The forward pass on an NVIDIA GPU: the orchestration of the numba.cuda kernels
(ernie_edge/kernels/cuda/) over weights uploaded once from the memory-mapped edge folder, with the
KV cache in GPU memory. The same interface as cpu_model.CpuModel; reference.py is the spec it is
tested against (tests/test_cuda_model.py).

Placement (ernie_edge/placement.py): everything runs on the GPU except the routed experts of the
MoE layers the plan puts on the CPU. For such a layer the router's output (normed input, expert
ids and weights) is copied to the host, the shared expert is launched on the GPU, and the CPU
kernels (cpu_weights.ExpertBank) run the routed experts meanwhile; their sum comes back and is added
to the residual stream with the shared expert's output.

One decode step launches ~9 kernels per layer and synchronises once, when the final hidden state
is copied back; the router, the top-k and the expert ids stay on the device. Prefill runs chunks of
PREFILL_CHUNK tokens: each MoE layer copies its routing [T, k] to the host, which orders the
(token, expert) pairs into tiles (kernels/cuda/moe.group_tokens) for the grouped matmuls.

Dimension letters: T tokens, H hidden, V vocab, Nq/Nkv heads, D head dim, k slots, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ErnieConfig
from .cuda_kv_cache import CudaKVCache
from .cuda_weights import DeviceExperts, DeviceQKV, DeviceSwiGLU, one_expert_tiles, upload
from .kernels.cuda import attention, moe, norm_rope
from .kernels.rope import rope_inv_freq
from .placement import PREFILL_CHUNK, Plan
from .reference import RoutingTrace


def _dev(a):
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(a))


def _empty(shape, dtype=np.float32):
    from numba import cuda
    return cuda.device_array(shape, dtype)


@dataclass
class DeviceMoE:
    layer: int
    router: object  # float32 [E, H] on the device
    bias: object | None  # float32 [E] or None
    experts: DeviceExperts | None  # None: the routed experts run on the CPU
    cpu_experts: object | None  # cpu_weights.ExpertBank when on the CPU
    shared: DeviceSwiGLU | None


@dataclass
class DeviceLayer:
    in_norm: object
    post_norm: object
    qkv: DeviceQKV
    o: object
    mlp: DeviceSwiGLU | DeviceMoE


class CudaModel:
    """Fast forward over an EdgeCheckpoint on the GPU (numba.cuda), placed by `plan`."""

    backend_name = "cuda"
    kv_dtype = "f16"

    def __init__(self, ck, plan: Plan, use_correction_bias: bool = True, max_context: int | None = None):
        self.ck, self.plan = ck, plan
        self.config = cfg = ck.config
        self.max_context = max_context
        moe.check_router(cfg.moe_num_experts, cfg.moe_k)
        self.embed = upload(ck.qtensor("model.embed_tokens.weight"))  # also the tied LM head
        self.final_norm = _dev(np.asarray(ck.dense("model.norm.weight"), np.float32))
        self.inv_freq = _dev(rope_inv_freq(cfg.dim_head, cfg.rope_theta))
        on_cpu = set(plan.cpu_expert_layers)
        self.layers = [self._load_layer(i, use_correction_bias, i in on_cpu) for i in range(cfg.num_hidden_layers)]
        self.cpu_scratch = None
        if any(isinstance(L.mlp, DeviceMoE) and L.mlp.cpu_experts is not None for L in self.layers):
            from .cpu_weights import Scratch
            self.cpu_scratch = Scratch(max(cfg.hidden_size, cfg.moe_intermediate_size), cfg.moe_k,
                                       cfg.moe_num_experts, cfg.moe_intermediate_size)
        self.buf = _DecodeBuffers(cfg)
        self.pre: _PrefillBuffers | None = None
        self.attn_scratch: attention.DecodeScratch | None = None

    def _load_layer(self, i: int, use_bias: bool, experts_on_cpu: bool) -> DeviceLayer:
        ck, cfg = self.ck, self.config
        p = f"model.layers.{i}."
        f32 = lambda name: _dev(np.asarray(ck.dense(name), np.float32).reshape(-1))  # noqa: E731
        attn = lambda n: ck.qtensor(p + f"self_attn.{n}_proj.weight")  # noqa: E731
        if cfg.is_moe_layer(i):
            bias = None
            if use_bias and cfg.moe_use_aux_free:
                bias = f32(p + "mlp.moe_statics.e_score_correction_bias")
            shared = None
            if cfg.moe_num_shared_experts:
                shared = DeviceSwiGLU(*(ck.qtensor(p + f"mlp.shared_experts.{n}_proj.weight")
                                        for n in ("gate", "up", "down")))
            banks = [ck.expert_bank(i, n) for n in ("gate", "up", "down")]
            experts = cpu_experts = None
            if experts_on_cpu or not DeviceExperts.fits(*banks):
                from .cpu_weights import ExpertBank
                cpu_experts = ExpertBank(*banks)
            else:
                experts = DeviceExperts(*banks)
            router = _dev(np.asarray(ck.dense(p + "mlp.gate.weight"), np.float32))
            mlp = DeviceMoE(i, router, bias, experts, cpu_experts, shared)
        else:
            mlp = DeviceSwiGLU(*(ck.qtensor(p + f"mlp.{n}_proj.weight") for n in ("gate", "up", "down")))
        return DeviceLayer(f32(p + "input_layernorm.weight"), f32(p + "post_attention_layernorm.weight"),
                           DeviceQKV(attn("q"), attn("k"), attn("v")), upload(attn("o")), mlp)

    def new_cache(self, start_position: int = 0) -> CudaKVCache:
        return CudaKVCache(self.config, start=start_position, max_context=self.max_context)

    def forward(self, token_ids, cache: CudaKVCache, trace: RoutingTrace | None = None) -> np.ndarray:
        """Run T new tokens after the cache; returns the final-normed hidden states [T, H] (host)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        cache.reserve(len(ids))
        if len(ids) == 1:
            return self._decode(int(ids[0]), cache, trace)
        return np.concatenate([self._prefill(ids[s:s + PREFILL_CHUNK], cache, trace)
                               for s in range(0, len(ids), PREFILL_CHUNK)])

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Tied LM head: [T, H] -> [T, V]."""
        T = len(hidden)
        if T == 1:
            self.buf.h.copy_to_device(np.ascontiguousarray(hidden, np.float32))
            self.embed.matvec(self.buf.h0, self.buf.logits)
            return self.buf.logits.copy_to_host()[None, :]
        out = _empty((T, self.config.vocab_size))
        self.embed.matmul(_dev(np.asarray(hidden, np.float32)), out)
        return out.copy_to_host()

    def _decode_scratch(self, capacity: int) -> attention.DecodeScratch:
        if self.attn_scratch is None or self.attn_scratch.chunks * attention.CHUNK < capacity:
            cfg = self.config
            self.attn_scratch = attention.DecodeScratch(cfg.num_attention_heads, cfg.dim_head, capacity)
        return self.attn_scratch

    # ---- one token ----------------------------------------------------------------------------

    def _decode(self, token: int, cache: CudaKVCache, trace) -> np.ndarray:
        cfg, b = self.config, self.buf
        slot = cache.used
        scratch = self._decode_scratch(cache.capacity)
        b.tok_pos_host[:] = (token, cache.length)
        b.tok_pos.copy_to_device(b.tok_pos_host)
        norm_rope.embed(self._embed_table(), b.tok, b.x)
        eps = cfg.rms_norm_eps
        for li, L in enumerate(self.layers):
            norm_rope.rmsnorm(b.x, L.in_norm, eps, b.h)
            L.qkv.matvec(b.h0, b.q_flat, b.k_flat, b.v_flat)
            norm_rope.rope_kv_write(b.q, b.k, b.v, b.pos, self.inv_freq, cache.k[li], cache.v[li], slot)
            attention.attention_decode(b.q0, cache.k[li], cache.v[li], slot + 1, b.attn, scratch)
            L.o.matvec(b.attn_flat, b.x0, accumulate=True)  # x += o
            if isinstance(L.mlp, DeviceMoE):
                self._decode_moe(L, L.mlp, trace)
            else:
                norm_rope.rmsnorm(b.x, L.post_norm, eps, b.h)
                self._decode_mlp(L.mlp, b.h0, b.x0, accumulate=True)
        cache.length += 1
        norm_rope.rmsnorm(b.x, self.final_norm, eps, b.h)
        return b.h.copy_to_host()

    def _decode_mlp(self, mlp: DeviceSwiGLU, x, out, accumulate: bool) -> None:
        b = self.buf
        if not mlp.fused:
            mlp.decode_unfused(x, b.hs2, out, accumulate)
            return
        moe.experts_gate_up(x, b.ids0, 0, None, mlp.gate_up_args(), b.hr, b.hs)
        moe.experts_down(b.hr, b.ids0, b.w0, 0, None, b.hs, mlp.down_args(), out, accumulate)

    def _decode_moe(self, L: DeviceLayer, m: DeviceMoE, trace) -> None:
        cfg, b = self.config, self.buf
        k = cfg.moe_k
        moe.route(b.h, m.router, m.bias, k, cfg.moe_norm_min, b.idx, b.w, norm=(b.x, L.post_norm, cfg.rms_norm_eps))
        if m.cpu_experts is not None:
            self._decode_cpu_experts(m, trace)
            return
        if trace is not None:
            trace.add(m.layer, b.idx.copy_to_host())
        shared = m.shared
        if shared is not None and not shared.fused:  # the shared expert alone, then the routed ones
            shared.decode_unfused(b.h0, b.hs2, b.x0, accumulate=True)
            shared = None
        moe.experts_gate_up(b.h0, b.ids0, k, m.experts.gate_up_args(),
                            shared.gate_up_args() if shared else None, b.hr, b.hs)
        moe.experts_down(b.hr, b.ids0, b.w0, k, m.experts.down_args(), b.hs,
                         shared.down_args() if shared else None, b.x0, accumulate=True)

    def _decode_cpu_experts(self, m: DeviceMoE, trace) -> None:
        """Routed experts on the CPU while the GPU runs the shared expert; x += routed + shared."""
        b = self.buf
        b.h.copy_to_host(b.h_host)
        b.idx.copy_to_host(b.idx_host)
        b.w.copy_to_host(b.w_host)
        if trace is not None:
            trace.add(m.layer, b.idx_host.copy())
        if m.shared is not None:  # launched first: it runs while the CPU works
            self._decode_mlp(m.shared, b.h0, b.ys, accumulate=False)
        s = self.cpu_scratch
        ids = b.idx_host[0]
        m.cpu_experts.gate_up_silu(b.h_host[0], ids, s.he, s)
        m.cpu_experts.down_weighted(s.he, ids, b.w_host[0], b.yr_host, s)
        b.yr.copy_to_device(b.yr_host)
        moe.residual_add(b.x0, b.yr, b.ys if m.shared is not None else None)

    def _embed_table(self):
        e = self.embed
        return (e.codes, e.scales, e.bits, e.group_size) if e.bits else e.w

    # ---- a chunk of tokens of one sequence ------------------------------------------------------

    def _prefill(self, ids: np.ndarray, cache: CudaKVCache, trace) -> np.ndarray:
        cfg = self.config
        if self.pre is None:
            self.pre = _PrefillBuffers(cfg, PREFILL_CHUNK)
        T, i0, eps = len(ids), cache.used, cfg.rms_norm_eps
        pb = self.pre.views(T)
        self.pre.tok[:T].copy_to_device(ids)
        self.pre.pos[:T].copy_to_device(np.arange(cache.length, cache.length + T, dtype=np.int64))
        dense_tiles = self.pre.upload_tiles(one_expert_tiles(T), dense=True)
        norm_rope.embed(self._embed_table(), self.pre.tok[:T], pb.x)
        for li, L in enumerate(self.layers):
            norm_rope.rmsnorm(pb.x, L.in_norm, eps, pb.h)
            L.qkv.matmul(pb.h, pb.q.reshape(T, -1), pb.k.reshape(T, -1), pb.v.reshape(T, -1))
            norm_rope.rope_kv_write(pb.q, pb.k, pb.v, self.pre.pos[:T], self.inv_freq, cache.k[li], cache.v[li], i0)
            attention.attention_prefill(pb.q, cache.k[li], cache.v[li], i0, pb.a)
            L.o.matmul(pb.a.reshape(T, -1), pb.x, accumulate=True)
            norm_rope.rmsnorm(pb.x, L.post_norm, eps, pb.h)
            if isinstance(L.mlp, DeviceMoE):
                self._prefill_moe(L.mlp, pb, T, dense_tiles, trace)
            else:
                L.mlp.prefill(pb.h, dense_tiles, self.pre.ident(T), pb.hd, pb.ys)
                moe.residual_add(pb.x.reshape(-1), pb.ys.reshape(-1))
        cache.length += T
        norm_rope.rmsnorm(pb.x, self.final_norm, eps, pb.h)
        return pb.h.copy_to_host()

    def _prefill_moe(self, m: DeviceMoE, pb, T: int, dense_tiles, trace) -> None:
        cfg, pre = self.config, self.pre
        k = cfg.moe_k
        moe.route(pb.h, m.router, m.bias, k, cfg.moe_norm_min, pb.idx, pb.w)
        idx, w = pb.idx.copy_to_host(), pb.w.copy_to_host()
        if trace is not None:
            trace.add(m.layer, idx)
        if m.cpu_experts is not None:
            h_host = pb.h.copy_to_host()
            if m.shared is not None:  # on the GPU while the CPU runs the routed experts
                m.shared.prefill(pb.h, dense_tiles, pre.ident(T), pb.hd, pb.ys)
            y = np.empty((T, cfg.hidden_size), np.float32)
            m.cpu_experts.prefill(h_host, idx, w, y)
            pb.yr.copy_to_device(y)
            moe.residual_add(pb.x.reshape(-1), pb.yr.reshape(-1), pb.ys.reshape(-1) if m.shared is not None else None)
            return
        order, perm, pos, tiles = moe.group_tokens(idx, tile_rows=pre.tile_rows)
        R = T * k
        pre.perm[:R].copy_to_device(perm)
        pre.row_w[:R].copy_to_device(np.ascontiguousarray(w.reshape(-1)[order]))
        pre.slot_pos[:R].copy_to_device(pos.reshape(-1))
        d_tiles = pre.upload_tiles(tiles, dense=False)
        m.experts.prefill(pb.h, pre.perm[:R], d_tiles, pre.row_w[:R], pre.hg, pb.yg)
        shared_y = None
        if m.shared is not None:
            m.shared.prefill(pb.h, dense_tiles, pre.ident(T), pb.hd, pb.ys)
            shared_y = pb.ys
        moe.combine(pb.yg, pre.slot_pos[:R].reshape(T, k), shared_y, pb.x)


class _DecodeBuffers:
    """Every device buffer one decode step needs, allocated once per model."""

    def __init__(self, cfg: ErnieConfig):
        from numba import cuda
        H, D, k = cfg.hidden_size, cfg.dim_head, max(cfg.moe_k, 1)
        widest = max(cfg.intermediate_size, cfg.shared_intermediate_size or 1)
        self.x = _empty((1, H))
        self.h = _empty((1, H))
        self.q = _empty((1, cfg.num_attention_heads, D))
        self.k = _empty((1, cfg.num_key_value_heads, D))
        self.v = _empty((1, cfg.num_key_value_heads, D))
        self.q_flat, self.k_flat, self.v_flat = self.q.reshape(-1), self.k.reshape(-1), self.v.reshape(-1)
        self.attn = _empty((cfg.num_attention_heads, D))
        self.attn_flat = self.attn.reshape(-1)
        self.tok_pos = _empty(2, np.int64)
        self.tok_pos_host = cuda.pinned_array(2, np.int64)
        self.idx = _dev(np.zeros((1, k), np.int64))
        self.w = _dev(np.zeros((1, k), np.float32))
        self.hr = _empty((k, max(cfg.moe_intermediate_size, 1)))
        self.hs = _empty(widest)
        self.hs2 = _empty((2, widest))  # an unfused MLP's gate and up outputs
        self.ys = _empty(H)
        self.yr = _empty(H)
        self.logits = _empty(cfg.vocab_size)
        # Row views made once (a device-array view is a Python object: not one per launch).
        self.x0, self.h0, self.q0 = self.x[0], self.h[0], self.q[0]
        self.ids0, self.w0 = self.idx[0], self.w[0]
        self.tok, self.pos = self.tok_pos[0:1], self.tok_pos[1:2]
        self.h_host = cuda.pinned_array((1, H), np.float32)
        self.idx_host = cuda.pinned_array((1, k), np.int64)
        self.w_host = cuda.pinned_array((1, k), np.float32)
        self.yr_host = cuda.pinned_array(H, np.float32)


class _PrefillBuffers:
    """Device buffers of one prefill chunk of up to `chunk` tokens; `views(T)` slices them."""

    def __init__(self, cfg: ErnieConfig, chunk: int):
        from .kernels.cuda.quant_matmul import BT
        H, D, k = cfg.hidden_size, cfg.dim_head, max(cfg.moe_k, 1)
        self.cfg, self.chunk, self.tile_rows = cfg, chunk, BT
        widest = max(cfg.intermediate_size, cfg.shared_intermediate_size or 1)
        R = chunk * k
        self.x, self.h = _empty((chunk, H)), _empty((chunk, H))
        self.q, self.a = (_empty((chunk, cfg.num_attention_heads, D)) for _ in range(2))
        self.k, self.v = (_empty((chunk, cfg.num_key_value_heads, D)) for _ in range(2))
        self.idx, self.w = _empty((chunk, k), np.int64), _empty((chunk, k))
        self.hg = _empty(R * max(cfg.moe_intermediate_size, 1))  # grouped rows' SwiGLU outputs
        self.hd = _empty(2 * chunk * widest)  # a dense / shared MLP's
        self.yg, self.ys, self.yr = _empty((R, H)), _empty((chunk, H)), _empty((chunk, H))
        self.tok, self.pos = _empty(chunk, np.int64), _empty(chunk, np.int64)
        self.perm, self.slot_pos, self.row_w = _empty(R, np.int64), _empty(R, np.int64), _empty(R)
        n_tiles = -(-R // BT) + max(cfg.moe_num_experts, 1)  # at most one partial tile per expert
        self.tiles = [_empty(n_tiles, np.int64) for _ in range(3)]
        self.dense_tiles = [_empty(-(-chunk // BT), np.int64) for _ in range(3)]
        self._ident = (_dev(np.arange(chunk, dtype=np.int64)), _dev(np.ones(chunk, np.float32)))

    def views(self, T: int):
        return _ChunkViews(self, T)

    def ident(self, T: int):
        """(arange(T), ones(T)) on the device: the rows and weights of a one-expert bank."""
        return self._ident[0][:T], self._ident[1][:T]

    def upload_tiles(self, tiles, dense: bool):
        dst = self.dense_tiles if dense else self.tiles
        n = len(tiles[0])
        for d, a in zip(dst, tiles):
            d[:n].copy_to_device(np.ascontiguousarray(a, np.int64))
        return tuple(d[:n] for d in dst)


class _ChunkViews:
    """The first T rows of each prefill buffer."""

    def __init__(self, b: _PrefillBuffers, T: int):
        k = max(b.cfg.moe_k, 1)
        self.x, self.h, self.q, self.a = b.x[:T], b.h[:T], b.q[:T], b.a[:T]
        self.k, self.v, self.idx, self.w = b.k[:T], b.v[:T], b.idx[:T], b.w[:T]
        self.yg, self.ys, self.yr, self.hd = b.yg[:T * k], b.ys[:T], b.yr[:T], b.hd
