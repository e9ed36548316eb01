"""GQA attention over an fp16 or int8 KV cache (docs/ERNIE_SPEC.md §3.2): the public names, in one
place. The code lives in:

  kv_layout.py          the cache's tile layout: new_kv_cache, kv_write, kv_read, element offsets
  attention_ir.py       the LLVM vector IR of scores and P.V (fp16 and integer int8 paths)
  attention_decode.py   one query over the cache (memory-bound; online softmax per position range),
                        and a layer's whole decode step (RoPE, the cache write, attention) as one call
  attention_prefill.py  blocked causal attention of T new tokens
"""

from __future__ import annotations

from .attention_decode import DecodeScratch, attention_decode, bind_decode_step, check_step
from .attention_prefill import attention_prefill
from .kv_layout import KV_BLOCK, KV_DTYPES, KV_TILE, cache_dtype, kv_read, kv_write, new_kv_cache, tile_elems

__all__ = ["DecodeScratch", "attention_decode", "bind_decode_step", "check_step",
           "attention_prefill", "KV_BLOCK", "KV_DTYPES", "KV_TILE",
           "cache_dtype", "kv_read", "kv_write", "new_kv_cache", "tile_elems"]
