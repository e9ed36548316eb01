"""The Hugging Face ERNIE-4.5 MoE checkpoint, as a table: every tensor name the checkpoint must
have (derived from the config, with its shape and role), and the names we skip with a reason.

`check_names` proves completeness: each source tensor is either expected or on the
skip list; anything else, and anything missing, is an error that lists the names.

Roles drive the quantization recipe: expert, shared_expert, dense_mlp, attn, embed, norm, router,
router_bias.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ernie_edge.config import ErnieConfig
from ernie_edge.errors import CheckpointError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    role: str


# Tensors present in the checkpoint that the model does not use, with the reason.
SKIP_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^model\.mtp_"), "multi-token-prediction head: unused at inference (ERNIE_SPEC P11)"),
    (re.compile(r"^lm_head\.weight$"), "tied word embeddings: embed_tokens is the LM head (ERNIE_SPEC P8)"),
    (re.compile(r"\.rotary_emb\.inv_freq$"), "RoPE frequencies are recomputed from rope_theta"),
]


def skip_reason(name: str) -> str | None:
    for pattern, reason in SKIP_RULES:
        if pattern.search(name):
            return reason
    return None


def expected_tensors(cfg: ErnieConfig) -> dict[str, TensorSpec]:
    """Every tensor the model needs, in checkpoint order, with the nn.Linear [out, in] shapes."""
    H, V = cfg.hidden_size, cfg.vocab_size
    out: dict[str, TensorSpec] = {}

    def add(name: str, shape: tuple[int, ...], role: str) -> None:
        out[name] = TensorSpec(name, shape, role)

    add("model.embed_tokens.weight", (V, H), "embed")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight", (H,), "norm")
        add(p + "self_attn.q_proj.weight", (cfg.q_dim, H), "attn")
        add(p + "self_attn.k_proj.weight", (cfg.kv_dim, H), "attn")
        add(p + "self_attn.v_proj.weight", (cfg.kv_dim, H), "attn")
        add(p + "self_attn.o_proj.weight", (H, cfg.q_dim), "attn")
        add(p + "post_attention_layernorm.weight", (H,), "norm")
        if cfg.is_moe_layer(i):
            E, I = cfg.moe_num_experts, cfg.moe_intermediate_size
            add(p + "mlp.gate.weight", (E, H), "router")
            if cfg.moe_use_aux_free:
                add(p + "mlp.moe_statics.e_score_correction_bias", (1, E), "router_bias")
            for e in range(E):
                q = f"{p}mlp.experts.{e}."
                add(q + "gate_proj.weight", (I, H), "expert")
                add(q + "up_proj.weight", (I, H), "expert")
                add(q + "down_proj.weight", (H, I), "expert")
            if cfg.moe_num_shared_experts:
                S = cfg.shared_intermediate_size
                add(p + "mlp.shared_experts.gate_proj.weight", (S, H), "shared_expert")
                add(p + "mlp.shared_experts.up_proj.weight", (S, H), "shared_expert")
                add(p + "mlp.shared_experts.down_proj.weight", (H, S), "shared_expert")
        else:
            I = cfg.intermediate_size
            add(p + "mlp.gate_proj.weight", (I, H), "dense_mlp")
            add(p + "mlp.up_proj.weight", (I, H), "dense_mlp")
            add(p + "mlp.down_proj.weight", (H, I), "dense_mlp")
    add("model.norm.weight", (H,), "norm")
    return out


def check_names(cfg: ErnieConfig, names, source: str) -> dict[str, str]:
    """Prove every source tensor is consumed or skipped. Returns {skipped name: reason}.

    Raises CheckpointError listing every missing and every unexpected name."""
    expected = expected_tensors(cfg)
    names = set(names)
    skipped = {n: r for n in names if n not in expected and (r := skip_reason(n))}
    unexpected = sorted(names - expected.keys() - skipped.keys())
    missing = [n for n in expected if n not in names]
    if missing or unexpected:
        lines = [f"{source}: the checkpoint does not match its config.json "
                 f"({cfg.num_hidden_layers} layers, {cfg.moe_num_experts} experts):"]
        if missing:
            lines.append(f"  {len(missing)} missing tensor(s): " + ", ".join(missing[:20])
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected tensor(s): " + ", ".join(unexpected[:20])
                         + (" ..." if len(unexpected) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    return skipped


def check_shape(spec: TensorSpec, shape: tuple[int, ...], source: str) -> None:
    if tuple(shape) != spec.shape:
        raise CheckpointError(f"{source}: tensor {spec.name!r} has shape {list(shape)}, "
                              f"but config.json implies {list(spec.shape)}")


def count_parameters(cfg: ErnieConfig) -> int:
    total = 0
    for spec in expected_tensors(cfg).values():
        n = 1
        for d in spec.shape:
            n *= d
        total += n
    return total
