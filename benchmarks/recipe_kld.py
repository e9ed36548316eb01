"""KL divergence of quantized weights against the fp32 model, per recipe and per role: ernie-edge's
formats and llama.cpp's own quantizers, on the same tokens, through the same numpy fp32 forward.

Each configuration quantizes and dequantizes every weight in memory (no folder is written) and runs
ernie_edge/reference.py over the result; the fp32 reference runs over the checkpoint itself. The
statistics are `ernie-edge eval`'s (ernie_edge/quant/evaluate.py: KL(P_ref || P_q) per position,
top-1 agreement, perplexity ratio) on `eval_sequences` of the model. What is compared is the
weights alone: llama.cpp also rounds activations (Q8_K / Q8_0) in its dot products, ernie-edge to
int16 per block of 32 in decode and to int8 per block of 32 in prefill (docs/PERF.md); neither is
applied here. `folder:PATH` runs a converted folder on the CPU backend instead (its prefill, so
int8 activations included), to check this harness against `ernie-edge eval`; `folder-i16:PATH` the
same with `prefill_acts="i16"`.

Configurations (repeat --config):
  recipe:NAME              an ernie-edge recipe, e.g. recipe:q4g32-d8 (ernie_edge/formats/recipe.py)
  llama:Q4_K_M, llama:Q4_0 llama.cpp's per-tensor types (benchmarks/llama_types.py), quantized by
                           llama.cpp's ggml_quantize_chunk from its libggml-base (--libggml; the
                           peers' build, see benchmarks/llama_types.py) after rounding to f16 as its
                           GGUF converter does
  roles:ROLE=Q,ROLE=Q,...  only these roles quantized, the rest fp32 (per-role sensitivity). Q is
                           q{bits}g{group} (ernie-edge) or a GGUF type (Q4_0, Q4_K, Q6_K, Q8_0)
  folder:PATH              a converted edge folder, run by the CPU backend (folder-i16:PATH: with
                           int16 / exact prefill arithmetic)

    python benchmarks/recipe_kld.py benchmarks/work/full-L4 --tokens 512 --config recipe:q4g32-d8 ...
Results are merged into benchmarks/results/recipe-kld-<model folder name>.json (one entry per config).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_types import BYTES_PER_WEIGHT, gguf_type  # noqa: E402

import ernie_edge  # noqa: E402
from ernie_edge.formats.budget import decode_bytes, recipe_bytes, recipe_storage  # noqa: E402
from ernie_edge.formats.recipe import Recipe  # noqa: E402
from ernie_edge.formats.table import get_format  # noqa: E402
from ernie_edge.hf_checkpoint import HFCheckpoint  # noqa: E402
from ernie_edge.quant.evaluate import compare_logits, eval_sequences  # noqa: E402
from ernie_edge.reference import ReferenceModel  # noqa: E402

HERE = Path(__file__).resolve().parent
LIBGGML = Path.home() / ".cache" / "ernie-edge-peers" / "build" / "bin" / "libggml-base.so"
GGML_TYPES = {"Q4_0": 2, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}


class GGML:
    """llama.cpp's quantize / dequantize functions from its libggml-base shared library."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        q = self.lib.ggml_quantize_chunk
        q.restype = ctypes.c_size_t
        q.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def round_trip(self, w: np.ndarray, gtype: str) -> np.ndarray:
        """float32 [..., K] -> llama.cpp's dequantized values after quantizing the f16-rounded w."""
        t = GGML_TYPES[gtype]
        x = np.ascontiguousarray(w.astype(np.float16).astype(np.float32))
        k = x.shape[-1]
        rows = x.size // k
        self.lib.ggml_quantize_init(t)
        dst = np.empty(rows * self.lib.ggml_row_size(t, k), np.uint8)
        self.lib.ggml_quantize_chunk(t, x.ctypes.data, dst.ctypes.data, 0, rows, k, None)
        out = np.empty_like(x)
        deq = getattr(self.lib, f"dequantize_row_{gtype.lower().replace('_k', '_K')}")
        deq.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        deq(dst.ctypes.data, out.ctypes.data, x.size)
        return out


