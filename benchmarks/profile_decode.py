"""Where decode time goes: per-kernel wall time of decode steps on a converted model.

    .venv/bin/python benchmarks/profile_decode.py MODEL [--tokens 32] [--context 1024 [32768 ...]]
        [--rounds 3] [--kv-dtype f16|i8] [--json OUT]

With several contexts (one cache each, filled to that length), rounds alternate between them in one
process, so their ratio is measured under the same machine load (the long-context goal: decode at 32k vs 1k):
the reported ratio is the median over rounds of each round's paired ratio (use many short rounds,
e.g. --tokens 8 --rounds 15, on a machine whose speed drifts).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np

import ernie_edge
from ernie_edge import cpu_model, cpu_weights
from ernie_edge.kernels import attention
from _machine import machine_load  # noqa: E402

TIMES: dict[str, float] = defaultdict(float)


def timed(name, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - t
    return wrapper


def _timed_call(call):
    """A bound decode call (cpu_model.DecodePlan) timed under its kernel's name; a block's calls in
    order (cpu_weights.in_order) each under their own."""
    if isinstance(call, partial) and call.func is cpu_weights._run_in_order:
        return cpu_weights.in_order(*(_timed_call(c) for c in call.args[0]))
    fn = call.func if isinstance(call, partial) else call
    name = getattr(fn, "__name__", type(fn).__name__)
    module = getattr(fn, "__module__", "") or ""
    label = f"q56.{name}" if module.endswith("q56") else name
    return timed(label, call)


def instrument(model) -> None:
    """Time decode's calls where decode makes them: the bound calls of the DecodePlan and of the
    attention steps (decode calls no module-level kernel wrapper, so timing those too would count a
    checked fallback twice), and the embedding row (bound too)."""
    backend = model.backend
    if isinstance(backend, cpu_model.CpuModel):
        plan = backend._decode_plan()
        plan.embed_row = timed("embed_row", plan.embed_row)
        for calls in (plan.qkv, plan.o, plan.mlp, plan.post_norm, plan.next_norm):
            calls[:] = [_timed_call(c) for c in calls]
        plan.lm_head, plan.in_norm = _timed_call(plan.lm_head), _timed_call(plan.in_norm)
        bound_steps = cpu_model.CpuModel._attention_steps  # RoPE, kv_write and attention, one call a layer

        def steps(self, cache):
            return [timed("decode_step (rope, kv_write, attention)", s) for s in bound_steps(self, cache)]
        cpu_model.CpuModel._attention_steps = steps


def fill_cache(model, cache, context: int, rng, headroom: int) -> None:
    """Make the cache attend over `context` positions holding real keys and values (random normal,
    written by kv_write as a prefill would: untouched zero pages would all map to one shared page,
    and random bytes in an int8 cache would make NaN scales). Room is reserved for `headroom` more
    tokens, so that no timed decode step grows (copies) the cache."""
    cfg = model.config
    cache.reserve(context + headroom - cache.length)
    chunk = rng.standard_normal((4096, cfg.num_key_value_heads, cfg.dim_head)).astype(np.float32)
    for layer in range(cfg.num_hidden_layers):
        for s in range(cache.used, context - cache.start, 4096):
            n = min(4096, context - cache.start - s)
            attention.kv_write(chunk[:n], chunk[:n], cache.k[layer], cache.v[layer], s)
    cache.length = max(cache.length, context)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--context", type=int, nargs="+", default=[1024],
                    help="one or more contexts; with several, rounds alternate between them and the "
                         "speed ratios to the first are reported (e.g. --context 1024 32768)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds when several contexts are given")
    ap.add_argument("--warm", type=int, default=256, help="prefill this many tokens first (maps the experts)")
    ap.add_argument("--kv-dtype", default="f16", choices=["f16", "i8"])
    ap.add_argument("--json", default="", help="save the figures here")
    a = ap.parse_args()
    model = ernie_edge.load(a.model, kv_dtype=a.kv_dtype)
    rng = np.random.default_rng(0)
    caches = {}
    for ctx in a.context:
        cache = model.new_cache()
        model.prefill(rng.integers(0, 1000, a.warm), cache)
        model.decode(1, cache)  # compile
        fill_cache(model, cache, ctx, rng, headroom=a.tokens)
        caches[ctx] = (cache, cache.length)
    instrument(model)
    speeds: dict[int, list[float]] = {ctx: [] for ctx in a.context}
    kernel_s: dict[int, dict[str, float]] = {ctx: defaultdict(float) for ctx in a.context}  # summed over rounds
    total_s: dict[int, float] = defaultdict(float)
    for _ in range(a.rounds if len(a.context) > 1 else 1):
        for ctx, (cache, length) in caches.items():
            cache.truncate(length)
            TIMES.clear()
            t = time.perf_counter()
            for _ in range(a.tokens):
                model.decode(int(rng.integers(0, 1000)), cache)
            total = time.perf_counter() - t
            speeds[ctx].append(a.tokens / total)
            total_s[ctx] += total
            for name, sec in TIMES.items():
                kernel_s[ctx][name] += sec
    for ctx in a.context:
        print(f"{np.median(speeds[ctx]):.2f} tok/s at context {ctx} ({a.kv_dtype} KV; median of {len(speeds[ctx])}"
              f" rounds: {', '.join(f'{v:.2f}' for v in speeds[ctx])})")
    # ms per token of each kernel, averaged over every round at each context
    steps = a.tokens * len(speeds[a.context[0]])
    profile = {str(ctx): {name: round(1e3 * sec / steps, 3) for name, sec in kernel_s[ctx].items()} for ctx in a.context}
    for ctx in a.context:
        profile[str(ctx)]["(python + other)"] = round(1e3 * (total_s[ctx] - sum(kernel_s[ctx].values())) / steps, 3)
        profile[str(ctx)]["total"] = round(1e3 * total_s[ctx] / steps, 3)
    print("ms per token (mean of all rounds):")
    print(f"  {'':28s}" + "".join(f"{ctx:>10d}" for ctx in a.context))
    for name in sorted(profile[str(a.context[-1])], key=lambda n: -profile[str(a.context[-1])][n] if n != "total" else 0):
        print(f"  {name:28s}" + "".join(f"{profile[str(ctx)].get(name, 0.0):10.2f}" for ctx in a.context))
    # Each round's ratio pairs runs seconds apart, so it is the figure least moved by the shared
    # machine's drift; their median is reported (the ratio of the medians is kept beside it).
    base = np.array(speeds[a.context[0]])
    ratios = {f"{ctx}_vs_{a.context[0]}": round(float(np.median(np.array(speeds[ctx]) / base)), 3)
              for ctx in a.context[1:]}
    ratio_of_medians = {f"{ctx}_vs_{a.context[0]}": round(float(np.median(speeds[ctx]) / np.median(base)), 3)
                        for ctx in a.context[1:]}
    if ratios:
        print("decode speed ratios (median of the rounds' paired ratios):", ratios)
        print("ratio of the median speeds:", ratio_of_medians)
    if a.json:
        res = {"model": a.model, "kv_dtype": a.kv_dtype, "tokens": a.tokens, "load": machine_load(),
               "decode_tok_s": {str(ctx): speeds[ctx] for ctx in a.context}, "ratios": ratios,
               "ratio_of_medians": ratio_of_medians, "rounds": len(base), "ms_per_token": profile,
               "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        Path(a.json).write_text(json.dumps(res, indent=1))
        print(f"saved {a.json}")


if __name__ == "__main__":
    main()
