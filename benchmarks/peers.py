"""ernie-edge beside llama.cpp on the same machine and shapes: alternating runs, one JSON, one table.

    .venv/bin/python benchmarks/peers.py --tools DIR [--layers 4] [--rounds 2] [--pairs default int4]
                                         [--depth 32768] [--quiet-wait 10] [--max-foreign 0.05]

DIR (or $ERNIE_EDGE_PEER_TOOLS) is the peers tools folder: `llama_cpp.sh` (builds llama.cpp, makes
the Q4_K_M / Q4_0 GGUFs of the synthetic full-width ERNIE-4.5-21B-A3B, runs llama-bench) and,
optionally, `quiet_run.py` (runs a timed command only when the machine is idle and repeats runs
that other processes disturbed). Pairs, by quality class:

  default   ernie-edge q4g128-d6-s5g32 (the default recipe)    vs  llama.cpp Q4_K_M
  int4      ernie-edge q4g32-d4-h6 (int4 but a 6-bit head)     vs  llama.cpp Q4_0
  (--pair-recipe default=q4g32-d8 pairs another recipe, e.g. the old default)

Each round runs, for every pair, `ernie-edge bench` (512-token prompt, 128 generated tokens) and
then `llama-bench -p 512 -n 128 -r 3` (default mmap load), 2 threads each, as fresh processes, so the machine's drift
hits both alike; the figures are the per-round ratios ernie-edge / llama.cpp and their median.
With --depth N the decode is measured after an N-token context instead (ernie-edge: an N-token
prompt then 64 tokens; llama-bench -d N -p 0 -n 64 -r 1), the long-context goal.

The edge models are built under benchmarks/work/ (synthetic full-width source + convert, as
benchmarks/cpu.py does). Writes benchmarks/results/peers-<cpu>-L<layers>[-d<depth>].json and the
README table between the bench:peers markers (every results file, one row per pair).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import machine  # noqa: E402
from cpu import ROOT, WORK, ensure_model, update_readme  # noqa: E402

RESULTS = HERE / "results"
MARK_BEGIN, MARK_END = "<!-- bench:peers:begin -->", "<!-- bench:peers:end -->"
PAIRS = {"default": ("q4g128-d6-s5g32", "Q4_K_M"), "int4": ("q4g32-d4-h6", "Q4_0")}  # name: (ernie-edge recipe, llama.cpp type)
OLD_RECIPES = {"default": "q4g32-d8", "int4": "q4g32-d4"}  # what results files without "recipe" ran


class Runner:
    """Runs timed commands, through quiet_run.py when the tools folder has it."""

    def __init__(self, tools: Path, log: Path, wait_min: float, max_foreign: float, tries: int):
        self.tools, self.log = tools, log
        self.quiet = tools / "quiet_run.py"
        self.opts = ["--wait-min", str(wait_min), "--max-foreign", str(max_foreign), "--tries", str(tries)]

    def run(self, label: str, cmd: list[str], extra_env: dict | None = None) -> tuple[str, dict]:
        """(stdout, quiet_run's record of the kept attempt or {}) of one timed command."""
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        env.update(extra_env or {})
        if not self.quiet.is_file():
            out = subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True).stdout
            return out, {}
        subprocess.run([sys.executable, str(self.quiet), "--label", label, "--log", str(self.log), *self.opts,
                        "--", *cmd], check=True, cwd=ROOT, env=env)
        records = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        rec = [r for r in records if r["label"] == label][-1]
        return Path(rec["stdout"]).read_text(), rec


def llama_sh(tools: Path, *args: str) -> str:
    return subprocess.run(["bash", str(tools / "llama_cpp.sh"), *args], check=True, stdout=subprocess.PIPE,
                          text=True).stdout.strip()


def ensure_gguf(tools: Path, layers: int, qtype: str) -> Path:
    path = Path(llama_sh(tools, "path", str(layers), qtype))
    if not path.is_file():
        print(f"+ llama_cpp.sh gguf {layers}", flush=True)
        subprocess.run(["bash", str(tools / "llama_cpp.sh"), "gguf", str(layers)], check=True)
    return path


