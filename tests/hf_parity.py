"""Compare an ernie-edge Model with transformers' Ernie4_5_MoeForCausalLM (fp32, eager attention).

Shared by tests/test_parity_transformers.py and benchmarks/parity.py. Test-only: imports torch.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Ernie4_5_MoeForCausalLM

import ernie_edge
from ernie_edge.reference import RoutingTrace


def load_hf(path) -> Ernie4_5_MoeForCausalLM:
    model = Ernie4_5_MoeForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_forward(hf, ids, offset: int = 0) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Logits [T, V] and the experts each MoE layer chose, sorted per token: {layer: [T, K]}."""
    routing: dict[int, np.ndarray] = {}
    hooks = []
    for i, layer in enumerate(hf.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "moe_statics"):
            def hook(_mod, _inp, out, i=i):
                routing[i] = np.sort(out[2].numpy(), axis=-1)
            hooks.append(gate.register_forward_hook(hook))
    try:
        t = torch.tensor(np.asarray(ids))[None]
        pos = torch.arange(offset, offset + t.shape[1])[None]
        with torch.no_grad():
            logits = hf(t, position_ids=pos).logits[0].numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, routing


def hf_greedy(hf, ids, n: int) -> list[int]:
    """n greedy tokens with transformers' own KV cache (no stop tokens)."""
    out, past = [], None
    step = torch.tensor(np.asarray(ids))[None]
    with torch.no_grad():
        for _ in range(n):
            res = hf(step, cache=past, use_cache=True) if past is not None else hf(step, use_cache=True)
            past = getattr(res, "cache", None) or res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            step = torch.tensor([[nxt]])
    return out


def edge_greedy(model, ids, n: int) -> list[int]:
    cache = model.new_cache()
    logits = model.prefill(ids, cache)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(logits))
        out.append(nxt)
        logits = model.decode(nxt, cache)
    return out


def edge_forward(model, ids, offset: int = 0) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    trace = RoutingTrace()
    cache = model.new_cache(start_position=offset)
    hidden = model.forward(ids, cache, trace)
    logits = model.backend.logits(hidden)
    return logits, {layer: trace.layer(layer) for layer in trace.experts}


def compare(model_dir, hf, ids, offset: int = 0, model=None) -> dict:
    """Figures for one sequence: max |dlogit|, argmax and routing agreement."""
    model = model or ernie_edge.load(model_dir)
    ours, our_routes = edge_forward(model, ids, offset)
    ref, ref_routes = hf_forward(hf, ids, offset)
    assert our_routes.keys() == ref_routes.keys(), (our_routes.keys(), ref_routes.keys())
    same = [np.array_equal(our_routes[k], ref_routes[k]) for k in ref_routes]
    rows = sum(int(np.all(our_routes[k] == ref_routes[k], axis=-1).sum()) for k in ref_routes)
    total = sum(len(ref_routes[k]) for k in ref_routes)
    return {
        "tokens": len(ids), "offset": offset,
        "max_abs_dlogit": float(np.max(np.abs(ours - ref))),
        "argmax_agreement": float(np.mean(ours.argmax(-1) == ref.argmax(-1))),
        "routing_identical_layers": int(sum(same)), "moe_layers": len(same),
        "routing_agreement": rows / max(total, 1),
    }
