"""Decode attention on the real ERNIE-4.5-21B-A3B shapes (20 query heads, 4 KV heads, head dim 128)
at long context, fp16 vs int8 KV cache, and the quantized caches' accuracy on the small
synthetic model.

    .venv/bin/python benchmarks/attention.py [--quick] [--lengths 1024,4096,32768,131072]
        [--threads N] [--wait-quiet S] [--baseline-rev REV] [--no-kld]

Per-layer `attention_decode` time for one token, best of several calls, rotating over enough cache
copies (> 1.1 GB in all, more than the L3 cache) that every call reads its K/V from DRAM as a real
decode step does (28 layers' caches plus the expert weights in between). GB/s counts the K/V bytes of
the attended positions. Beside each, a bare read of the same caches (every byte XORed, one KV head per
thread, nothing computed) gives the memory floor on the machine as it is during the run. The
projection takes REST_MS = 100 ms/token for the rest of the model at 1k context:
token time(L) = REST_MS + 28 layers x attention(L); ratio = time(1k) / time(L).
--baseline-rev times the attention kernel of an older commit the same way (e.g. before the tiled
layout). KLD: decode 2 x 608 tokens (after a 32-token prompt) on the small synthetic model, each
cache vs the reference backend on the same (dequantized) weights, the quantized caches vs fp16, and,
for scale, the default recipe's int4/int8 weights and each cache vs the bf16 checkpoint itself.
Saves benchmarks/results/attention.json.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from numba import prange

from ernie_edge.kernels import _jit, attention, attention_ir
from ernie_edge.kernels._jit import pnjit
from _machine import best_time, machine_load, wait_quiet  # noqa: E402

NQ, NKV, D, LAYERS = 20, 4, 128, 28
# whole-model decode time per token at 1k context, attention excluded: 94-101 ms in
# benchmarks/profile_decode.py on 2026-12-06 (results/decode-context-*.json, "ms_per_token")
REST_MS = 100.0
COPY_BYTES = 1_100_000_000
RESULTS = Path(__file__).resolve().parent / "results" / "attention.json"


def random_caches(rng, length: int, kv_dtype: str, new_cache):
    """Enough copies of a filled cache for `length` positions to exceed COPY_BYTES."""
    k, v = new_cache(length, kv_dtype)
    if k.dtype == np.uint16:  # fp16 bits of values in [0.125, 1)
        k[...] = rng.integers(0x3000, 0x3C00, size=k.shape, dtype=np.uint16)
        v[...] = rng.integers(0x3000, 0x3C00, size=v.shape, dtype=np.uint16)
    else:
        kk = rng.standard_normal((length, NKV, D)).astype(np.float32)
        attention.kv_write(kk, kk, k, v, 0)
    n = max(2, -(-COPY_BYTES // (k.nbytes + v.nbytes)))
    return [(k, v)] + [(k.copy(), v.copy()) for _ in range(n - 1)]


@pnjit()
def _bare_read(k, v):
    """XOR of every 64-bit word of both caches ([Nkv, n] uint64 views), one KV head per work item: the
    memory floor of a decode step's attention, read in the same order and threads as the kernel."""
    nkv = k.shape[0]
    out = np.zeros(nkv, np.uint64)
    for g in prange(nkv):
        acc = np.uint64(0)
        for i in range(k.shape[1]):
            acc ^= k[g, i]
        for i in range(v.shape[1]):
            acc ^= v[g, i]
        out[g] = acc
    return out