def edge_bench(runner: Runner, label: str, model: Path, prompt: int, gen: int, threads: int) -> dict:
    out = WORK / f"peers-{label}.json"
    cmd = [sys.executable, "-m", "ernie_edge.cli", "bench", "--model", str(model), "--threads", str(threads),
           "--prompt-tokens", str(prompt), "--gen-tokens", str(gen), "--json", str(out)]
    if prompt > 4096:
        cmd += ["--ctx-size", str(prompt + gen + 64)]
    _, rec = runner.run(label, cmd)
    r = json.loads(out.read_text())
    r["quiet_run"] = rec
    return r


def llama_bench(runner: Runner, label: str, gguf: Path, threads: int, depth: int, extra: list[str],
                lib_path: str | None) -> dict:
    """llama-bench (built by llama_cpp.sh next to its GGUFs) on one GGUF: pp512 + tg128, 3 repetitions,
    or with depth a 64-token decode after `depth` context tokens, one repetition."""
    exe = gguf.parent / "build" / "bin" / "llama-bench"
    shape = ["-d", str(depth), "-p", "0", "-n", "64", "-r", "1"] if depth else ["-p", "512", "-n", "128", "-r", "3"]
    env = {"LD_LIBRARY_PATH": lib_path} if lib_path else None
    stdout, rec = runner.run(label, [str(exe), "-m", str(gguf), "-t", str(threads), *shape, *extra, "-o", "json"], env)
    tests = json.loads(stdout[stdout.index("["):])
    out = {"quiet_run": rec, "tests": tests}
    for t in tests:
        if t.get("n_gen", 0) > 0:
            out["decode_tok_s"] = t["avg_ts"]
        elif t.get("n_prompt", 0) > 0:
            out["prefill_tok_s"] = t["avg_ts"]
    return out


def cpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "cpu"


def summarize(rounds: list[dict], pairs: list[str], depth: int, recipes: dict[str, str]) -> dict:
    keys = ["decode_tok_s"] + ([] if depth else ["prefill_tok_s"])
    out = {}
    for p in pairs:
        out[p] = {"recipe": recipes[p]}
        for k in keys:
            edge = [r[p]["edge"][k] for r in rounds]
            peer = [r[p]["llama"][k] for r in rounds]
            out[p][k] = {"edge": edge, "llama": peer, "ratios": [e / q for e, q in zip(edge, peer)],
                         "median_ratio": statistics.median(e / q for e, q in zip(edge, peer))}
        out[p]["weights_bytes_per_token"] = rounds[0][p]["edge"]["weights_bytes_per_token"]
        out[p]["bandwidth_fraction"] = [r[p]["edge"]["bandwidth_fraction"] for r in rounds]
        out[p]["read_bandwidth_gbs"] = [r[p]["edge"]["read_bandwidth_gbs"] for r in rounds]
        # against a plain read of decode's own bytes through the model's mapping (ernie_edge/bench.py)
        out[p]["weights_bandwidth_fraction"] = [r[p]["edge"].get("weights_bandwidth_fraction") for r in rounds]
        out[p]["weights_read_gbs"] = [r[p]["edge"].get("weights_read_gbs") for r in rounds]
        # share of all CPUs that other processes used during each timed run (quiet_run.py's record)
        out[p]["foreign_cpu"] = [r[p][side].get("quiet_run", {}).get("foreign_cpu_frac") for r in rounds
                                 for side in ("edge", "llama")]
    return out


