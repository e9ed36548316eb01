"""Quantization error and quantizer throughput of the q4 / q5 / q6 / q8 formats (ernie_edge/formats/quant.py).

    .venv/bin/python benchmarks/quant_error.py [--rows 1536] [--cols 2560] [--threads 2]

Error: relative RMS error ||w - deq|| / ||w|| and max |w - deq| / max |w| on gaussian and
Student-t (3 dof, heavy-tailed) matrices, for the searched scales and, as baselines, the plain
scales amax/7 and llama.cpp Q4_0's max/-8 (int4; int5 / int6: amax/15, max/-16 and amax/31,
max/-32) and amax/127 (int8). Throughput: weights per second of each quantizer on one thread, and
of quantize_q4 / quantize_q8 on --threads threads (the kernels release the GIL). Writes benchmarks/results/quant_error.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ernie_edge.formats.quant import (GROUP_SIZES, dequantize_q4, dequantize_q8, dequantize_qn,
                                      quantize_q4, quantize_q5, quantize_q6, quantize_q8, quantize_qn)

RESULTS = Path(__file__).parent / "results" / "quant_error.json"


def plain_scale_error(w: np.ndarray, bits: int, group_size: int, pivot_divisor: float, signed: bool) -> float:
    """Relative RMS error with scale = pivot / divisor (fp16), no search."""
    g = w.reshape(-1, group_size)
    pivot = g[np.arange(len(g)), np.argmax(np.abs(g), axis=1)]
    if not signed:
        pivot = np.abs(pivot)
    s = (pivot / pivot_divisor).astype(np.float16).astype(np.float32)[:, None]
    lo, hi = (-127, 127) if bits == 8 else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    codes = np.clip(np.rint(g / np.where(s != 0, s, 1)), lo, hi)
    return float(np.linalg.norm(g - codes * s) / np.linalg.norm(g))


def searched_error(w: np.ndarray, bits: int, group_size: int) -> tuple[float, float]:
    if bits == 4:
        deq = dequantize_q4(*quantize_q4(w, group_size), group_size)
    elif bits == 8:
        deq = dequantize_q8(*quantize_q8(w, group_size), group_size)
    else:
        deq = dequantize_qn(*quantize_qn(w, group_size, bits), group_size, bits)
    diff = w - deq
    return float(np.linalg.norm(diff) / np.linalg.norm(w)), float(np.abs(diff).max() / np.abs(w).max())


def throughput(fn, w: np.ndarray, group_size: int, threads: int, repeats: int = 3) -> float:
    """Weights per second, best of `repeats`; `threads` workers each quantize their own copy."""
    fn(w[:2], group_size)  # compile or load from cache
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(lambda _: fn(w, group_size), range(threads)))
            best = min(best, time.perf_counter() - t)
    return threads * w.size / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--cols", type=int, default=2560)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    data = {"gaussian": rng.standard_normal((a.rows, a.cols)).astype(np.float32),
            "student_t3": rng.standard_t(3, (a.rows, a.cols)).astype(np.float32)}
    rows = []
    for bits in (4, 5, 6, 8):
        top = 127 if bits == 8 else 1 << (bits - 1)  # plain scales: amax / (top - 1), Q4_0-style max / -top
        for g in GROUP_SIZES:
            row = {"format": f"int{bits}-sym-g{g}", "bits_per_weight": bits + 16.0 / g}
            for name, w in data.items():
                row[f"{name}_rel_rms"], row[f"{name}_max_rel"] = searched_error(w, bits, g)
                if bits == 8:
                    row[f"{name}_rel_rms_amax127"] = plain_scale_error(w, 8, g, 127.0, False)
                else:
                    row[f"{name}_rel_rms_amax{top - 1}"] = plain_scale_error(w, bits, g, top - 1.0, False)
                    row[f"{name}_rel_rms_q{bits}_0"] = plain_scale_error(w, bits, g, -float(top), True)
            rows.append(row)
    w = data["gaussian"]
    speed = {}
    for fn in (quantize_q4, quantize_q5, quantize_q6, quantize_q8):
        for g in GROUP_SIZES:
            speed[f"{fn.__name__} g{g} 1 thread"] = throughput(fn, w, g, 1)
        if fn in (quantize_q4, quantize_q8):
            speed[f"{fn.__name__} g32 {a.threads} threads"] = throughput(fn, w, 32, a.threads)
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
           "shape": [a.rows, a.cols], "seed": a.seed, "error": rows, "weights_per_s": speed}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")

    print("| format | bits/weight | rel RMS gaussian | (amax/(2^(b-1)-1) or amax/127) | (Q4_0-style max/-2^(b-1)) | rel RMS t3 | max err / max|w| (gaussian) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(v for k, v in r.items() if k.startswith("gaussian_rel_rms_amax"))
        q40 = next((v for k, v in r.items() if k.startswith("gaussian_rel_rms_q") and k.endswith("_0")), None)
        print(f"| {r['format']} | {r['bits_per_weight']:g} | {r['gaussian_rel_rms']:.4f} | {base:.4f} | "
              f"{'' if q40 is None else f'{q40:.4f}'} | {r['student_t3_rel_rms']:.4f} | {r['gaussian_max_rel']:.4f} |")
    for k, v in speed.items():
        print(f"{k}: {v / 1e6:.1f} M weights/s")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
