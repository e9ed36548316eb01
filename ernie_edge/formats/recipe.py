"""The quantization recipe: which precision each tensor of the model gets.

A tensor's precision follows from its role (ernie_edge/formats/hf_ernie.py assigns one to every tensor):

  role            precision            what it is
  expert          expert_bits (q4/q8)  routed experts, layers 1..27: 64 x {gate, up, down}
  attn            dense_bits           q/k/v/o projections
  dense_mlp       dense_bits           layer 0's MLP
  shared_expert   dense_bits           the shared expert of each MoE layer
  embed           dense_bits           token embedding, which is also the LM head (tied)
  router          f32                  mlp.gate.weight [64, 2560]
  router_bias     f32                  moe_statics.e_score_correction_bias [1, 64]
  norm            f32                  RMSNorm weights

dense_bits 4 / 8 / 16 mean q4 / q8 / f16.

Why the defaults (expert_bits=4, dense_bits=8, group_size=32):
- Routed experts hold ~20.4 B of the ~21.8 B parameters, and each token reads only 6 of the 64.
  They decide the folder size (~11.5 GB at 4.5 bits/weight) and the bytes read per token, so they
  get int4; an error in one expert reaches a token only when the router picks it.
- Attention, layer 0's MLP, the shared experts and the embedding / LM head (~1.44 B parameters)
  run for every token, so their error reaches every token. int8 costs ~0.7 GB more than int4 there,
  for ~17x lower weight error (relative RMS 0.47% vs 8.1% on gaussian data, docs/FORMAT.md).
- Group size 32 is llama.cpp's Q4_0 block: int4 error 8.1% at g32 vs 9.7% at g128, for 0.375 more
  bits per weight.
- The router and its correction bias stay f32 whatever the options (ERNIE_SPEC P3): softmax,
  bias-add and top-k run in fp32, and a 1-ulp change can flip which experts are chosen (P14).
  They are tiny (64 x 2560 and 64 values per layer).
- RMSNorm weights stay f32: 2560 values each, multiplied into every activation.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ernie_edge.errors import ErnieEdgeError

from .table import GROUP_SIZES

EXPERT_BITS = (4, 8)
DENSE_BITS = (4, 8, 16)
PRECISIONS = ("q4", "q8", "f16", "f32")
EXPERT_ROLES = ("expert",)
DENSE_ROLES = ("attn", "dense_mlp", "shared_expert", "embed")
FP32_ROLES = ("router", "router_bias", "norm")
ROLES = EXPERT_ROLES + DENSE_ROLES + FP32_ROLES

_BITS_TO_PRECISION = {4: "q4", 8: "q8", 16: "f16"}
_NAME = re.compile(r"^q(\d+)g(\d+)-d(\d+)$")  # q{expert_bits}g{group_size}-d{dense_bits}
_OPTIONS = {"expert_bits": ("--expert-bits", EXPERT_BITS), "dense_bits": ("--dense-bits", DENSE_BITS),
            "group_size": ("--group-size", GROUP_SIZES)}


class RecipeError(ErnieEdgeError, ValueError):
    """A quantization option (command line or manifest "recipe") has an unsupported value."""


@dataclass(frozen=True)
class Recipe:
    """Bits for routed experts, bits for the other matrices, and the quantization group size."""

    expert_bits: int = 4
    dense_bits: int = 8
    group_size: int = 32

    def __post_init__(self) -> None:
        for field, (option, allowed) in _OPTIONS.items():
            value = getattr(self, field)
            if type(value) is not int or value not in allowed:
                raise RecipeError(f"{option} (recipe field {field!r}) must be one of {_choices(allowed)}, "
                                  f"got {value!r}")

    def precision_for(self, role: str) -> str:
        """"q4", "q8", "f16" or "f32" for a tensor role (see the module doc)."""
        if role in EXPERT_ROLES:
            return _BITS_TO_PRECISION[self.expert_bits]
        if role in DENSE_ROLES:
            return _BITS_TO_PRECISION[self.dense_bits]
        if role in FP32_ROLES:
            return "f32"
        raise ValueError(f"unknown tensor role {role!r} (known roles: {', '.join(ROLES)})")

    @property
    def name(self) -> str:
        """The recipe's short name, q{expert_bits}g{group_size}-d{dense_bits}: q4g32-d8 (the
        default), q4g32-d4 (all int4), ... Used in default folder names and by --recipe."""
        return f"q{self.expert_bits}g{self.group_size}-d{self.dense_bits}"

    @classmethod
    def from_name(cls, name: str) -> "Recipe":
        """The recipe a name stands for ("q4g32-d8" -> Recipe(4, 8, 32)); a RecipeError names the
        accepted form and the allowed values."""
        m = _NAME.match(name.strip().lower()) if isinstance(name, str) else None
        if m is None:
            raise RecipeError(f"--recipe {name!r}: expected q{{expert bits}}g{{group size}}-d{{dense bits}}, "
                              f"e.g. q4g32-d8 (default) or q4g32-d4; expert bits {_choices(EXPERT_BITS)}, "
                              f"group size {_choices(GROUP_SIZES)}, dense bits {_choices(DENSE_BITS)}")
        expert_bits, group_size, dense_bits = (int(g) for g in m.groups())
        try:
            return cls(expert_bits=expert_bits, dense_bits=dense_bits, group_size=group_size)
        except RecipeError as e:
            raise RecipeError(f"--recipe {name!r}: {e}") from None

    def to_dict(self) -> dict:
        """The manifest's "recipe" object."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """Read a manifest's "recipe" object; missing, unknown or bad fields are a RecipeError."""
        if not isinstance(d, dict):
            raise RecipeError(f"recipe must be a JSON object, got {type(d).__name__}")
        missing = [k for k in _OPTIONS if k not in d]
        unknown = sorted(str(k) for k in d if k not in _OPTIONS)
        if missing or unknown:
            raise RecipeError(f"recipe: missing field(s) {missing}, unknown field(s) {unknown}; "
                              f"expected exactly {list(_OPTIONS)}")
        return cls(**d)


def _choices(allowed) -> str:
    return ", ".join(str(a) for a in allowed)
