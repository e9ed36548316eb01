"""ErnieConfig: the model's hyper-parameters, built from a Hugging Face config.json.

Unknown keys are ignored; missing required keys, another architecture, and inconsistent values are
a ConfigError naming the field. Defaults are the ones transformers' Ernie4_5_MoeConfig applies
(docs/ERNIE_SPEC.md §1). Both the v4 names (`moe_num_experts`, `moe_k`, `rope_theta`) and the v5 names
(`num_experts`, `num_experts_per_tok`, `rope_parameters`) are accepted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ConfigError

MODEL_TYPE = "ernie4_5_moe"
ARCHITECTURE = "Ernie4_5_MoeForCausalLM"

# Sanity caps: far above any real ERNIE, low enough that no allocation sized by them can explode.
_CAPS = {
    "vocab_size": 1 << 20,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "moe_intermediate_size": 1 << 18,
    "num_hidden_layers": 512,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1024,
    "max_position_embeddings": 1 << 24,
    "moe_num_experts": 4096,
    "moe_k": 4096,
    "moe_num_shared_experts": 64,
}


@dataclass(frozen=True)
class ErnieConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    moe_intermediate_size: int
    moe_num_experts: int
    moe_k: int
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1  # -1 / absent: last layer
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    moe_use_aux_free: bool = True
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    use_bias: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    torch_dtype: str = "bfloat16"

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ErnieConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        _check_architecture(raw, source)
        d = dict(raw)
        # v5 / alternative spellings -> the names used here.
        for new, old in (("num_experts", "moe_num_experts"), ("num_experts_per_tok", "moe_k"),
                         ("num_shared_experts", "moe_num_shared_experts"), ("dtype", "torch_dtype")):
            if old not in d and new in d:
                d[old] = d[new]
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        if "rope_theta" not in d and isinstance(rope, dict) and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if isinstance(rope, dict) and rope.get("rope_type", "default") not in ("default", None):
            raise ConfigError(f"{source}: rope type {rope.get('rope_type')!r} is not supported "
                              "(ERNIE-4.5 uses plain RoPE)")
        if d.get("moe_layer_end_index") is None:
            d["moe_layer_end_index"] = -1
        if d.get("head_dim") is None:
            d["head_dim"] = 0
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0] if d["eos_token_id"] else 2

        kwargs = {}
        for f in fields(cls):
            if f.name in d:
                kwargs[f.name] = _coerce(f.name, f.type, d[f.name], source)
            elif f.default is _MISSING:
                raise ConfigError(f"{source}: required field '{f.name}' is missing")
        cfg = cls(**kwargs)
        cfg._validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "ErnieConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found (a model folder needs a config.json)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read: {e}") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict:
        """The HF-style dict (v4 names), enough to rebuild this config or a transformers one."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["model_type"] = MODEL_TYPE
        d["architectures"] = [ARCHITECTURE]
        if self.head_dim == self.hidden_size // self.num_attention_heads:
            d.pop("head_dim")
        return d

    # ---- derived facts ------------------------------------------------------------------------

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.dim_head

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.dim_head

    @property
    def gqa_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def shared_intermediate_size(self) -> int:
        """Width of the one shared-expert MLP (ERNIE_SPEC P6: 1536 x 2 = 3072, not two MLPs)."""
        return self.moe_intermediate_size * self.moe_num_shared_experts

    @property
    def last_moe_layer(self) -> int:
        return self.num_hidden_layers - 1 if self.moe_layer_end_index < 0 else self.moe_layer_end_index

    def is_moe_layer(self, i: int) -> bool:
        """transformers' rule (ERNIE_SPEC §2): layer 0 is dense for the real model."""
        return ((i + 1) % self.moe_layer_interval == 0
                and self.moe_layer_start_index <= i <= self.last_moe_layer
                and self.moe_num_experts > 0)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # ---- validation ---------------------------------------------------------------------------

    def _validate(self, source: str) -> None:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: field '{field}' = {getattr(self, field)!r}: {why}")

        for name, cap in _CAPS.items():
            value = getattr(self, name)
            lo = 0 if name in ("head_dim", "moe_num_shared_experts") else 1
            if not lo <= value <= cap:
                raise bad(name, f"must be between {lo} and {cap}")
        if self.head_dim == 0 and self.hidden_size % self.num_attention_heads:
            raise bad("hidden_size", f"not divisible by num_attention_heads ({self.num_attention_heads})"
                                     " and no head_dim given")
        if self.dim_head % 2:
            raise bad("head_dim", "must be even (RoPE rotates pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_attention_heads", f"not a multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.moe_k > self.moe_num_experts:
            raise bad("moe_k", f"more experts per token than moe_num_experts ({self.moe_num_experts})")
        if self.moe_layer_interval < 1:
            raise bad("moe_layer_interval", "must be >= 1")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 1.0):
            raise bad("rope_theta", "must be a finite number > 1")
        if not (math.isfinite(self.rms_norm_eps) and 0.0 < self.rms_norm_eps < 1.0):
            raise bad("rms_norm_eps", "must be in (0, 1)")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "only 'silu' is supported (ERNIE-4.5 uses SwiGLU)")
        if self.use_bias:
            raise bad("use_bias", "ERNIE-4.5-21B-A3B has no biases; a biased variant is not supported")


_MISSING = fields(ErnieConfig)[0].default  # dataclasses.MISSING, without importing it by name


def _check_architecture(raw: dict, source: str) -> None:
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    if model_type is not None and model_type != MODEL_TYPE:
        raise ConfigError(f"{source}: model_type is {model_type!r}; ernie-edge runs only "
                          f"{MODEL_TYPE!r} (ERNIE-4.5 MoE, e.g. baidu/ERNIE-4.5-21B-A3B-Thinking)")
    if archs and ARCHITECTURE not in archs:
        raise ConfigError(f"{source}: architectures is {archs!r}; expected {ARCHITECTURE!r}")
    if model_type is None and not archs:
        raise ConfigError(f"{source}: neither model_type nor architectures is set; "
                          "this does not look like an ERNIE-4.5 MoE config")


def _coerce(name: str, typ: str, value, source: str):
    want = {"int": int, "float": float, "bool": bool, "str": str}[typ]
    if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: field '{name}' should be {typ}, got {value!r}")
    return value