def table(results: list[dict]) -> str:
    lines = ["| CPU | layers | context | pair | ernie-edge decode tok/s | llama.cpp decode tok/s | ratio | "
             "ernie-edge pp512 tok/s | llama.cpp pp512 tok/s | ratio | rounds | other processes' CPU | "
             "ernie-edge commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def busy(values):
        values = [v for v in values or [] if v is not None]
        return f"{min(values):.0%}-{max(values):.0%}" if values else "-"

    def cell(values):
        return " / ".join(f"{v:.1f}" for v in values)

    for res in results:
        for pair, s in res["summary"].items():
            edge, peer = s.get("recipe", OLD_RECIPES[pair]), PAIRS[pair][1]
            name = f"{edge} vs {peer}"
            d = s["decode_tok_s"]
            p = s.get("prefill_tok_s")
            pre = (f"{cell(p['edge'])} | {cell(p['llama'])} | {p['median_ratio']:.2f}x" if p else "- | - | -")
            lines.append(f"| {res['machine']['cpu']} | {res['layers']} | {res['depth'] or 512} | {name} | "
                         f"{cell(d['edge'])} | {cell(d['llama'])} | {d['median_ratio']:.2f}x | {pre} | "
                         f"{len(d['edge'])} | {busy(s.get('foreign_cpu'))} | {res['commit']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tools", type=Path, default=os.environ.get("ERNIE_EDGE_PEER_TOOLS"),
                    help="folder with llama_cpp.sh and quiet_run.py (default $ERNIE_EDGE_PEER_TOOLS)")
    ap.add_argument("--layers", type=int, default=4, choices=[4, 28])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=0, help="decode after this many context tokens (0: pp512 + tg128)")
    ap.add_argument("--quiet-wait", type=float, default=10.0, help="minutes quiet_run.py waits for an idle machine")
    ap.add_argument("--max-foreign", type=float, default=0.05, help="quiet_run.py: other processes' CPU share allowed")
    ap.add_argument("--tries", type=int, default=2, help="quiet_run.py: attempts per timed command")
    ap.add_argument("--llama-args", nargs="*", default=[], help="more llama-bench arguments (e.g. --repack 0)")
    ap.add_argument("--llama-lib-path", help="LD_LIBRARY_PATH for llama-bench (e.g. a libggml-cpu built without AMX, "
                    "where llama.cpp's AMX kernels crash)")
    ap.add_argument("--pair-recipe", action="append", default=[], metavar="PAIR=RECIPE",
                    help="the ernie-edge recipe of a pair (default: default=q4g128-d6-s5g32, int4=q4g32-d4-h6)")
    a = ap.parse_args()
    recipes = {p: r for p, (r, _) in PAIRS.items()}
    for item in a.pair_recipe:
        pair, _, recipe = item.partition("=")
        if pair not in PAIRS or not recipe:
            sys.exit(f"--pair-recipe {item!r}: expected PAIR=RECIPE with PAIR one of {', '.join(PAIRS)}")
        recipes[pair] = recipe
    if a.tools is None or not (a.tools / "llama_cpp.sh").is_file():
        sys.exit("peers.py needs --tools DIR (or $ERNIE_EDGE_PEER_TOOLS): the folder holding llama_cpp.sh")
    tools = a.tools.resolve()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runner = Runner(tools, WORK / f"peers-quiet-{stamp}.jsonl", a.quiet_wait, a.max_foreign, a.tries)
    models = {p: (ensure_model(a.layers, recipes[p], keep_source=False), ensure_gguf(tools, a.layers, PAIRS[p][1]))
              for p in a.pairs}
    prompt, gen = (a.depth, 64) if a.depth else (512, 128)
    for p, (edge, _) in models.items():  # first run compiles the kernels into numba's cache: not timed
        edge_bench(Runner(tools, runner.log, 0, 1.0, 1), f"warm-{p}-{stamp}", edge, 16, 2, a.threads)
    rounds = []
    for r in range(a.rounds):
        row = {}
        for p, (edge, gguf) in models.items():
            e = edge_bench(runner, f"edge-{p}-r{r}-{stamp}", edge, prompt, gen, a.threads)
            q = llama_bench(runner, f"llama-{p}-r{r}-{stamp}", gguf, a.threads, a.depth, a.llama_args, a.llama_lib_path)
            row[p] = {"edge": e, "llama": q}
            print(f"round {r + 1} {p}: decode {e['decode_tok_s']:.2f} vs {q['decode_tok_s']:.2f} tok/s"
                  + ("" if a.depth else f", pp{prompt} {e['prefill_tok_s']:.1f} vs {q['prefill_tok_s']:.1f}"),
                  flush=True)
        rounds.append(row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True).stdout.strip()
    mach = machine()
    res = {"machine": mach, "layers": a.layers, "depth": a.depth, "threads": a.threads, "commit": commit,
           "date": time.strftime("%Y-%m-%d %H:%M"), "llama_args": a.llama_args, "llama_lib_path": a.llama_lib_path,
           "llama_cpp_build": rounds[0][a.pairs[0]]["llama"]["tests"][0].get("build_commit"),
           "summary": summarize(rounds, a.pairs, a.depth, recipes), "rounds": rounds}
    suffix = f"-d{a.depth}" if a.depth else ""
    out = RESULTS / f"peers-{cpu_slug(mach['cpu'])}-L{a.layers}{suffix}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(table([res]))
    print(f"saved {out}")
    everything = [json.loads(f.read_text()) for f in sorted(RESULTS.glob("peers-*.json"))]
    update_readme(table(everything), MARK_BEGIN, MARK_END)


if __name__ == "__main__":
    main()
