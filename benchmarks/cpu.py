"""CPU benchmark on the real ERNIE-4.5-21B-A3B shapes (synthetic weights: honest for speed and
memory, not for quality).

    .venv/bin/python benchmarks/cpu.py            # full 28-layer model (~44 GB bf16 synthesised once,
                                                  #   converted, source deleted unless --keep-source)
    .venv/bin/python benchmarks/cpu.py --quick    # 4-layer full-width model
    options: --recipe q4g32-d4-h6 (default: the converter's default recipe), --threads 1 2,
             --prompt-tokens, --gen-tokens

Each run is a fresh `ernie-edge bench` process (real RSS and JIT-cache behaviour). Results go to
benchmarks/results/cpu-<model>.json and into the README table between the bench markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results"
CLI = [sys.executable, "-m", "ernie_edge.cli"]
MARK_BEGIN, MARK_END = "<!-- bench:cpu:begin -->", "<!-- bench:cpu:end -->"


def sh(*args) -> None:
    print("+", " ".join(map(str, args)), flush=True)
    subprocess.run([*CLI, *map(str, args)], check=True, cwd=ROOT)


def ensure_model(layers: int, recipe: str, keep_source: bool) -> Path:
    """The synthetic full-width model at `layers` layers, converted with `recipe` (under WORK)."""
    src = WORK / f"full-L{layers}"
    dst = WORK / f"full-L{layers}-{recipe}"
    if (dst / "manifest.json").is_file():
        return dst
    if not (src / "config.json").is_file():
        need = 1.75e9 * layers + 0.6e9
        free = shutil.disk_usage(WORK.parent).free
        if free < need * 1.35:
            sys.exit(f"not enough disk: {free / 1e9:.0f} GB free, ~{need * 1.35 / 1e9:.0f} GB needed")
        sh("synth", src, "--preset", "full", "--layers", layers)
    t = time.perf_counter()
    sh("convert", src, dst, "--recipe", recipe, "--force")
    print(f"converted in {time.perf_counter() - t:.0f} s")
    if not keep_source and layers > 4:
        shutil.rmtree(src)
    return dst


def run_bench(model: Path, threads: int, prompt_tokens: int, gen_tokens: int) -> dict:
    out = WORK / f"bench-{model.name}-t{threads}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    subprocess.run([*CLI, "bench", "--model", model, "--threads", str(threads), "--prompt-tokens",
                    str(prompt_tokens), "--gen-tokens", str(gen_tokens), "--json", out],
                   check=True, cwd=ROOT, env=env)
    return json.loads(out.read_text())


def table(rows: list[dict]) -> str:
    lines = ["| model | threads | prefill tok/s | decode tok/s | decode ms/token (median) | ttft s | jit s | "
             "anon RSS GB | weights GB/token | read GB/s | bandwidth fraction |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p50 = f"{r['decode_ms_p50']:.0f}" if "decode_ms_p50" in r else "-"
        lines.append(f"| {Path(r['model']).name} | {r['threads']} | {r['prefill_tok_s']:.2f} | "
                     f"{r['decode_tok_s']:.2f} | {p50} | {r['ttft_s']:.2f} | {r['jit_s']:.1f} | "
                     f"{r['anon_rss_bytes'] / 1e9:.2f} | {r['weights_bytes_per_token'] / 1e9:.3f} | "
                     f"{r['read_bandwidth_gbs']:.1f} | {r['bandwidth_fraction']:.2f} |")
    return "\n".join(lines)


def update_readme(text: str, begin: str = MARK_BEGIN, end: str = MARK_END) -> None:
    """Replace the README's text between the markers `begin` and `end` (if present) with `text`."""
    readme = ROOT / "README.md"
    body = readme.read_text()
    if begin in body:
        head, _, rest = body.partition(begin)
        _, _, tail = rest.partition(end)
        readme.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4-layer full-width model")
    ap.add_argument("--recipe", default=None, help="conversion recipe (default: the converter's default)")
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--keep-source", action="store_true")
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    from ernie_edge.formats.recipe import Recipe
    model = ensure_model(4 if a.quick else 28, a.recipe or Recipe.default().name, a.keep_source)
    rows = [run_bench(model, t, a.prompt_tokens, a.gen_tokens) for t in a.threads]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"cpu-{model.name}.json"
    out.write_text(json.dumps(rows, indent=2))
    text = table(rows)
    print(text)
    print(f"saved {out}")
    all_rows = []
    for f in sorted(RESULTS.glob("cpu-*.json")):
        all_rows += json.loads(f.read_text())
    update_readme(table(all_rows))


if __name__ == "__main__":
    main()