class Quantized:
    """A WeightSource (ernie_edge/reference.py) whose weights went through `assign(spec)`: a
    quantizer name ("q4g32", "Q4_K", ...) or None (kept fp32). Dense tensors are kept for the run."""

    def __init__(self, ckpt: HFCheckpoint, assign, ggml: GGML | None):
        self.ckpt, self.assign, self.ggml = ckpt, assign, ggml
        self.config = ckpt.config
        self._dense: dict[str, np.ndarray] = {}

    def _apply(self, name: str, w: np.ndarray) -> np.ndarray:
        q = self.assign(self.ckpt.specs[name])
        if q is None or q in ("f32", "F32"):
            return w
        if q in ("f16", "F16"):
            return w.astype(np.float16).astype(np.float32)
        if q[0] == "q":
            bits, group = q[1:].split("g")
            fmt = get_format(f"q{bits}")
            return fmt.dequantize(*fmt.quantize(w, int(group)), int(group)).reshape(w.shape)
        if self.ggml is None:
            raise SystemExit(f"{q}: llama.cpp's libggml-base is needed (--libggml)")
        return self.ggml.round_trip(w, q)

    def dense(self, name: str) -> np.ndarray:
        if name not in self._dense:
            self._dense[name] = self._apply(name, self.ckpt.f32(name))
        return self._dense[name]

    def expert(self, layer: int, e: int):
        p = f"model.layers.{layer}.mlp.experts.{e}."
        return tuple(self._apply(p + f"{n}_proj.weight", self.ckpt.f32(p + f"{n}_proj.weight"))
                     for n in ("gate", "up", "down"))


def parse_config(spec: str, cfg):
    """(assign(spec) -> quantizer or None, bytes per decoded token or None) of a --config."""
    kind, _, arg = spec.partition(":")
    if kind == "recipe":
        recipe = Recipe.from_name(arg)

        def assign(t):
            quant, group = recipe_storage(recipe, t)
            return quant if group is None else f"{quant}g{group}"
        return assign, recipe_bytes(recipe, cfg)["total"]
    if kind == "llama":
        def assign(t):
            return gguf_type(arg, t.name, t.role, t.shape[-1], cfg.num_hidden_layers)

        def nbytes(t):
            return int(np.prod(t.shape)) * BYTES_PER_WEIGHT[assign(t)]
        return assign, decode_bytes(cfg, nbytes)["total"]
    if kind == "roles":
        table = dict(item.split("=") for item in arg.split(","))
        return (lambda t: table.get(t.role)), None
    raise SystemExit(f"--config {spec!r}: expected recipe:, llama:, roles:, folder: or folder-i16:")


def run(a) -> None:
    model = ernie_edge.load(a.model)  # the HF folder: the fp32 reference, and its tokenizer
    ckpt = HFCheckpoint(a.model)
    (ids,), kind = eval_sequences(model, 1, a.tokens, a.seed)
    t0 = time.perf_counter()
    ref = model.logits(ids)
    print(f"fp32 reference: {len(ids)} {kind} tokens, {time.perf_counter() - t0:.1f} s", flush=True)
    ggml = GGML(Path(a.libggml)) if Path(a.libggml).is_file() else None
    out_path = HERE / "results" / f"recipe-kld-{Path(a.model).name}.json"
    saved = json.loads(out_path.read_text()) if out_path.is_file() else {"runs": {}}
    for spec in a.config:
        t0 = time.perf_counter()
        if spec.startswith(("folder:", "folder-i16:")):
            kind_, path = spec.split(":", 1)
            acts = "i16" if kind_ == "folder-i16" else "i8"
            logits, nbytes = ernie_edge.load(path, prefill_acts=acts).logits(ids), None
        else:
            assign, nbytes = parse_config(spec, ckpt.config)
            rm = ReferenceModel(Quantized(ckpt, assign, ggml))
            logits = rm.logits(rm.forward(ids, rm.new_cache()))
        s = compare_logits(logits, ref, ids)
        row = {"kld_mean": float(s["kld"].mean()), "kld_median": float(np.median(s["kld"])),
               "kld_p99": float(np.percentile(s["kld"], 99)), "top1_agreement": float(s["top1_agree"].mean()),
               "ppl_ratio": float(np.exp(s["nll_model"].mean() - s["nll_reference"].mean())),
               "bytes_per_token": nbytes, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{spec:<44} KLD {row['kld_mean']:.5f}  top-1 {100 * row['top1_agreement']:.2f} %  "
              f"PPL ratio {row['ppl_ratio']:.4f}  " + (f"{nbytes / 1e6:.1f} MB/token  " if nbytes else "")
              + f"({row['seconds']} s)", flush=True)
        saved["runs"][spec] = row
        saved.update(model=str(a.model), tokens=len(ids), sequences=kind, seed=a.seed)
        if not a.no_save:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(saved, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="the HF checkpoint folder (the fp32 reference)")
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--libggml", default=str(LIBGGML))
    ap.add_argument("--no-save", action="store_true")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
