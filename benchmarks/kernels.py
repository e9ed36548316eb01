"""Micro-benchmarks of ernie_edge.kernels on the real ERNIE-4.5-21B-A3B shapes.

    .venv/bin/python benchmarks/kernels.py [--quick] [--no-loaded] [--threads N] [--out PATH]

Random quantized weights are generated directly as packed bytes + fp16 scales (no converter).
Weights are spread over several copies (> the CPU caches) and rotated, so every call streams
from DRAM as a real decode step does. Each figure is the best of several repeats (other processes
on a shared machine only ever make a run slower). Prints GB/s of weight bytes, an estimated
full-model decode speed (27 MoE layers + the dense layer 0 + lm head), prefill estimates, and the
same decode estimate with a busy process loading one core. The `*_hot_*` cases keep their weights
in the L2 cache: they measure the arithmetic ceiling of the matvec kernels, not DRAM. Saves
benchmarks/results/kernels.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ernie_edge.bench import _read_sum
from ernie_edge.kernels import _jit, attention, moe, norm, q4, q8, qbatch, rope
from _machine import best_time, machine_load, wait_quiet  # noqa: E402

H, NQ, NKV, D = 2560, 20, 4, 128
E, K_ROUTED, I_EXP, I_SHARED, I_DENSE = 64, 6, 1536, 3072, 12288
VOCAB, N_MOE_LAYERS = 103424, 27
G = 32
RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"


# ---- random quantized weights ----------------------------------------------------------------

def q4_weight(rng, *shape):
    """packed uint8 [*shape[:-1], K/2] + fp16 scales as uint16 [*shape[:-1], K/G]."""
    *lead, k = shape
    packed = rng.integers(0, 256, size=(*lead, k // 2), dtype=np.uint8)
    scales = (rng.random((*lead, k // G), dtype=np.float32) * 0.02 + 0.001).astype(np.float16).view(np.uint16)
    return packed, scales


def q8_weight(rng, *shape):
    *lead, k = shape
    codes = rng.integers(-127, 128, size=(*lead, k), dtype=np.int8)
    scales = (rng.random((*lead, k // G), dtype=np.float32) * 0.002 + 0.0001).astype(np.float16).view(np.uint16)
    return codes, scales


def nbytes(*arrays) -> int:
    return sum(a.nbytes for a in arrays)


class Rotating:
    """Call fn(copy_i) over n copies so consecutive calls touch different memory."""

    def __init__(self, copies, fn):
        self.copies, self.fn, self.i = copies, fn, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.copies)
        self.fn(self.copies[self.i])


# ---- decode ------------------------------------------------------------------------------------

def decode_benchmarks(rng, reps: int, copies: int) -> dict:
    r = {}
    x = rng.standard_normal(H).astype(np.float32)
    act = q8.ActScratch(max(H, I_DENSE), rows=K_ROUTED)

    # routed experts: one layer's banks; random distinct experts per call
    gate = q4_weight(rng, E, I_EXP, H)
    up = q4_weight(rng, E, I_EXP, H)
    down = q4_weight(rng, E, H, I_EXP)
    h = np.empty((K_ROUTED, I_EXP), np.float32)
    out = np.empty(H, np.float32)
    wts = np.full(K_ROUTED, 1.0 / K_ROUTED, np.float32)
    id_sets = [np.sort(rng.choice(E, K_ROUTED, replace=False)) for _ in range(64)]
    state = {"i": 0}

    def experts_gate_up():
        state["i"] = (state["i"] + 1) % len(id_sets)
        q8.experts_gate_up_silu(x, gate[0], gate[1], up[0], up[1], id_sets[state["i"]], h, act, 4)

    def experts_down():
        state["i"] = (state["i"] + 1) % len(id_sets)
        q8.experts_down_weighted(h, down[0], down[1], id_sets[state["i"]], wts, out, act, 4)

    per_expert_gu = 2 * nbytes(gate[0][0], gate[1][0])
    per_expert_d = nbytes(down[0][0], down[1][0])
    r["q4_experts_gate_up_silu_6"] = timed(experts_gate_up, reps, K_ROUTED * per_expert_gu, E * per_expert_gu)
    r["q4_experts_down_weighted_6"] = timed(experts_down, reps, K_ROUTED * per_expert_d, E * per_expert_d)
    del gate, up, down

    # int8 matvecs: attention projections, shared expert, dense MLP, lm head
    def q8_case(name, o, k, n_copies, fn=None):
        ws = [q8_weight(rng, o, k) for _ in range(n_copies)]
        xin = rng.standard_normal(k).astype(np.float32)
        y = np.empty(o, np.float32)
        call = Rotating(ws, lambda w: q8.q8_matvec(xin, w[0], w[1], y, act))
        r[name] = timed(call, reps, nbytes(*ws[0]), n_copies * nbytes(*ws[0]))

    q8_case("q8_matvec_q_proj_2560x2560", H, H, copies)
    q8_case("q8_matvec_kv_proj_512x2560", NKV * D, H, copies * 4)
    q8_case("q8_matvec_o_proj_2560x2560", H, H, copies)
    qkv = [(q8_weight(rng, H, H), q8_weight(rng, NKV * D, H), q8_weight(rng, NKV * D, H)) for _ in range(copies)]
    yq, yk, yv = np.empty(H, np.float32), np.empty(NKV * D, np.float32), np.empty(NKV * D, np.float32)
    call = Rotating(qkv, lambda m: q8.q8_matvec3(x, *m[0], yq, *m[1], yk, *m[2], yv, act))
    qkv_bytes = nbytes(*qkv[0][0], *qkv[0][1], *qkv[0][2])
    r["q8_matvec3_qkv_3584x2560"] = timed(call, reps, qkv_bytes, copies * qkv_bytes)
    del qkv
    q8_case("q8_matvec_shared_down_2560x3072", H, I_SHARED, copies)
    q8_case("q8_matvec_dense_down_2560x12288", H, I_DENSE, 2)
    q8_case("q8_matvec_lm_head_103424x2560", VOCAB, H, 1)

    # cache-resident weights (~0.65 MB): the kernels' arithmetic throughput
    hot4 = q4_weight(rng, 512, H)
    y4 = np.empty(512, np.float32)
    r["q4_matvec_hot_512x2560"] = timed(lambda: q8.matvec(x, hot4[0], hot4[1], y4, act, 4), 20 * reps, nbytes(*hot4))
    hot8 = q8_weight(rng, 256, H)
    y8 = np.empty(256, np.float32)
    r["q8_matvec_hot_256x2560"] = timed(lambda: q8.q8_matvec(x, hot8[0], hot8[1], y8, act), 20 * reps, nbytes(*hot8))

    # shared expert / dense gate+up as a 1-expert bank in one region
    def gate_up_case(name, inter, n_copies):
        banks = [(q8_weight(rng, 1, inter, H), q8_weight(rng, 1, inter, H)) for _ in range(n_copies)]
        hh = np.empty((1, inter), np.float32)
        ids = np.zeros(1, np.int64)
        call = Rotating(banks, lambda b: q8.q8_experts_gate_up_silu(x, b[0][0], b[0][1], b[1][0], b[1][1], ids, hh, act))
        r[name] = timed(call, reps, nbytes(*banks[0][0], *banks[0][1]), n_copies * nbytes(*banks[0][0], *banks[0][1]))

    gate_up_case("q8_shared_gate_up_silu_2x3072x2560", I_SHARED, copies)
    gate_up_case("q8_dense_gate_up_silu_2x12288x2560", I_DENSE, 1)

    # router, norms, rope
    wg = rng.standard_normal((E, H)).astype(np.float32) * 0.02
    bias = np.zeros(E, np.float32)
    idx, w = np.empty((1, K_ROUTED), np.int64), np.empty((1, K_ROUTED), np.float32)
    r["router_fp32_64x2560"] = timed(lambda: moe.route(x, wg, bias, K_ROUTED, idx, w), reps, wg.nbytes)
    hs = rng.standard_normal((1, H)).astype(np.float32)
    nw = np.ones(H, np.float32)
    xn = np.empty_like(hs)
    r["add_rmsnorm_2560"] = timed(lambda: norm.add_rmsnorm(hs, xn, nw, 1e-5, xn), reps, 0)
    cos, sin = rope.rope_tables(4096, D, 500000.0)
    qk = rng.standard_normal((1, NQ + NKV, D)).astype(np.float32)
    r["rope_q_and_k_1_token"] = timed(lambda: rope.apply_rope(qk, np.array([1000]), cos, sin), reps, 0)

    # decode attention over the fp16 cache
    qd = rng.standard_normal((NQ, D)).astype(np.float32)
    od = np.empty_like(qd)
    for length in (1024, 32768):
        kc, vc = attention.new_kv_cache(NKV, length, D)
        kc[...] = rng.integers(0x3000, 0x3C00, size=kc.shape, dtype=np.uint16)
        vc[...] = rng.integers(0x3000, 0x3C00, size=vc.shape, dtype=np.uint16)
        sc = attention.DecodeScratch(NQ, D, length)
        r[f"attention_decode_{length}"] = timed(
            lambda: attention.attention_decode(qd, kc, vc, length, od, sc), reps, kc.nbytes + vc.nbytes)
    return r


def timed(fn, reps, weight_bytes, footprint: int = 0) -> dict:
    """Best time of fn; with a footprint (the bytes its calls rotate over), also the bare-read floor:
    the best time to read weight_bytes from a buffer of that size with the same threads
    (`read_floor`), and floor_fraction = floor / kernel time (1.0: the kernel reads at the floor)."""
    t = best_time(fn, reps)
    gbs = weight_bytes / t / 1e9 if weight_bytes else None
    out = {"us": round(t * 1e6, 1), "GB_s": None if gbs is None else round(gbs, 2)}
    if footprint:
        floor = read_floor(weight_bytes, footprint, reps)
        out.update(floor_us=round(floor * 1e6, 1), floor_fraction=round(floor / t, 3))
    return out


def read_floor(nbytes: int, footprint: int, reps: int) -> float:
    """Seconds to read nbytes (the bandwidth probe of `ernie-edge bench`, bench._read_sum: a
    STREAM-style sum with the kernels' threads), rotating over a buffer of `footprint` bytes as the
    kernel benchmarks rotate over their weight copies."""
    rows = max(1, nbytes // 256)  # float32 [rows, 64]
    buf = np.ones((max(rows, footprint // 256), 64), np.float32)
    n = buf.shape[0] // rows
    nt = _jit.get_threads()
    parts = [buf[i * rows:(i + 1) * rows] for i in range(n)]
    return best_time(Rotating(parts, lambda a: _read_sum(a, nt)), reps)


def decode_estimate(r: dict, attention_len: int = 1024) -> dict:
    """Seconds per decoded token: 27 MoE layers + layer 0 (dense MLP) + lm head, from the pieces."""
    us = {k: v["us"] for k, v in r.items()}
    attn = (us["q8_matvec3_qkv_3584x2560"] + us["q8_matvec_o_proj_2560x2560"]
            + us[f"attention_decode_{attention_len}"] + us["rope_q_and_k_1_token"] + 2 * us["add_rmsnorm_2560"])
    moe_layer = (us["router_fp32_64x2560"] + us["q4_experts_gate_up_silu_6"] + us["q4_experts_down_weighted_6"]
                 + us["q8_shared_gate_up_silu_2x3072x2560"] + us["q8_matvec_shared_down_2560x3072"])
    dense_layer = us["q8_dense_gate_up_silu_2x12288x2560"] + us["q8_matvec_dense_down_2560x12288"]
    total = N_MOE_LAYERS * (attn + moe_layer) + (attn + dense_layer) + us["add_rmsnorm_2560"] \
        + us["q8_matvec_lm_head_103424x2560"]
    return {"attention_len": attention_len, "ms_per_token": round(total / 1e3, 2),
            "tokens_per_s": round(1e6 / total, 2),
            "ms_attention_layer": round(attn / 1e3, 3), "ms_moe_layer": round(moe_layer / 1e3, 3)}


# ---- prefill -----------------------------------------------------------------------------------

def prefill_benchmarks(rng, reps: int, T: int = 512) -> dict:
    r = {}
    X = rng.standard_normal((T, H)).astype(np.float32)
    w8 = q8_weight(rng, H, H)
    y = np.empty((T, H), np.float32)
    t = best_time(lambda: q8.q8_matmul(X, w8[0], w8[1], y), reps)
    r["q8_matmul_T512_2560x2560"] = {"us": round(t * 1e6), "GFLOP_s": round(2 * T * H * H / t / 1e9, 1)}
    w4 = q4_weight(rng, I_EXP, H)
    y4 = np.empty((T, I_EXP), np.float32)
    t = best_time(lambda: q4.q4_matmul(X, w4[0], w4[1], y4), reps)
    r["q4_matmul_T512_1536x2560"] = {"us": round(t * 1e6), "GFLOP_s": round(2 * T * I_EXP * H / t / 1e9, 1)}

    # one MoE layer's routed experts for T tokens (6 of 64 each, uniform random routing), as the prefill
    # runs them (qbatch.qexperts)
    gate, up, down = q4_weight(rng, E, I_EXP, H), q4_weight(rng, E, I_EXP, H), q4_weight(rng, E, H, I_EXP)
    idx = np.stack([rng.choice(E, K_ROUTED, replace=False) for _ in range(T)])
    wts = np.full((T, K_ROUTED), 1.0 / K_ROUTED, np.float32)
    out = np.empty((T, H), np.float32)
    t = best_time(lambda: qbatch.qexperts(X, idx, wts, gate[0], gate[1], up[0], up[1], down[0], down[1], out, 4),
                  max(1, reps // 3))
    flops = 2 * T * K_ROUTED * 3 * I_EXP * H
    r["q4_experts_prefill_T512"] = {"us": round(t * 1e6), "GFLOP_s": round(flops / t / 1e9, 1)}

    # causal attention of T new tokens over the cache
    kc, vc = attention.new_kv_cache(NKV, T, D)
    kc[...] = rng.integers(0x3000, 0x3C00, size=kc.shape, dtype=np.uint16)
    vc[...] = rng.integers(0x3000, 0x3C00, size=vc.shape, dtype=np.uint16)
    qa = rng.standard_normal((T, NQ, D)).astype(np.float32)
    oa = np.empty_like(qa)
    t = best_time(lambda: attention.attention_prefill(qa, kc, vc, 0, oa), reps)
    r["attention_prefill_T512"] = {"us": round(t * 1e6)}
    return r


def prefill_estimate(r: dict, T: int = 512) -> dict:
    """Seconds for a T-token prompt: matmuls at the measured GFLOP/s + routed experts + attention."""
    q8_flops = r["q8_matmul_T512_2560x2560"]["GFLOP_s"] * 1e9
    dense_params = 2 * H * H + 2 * NKV * D * H + 3 * I_SHARED * H  # per MoE layer, int8
    moe_layer = (2 * T * dense_params / q8_flops + r["q4_experts_prefill_T512"]["us"] / 1e6
                 + r["attention_prefill_T512"]["us"] / 1e6)
    layer0 = 2 * T * (2 * H * H + 2 * NKV * D * H + 3 * I_DENSE * H) / q8_flops + r["attention_prefill_T512"]["us"] / 1e6
    lm_head = 2 * VOCAB * H / q8_flops  # logits of the last token only (T=1 is memory-bound; rough)
    total = N_MOE_LAYERS * moe_layer + layer0 + lm_head
    return {"T": T, "seconds": round(total, 2), "tokens_per_s": round(T / total, 1)}


# ---- threading overhead ------------------------------------------------------------------------

def region_overhead(reps: int = 2000) -> float:
    """Microseconds per empty parallel region (numba thread pool wake-up + join)."""
    from numba import prange

    @_jit.numba.njit(parallel=True)
    def empty(a):
        for i in prange(a.shape[0]):
            a[i] += 1.0

    a = np.zeros(2, np.float32)
    empty(a)
    t = time.perf_counter()
    for _ in range(reps):
        empty(a)
    return round((time.perf_counter() - t) / reps * 1e6, 1)


def start_busy_process(seconds: float) -> subprocess.Popen:
    """A process spinning one core for at most `seconds` (it also stops when we kill it)."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, skip prefill")
    ap.add_argument("--no-loaded", action="store_true", help="skip the run with a busy process")
    ap.add_argument("--threads", type=int, default=0, help="numba threads (default: all)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="on a shared machine, wait up to S seconds for other processes to go idle first")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"where to save the results (default {RESULTS})")
    args = ap.parse_args(argv)
    if args.threads:
        _jit.set_threads(args.threads)
    reps, copies = (5, 4) if args.quick else (15, 8)
    wait_quiet(args.wait_quiet)
    rng = np.random.default_rng(0)
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "simd": _jit.SIMD,
                       "threads": _jit.get_threads(), "threading_layer_env": os.environ.get("NUMBA_THREADING_LAYER"),
                       "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_before": machine_load()},
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    res["region_overhead_us"] = region_overhead()
    print(f"simd={_jit.SIMD} threads={_jit.get_threads()} machine load before: {res['machine']['load_before']}")
    print(f"empty parallel region: {res['region_overhead_us']} us")
    dec = decode_benchmarks(rng, reps, copies)
    res["decode"] = dec
    for k, v in dec.items():
        print(f"  {k:42s} {v['us']:10.1f} us   " + (f"{v['GB_s']:6.2f} GB/s" if v["GB_s"] else "")
              + (f"   bare read {v['floor_us']:8.1f} us ({v['floor_fraction']:.2f} of it)" if "floor_us" in v else ""))
    res["decode_estimate"] = [decode_estimate(dec, 1024), decode_estimate(dec, 32768)]
    for est in res["decode_estimate"]:
        print(f"decode estimate @ {est['attention_len']} ctx: {est['ms_per_token']} ms/token = {est['tokens_per_s']} tok/s")
    if not args.quick:
        pre = prefill_benchmarks(rng, 3)
        res["prefill"] = pre
        for k, v in pre.items():
            print(f"  {k:42s} {v}")
        res["prefill_estimate"] = prefill_estimate(pre)
        print(f"prefill estimate 512 tokens: {res['prefill_estimate']}")
    if not args.no_loaded:
        busy = start_busy_process(600)
        try:
            time.sleep(0.2)
            res["loaded"] = {"region_overhead_us": region_overhead(500)}
            dl = decode_benchmarks(rng, reps, copies)
            res["loaded"]["decode"] = dl
            res["loaded"]["decode_estimate"] = decode_estimate(dl, 1024)
        finally:
            busy.kill()
            busy.wait()
        print(f"with a busy process: empty region {res['loaded']['region_overhead_us']} us, "
              f"decode {res['loaded']['decode_estimate']['tokens_per_s']} tok/s")
        for k in ("q4_experts_gate_up_silu_6", "q8_matvec3_qkv_3584x2560", "q8_matvec_lm_head_103424x2560"):
            print(f"  {k:42s} {dl[k]['us']:10.1f} us   {dl[k]['GB_s']} GB/s")
    res["machine"]["load_after"] = machine_load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
