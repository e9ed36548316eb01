"""kernels/qbatch.py (int16-activation small-batch matmuls) against the exact prefill kernels
(q4_matmul / q8_matmul, for the experts applied to each hit expert's tokens) on the real
ERNIE-4.5-21B-A3B shapes.

    .venv/bin/python benchmarks/qbatch.py [--quick] [--threads N] [--out PATH]

For each T the two kernels of a case run interleaved, best of several repeats each, so a shared
machine slows both alike; the ratio old / qbatch is the figure to read (> 1: qbatch is faster).
The crossover per case is the largest measured T at which qbatch is still faster. Routing for
the expert cases is random top-6 of 64 (uniform: every expert gets ~T*6/64 tokens). Saves
benchmarks/results/qbatch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from ernie_edge.kernels import _jit, norm, q4, q8, qbatch

H, E, K_ROUTED, I_EXP, I_DENSE = 2560, 64, 6, 1536, 12288
G = 32
RESULTS = Path(__file__).resolve().parent / "results" / "qbatch.json"


def weight(rng, bits, *shape):
    *lead, k = shape
    if bits == 4:
        w = rng.integers(0, 256, size=(*lead, k // 2), dtype=np.uint8)
    else:
        w = rng.integers(-127, 128, size=(*lead, k), dtype=np.int8)
    s = (rng.random((*lead, k // G), dtype=np.float32) * 0.02 + 0.001).astype(np.float16)
    return w, s


def interleaved_best(fns, reps):
    """Best wall time of each fn, run round-robin reps times after one warm-up call each."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def matmul_case(rng, bits, o, k, ts, reps):
    w, s = weight(rng, bits, o, k)
    old = q4.q4_matmul if bits == 4 else q8.q8_matmul
    rows = []
    for T in ts:
        X = rng.standard_normal((T, k)).astype(np.float32)
        out = np.empty((T, o), np.float32)
        tq, to = interleaved_best([lambda: qbatch.qmatmul(X, w, s, out, bits), lambda: old(X, w, s, out)], reps)
        rows.append({"T": T, "qbatch_ms": round(tq * 1e3, 3), "old_ms": round(to * 1e3, 3),
                     "speedup": round(to / tq, 2), "qbatch_weight_GB_s": round((w.nbytes + s.nbytes) / tq / 1e9, 1),
                     "qbatch_GMAC_s": round(T * o * k / tq / 1e9, 1)})
        print(f"  T={T:4d}  qbatch {tq * 1e3:8.2f} ms  old {to * 1e3:8.2f} ms  x{to / tq:5.2f}  "
              f"({rows[-1]['qbatch_weight_GB_s']} GB/s, {rows[-1]['qbatch_GMAC_s']} GMAC/s)", flush=True)
    return rows


def exact_experts(x, idx, wts, gate, up, down, out, bits):
    """The exact float32 path: each hit expert's tokens through q4_matmul / q8_matmul (dequantized
    tiles + sgemm), the outputs added in ascending expert id."""
    matmul = q4.q4_matmul if bits == 4 else q8.q8_matmul
    out[...] = 0.0
    for e in np.unique(idx):
        rows, slots = np.nonzero(idx == e)
        xe = np.ascontiguousarray(x[rows])  # [n, H]
        g = np.empty((len(rows), gate[0].shape[1]), np.float32)  # [n, I]
        u = np.empty_like(g)
        matmul(xe, gate[0][e], gate[1][e], g)
        matmul(xe, up[0][e], up[1][e], u)
        norm.silu_mul(g, u, g)
        y = np.empty((len(rows), x.shape[1]), np.float32)  # [n, H]
        matmul(g, down[0][e], down[1][e], y)
        out[rows] += y * wts[rows, slots][:, None]
    return out


def experts_case(rng, bits, ts, reps):
    gate, up, down = weight(rng, bits, E, I_EXP, H), weight(rng, bits, E, I_EXP, H), weight(rng, bits, E, H, I_EXP)
    rows = []
    for T in ts:
        x = rng.standard_normal((T, H)).astype(np.float32)
        idx = np.stack([rng.permutation(E)[:K_ROUTED] for _ in range(T)])
        wts = np.full((T, K_ROUTED), 1 / K_ROUTED, np.float32)
        out = np.empty_like(x)
        fq = lambda: qbatch.qexperts(x, idx, wts, *gate, *up, *down, out, bits)  # noqa: E731
        fo = lambda: exact_experts(x, idx, wts, gate, up, down, out, bits)  # noqa: E731
        tq, to = interleaved_best([fq, fo], reps)
        hit = len(np.unique(idx))
        nbytes = hit * sum(a[0][0].nbytes + a[1][0].nbytes for a in (gate, up, down))
        rows.append({"T": T, "experts_hit": hit, "qbatch_ms": round(tq * 1e3, 3), "old_ms": round(to * 1e3, 3),
                     "speedup": round(to / tq, 2), "qbatch_weight_GB_s": round(nbytes / tq / 1e9, 1)})
        print(f"  T={T:4d}  qbatch {tq * 1e3:8.2f} ms  old {to * 1e3:8.2f} ms  x{to / tq:5.2f}  "
              f"({hit} experts, {rows[-1]['qbatch_weight_GB_s']} GB/s)", flush=True)
    return rows


def crossover(rows):
    """Largest measured T up to which qbatch is faster at every measured T (0: never)."""
    best = 0
    for r in rows:
        if r["speedup"] <= 1.0:
            break
        best = r["T"]
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and token counts")
    ap.add_argument("--threads", type=int, default=0, help="numba threads (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        _jit.set_threads(args.threads)
    ts = [1, 8, 32, 128] if args.quick else [1, 8, 16, 32, 48, 64, 96, 128, 512]
    reps = 2 if args.quick else 4
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()[0]
    cases = {}
    for name, bits, o, k in (("q8_q_proj_2560x2560", 8, H, H), ("q8_dense_up_12288x2560", 8, I_DENSE, H),
                             ("q4_expert_up_1536x2560", 4, I_EXP, H), ("q4_q_proj_2560x2560", 4, H, H)):
        print(name, flush=True)
        cases[name] = matmul_case(rng, bits, o, k, ts, reps)
    for bits in (4, 8):
        name = f"q{bits}_experts_64x_k6_2560_1536"
        print(name, flush=True)
        cases[name] = experts_case(rng, bits, ts, reps)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "simd": _jit.SIMD,
                    "threads": _jit.get_threads(), "load_before": round(load_before, 2),
                    "load_after": round(os.getloadavg()[0], 2)},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "note": "speedup = old / qbatch, both best-of-reps run interleaved; crossover = largest T "
                "with speedup > 1 at every smaller measured T",
        "crossover_T": {name: crossover(rows) for name, rows in cases.items()},
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["crossover_T"], indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
