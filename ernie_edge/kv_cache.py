"""The fast path's KV cache: fp16 (default) or int8 keys/values per layer in the attention kernels'
layout (kernels/kv_layout.py), grown in chunks as the conversation grows, with its size checked
against free memory before any allocation. One cache per conversation; `truncate` rewinds it for
prompt-prefix reuse.

kv_dtype "i8" stores int8 codes with one float32 scale per position and KV head (half the memory and
read bandwidth of fp16: 131072 positions take 3.9 GB instead of 7.5 GB on the 21B model); see
benchmarks/results/attention.json for its speed and accuracy.

Index i of the cache holds position start + i (start > 0 only in tests of long-range positions,
the equivalent of transformers' position_ids offset with no past).
"""

from __future__ import annotations

import numpy as np
import psutil

from .config import ErnieConfig
from .errors import ContextLengthError, ErnieEdgeError
from .kernels.kv_layout import KV_BLOCK, KV_DTYPES, KV_TILE, new_kv_cache, tile_elems
from .kernels.rope import rope_tables

GROW_CHUNK = 4096  # positions added per growth step (a multiple of KV_BLOCK)


def kv_bytes(cfg: ErnieConfig, positions: int, kv_dtype: str = "f16") -> int:
    """Bytes of K and V for `positions` tokens across all layers (a multiple of KV_TILE positions
    for "i8", whose scales are stored per tile)."""
    itemsize = 2 if kv_dtype == "f16" else 1
    per_tile = tile_elems(cfg.dim_head, kv_dtype) * itemsize  # bytes of one head's K (or V) tile
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * positions * per_tile // KV_TILE


def check_kv_budget(cfg: ErnieConfig, positions: int, available: int | None = None, kv_dtype: str = "f16") -> None:
    """Refuse, before allocating, a cache that cannot fit in memory (both numbers in the error)."""
    need = kv_bytes(cfg, positions, kv_dtype)
    available = psutil.virtual_memory().available if available is None else available
    if need > available:
        raise ErnieEdgeError(f"a KV cache for {positions} tokens needs {need / 2**30:.2f} GiB, but only "
                             f"{available / 2**30:.2f} GiB of memory is available; use a shorter context "
                             "(--context) or free memory")


class KVCache:
    """Per-layer K/V arrays (`k[layer]`, `v[layer]`, see attention.new_kv_cache) and RoPE tables.

    kv_dtype: "f16" (default) or "i8" (int8 + per-position scales).
    """

    def __init__(self, cfg: ErnieConfig, start: int = 0, max_context: int | None = None, kv_dtype: str = "f16"):
        if kv_dtype not in KV_DTYPES:
            raise ErnieEdgeError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        self.cfg = cfg
        self.kv_dtype = kv_dtype
        self.start = start
        self.length = start  # the position of the next token
        self.max_context = min(max_context or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if not 0 <= start < self.max_context:
            raise ErnieEdgeError(f"start position {start} is outside the context [0, {self.max_context})")
        self.capacity = 0
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.cos = self.sin = np.zeros((0, cfg.dim_head // 2), np.float32)
        self.bound = None  # a backend's calls bound to these arrays (cpu_model.CpuModel._attention_steps)

    @property
    def used(self) -> int:
        """Cache slots in use (= length - start)."""
        return self.length - self.start

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def reserve(self, new_tokens: int) -> None:
        """Make room for `new_tokens` more positions, growing in chunks (copying what is there)."""
        need = self.used + new_tokens
        if self.length + new_tokens > self.max_context:
            raise ContextLengthError(f"{self.length + new_tokens} tokens exceed the context of {self.max_context}")
        if need <= self.capacity:
            return
        cap = min(-(-need // GROW_CHUNK) * GROW_CHUNK, -(-(self.max_context - self.start) // KV_BLOCK) * KV_BLOCK)
        cap = max(cap, need)
        check_kv_budget(self.cfg, cap - self.capacity, kv_dtype=self.kv_dtype)
        cfg = self.cfg
        for i in range(cfg.num_hidden_layers):
            k, v = new_kv_cache(cfg.num_key_value_heads, cap, cfg.dim_head, self.kv_dtype)
            if self.capacity:
                k[:, : self.k[i].shape[1]] = self.k[i]
                v[:, : self.v[i].shape[1]] = self.v[i]
                self.k[i], self.v[i] = k, v
            else:
                self.k.append(k)
                self.v.append(v)
        self.capacity = self.k[0].shape[1] * KV_TILE
        self.cos, self.sin = rope_tables(self.capacity, cfg.dim_head, cfg.rope_theta, start=self.start)

    def clone(self) -> "KVCache":
        """A new cache holding the same positions (its own arrays, sized for growth)."""
        new = KVCache(self.cfg, start=self.start, max_context=self.max_context, kv_dtype=self.kv_dtype)
        if self.used:
            new.reserve(self.used)
            tiles = -(-self.used // KV_TILE)
            for i in range(self.cfg.num_hidden_layers):
                new.k[i][:, :tiles] = self.k[i][:, :tiles]
                new.v[i][:, :tiles] = self.v[i][:, :tiles]
        new.length = self.length
        return new

    def truncate(self, length: int) -> None:
        """Forget positions >= length (their slots are overwritten by the next tokens)."""
        self.length = max(self.start, min(length, self.length))
