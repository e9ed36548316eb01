"""Parity of ernie-edge's reference forward pass with transformers' Ernie4_5_MoeForCausalLM.

Builds the three tiny parity configs of the test suite, runs both models in fp32 (eager attention)
on random sequences up to 512 tokens and at position offsets up to 8192, and prints/saves:
max |dlogit|, argmax agreement, expert-selection agreement, and greedy-continuation agreement.

    .venv/bin/python benchmarks/parity.py  ->  benchmarks/results/parity.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import ernie_edge  # noqa: E402
from conftest import PARITY_CONFIGS  # noqa: E402
from hf_parity import compare, edge_greedy, hf_greedy, load_hf  # noqa: E402
from ernie_edge.quant import synthetic  # noqa: E402

CASES = [(7, 0), (128, 0), (512, 0), (64, 1000), (48, 8192)]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in PARITY_CONFIGS.items():
            folder = synthetic.write_checkpoint(Path(tmp) / name, tokenizer=False, seed=len(name), **kwargs)
            model, hf = ernie_edge.load(folder), load_hf(folder)
            for length, offset in CASES:
                ids = np.random.default_rng(length + offset).integers(0, model.config.vocab_size, length)
                rows.append({"config": name, **compare(folder, hf, ids, offset, model=model)})
            ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 20)
            same = edge_greedy(model, ids, 32) == hf_greedy(hf, ids, 32)
            rows.append({"config": name, "greedy_32_identical": same})
    print("| config | tokens | offset | max abs dlogit | argmax agree | routing agree |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "tokens" in r:
            print(f"| {r['config']} | {r['tokens']} | {r['offset']} | {r['max_abs_dlogit']:.2e} | "
                  f"{r['argmax_agreement']:.4f} | {r['routing_agreement']:.4f} |")
        else:
            print(f"| {r['config']} | greedy 32 tokens identical: {r['greedy_32_identical']} |||||")
    out = ROOT / "benchmarks" / "results" / "parity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
