"""A/B speed check of two source trees on one model, `ernie-edge bench` runs alternating.

    .venv/bin/python benchmarks/ab_bench.py --a OLD_TREE --b NEW_TREE --model MODEL [--model-b MODEL_B] [--rounds 5]

Each tree is a checkout (e.g. `git worktree add /tmp/old REV`); each run is a fresh process started
in that tree, so `import ernie_edge` takes the tree's own code. Runs alternate A, B, A, B, ... so
that the machine's drift hits both alike; the result is the median of the per-round ratios B / A
(these shared VMs drift by tens of percent within minutes: compare only ratios from one run).
--model-b gives B its own folder: the same weights converted by B's converter, where the two trees
store them differently (e.g. by rows and in 4-row tiles). Writes benchmarks/results/ab-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("prefill_tok_s", "decode_tok_s", "decode_ms_p50")


def bench(tree: Path, model: str, prompt: int, gen: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "ernie_edge.cli", "bench", "--model", model, "--prompt-tokens", str(prompt),
               "--gen-tokens", str(gen), "--threads", str(threads), "--json", str(out)]
        subprocess.run(cmd, cwd=tree, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, type=Path, help="baseline source tree")
    ap.add_argument("--b", required=True, type=Path, help="candidate source tree")
    ap.add_argument("--model", required=True, help="converted model folder")
    ap.add_argument("--model-b", default=None, help="B's converted model folder (default: --model)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="refactor", help="results file: benchmarks/results/ab-NAME.json")
    a = ap.parse_args()
    model_b = a.model_b or a.model
    for tree, model in ((a.a, a.model), (a.b, model_b)):  # first runs compile the kernels: not timed
        bench(tree, model, 16, 2, a.threads)
    rounds = []
    for r in range(a.rounds):
        ra = bench(a.a, a.model, a.prompt_tokens, a.gen_tokens, a.threads)
        rb = bench(a.b, model_b, a.prompt_tokens, a.gen_tokens, a.threads)
        row = {k: {"a": ra[k], "b": rb[k], "b_over_a": rb[k] / ra[k]} for k in KEYS}
        rounds.append(row)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v['a']:.2f} -> {v['b']:.2f} ({v['b_over_a']:.3f}x)"
                                             for k, v in row.items()), flush=True)
    summary = {k: statistics.median(r[k]["b_over_a"] for r in rounds) for k in KEYS}
    print("median B/A: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ab-{a.name}.json").write_text(json.dumps({
        "machine": machine(), "model": a.model, "model_b": model_b, "a": str(a.a), "b": str(a.b), "threads": a.threads,
        "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens, "date": time.strftime("%Y-%m-%d"),
        "median_b_over_a": summary, "rounds": rounds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
