"""Bytes of weights one decoded token reads, per role: the memory traffic that bounds decode speed.

A decode step reads every stored tensor once, except:
  - routed experts: k of the E experts of each MoE layer, so k/E of each bank;
  - the embedding: one row for the token's lookup, and the whole matrix as the tied LM head.
KV-cache reads (which grow with the context) and activations are not counted.

`decode_reads(cfg)` lists every tensor with the fraction of it a step reads; `decode_bytes` prices
them with any per-tensor byte count: a recipe's (`recipe_bytes`), or another engine's (the llama.cpp
comparison in benchmarks/recipe_bytes.py prices the same list with GGUF types).
"""

from __future__ import annotations

from typing import Callable

from ernie_edge.config import ErnieConfig

from .hf_ernie import TensorSpec, expected_tensors
from .recipe import Recipe
from .table import choose_storage, get_format

# The roles of the report: the embedding is reported as the LM head that reads it.
REPORT_ROLE = {"embed": "lm_head", "router_bias": "router"}


def decode_reads(cfg: ErnieConfig) -> list[tuple[TensorSpec, float]]:
    """(tensor, fraction of its stored bytes read per decoded token) for every stored tensor."""
    out = []
    for spec in expected_tensors(cfg).values():
        if spec.role == "expert":
            frac = cfg.moe_k / cfg.moe_num_experts
        elif spec.role == "embed":
            frac = 1.0 + 1.0 / spec.shape[0]  # the LM head reads all rows, the lookup one more
        else:
            frac = 1.0
        out.append((spec, frac))
    return out


def decode_bytes(cfg: ErnieConfig, nbytes: Callable[[TensorSpec], int]) -> dict[str, float]:
    """{report role: bytes per decoded token} plus "total", with nbytes(spec) = stored bytes of a
    tensor. Report roles: lm_head, attn, dense_mlp, shared_expert, expert, router, norm."""
    out: dict[str, float] = {}
    for spec, frac in decode_reads(cfg):
        role = REPORT_ROLE.get(spec.role, spec.role)
        out[role] = out.get(role, 0.0) + frac * nbytes(spec)
    out["total"] = sum(out.values())
    return out


def recipe_storage(recipe: Recipe, spec: TensorSpec) -> tuple[str, int | None]:
    """(format, group size) the converter stores a tensor in under `recipe` (as convert.plan_files)."""
    name, group = recipe.storage_for(spec.role)
    return choose_storage(name, spec.shape[-1], group)


def recipe_bytes(recipe: Recipe, cfg: ErnieConfig) -> dict[str, float]:
    """`decode_bytes` of a recipe: what a folder converted with it reads per decoded token."""
    def nbytes(spec: TensorSpec) -> int:
        quant, group = recipe_storage(recipe, spec)
        return get_format(quant).nbytes(spec.shape, group)

    return decode_bytes(cfg, nbytes)
