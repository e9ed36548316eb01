"""Where decode time goes: per-kernel wall time of decode steps on a converted model.

    .venv/bin/python benchmarks/profile_decode.py MODEL [--tokens 32] [--context 1024] [--kv-dtype f16|i8]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

import ernie_edge
from ernie_edge import cpu_model
from ernie_edge.kernels import attention, moe, norm, q4, q8

TIMES: dict[str, float] = defaultdict(float)


def timed(name, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - t
    return wrapper


def instrument() -> None:
    for mod, names in ((q4, ["q4_matvec", "q4_matvec3", "q4_experts_gate_up_silu", "q4_experts_down_weighted"]),
                       (q8, ["q8_matvec", "q8_matvec3", "q8_experts_gate_up_silu", "q8_experts_down_weighted",
                             "experts_pair_gate_up_silu", "experts_pair_down_weighted"]),
                       (attention, ["attention_decode", "kv_write"]), (moe, ["route"]),
                       (norm, ["rmsnorm", "add_rmsnorm", "silu_mul"])):
        for n in names:
            setattr(mod, n, timed(n, getattr(mod, n)))
    cpu_model.apply_rope = timed("apply_rope", cpu_model.apply_rope)
    cpu_model.embed_rows = timed("embed_rows", cpu_model.embed_rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--warm", type=int, default=256, help="prefill this many tokens first (maps the experts)")
    ap.add_argument("--kv-dtype", default="f16", choices=["f16", "i8"])
    a = ap.parse_args()
    model = ernie_edge.load(a.model, kv_dtype=a.kv_dtype)
    cache = model.new_cache()
    rng = np.random.default_rng(0)
    model.prefill(rng.integers(0, 1000, a.warm), cache)
    model.decode(1, cache)  # compile
    cache.reserve(a.context)
    # Attend over `context` positions. Fill the slots with real bytes: untouched zero pages would
    # all map to one shared page, and reading them would look faster than reading a real cache.
    fill = rng.integers(0x2000, 0x2C00, size=1 << 20, dtype=np.uint16)  # small positive fp16 bits
    for arr in cache.k + cache.v:
        flat = arr.reshape(-1)
        for s in range(0, flat.size, fill.size):
            n = min(fill.size, flat.size - s)
            flat[s:s + n] = fill[:n].astype(flat.dtype) if flat.dtype != np.uint16 else fill[:n]
    cache.length = max(cache.length, a.context)
    instrument()
    t = time.perf_counter()
    for _ in range(a.tokens):
        model.decode(int(rng.integers(0, 1000)), cache)
    total = time.perf_counter() - t
    print(f"{a.tokens / total:.2f} tok/s at context {a.context} ({a.kv_dtype} KV); ms per token:")
    for name, s in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {1e3 * s / a.tokens:8.2f}")
    print(f"  {'(python + other)':28s} {1e3 * (total - sum(TIMES.values())) / a.tokens:8.2f}")


if __name__ == "__main__":
    main()
