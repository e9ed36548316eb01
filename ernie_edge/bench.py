"""`ernie-edge bench`: speed and memory of a converted model on this machine, in one process.

Figures (keys of --json): prefill_tok_s, decode_tok_s, ttft_s, load_s, jit_s, peak_rss_bytes,
anon_rss_bytes, file_rss_bytes, weights_bytes_per_token, read_bandwidth_gbs, bandwidth_fraction
(= decode_tok_s x weights_bytes_per_token / read bandwidth: how close decode runs to the memory bus);
weights_read_gbs and weights_bandwidth_fraction, the same against a plain read of the bytes decode
reads, through the model's own mapping (`token_read_gbs`; null but on the CPU with the whole model in
memory);
also decode_ms_p50 / decode_ms_p90, the median and 90th percentile of the decode steps' times (on
a shared machine the median is the steadier figure for comparing code versions). jit_s is the
CPU backend's warm-up (ernie_edge/kernel_warmup.py): every kernel compiled on a first run (numba's
cache then holds them) or loaded from the cache, plus its throwaway pass.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
from numba import prange

from .errors import ErnieEdgeError
from .kernels._jit import get_threads, pnjit


@dataclass(frozen=True)
class BenchSettings:
    model: str
    prompt_tokens: int = 512
    gen_tokens: int = 128
    threads: int | None = None
    seed: int = 0
    max_context: int | None = None
    kv_dtype: str = "f16"  # KV cache storage (model.load's kv_dtype)
    device: str = "cpu"  # cpu | cuda | auto (model.load's device, ernie_edge/placement.py)
    gpu_experts: str | int | None = None  # MoE layers whose routed experts go on the GPU
    probe_bytes: int = 1 << 30  # size of the read-bandwidth probe (larger than any CPU cache)


@pnjit()
def _read_sum(a2, nt):
    # a2 [n, 64] float32: one contiguous share per each of nt threads, 64 independent accumulators
    # (LLVM turns them into vector adds), so the loop is limited by memory, not by an add chain.
    n = a2.shape[0]
    parts = np.zeros((nt, 64), np.float32)
    step = (n + nt - 1) // nt
    for t in prange(nt):
        acc = np.zeros(64, np.float32)
        for i in range(t * step, min(n, (t + 1) * step)):
            for j in range(64):
                acc[j] += a2[i, j]
        parts[t] = acc
    return parts.sum()


def read_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """STREAM-style read bandwidth (GB/s) with the kernels' thread count: best of `repeats`.
    (Checked against numpy's sgemv over a 1 GiB matrix: 28.8 vs 29.2 GB/s on the project machine.)"""
    a = np.ones((nbytes // 4 // 64, 64), np.float32)
    nt = get_threads()
    _read_sum(a[:16], nt)  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        _read_sum(a, nt)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def memory_status() -> dict:
    """RssAnon / RssFile / VmHWM of this process from /proc (Linux), in bytes."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        import psutil
        info = psutil.Process().memory_info()
        out = {"RssAnon": info.rss, "RssFile": 0, "VmHWM": info.rss}
    return out


@pnjit()
def _read_pieces(pieces, nt):
    # pieces: uint64 [n, 64] arrays, whole 512-byte blocks; thread t reads the t-th share of every
    # piece, in order, into 64 independent integer sums (random bytes as floats could be denormals,
    # which are slow to add; 32-bit lanes read ~30 % slower here than 64-bit ones). Indexed [i, j],
    # not [64 i + j]: the flat index was not vectorized on AMD Zen 4 (9.5 GB/s against 53 for the
    # same 1 GiB, docs/PERF.md "Measuring on a shared VM").
    parts = np.zeros((nt, 64), np.uint64)
    for t in prange(nt):
        acc = np.zeros(64, np.uint64)
        for p in range(len(pieces)):
            a = pieces[p]
            n = a.shape[0]
            for i in range(t * n // nt, (t + 1) * n // nt):
                for j in range(64):
                    acc[j] += a[i, j]
        parts[t] = acc
    return parts.sum()


def _whole_blocks(a: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array as uint64 [n, 64], cut to whole 512-byte blocks."""
    b = a.reshape(-1).view(np.uint8)
    return b[: b.size // 512 * 512].view(np.uint64).reshape(-1, 64)


def _dense_qtensors(model):
    """Every dense (non-expert) stored tensor, by HF name: the ones decode reads whole each token."""
    ck = model.weights
    for name in ck.manifest.tensors:
        if name.startswith("model."):  # routed-expert banks are layers.LL.experts.*
            yield name, ck.qtensor(name)


def _dense_pieces(model) -> list[np.ndarray]:
    """The dense tensors' bytes (data and scales) in whole blocks, where decode reads them: the LM
    head's rows from its tiled copy when the CPU backend made one (cpu_weights.TiledHead)."""
    tiles = getattr(getattr(model.backend, "lm_head", None), "tiles", None)
    pieces = []
    for name, q in _dense_qtensors(model):
        data = tiles if name == "model.embed_tokens.weight" and tiles is not None else q.data
        pieces += [_whole_blocks(a) for a in (data, q.scales) if a is not None]
    return pieces


def _expert_pieces(model, rng) -> list[np.ndarray]:
    """k experts per MoE layer drawn at random: their gate, up and down bytes in whole blocks."""
    ck, cfg = model.weights, model.config
    pieces = []
    for layer in cfg.moe_layers:
        banks = [ck.expert_bank(layer, proj) for proj in ("gate", "up", "down")]
        for e in rng.choice(cfg.moe_num_experts, cfg.moe_k, replace=False):
            pieces += [_whole_blocks(a[e]) for q in banks for a in (q.data, q.scales) if a is not None]
    return pieces


def _token_pieces(model, rng, dense: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """The weights one decode step reads (as `weights_bytes_per_token` counts them, less the one
    embedding row): every dense tensor (`dense`, when already listed), then k random experts per
    MoE layer."""
    return (_dense_pieces(model) if dense is None else dense) + _expert_pieces(model, rng)


def token_read_gbs(model, tokens: int = 8, passes: int = 3, seed: int = 0) -> float | None:
    """The read ceiling of the model's own weight pages: GB/s at which a plain read loop (one parallel
    region, the kernels' thread count) reads what `tokens` decode steps read, k random experts per MoE
    layer each, over the same memory mapping; the best of `passes` such passes (other experts each
    time), as the fresh-array probe takes its best. On a virtual machine, memory far apart can read
    at very different speeds (docs/PERF.md, "Measuring on a shared VM"): the 1 GiB probe of a fresh
    array is the bus's best case, this is the ceiling for the bytes decode actually reads. None when
    the model has no whole 512-byte block to read."""
    from numba.typed import List
    rng = np.random.default_rng(seed)
    nt = get_threads()
    dense = _dense_pieces(model)  # the same every token
    _read_pieces(List(_token_pieces(model, rng, dense)), nt)  # compile, and a first touch
    best = None
    for _ in range(passes):
        steps = [List(_token_pieces(model, rng, dense)) for _ in range(tokens)]
        nbytes = sum(p.nbytes for step in steps for p in step)
        if nbytes == 0:
            return None
        t = time.perf_counter()
        for step in steps:
            _read_pieces(step, nt)
        gbs = nbytes / (time.perf_counter() - t) / 1e9
        best = gbs if best is None else max(best, gbs)
    return best


def weights_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every dense tensor, the embedding row, the LM head,
    and k routed experts per MoE layer."""
    ck, cfg = model.weights, model.config
    total = 0
    for name, q in _dense_qtensors(model):  # the routed-expert banks are counted below
        if name == "model.embed_tokens.weight":
            total += q.nbytes + q.nbytes // cfg.vocab_size  # LM head matvec + one embedding row
        else:
            total += q.nbytes
    for layer in cfg.moe_layers:
        banks = [ck.expert_bank(layer, p) for p in ("gate", "up", "down")]
        per_expert = sum(t.nbytes for t in banks) // cfg.moe_num_experts
        total += cfg.moe_k * per_expert
    return total


def check_settings(s: BenchSettings) -> None:
    """Bad numbers and unconverted models are ErnieEdgeErrors, found before anything is loaded."""
    from .model_dir import resolve
    from .models_store import conversion_advice
    if s.prompt_tokens < 1 or s.gen_tokens < 1:
        raise ErnieEdgeError(f"bench needs --prompt-tokens >= 1 and --gen-tokens >= 1, got "
                             f"{s.prompt_tokens} and {s.gen_tokens}")
    if s.max_context is not None and s.max_context < s.prompt_tokens + s.gen_tokens:
        raise ErnieEdgeError(f"bench --ctx-size {s.max_context} does not hold --prompt-tokens {s.prompt_tokens} "
                             f"+ --gen-tokens {s.gen_tokens}")
    location = resolve(s.model)
    if location.kind != "edge":
        raise ErnieEdgeError(conversion_advice(s.model, location, reference_ok=False))


def run_bench(s: BenchSettings, log=sys.stderr) -> dict:
    from . import load
    from .generate import stream_generate
    check_settings(s)
    rng = np.random.default_rng(s.seed)

    t = time.perf_counter()
    model = load(s.model, threads=s.threads, max_context=s.max_context, kv_dtype=s.kv_dtype, device=s.device,
                 gpu_experts=s.gpu_experts)
    load_s = time.perf_counter() - t
    vocab = model.tokenizer.vocab_size

    if model.backend_name == "cpu":  # every kernel path compiled (first run) or loaded, with progress
        from .kernel_warmup import console_warm_up
        jit_s = console_warm_up(model, log)
    else:
        t = time.perf_counter()
        cache = model.new_cache()
        model.prefill(rng.integers(0, vocab, 3), cache)
        model.decode(1, cache)
        jit_s = time.perf_counter() - t

    from .generate import PromptCache, Session, render_prompt
    from .sampling import SamplingParams
    short = render_prompt(model, prompt="Hello!")
    t = time.perf_counter()
    int(np.argmax(model.prefill(short, model.new_cache())))
    ttft_cold_s = time.perf_counter() - t
    # As the chat does it: the template's shared opening block is computed once at start-up.
    session = Session(model, prefix=PromptCache.for_chat(model))
    t = time.perf_counter()
    next(stream_generate(model, short, SamplingParams(temperature=0.0, max_tokens=1), session=session))
    ttft_s = time.perf_counter() - t

    print(f"prefill: {s.prompt_tokens} tokens ...", file=log, flush=True)
    prompt = rng.integers(0, vocab, s.prompt_tokens)
    cache = model.new_cache()
    t = time.perf_counter()
    logits = model.prefill(prompt, cache)
    prefill_s = time.perf_counter() - t

    print(f"decode: {s.gen_tokens} tokens ...", file=log, flush=True)
    steps = np.empty(s.gen_tokens)
    t = time.perf_counter()
    for i in range(s.gen_tokens):
        t_step = time.perf_counter()
        logits = model.decode(int(np.argmax(logits[:vocab])), cache)
        steps[i] = time.perf_counter() - t_step
    decode_s = time.perf_counter() - t
    mem = memory_status()

    print("read bandwidth probes ...", file=log, flush=True)
    bw = read_bandwidth_gbs(s.probe_bytes)
    wbytes = weights_bytes_per_token(model)
    decode_tok_s = s.gen_tokens / decode_s
    # Only over pages in memory: of a model larger than RAM it would time the disk (and read
    # gigabytes from it).
    files = getattr(model.weights, "files", {})
    resident = bool(files) and (mem.get("RssFile") or 0) >= 0.9 * sum(f.file_size for f in files.values())
    token_bw = token_read_gbs(model, seed=s.seed) if model.backend_name == "cpu" and resident else None
    return {
        "model": str(model.path), "backend": model.backend_name, "threads": get_threads(),
        "prompt_tokens": s.prompt_tokens, "gen_tokens": s.gen_tokens,
        "prefill_tok_s": s.prompt_tokens / prefill_s, "decode_tok_s": decode_tok_s,
        "decode_ms_p50": 1e3 * float(np.median(steps)), "decode_ms_p90": 1e3 * float(np.percentile(steps, 90)),
        "ttft_s": ttft_s, "ttft_cold_s": ttft_cold_s, "ttft_prompt_tokens": len(short),
        "ttft_cached_tokens": len(session.prefix.ids), "load_s": load_s, "jit_s": jit_s,
        "peak_rss_bytes": mem.get("VmHWM"), "anon_rss_bytes": mem.get("RssAnon"),
        "file_rss_bytes": mem.get("RssFile"), "kv_dtype": s.kv_dtype, "kv_cache_bytes": cache.nbytes(),
        "weights_bytes_per_token": wbytes, "read_bandwidth_gbs": bw,
        "bandwidth_fraction": decode_tok_s * wbytes / (bw * 1e9),
        "weights_read_gbs": token_bw,
        "weights_bandwidth_fraction": None if token_bw is None else decode_tok_s * wbytes / (token_bw * 1e9),
        "device": model.backend_name, "placement": _placement(model),
    }


def _placement(model) -> dict | None:
    """Where a CUDA model's weights are (None on the CPU)."""
    plan = model.placement
    if plan is None:
        return None
    return {"gpu": plan.gpu_name, "gpu_expert_layers": list(plan.gpu_expert_layers),
            "cpu_expert_layers": list(plan.cpu_expert_layers), "gpu_bytes_estimate": plan.gpu_bytes}


def format_bench(r: dict) -> str:
    gb = 1e9
    return "\n".join([
        f"model            {r['model']} ({r['backend']}, {r['threads']} threads)",
        *([f"placement        GPU {r['placement']['gpu']}: routed experts of {len(r['placement']['gpu_expert_layers'])} "
           f"MoE layers on the GPU, {len(r['placement']['cpu_expert_layers'])} on the CPU"] if r.get("placement") else []),
        f"prefill          {r['prefill_tok_s']:.2f} tok/s ({r['prompt_tokens']} tokens)",
        f"decode           {r['decode_tok_s']:.2f} tok/s ({r['gen_tokens']} tokens; per token: median "
        f"{r['decode_ms_p50']:.1f} ms, 90th percentile {r['decode_ms_p90']:.1f} ms)",
        f"time to 1st tok  {r['ttft_s']:.3f} s (short chat prompt of {r['ttft_prompt_tokens']} tokens, "
        f"{r['ttft_cached_tokens']} of them the template's cached opening); "
        f"{r['ttft_cold_s']:.3f} s with nothing cached",
        f"load / jit       {r['load_s']:.2f} s / {r['jit_s']:.2f} s",
        f"memory           peak {r['peak_rss_bytes'] / gb:.2f} GB, anonymous {r['anon_rss_bytes'] / gb:.2f} GB, "
        f"file-backed {r['file_rss_bytes'] / gb:.2f} GB; KV cache {r['kv_cache_bytes'] / gb:.3f} GB ({r['kv_dtype']})",
        f"weights/token    {r['weights_bytes_per_token'] / gb:.3f} GB",
        f"read bandwidth   {r['read_bandwidth_gbs']:.1f} GB/s -> bandwidth fraction {r['bandwidth_fraction']:.2f}",
        *([f"weights read     {r['weights_read_gbs']:.1f} GB/s (a plain read of decode's bytes, same pages) -> "
           f"fraction {r['weights_bandwidth_fraction']:.2f}"] if r.get("weights_read_gbs") else []),
    ])
