"""The CUDA backend on a real NVIDIA GPU: full-model parity with the CPU path, and speed at three
placements. Run by benchmarks/gpu_check.sh (which first runs the CUDA tests without the simulator).

    python benchmarks/gpu_check.py [--layers 4] [--prompt-tokens 512] [--gen-tokens 64]

1. parity: the `tiny` synthetic model (the real 20/4 head layout), converted; logits of two
   prompts and 8 greedy decode steps, CUDA vs CPU backend: max KL divergence must be <= 1e-4.
2. speed: a full-width synthetic model (the real 21B shapes, --layers layers; 28 is the real depth)
   built here, converted, then `ernie-edge bench` with --device cuda at --gpu-experts all, half of
   the MoE layers (14 at 28 layers) and none, and once on the CPU alone.
Writes benchmarks/results/gpu-<gpu name>.json (and a copy under $OUT when that is set) with the
GPU's name, the CPU's model and flags, and every figure. Exits 1 if parity fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _machine import machine  # noqa: E402  (benchmarks/ is this script's folder: sys.path[0])

CLI = [sys.executable, "-m", "ernie_edge.cli"]
KLD_LIMIT = 1e-4


def kld(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp = p_logits - p_logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = q_logits - q_logits.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return float((np.exp(lp) * (lp - lq)).sum(-1).max())


def parity(work: Path) -> dict:
    import ernie_edge
    from ernie_edge.quant import synthetic
    from ernie_edge.quant.convert import ConvertSettings, convert
    src = synthetic.write_checkpoint(work / "tiny-src", "tiny", force=True)
    edge = convert(ConvertSettings(source=str(src), dest=work / "tiny-edge", progress=False, force=True))
    cpu = ernie_edge.load(edge)
    gpu = ernie_edge.load(edge, device="cuda")
    rng = np.random.default_rng(0)
    worst, top1 = 0.0, True
    for n in (32, 300):
        ids = rng.integers(0, cpu.config.vocab_size, n)
        a, b = cpu.logits(ids), gpu.logits(ids)
        worst = max(worst, kld(a, b))
        top1 &= bool((a.argmax(-1) == b.argmax(-1)).mean() >= 0.99)
    c_cpu, c_gpu = cpu.new_cache(), gpu.new_cache()
    a, b = cpu.prefill(ids[:20], c_cpu), gpu.prefill(ids[:20], c_gpu)
    for _ in range(8):
        worst = max(worst, kld(a[None], b[None]))
        token = int(np.argmax(a))
        a, b = cpu.decode(token, c_cpu), gpu.decode(token, c_gpu)
    return {"max_kld": worst, "limit": KLD_LIMIT, "top1_agree": top1, "ok": worst <= KLD_LIMIT}


def build_full(work: Path, layers: int) -> Path:
    src, edge = work / f"full-L{layers}-src", work / f"full-L{layers}"
    if not (edge / "manifest.json").exists():
        t = time.time()
        subprocess.run([*CLI, "synth", str(src), "--preset", "full", "--layers", str(layers), "--force"], check=True)
        subprocess.run([*CLI, "convert", str(src), str(edge), "--force"], check=True)
        shutil.rmtree(src, ignore_errors=True)
        print(f"built the full-width {layers}-layer model in {time.time() - t:.0f} s", flush=True)
    return edge


def bench(edge: Path, work: Path, name: str, flags: list[str], prompt: int, gen: int) -> dict:
    out = work / f"bench-{name}.json"
    proc = subprocess.run([*CLI, "bench", "--model", str(edge), "--prompt-tokens", str(prompt), "--gen-tokens",
                           str(gen), "--json", str(out), *flags], capture_output=True, text=True)
    print(proc.stdout + proc.stderr, flush=True)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    r = json.loads(out.read_text())
    keep = ("device", "placement", "prefill_tok_s", "decode_tok_s", "decode_ms_p50", "decode_ms_p90", "ttft_s",
            "load_s", "jit_s", "weights_bytes_per_token", "prompt_tokens", "gen_tokens")
    return {k: r.get(k) for k in keep}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="layers of the full-width model (28: the real depth)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("GPU_CHECK_WORK", "/tmp/ernie-edge-gpu-check")))
    ap.add_argument("--skip-speed", action="store_true", help="parity only")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    from ernie_edge.placement import probe_gpu
    gpu, why = probe_gpu()
    if gpu is None or gpu.simulated:
        print(f"no usable GPU: {why or 'the simulator'}", file=sys.stderr)
        return 2
    report = {"gpu": gpu.name, "gpu_total_bytes": gpu.total_bytes, "cpu": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "layers": a.layers}
    t = time.time()
    report["parity"] = parity(a.work)
    report["parity"]["seconds"] = round(time.time() - t, 1)
    print("parity:", report["parity"], flush=True)
    if not a.skip_speed:
        edge = build_full(a.work, a.layers)
        from ernie_edge.config import ErnieConfig
        n_moe = len(ErnieConfig.from_file(edge / "config.json").moe_layers)
        runs = {"gpu-all": ["--device", "cuda", "--gpu-experts", "all"],
                f"gpu-{n_moe // 2}": ["--device", "cuda", "--gpu-experts", str(n_moe // 2)],
                "gpu-none": ["--device", "cuda", "--gpu-experts", "none"],
                "cpu": ["--device", "cpu"]}
        report["bench"] = {}
        for name, flags in runs.items():
            prompt, gen = (a.prompt_tokens, a.gen_tokens) if name != "cpu" else (min(a.prompt_tokens, 128), 16)
            report["bench"][name] = bench(edge, a.work, name, flags, prompt, gen)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu.name).strip("-").lower()
    text = json.dumps(report, indent=2) + "\n"
    out = ROOT / "benchmarks" / "results" / f"gpu-{slug}.json"
    out.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], out.name).write_text(text)
    print(text)
    return 0 if report["parity"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
