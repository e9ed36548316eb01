"""Converter benchmark: throughput, peak memory and size at real ERNIE shapes; quantization quality
(KL divergence, top-1 agreement) on small synthetic models.

    .venv/bin/python benchmarks/convert.py [--layers 4 8] [--threads 1 2] [--skip-full] [--skip-quality]

Speed: synthetic checkpoints with the real 21B shapes and `--layers` layers (`synth --preset full`,
built once under benchmarks/work/, git-ignored) are converted in a child process per thread count
(two depths show that peak memory does not grow with depth).
We record input GB/s (source bytes / wall time), the child's peak RSS (ru_maxrss, and psutil
sampling every 50 ms), output bytes and bits per weight, and `verify` MB/s (warm page cache).

Quality: tiny and small synthetic models converted with int4 / int8 experts at group 32 / 64 / 128
and compared with their bf16 source by quant/evaluate.py. Random weights make these numbers honest
for comparing recipes with each other, not for predicting the real model's quality.

Writes benchmarks/results/convert.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work"
RESULTS = ROOT / "results" / "convert.json"

CHILD = """
import json, resource, sys, time
from pathlib import Path
from ernie_edge.quant.convert import ConvertSettings, convert
t = time.perf_counter()
convert(ConvertSettings(source=sys.argv[1], dest=Path(sys.argv[2]), threads=int(sys.argv[3]), progress=False))
print(json.dumps({"seconds": time.perf_counter() - t,
                  "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


# ---- speed at full width ---------------------------------------------------------------------------

def build_full(layers: int) -> Path:
    from ernie_edge.quant import synthetic
    src = WORK / f"full-L{layers}"
    if (src / "model.safetensors.index.json").is_file():
        return src
    need = 2.2e9 * layers + 2e9  # bf16 source, with margin
    free = shutil.disk_usage(WORK.parent).free
    if free < 2.5 * need:
        sys.exit(f"not enough disk for the full-width benchmark: need ~{2.5 * need / 1e9:.0f} GB, "
                 f"{free / 1e9:.0f} GB free")
    print(f"building {src} (synthetic full shapes, {layers} layers) ...", flush=True)
    shutil.rmtree(src, ignore_errors=True)
    synthetic.write_checkpoint(src, "full", layers=layers, progress=sys.stderr.isatty())
    return src


def convert_in_child(src: Path, dest: Path, threads: int) -> dict:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(dest.with_name(dest.name + ".partial"), ignore_errors=True)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(dest), str(threads)],
                            stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode:
        sys.exit(f"conversion failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["psutil_peak_rss_bytes"] = peak[0]
    return result


def speed(layers: int, thread_counts: list[int]) -> dict:
    from ernie_edge.hf_checkpoint import HFCheckpoint
    from ernie_edge.manifest import describe, sha256_file

    src = build_full(layers)
    source_bytes = HFCheckpoint(src).total_bytes()
    dest = WORK / f"full-L{layers}-q4g32-d8"
    runs = []
    for threads in thread_counts:
        r = convert_in_child(src, dest, threads)
        r.update(threads=threads, input_gb_per_s=source_bytes / r["seconds"] / 1e9,
                 manifest_sha256=sha256_file(dest / "manifest.json"))
        runs.append(r)
        print(f"  threads {threads}: {r['seconds']:.1f} s, {r['input_gb_per_s']:.3f} GB/s, "
              f"peak RSS {r['ru_maxrss_bytes'] / 2**30:.2f} GiB", flush=True)
    info = describe(dest)
    cold_s = timed_verify(dest, evict=True)
    verify_s = timed_verify(dest, evict=False)
    biggest = max(dest.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    t = time.perf_counter()
    sha256_file(biggest)
    one_thread_s = time.perf_counter() - t
    return {
        "source": str(src.relative_to(ROOT.parent)), "layers": layers, "source_bytes": source_bytes,
        "output_bytes": info["total_bytes"], "bits_per_weight": info["bits_per_weight"],
        "roles": {k: {"bits_per_weight": v["bits_per_weight"], "bytes": v["bytes"]} for k, v in info["roles"].items()},
        "runs": runs,
        "identical_across_thread_counts": len({r["manifest_sha256"] for r in runs}) == 1,
        "verify": {"cold_mb_per_s": info["total_bytes"] / cold_s / 1e6,
                   "warm_mb_per_s": info["total_bytes"] / verify_s / 1e6,
                   "warm_one_thread_mb_per_s": biggest.stat().st_size / one_thread_s / 1e6},
    }


def timed_verify(folder: Path, evict: bool) -> float:
    """Seconds for `verify(folder)`; evict=True first drops the folder's pages from the page cache
    (posix_fadvise DONTNEED on our own files only), so the digest reads come from disk."""
    from ernie_edge.manifest import verify
    if evict:
        for path in folder.iterdir():
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    t = time.perf_counter()
    problems = verify(folder)
    seconds = time.perf_counter() - t
    if problems:
        sys.exit(f"verify failed: {problems}")
    return seconds


# ---- quality on small models -----------------------------------------------------------------------

def quality(presets: list[str], prompts: int, tokens: int) -> list[dict]:
    from ernie_edge.quant import synthetic
    from ernie_edge.formats.recipe import Recipe

    rows = []
    for preset in presets:
        src = WORK / f"{preset}-src"
        if not (src / "config.json").is_file():
            synthetic.write_checkpoint(src, preset)
        # int4 / int8 experts at each group size, then dense int4 / f16 against the default int8.
        recipes = [Recipe(expert_bits=b, dense_bits=8, group_size=g) for b in (4, 8) for g in (32, 64, 128)]
        recipes += [Recipe(expert_bits=4, dense_bits=d, group_size=32) for d in (4, 16)]
        for recipe in recipes:
            rows.append(quality_row(preset, src, recipe, prompts, tokens))
    return rows


def quality_row(preset: str, src: Path, recipe, prompts: int, tokens: int) -> dict:
    from ernie_edge.manifest import describe
    from ernie_edge.quant.convert import ConvertError, ConvertSettings, convert, recipe_tag
    from ernie_edge.quant.evaluate import EvalSettings, evaluate

    dest = WORK / f"{preset}-{recipe_tag(recipe)}"
    row = {"preset": preset, "recipe": recipe.to_dict(), "tag": recipe_tag(recipe)}
    try:
        convert(ConvertSettings(source=str(src), dest=dest, recipe=recipe, force=True, progress=False))
    except ConvertError as e:  # the group size does not divide a tiny model's dimensions
        row["skipped"] = str(e).split(": ", 1)[-1]
        return row
    report = evaluate(EvalSettings(model=str(dest), reference=str(src), prompts=prompts, tokens=tokens))
    row.update(bits_per_weight=describe(dest)["bits_per_weight"], kld=report["kld"],
               top1_agreement=report["top1_agreement"], perplexity=report["perplexity"],
               sequences=report["sequences"], positions=report["positions"])
    print(f"  {preset} {row['tag']}: KLD mean {report['kld']['mean']:.5f}, "
          f"top-1 {100 * report['top1_agreement']:.1f} %", flush=True)
    return row


# ---- report ----------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    lines = []
    for s in result.get("speed", []):
        lines += [f"Converter at full ERNIE width, {s['layers']} layers ({s['source_bytes'] / 1e9:.2f} GB bf16 in, "
                  f"{s['output_bytes'] / 1e9:.2f} GB out, {s['bits_per_weight']:.3f} bits/weight):", "",
                  "| threads | seconds | input GB/s | peak RSS (ru_maxrss) | peak RSS (psutil) |",
                  "|---|---|---|---|---|"]
        for r in s["runs"]:
            lines.append(f"| {r['threads']} | {r['seconds']:.1f} | {r['input_gb_per_s']:.3f} | "
                         f"{r['ru_maxrss_bytes'] / 2**30:.2f} GiB | {r['psutil_peak_rss_bytes'] / 2**30:.2f} GiB |")
        same = "identical" if s["identical_across_thread_counts"] else "DIFFERENT"
        lines += ["", f"manifest (with every file's sha256) {same} across thread counts"]
        v = s["verify"]
        lines += ["", f"verify: {v['cold_mb_per_s']:.0f} MB/s from disk (files evicted from the page cache), "
                      f"{v['warm_mb_per_s']:.0f} MB/s cached; sha256 of one cached file on one thread "
                      f"{v['warm_one_thread_mb_per_s']:.0f} MB/s", ""]
    q = result.get("quality")
    if q:
        lines += ["| model | recipe | bits/w | KLD mean | KLD p99 | KLD max | top-1 | PPL(Q)/PPL(base) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in q:
            if "skipped" in r:
                lines.append(f"| {r['preset']} | {r['tag']} | — | n/a: {r['skipped'][:60]} | | | | |")
                continue
            k = r["kld"]
            lines.append(f"| {r['preset']} | {r['tag']} | {r['bits_per_weight']:.3f} | {k['mean']:.5f} | "
                         f"{k['p99']:.5f} | {k['max']:.5f} | {100 * r['top1_agreement']:.1f} % | "
                         f"{r['perplexity']['ratio']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    a = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
                         "load_average_at_start": os.getloadavg()[0]}
    if not a.skip_full:
        result["speed"] = [speed(layers, a.threads) for layers in a.layers]
    if not a.skip_quality:
        result["quality"] = quality(["tiny", "small"], a.prompts, a.tokens)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
