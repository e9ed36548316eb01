"""llama.cpp's per-tensor quantization types for an ERNIE-4.5 MoE model, as `llama-quantize` picks
them without an importance matrix (llama.cpp src/llama-quant.cpp, `llama_tensor_get_type_impl`, at
ggml-org/llama.cpp@0c1e57098, the tree the peers' llama_cpp.sh builds):

  - the tied token embedding (it is the output matrix): Q6_K (Q8_0 when its width is not a multiple
    of 256), for Q4_K_M and for Q4_0 alike;
  - Q4_K_M: attn_v, and every ffn_down (layer 0's dense MLP, the routed experts' down_exps, the
    shared expert's down_shexp), get Q6_K in the layers where use_more_bits(i, n) holds:
    i < n/8, or i >= 7n/8, or (i - n/8) % 3 == 2; everything else Q4_K;
  - Q4_0: every other matrix Q4_0;
  - the router (ffn_gate_inp), its bias and the norms stay F32.
  - A matrix whose input width is not a multiple of 256 cannot take a k-quant: Q4_K falls back to
    Q5_0 and Q6_K to Q8_0 (llama-quant.cpp `tensor_type_fallback`); this only happens at the tiny
    and small synthetic sizes.

Used by benchmarks/recipe_bytes.py (bytes per decoded token) and benchmarks/recipe_kld.py (the
same types applied with llama.cpp's own quantizers).
"""

from __future__ import annotations

import re

BYTES_PER_WEIGHT = {"Q4_0": 18 / 32, "Q4_K": 144 / 256, "Q5_0": 22 / 32, "Q6_K": 210 / 256, "Q8_0": 34 / 32,
                    "F16": 2.0, "F32": 4.0}
BLOCK = {"Q4_0": 32, "Q4_K": 256, "Q5_0": 32, "Q6_K": 256, "Q8_0": 32}
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def gguf_type(ftype: str, name: str, role: str, k: int, n_layers: int) -> str:
    """The GGUF type llama-quantize gives HF tensor `name` (role, input width k) under ftype
    "Q4_K_M" or "Q4_0" (module doc)."""
    if role in ("router", "router_bias", "norm"):
        return "F32"
    if role == "embed":
        t = "Q6_K"
    elif ftype == "Q4_0":
        t = "Q4_0"
    elif ftype == "Q4_K_M":
        layer = int(_LAYER.match(name).group(1))
        sensitive = name.endswith("v_proj.weight") or name.endswith("down_proj.weight")
        t = "Q6_K" if sensitive and use_more_bits(layer, n_layers) else "Q4_K"
    else:
        raise ValueError(f"ftype {ftype!r}: expected Q4_K_M or Q4_0")
    if t in _FALLBACK and k % BLOCK[t]:
        t = _FALLBACK[t]
    if k % BLOCK[t]:
        raise ValueError(f"{name}: input width {k} does not take {t}")
    return t
