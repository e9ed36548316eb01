"""Shared fixtures: tiny synthetic ERNIE checkpoints built once per session (never downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
# The CUDA kernels run in numba's simulator unless a real GPU is asked for (benchmarks/gpu_check.sh
# sets ERNIE_EDGE_CUDA_TESTS=gpu). It must be set before numba is first imported.
if os.environ.get("ERNIE_EDGE_CUDA_TESTS") != "gpu":
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import pytest  # noqa: E402

from ernie_edge.quant import synthetic  # noqa: E402

# Three tiny configs that differ in experts / k / shared experts / layer layout.
PARITY_CONFIGS = {
    # the real 20/4 head layout (GQA 5), explicit head_dim, 16 experts / 4 active, 2 shared.
    "real_heads": dict(preset="tiny"),
    # MoE every second layer from layer 2 (MoE at 3 and 5), 8 experts / 2 active, 1 shared.
    "interval2": dict(preset="tiny", layers=6, moe_layer_start_index=2, moe_layer_interval=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=8, moe_num_experts=8,
                      moe_k=2, moe_num_shared_experts=1),
    # k equal to the number of experts, no shared expert, dense last layer, head_dim != H/heads.
    "k_all_dense_last": dict(preset="tiny", layers=4, moe_layer_end_index=2, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=32, moe_num_experts=6, moe_k=6,
                             moe_num_shared_experts=0),
}


@pytest.fixture(scope="module")
def simulator_gil():
    """numba's CUDA simulator runs each CUDA thread as a Python thread, polled by a busy loop: a
    shorter GIL switch interval lets the threads reach their barriers sooner (about 1.7x faster).
    The CUDA test modules use it; nothing else's timing changes."""
    import sys
    old = sys.getswitchinterval()
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        sys.setswitchinterval(0.0005)
    yield
    sys.setswitchinterval(old)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny preset with tokenizer files: the default model of the test suite."""
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="session")
def make_parity_dir(tmp_path_factory):
    """name -> folder of that PARITY_CONFIGS checkpoint, built once per session."""
    built = {}

    def make(name):
        if name not in built:
            kwargs = dict(PARITY_CONFIGS[name])
            built[name] = synthetic.write_checkpoint(tmp_path_factory.mktemp(name), tokenizer=False,
                                                     seed=len(name), **kwargs)
        return built[name]
    return make


@pytest.fixture(scope="session", params=sorted(PARITY_CONFIGS))
def parity_dir(request, make_parity_dir):
    return make_parity_dir(request.param)


@pytest.fixture(scope="session")
def tiny_edge_dir(tiny_dir, tmp_path_factory):
    """tiny_dir converted with the default recipe: what the command line runs."""
    from ernie_edge.quant.convert import ConvertSettings, convert
    return convert(ConvertSettings(source=str(tiny_dir), dest=tmp_path_factory.mktemp("edge") / "tiny-q4g32-d8",
                                   progress=False))