def time_decode(decode, scratch_cls, new_cache, lengths, dtypes, reps, rng, bare_read: bool = False) -> dict:
    q = rng.standard_normal((NQ, D)).astype(np.float32)
    out = np.empty_like(q)
    res = {}
    for dt in dtypes:
        for length in lengths:
            caches = random_caches(rng, length, dt, new_cache)
            scratch = scratch_cls(NQ, D, length)
            state = {"i": 0}

            def call():
                state["i"] = (state["i"] + 1) % len(caches)
                k, v = caches[state["i"]]
                decode(q, k, v, length, out, scratch)

            t = best_time(call, reps if length < 100_000 else max(3, reps // 3))
            kv = attention.tile_elems(D, dt) * (2 if dt == "f16" else 1) * 2 * NKV * length // attention.KV_TILE
            res[f"{dt}_{length}"] = {"ms": round(t * 1e3, 4), "gb_s": round(kv / t / 1e9, 2), "kv_mib": round(kv / 2**20, 1)}
            line = f"  {dt:4s} {length:7d}: {t * 1e3:8.3f} ms  {kv / t / 1e9:6.1f} GB/s"
            if bare_read:  # the same caches read and nothing computed, timed the same way
                words = [(k.reshape(NKV, -1).view(np.uint64), v.reshape(NKV, -1).view(np.uint64)) for k, v in caches]

                def read():
                    state["i"] = (state["i"] + 1) % len(words)
                    _bare_read(*words[state["i"]])

                read()
                tr = best_time(read, reps if length < 100_000 else max(3, reps // 3))
                nbytes = caches[0][0].nbytes + caches[0][1].nbytes
                res[f"{dt}_{length}"].update(read_ms=round(tr * 1e3, 4), read_gb_s=round(nbytes / tr / 1e9, 2))
                line += f"   bare read {tr * 1e3:7.3f} ms  {nbytes / tr / 1e9:5.1f} GB/s"
            print(line, flush=True)
            del caches
    return res


def best_of_rounds(rounds: int, wait: float, fn) -> dict:
    """fn() -> {key: {"ms": ..}} repeated; keeps each key's fastest round (others only slow a run)."""
    best: dict = {}
    for _ in range(rounds):
        wait_quiet(wait)
        for key, val in fn().items():
            if key not in best or val["ms"] < best[key]["ms"]:
                best[key] = val
    return best


def projection(res: dict, dtypes, lengths) -> dict:
    proj = {}
    for dt in dtypes:
        base = f"{dt}_{lengths[0]}"
        if base not in res:
            continue
        t0 = REST_MS + LAYERS * res[base]["ms"]
        for length in lengths[1:]:
            t = REST_MS + LAYERS * res[f"{dt}_{length}"]["ms"]
            proj[f"{dt}_{length}_vs_{lengths[0]}"] = round(t0 / t, 3)
    return proj


def baseline_module(rev: str):
    """The attention module of an older commit: that commit's ernie_edge/kernels/ package, extracted
    to a temporary folder and imported as `attention_baseline` (its own kernel modules alongside)."""
    tar = subprocess.run(["git", "archive", rev, "ernie_edge/kernels"], capture_output=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    tmp = Path(tempfile.mkdtemp(prefix="attention_baseline_"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(tmp)
    (tmp / "ernie_edge" / "kernels").rename(tmp / "attention_baseline")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("attention_baseline.attention")


def kld_small_model(n_tokens: int = 640, prompt: int = 32) -> dict:
    """KLD of the quantized caches' logits vs the fp16 cache's (and all vs the reference backend)."""
    import ernie_edge
    from ernie_edge.kv_cache import KVCache
    from ernie_edge.quant import synthetic
    from ernie_edge.quant.convert import ConvertSettings, convert
    from ernie_edge.reference import softmax

    def kld(p_logits, q_logits):
        p, q = softmax(p_logits.astype(np.float64)), softmax(q_logits.astype(np.float64))
        return np.sum(p * (np.log(p + 1e-300) - np.log(q + 1e-300)), axis=-1)

    def stats(a, b):
        k = kld(a, b)
        return {"kld_mean": float(k.mean()), "kld_max": float(k.max()), "top1": float(np.mean(a.argmax(-1) == b.argmax(-1)))}

    with tempfile.TemporaryDirectory() as tmp:
        src = synthetic.write_checkpoint(Path(tmp) / "src", "small", layers=3)
        edge = convert(ConvertSettings(source=str(src), dest=Path(tmp) / "edge", progress=False))
        fast, ref = ernie_edge.load(edge), ernie_edge.load(edge, backend="reference")
        bf16 = ernie_edge.load(src, backend="reference")
        rng = np.random.default_rng(0)
        seqs = [rng.integers(0, fast.tokenizer.vocab_size, n_tokens) for _ in range(2)]
        runs = {}
        for dt in attention.KV_DTYPES:
            outs = []
            for ids in seqs:
                cache = KVCache(fast.config, kv_dtype=dt)
                outs.append(np.stack([fast.prefill(ids[:prompt], cache)]
                                     + [fast.decode(int(t), cache) for t in ids[prompt:-1]]))
            runs[dt] = np.concatenate(outs)
        want = np.concatenate([ref.logits(ids)[prompt - 1:-1] for ids in seqs])
        exact = np.concatenate([bf16.logits(ids)[prompt - 1:-1] for ids in seqs])
    res = {"model": "synthetic small, 3 layers", "tokens": int(len(want)), "prompt": prompt}
    for dt in attention.KV_DTYPES:
        res[f"{dt}_vs_reference"] = stats(want, runs[dt])
        if dt != "f16":
            res[f"{dt}_vs_f16"] = stats(runs["f16"], runs[dt])
    # the cost of the cache next to the cost of the weights' quantization (bf16 = the checkpoint)
    res["weights_vs_bf16"] = stats(exact, want)
    for dt in attention.KV_DTYPES:
        res[f"{dt}_vs_bf16"] = stats(exact, runs[dt])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--lengths", default="1024,4096,32768,131072")
    ap.add_argument("--threads", type=int, default=0, help="numba threads (default: all)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="on a shared machine, wait up to S seconds for other processes to go idle first")
    ap.add_argument("--baseline-rev", default="", help="also time the attention kernel of this git commit")
    ap.add_argument("--no-kld", action="store_true", help="skip the accuracy run on the small model")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every timing this many times (waiting for quiet before each) and keep the best")
    args = ap.parse_args(argv)
    if args.threads:
        _jit.set_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    reps = 5 if args.quick else 15
    wait_quiet(args.wait_quiet)
    rng = np.random.default_rng(0)
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "simd": _jit.SIMD, "nvec": attention_ir.NVEC,
                       "threads": _jit.get_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                       "load_before": machine_load()},
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "shape": {"nq": NQ, "nkv": NKV, "d": D, "layers": LAYERS},
           "rest_of_model_ms": REST_MS}
    print(f"simd={_jit.SIMD} nvec={attention_ir.NVEC} threads={_jit.get_threads()} load={res['machine']['load_before']}")
    if args.baseline_rev:
        old = baseline_module(args.baseline_rev)
        print(f"baseline {args.baseline_rev} (fp16):")
        res["baseline"] = {"rev": args.baseline_rev}
        res["baseline"]["decode"] = best_of_rounds(args.rounds, args.wait_quiet, lambda: time_decode(
            old.attention_decode, old.DecodeScratch, lambda n, dt: old.new_kv_cache(NKV, n, D), lengths, ["f16"],
            reps, rng))
        res["baseline"]["projected_ratio"] = projection(res["baseline"]["decode"], ["f16"], lengths)
    print("current:")
    res["decode"] = best_of_rounds(args.rounds, args.wait_quiet, lambda: time_decode(
        attention.attention_decode, attention.DecodeScratch, lambda n, dt: attention.new_kv_cache(NKV, n, D, dt),
        lengths, list(attention.KV_DTYPES), reps, rng, bare_read=True))
    res["projected_ratio"] = projection(res["decode"], list(attention.KV_DTYPES), lengths)
    res["rounds"] = args.rounds
    print("projected whole-model decode speed vs the first length:", res["projected_ratio"])
    res["machine"]["load_after"] = machine_load()
    if not args.no_kld:
        res["accuracy"] = kld_small_model()
        print(json.dumps(res["accuracy"], indent=1))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    print(f"saved {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
