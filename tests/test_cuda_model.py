"""The CUDA backend end to end, against the CPU backend on the same converted model: full-model
logits, decode over a growing device KV cache, cache clones, and the mixed placement (routed
experts of some MoE layers on the CPU). numba's CUDA simulator by default (tests/conftest.py), so
the model is a small synthetic one; benchmarks/gpu_check.sh runs this file on a GPU too."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import ernie_edge
from ernie_edge import cuda_kv_cache
from ernie_edge.quant import synthetic
from ernie_edge.quant.convert import ConvertSettings, convert
from ernie_edge.reference import RoutingTrace

pytestmark = pytest.mark.usefixtures("simulator_gil")

# 3 layers (dense layer 0, MoE 1-2), 4 query / 2 KV heads, 4 experts / 2 active, 1 shared expert.
SMALL = dict(layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
             moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, intermediate_size=64)


@pytest.fixture(scope="module")
def small_edge(tiny_dir, tmp_path_factory):
    """A converted small model (the tokenizer files are the tiny model's: only ids are used)."""
    src = synthetic.write_checkpoint(tmp_path_factory.mktemp("cuda_small"), "tiny", tokenizer=False, seed=3, **SMALL)
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, src / f.name)
    return convert(ConvertSettings(source=str(src), dest=tmp_path_factory.mktemp("cuda_edge") / "m", progress=False))


def kld(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, from logits."""
    lp = p_logits - p_logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = q_logits - q_logits.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(-1)


def test_cuda_model_logits_and_decode_match_the_cpu_backend(small_edge, monkeypatch):
    monkeypatch.setattr(cuda_kv_cache, "GROW_CHUNK", 4)  # the cache grows (and copies) during the test
    cpu = ernie_edge.load(small_edge, prefill_acts="i16", decode_acts="i16")  # the arithmetic the GPU computes
    gpu = ernie_edge.load(small_edge, device="cuda", log=lambda text: None)
    assert gpu.backend_name == "cuda" and gpu.placement.gpu_expert_layers == (1, 2)
    ids = [5, 17, 100, 2, 99]
    trace_cpu, trace_gpu = RoutingTrace(), RoutingTrace()
    want = cpu.logits(ids, trace_cpu)
    got = gpu.logits(ids, trace_gpu)
    assert kld(want, got).max() <= 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()
    for layer in (1, 2):
        np.testing.assert_array_equal(trace_gpu.layer(layer), trace_cpu.layer(layer))
    c_cpu, c_gpu = cpu.new_cache(), gpu.new_cache()
    cpu.prefill(ids[:3], c_cpu)
    gpu.prefill(ids[:3], c_gpu)
    for token in (7, 64):  # positions 3 and 4: the second one past the first chunk of 4
        want, got = cpu.decode(token, c_cpu), gpu.decode(token, c_gpu)
        assert kld(want[None], got[None])[0] <= 1e-4
    assert c_gpu.capacity == 8 and c_gpu.length == 5
    clone = c_gpu.clone()  # its own copy of the positions: rewinding it leaves c_gpu as it was
    clone.truncate(4)
    c_cpu.truncate(4)
    assert clone.length == 4 and c_gpu.length == 5
    assert kld(cpu.decode(11, c_cpu)[None], gpu.decode(11, clone)[None])[0] <= 1e-4


def test_cuda_model_with_routed_experts_on_the_cpu(small_edge):
    """--gpu-experts 1: layer 1's routed experts on the GPU, layer 2's on the CPU kernels."""
    cpu = ernie_edge.load(small_edge, prefill_acts="i16", decode_acts="i16")  # the arithmetic the GPU computes
    shown = []
    gpu = ernie_edge.load(small_edge, device="cuda", gpu_experts=1, log=shown.append)
    assert gpu.placement.gpu_expert_layers == (1,) and gpu.placement.cpu_expert_layers == (2,)
    assert "on the CPU: routed experts of MoE layers 2" in shown[0]
    ids = [9, 4, 77, 31]
    assert kld(cpu.logits(ids), gpu.logits(ids)).max() <= 1e-4
    c_cpu, c_gpu = cpu.new_cache(), gpu.new_cache()
    cpu.prefill(ids, c_cpu)
    gpu.prefill(ids, c_gpu)
    assert kld(cpu.decode(50, c_cpu)[None], gpu.decode(50, c_gpu)[None])[0] <= 1e-4


def test_cuda_device_with_a_reference_or_cpu_backend_is_refused(small_edge):
    with pytest.raises(ernie_edge.ErnieEdgeError, match="needs backend 'auto'"):
        ernie_edge.load(small_edge, backend="cpu", device="cuda")
    with pytest.raises(ernie_edge.ErnieEdgeError, match="f16 KV cache"):
        ernie_edge.load(small_edge, device="cuda", kv_dtype="i8", log=lambda text: None)
