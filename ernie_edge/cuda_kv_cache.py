"""The CUDA backend's KV cache: float16 keys and values per layer in GPU memory, in the layout of
ernie_edge/kernels/cuda/norm_rope.py (K [Nkv, D, S] positions innermost, V [Nkv, S, D]), grown in
chunks as the conversation grows. The same interface as kv_cache.KVCache (length, start, used,
reserve, clone, truncate), so sessions, prompt caches and the engine use either.

Index i of the cache holds position start + i.
"""

from __future__ import annotations

import numpy as np

from .config import ErnieConfig
from .errors import ContextLengthError, ErnieEdgeError
from .kernels.cuda import norm_rope

GROW_CHUNK = 1024  # positions added per growth step


class CudaKVCache:
    kv_dtype = "f16"

    def __init__(self, cfg: ErnieConfig, start: int = 0, max_context: int | None = None):
        self.cfg = cfg
        self.start = start
        self.length = start
        self.max_context = min(max_context or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if not 0 <= start < self.max_context:
            raise ErnieEdgeError(f"start position {start} is outside the context [0, {self.max_context})")
        self.capacity = 0
        self.k: list = []
        self.v: list = []

    @property
    def used(self) -> int:
        return self.length - self.start

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def reserve(self, new_tokens: int) -> None:
        """Room for `new_tokens` more positions (a larger cache, the old positions copied over)."""
        if self.length + new_tokens > self.max_context:
            raise ContextLengthError(f"{self.length + new_tokens} tokens exceed the context of {self.max_context}")
        need = self.used + new_tokens
        if need > self.capacity:
            cap = min(-(-need // GROW_CHUNK) * GROW_CHUNK, self.max_context - self.start)
            self._resize(max(cap, need), self.used)

    def _resize(self, capacity: int, keep: int) -> None:
        from numba import cuda
        cfg = self.cfg
        new_k, new_v = [], []
        for i in range(cfg.num_hidden_layers):
            k = cuda.device_array((cfg.num_key_value_heads, cfg.dim_head, capacity), np.float16)
            v = cuda.device_array((cfg.num_key_value_heads, capacity, cfg.dim_head), np.float16)
            if keep:
                norm_rope.kv_copy(self.k[i], self.v[i], k, v, keep)
            new_k.append(k)
            new_v.append(v)
        self.k, self.v, self.capacity = new_k, new_v, capacity

    def clone(self) -> "CudaKVCache":
        new = CudaKVCache(self.cfg, start=self.start, max_context=self.max_context)
        if self.used:
            new.k, new.v = self.k, self.v  # copied by the resize below, never shared
            new._resize(self.capacity, self.used)
        new.length = self.length
        return new

    def truncate(self, length: int) -> None:
        self.length = max(self.start, min(length, self.length))
