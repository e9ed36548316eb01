"""Decode and prefill speed of several converted folders (recipes) of one model, in ONE process,
interleaved: round after round, each model prefills a prompt and decodes some tokens, so that the
shared machine's drift hits all of them alike. The figure to read is the per-round ratio to the
first model (median over rounds), not the absolute speed.

    python benchmarks/recipe_speed.py benchmarks/work/full-L4-q4g32-d8 benchmarks/work/full-L4-q4g128-d6-s5g32 \
        [--rounds 7] [--prompt 128] [--tokens 16] [--threads 2]
Writes benchmarks/results/recipe-speed-<first folder name>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402

import ernie_edge  # noqa: E402
from ernie_edge.formats.budget import recipe_bytes  # noqa: E402
from ernie_edge.formats.recipe import Recipe  # noqa: E402
from ernie_edge.kernels._jit import set_threads  # noqa: E402
from ernie_edge.manifest import read_manifest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def one_round(model, ids: np.ndarray, tokens: int) -> tuple[float, float]:
    """(prefill seconds, median decode seconds per token) of one fresh conversation."""
    cache = model.new_cache()
    t = time.perf_counter()
    logits = model.prefill(ids, cache)
    prefill = time.perf_counter() - t
    steps = []
    for _ in range(tokens):
        t = time.perf_counter()
        logits = model.decode(int(np.argmax(logits)), cache)
        steps.append(time.perf_counter() - t)
    return prefill, statistics.median(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    set_threads(a.threads)
    models = {Path(m).name: ernie_edge.load(m) for m in a.models}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, next(iter(models.values())).config.vocab_size, a.prompt)
    for m in models.values():  # compile or load the kernels, touch the pages
        one_round(m, ids[:8], 2)
    rows = {name: {"prefill_s": [], "decode_s": []} for name in models}
    for r in range(a.rounds):
        for name, m in models.items():
            p, d = one_round(m, ids, a.tokens)
            rows[name]["prefill_s"].append(p)
            rows[name]["decode_s"].append(d)
        print(f"round {r + 1}: " + "  ".join(f"{n} {1e3 * rows[n]['decode_s'][-1]:.1f} ms" for n in models), flush=True)
    first = next(iter(models))
    out = {"machine": machine(), "threads": a.threads, "prompt": a.prompt, "tokens": a.tokens, "rounds": a.rounds,
           "models": {}}
    for name, m in models.items():
        manifest = read_manifest(a.models[list(models).index(name)])
        gb = recipe_bytes(Recipe.from_dict(manifest.recipe), m.config)["total"] / 1e9
        ratio = [x / y for x, y in zip(rows[name]["decode_s"], rows[first]["decode_s"])]
        pratio = [x / y for x, y in zip(rows[name]["prefill_s"], rows[first]["prefill_s"])]
        out["models"][name] = {**rows[name], "weights_gb_per_token": gb,
                               "decode_ms_median": 1e3 * statistics.median(rows[name]["decode_s"]),
                               "decode_time_ratio_to_first": statistics.median(ratio),
                               "prefill_time_ratio_to_first": statistics.median(pratio)}
        print(f"{name:<32} {gb:.3f} GB/token  decode {out['models'][name]['decode_ms_median']:.1f} ms/token "
              f"(x{statistics.median(ratio):.3f} of {first})  prefill x{statistics.median(pratio):.3f}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"recipe-speed-{first}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
