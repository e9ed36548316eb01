"""Bytes of weights read per decoded token, per role: ernie-edge recipes beside llama.cpp's Q4_K_M
and Q4_0 on the same shapes (the full-width ERNIE-4.5-21B-A3B at 4 and 28 layers by default).

Counted, not timed (ernie_edge/formats/budget.py): every stored tensor once per token, the routed
experts k/E of each bank, the tied embedding once as the LM head plus the looked-up row. llama.cpp's
types per tensor are benchmarks/llama_types.py's (its Q4_K_M and Q4_0 rules), priced at the GGUF
block sizes (Q4_K 4.5, Q6_K 6.5625, Q4_0 4.5 bits per weight).

    python benchmarks/recipe_bytes.py [--layers 4 28] [--recipe q4g32-d8 ...]
Writes benchmarks/results/recipe-bytes.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_types import BYTES_PER_WEIGHT, gguf_type  # noqa: E402

from ernie_edge.config import ErnieConfig  # noqa: E402
from ernie_edge.formats.budget import decode_bytes, recipe_bytes  # noqa: E402
from ernie_edge.formats.recipe import Recipe  # noqa: E402
from ernie_edge.quant.synthetic import make_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "recipe-bytes.json"
DEFAULT_RECIPES = [Recipe.default().name, "q4g32-d4-h6", "q4g32-d8", "q4g32-d4"]
ROLES = ("lm_head", "attn", "dense_mlp", "shared_expert", "expert", "router", "norm")


def llama_bytes(ftype: str, cfg: ErnieConfig) -> dict[str, float]:
    def nbytes(spec) -> float:
        t = gguf_type(ftype, spec.name, spec.role, spec.shape[-1], cfg.num_hidden_layers)
        n = 1
        for d in spec.shape:
            n *= d
        return n * BYTES_PER_WEIGHT[t]

    return decode_bytes(cfg, nbytes)


def table(layers: list[int], recipes: list[str]) -> dict:
    out = {}
    for n in layers:
        cfg = ErnieConfig.from_dict(make_config("full", layers=n))
        rows = {f"llama.cpp {f}": llama_bytes(f, cfg) for f in ("Q4_K_M", "Q4_0")}
        rows.update({name: recipe_bytes(Recipe.from_name(name), cfg) for name in dict.fromkeys(recipes)})
        out[str(n)] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 28])
    ap.add_argument("--recipe", nargs="+", default=DEFAULT_RECIPES)
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    result = table(a.layers, a.recipe)
    for n, rows in result.items():
        print(f"\n{n} layers, full width: MB of weights read per decoded token")
        print(f"{'':<22}" + "".join(f"{r:>14}" for r in ROLES) + f"{'total':>10}{'vs Q4_K_M':>11}")
        base = rows["llama.cpp Q4_K_M"]["total"]
        for name, b in rows.items():
            print(f"{name:<22}" + "".join(f"{b.get(r, 0) / 1e6:>14.1f}" for r in ROLES)
                  + f"{b['total'] / 1e6:>10.1f}{b['total'] / base:>11.3f}")
    if not a.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"unit": "bytes per decoded token", "layers": result}, indent=1))
        print(f"\nsaved {RESULTS}")


if __name__ == "__main__":
    main()
