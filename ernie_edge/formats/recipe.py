"""The quantization recipe: which precision each tensor of the model gets.

A tensor's precision follows from its role (ernie_edge/formats/hf_ernie.py assigns one to every tensor):

  role            precision            what it is                                        name letter
  expert          expert_bits (q4/q8)  routed experts, layers 1..27: 64 x {gate, up, down}
  attn            dense_bits           q/k/v/o projections                                a
  dense_mlp       dense_bits           layer 0's MLP                                      m
  shared_expert   dense_bits           the shared expert of each MoE layer                s
  embed           dense_bits           token embedding, which is also the LM head (tied)  h
  router          f32                  mlp.gate.weight [64, 2560]
  router_bias     f32                  moe_statics.e_score_correction_bias [1, 64]
  norm            f32                  RMSNorm weights

bits 4 / 5 / 6 / 8 / 16 mean q4 / q5 / q6 / q8 / f16, at the recipe's group size. A dense role may
be given its own bits (and group size) instead of dense_bits: `roles`, written in the name as
-{letter}{bits}[g{group}] after q{expert bits}g{group}-d{dense bits}, e.g. q4g32-d5-h6g64
(int4 experts, int5 attention / MLP / shared experts at g32, int6 LM head at g64).

Why the default, q4g128-d6-s5g32 (int4 experts and int6 attention, layer-0 MLP and LM head at
group 128; int5 shared experts at group 32): it reads fewer bytes per decoded token than
llama.cpp's Q4_K_M on the same shapes (formats/budget.py: 483.4 vs 483.9 MB at 4 layers, 2055 vs
2088 MB at 28) for a third of its KL divergence (docs/PERF.md, "Weights format & recipe"):
- Routed experts hold ~20.4 B of the ~21.8 B parameters, and each token reads only 6 of the 64.
  They decide the folder size and half the bytes read per token, so they get int4; an error in one
  expert reaches a token only when the router picks it. Group 128 (4.125 bits per weight) instead
  of 32 (4.5) frees 90 MB per token at 28 layers for the tensors every token reads.
- Attention, layer 0's MLP, the shared experts and the embedding / LM head (~1.44 B parameters)
  run for every token, so their error reaches every token, and they are where the KL divergence
  comes from: on the 4-layer synthetic model each of attention, LM head and layer-0 MLP at int4
  adds more KL divergence than all the int4 experts together. int6 (6.125 bits per weight at
  g128) has 1/11 of int4 g32's squared error; the shared experts, the least sensitive per weight
  and the largest of these at 28 layers, get int5 (1/4).
- The previous default, q4g32-d8 (int8 dense), reads 1.33x Q4_K_M's bytes at 4 layers.
- Group sizes are per role in the name (-s5g32); without one a role takes the recipe's.
- The router and its correction bias stay f32 whatever the options (ERNIE_SPEC P3): softmax,
  bias-add and top-k run in fp32, and a 1-ulp change can flip which experts are chosen (P14).
  They are tiny (64 x 2560 and 64 values per layer).
- RMSNorm weights stay f32: 2560 values each, multiplied into every activation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ernie_edge.errors import ErnieEdgeError

from .table import GROUP_SIZES

EXPERT_BITS = (4, 8)
DENSE_BITS = (4, 5, 6, 8, 16)
PRECISIONS = ("q4", "q5", "q6", "q8", "f16", "f32")
EXPERT_ROLES = ("expert",)
DENSE_ROLES = ("attn", "dense_mlp", "shared_expert", "embed")
FP32_ROLES = ("router", "router_bias", "norm")
ROLES = EXPERT_ROLES + DENSE_ROLES + FP32_ROLES
ROLE_LETTERS = {"attn": "a", "dense_mlp": "m", "shared_expert": "s", "embed": "h"}  # in the recipe name

DEFAULT_NAME = "q4g128-d6-s5g32"  # Recipe.default(): why, in the module doc
_BITS_TO_PRECISION = {4: "q4", 5: "q5", 6: "q6", 8: "q8", 16: "f16"}
# q{expert_bits}g{group_size}-d{dense_bits}, then -{role letter}{bits}[g{group}] per role override
_NAME = re.compile(r"^q(\d+)g(\d+)-d(\d+)((?:-[amsh]\d+(?:g\d+)?)*)$")
_OVERRIDE = re.compile(r"-([amsh])(\d+)(?:g(\d+))?")
_OPTIONS = {"expert_bits": ("--expert-bits", EXPERT_BITS), "dense_bits": ("--dense-bits", DENSE_BITS),
            "group_size": ("--group-size", GROUP_SIZES)}


class RecipeError(ErnieEdgeError, ValueError):
    """A quantization option (command line or manifest "recipe") has an unsupported value."""


@dataclass(frozen=True)
class Recipe:
    """Bits for routed experts, bits for the other matrices, the quantization group size, and
    per-role exceptions (the field defaults are the plain q4g32-d8; `Recipe.default()` is the
    converter's default): `roles` = ((dense role, bits, group size), ...). Overrides equal to the
    dense default are dropped and the rest kept in DENSE_ROLES order, so equal recipes compare equal."""

    expert_bits: int = 4
    dense_bits: int = 8
    group_size: int = 32
    roles: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self) -> None:
        for field, (option, allowed) in _OPTIONS.items():
            value = getattr(self, field)
            if type(value) is not int or value not in allowed:
                raise RecipeError(f"{option} (recipe field {field!r}) must be one of {_choices(allowed)}, "
                                  f"got {value!r}")
        given: dict[str, tuple[int, int]] = {}
        for item in self.roles:
            if not isinstance(item, (tuple, list)) or len(item) != 3:
                raise RecipeError(f"recipe roles: each entry is (role, bits, group size), got {item!r}")
            role, bits, group = item
            if role not in DENSE_ROLES or role in given:
                raise RecipeError(f"recipe roles: {role!r} is not one of {', '.join(DENSE_ROLES)} "
                                  "(or is given twice)")
            if type(bits) is not int or bits not in DENSE_BITS:
                raise RecipeError(f"recipe roles: {role} bits must be one of {_choices(DENSE_BITS)}, got {bits!r}")
            if type(group) is not int or group not in GROUP_SIZES:
                raise RecipeError(f"recipe roles: {role} group size must be one of {_choices(GROUP_SIZES)}, "
                                  f"got {group!r}")
            given[role] = (bits, self.group_size if bits == 16 else group)
        kept = tuple((role, *given[role]) for role in DENSE_ROLES
                     if role in given and given[role] != (self.dense_bits, self.group_size))
        object.__setattr__(self, "roles", kept)

    @classmethod
    def default(cls) -> "Recipe":
        """The recipe `ernie-edge convert` uses when given none: DEFAULT_NAME (see the module doc).
        Recipe() itself is the plain q4g32-d8, the three flags' starting point."""
        return cls.from_name(DEFAULT_NAME)

    def storage_for(self, role: str) -> tuple[str, int | None]:
        """(format, group size or None) a tensor role asks for (see the module doc)."""
        if role in EXPERT_ROLES:
            return _BITS_TO_PRECISION[self.expert_bits], self.group_size
        if role in DENSE_ROLES:
            bits, group = next(((b, g) for r, b, g in self.roles if r == role), (self.dense_bits, self.group_size))
            return _BITS_TO_PRECISION[bits], (None if bits == 16 else group)
        if role in FP32_ROLES:
            return "f32", None
        raise ValueError(f"unknown tensor role {role!r} (known roles: {', '.join(ROLES)})")

    def precision_for(self, role: str) -> str:
        """"q4", "q5", "q6", "q8", "f16" or "f32" for a tensor role (see the module doc)."""
        return self.storage_for(role)[0]

    @property
    def name(self) -> str:
        """The recipe's short name, q{expert_bits}g{group_size}-d{dense_bits} plus one
        -{letter}{bits}[g{group}] per role override: q4g128-d6-s5g32 (the default), q4g32-d4-h6
        (int4 but the head), q4g32-d8 (the default before), ... Used in default folder names and by
        --recipe."""
        out = f"q{self.expert_bits}g{self.group_size}-d{self.dense_bits}"
        for role, bits, group in self.roles:
            out += f"-{ROLE_LETTERS[role]}{bits}" + (f"g{group}" if group != self.group_size else "")
        return out

    @classmethod
    def from_name(cls, name: str) -> "Recipe":
        """The recipe a name stands for ("q4g32-d8" -> Recipe(4, 8, 32)); a RecipeError names the
        accepted form and the allowed values."""
        m = _NAME.match(name.strip().lower()) if isinstance(name, str) else None
        if m is None:
            raise RecipeError(f"--recipe {name!r}: expected q{{expert bits}}g{{group size}}-d{{dense bits}}, "
                              f"e.g. q4g32-d8 or q4g32-d4, then optionally -{{a|m|s|h}}{{bits}}[g{{group}}] "
                              f"per role (attention, layer-0 MLP, shared experts, head), e.g. q4g128-d6-s5g32 "
                              f"(default); "
                              f"expert bits {_choices(EXPERT_BITS)}, group size {_choices(GROUP_SIZES)}, "
                              f"dense bits {_choices(DENSE_BITS)}")
        expert_bits, group_size, dense_bits = (int(g) for g in m.groups()[:3])
        letters = {v: k for k, v in ROLE_LETTERS.items()}
        roles = [(letters[r], int(b), int(g) if g else group_size) for r, b, g in _OVERRIDE.findall(m.group(4))]
        try:
            return cls(expert_bits=expert_bits, dense_bits=dense_bits, group_size=group_size, roles=tuple(roles))
        except RecipeError as e:
            raise RecipeError(f"--recipe {name!r}: {e}") from None

    def to_dict(self) -> dict:
        """The manifest's "recipe" object. Without role overrides it has exactly the three fields
        every ernie-edge version reads."""
        d = {"expert_bits": self.expert_bits, "dense_bits": self.dense_bits, "group_size": self.group_size}
        if self.roles:
            d["roles"] = {role: {"bits": bits, "group_size": group} for role, bits, group in self.roles}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """Read a manifest's "recipe" object; missing, unknown or bad fields are a RecipeError."""
        if not isinstance(d, dict):
            raise RecipeError(f"recipe must be a JSON object, got {type(d).__name__}")
        missing = [k for k in _OPTIONS if k not in d]
        unknown = sorted(str(k) for k in d if k not in _OPTIONS and k != "roles")
        if missing or unknown:
            raise RecipeError(f"recipe: missing field(s) {missing}, unknown field(s) {unknown}; "
                              f"expected exactly {list(_OPTIONS)} (and optionally 'roles')")
        roles = d.get("roles", {})
        if not isinstance(roles, dict) or not all(isinstance(v, dict) and set(v) == {"bits", "group_size"}
                                                  for v in roles.values()):
            raise RecipeError("recipe: 'roles' must map dense roles to {\"bits\": ..., \"group_size\": ...}")
        return cls(**{k: d[k] for k in _OPTIONS},
                   roles=tuple((r, v["bits"], v["group_size"]) for r, v in roles.items()))


def _choices(allowed) -> str:
    return ", ".join(str(a) for a in allowed)
