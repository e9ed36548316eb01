"""MoE-aware CPU/GPU placement (ernie_edge/placement.py), planned without a GPU; the --device and
--gpu-experts flags and the message when there is no usable GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_helpers import assert_user_error, cli_env, run
from ernie_edge.errors import ErnieEdgeError
from ernie_edge.placement import (GpuInfo, ModelSizes, model_sizes, parse_gpu_experts, plan_placement)

GIB = 2 ** 30
# 4 MoE layers (1..4) of 1 GiB routed experts each, 2 GiB of the rest, 1 MiB of KV per position.
SIZES = ModelSizes(dense_bytes=2 * GIB, expert_bytes={1: GIB, 2: GIB, 3: GIB, 4: GIB},
                   kv_bytes_per_token=1 << 20, workspace_bytes=0)


def gpu(free_gib: float) -> GpuInfo:
    """A card with `free_gib` free of free + 2 GiB (headroom: the 0.5 GiB floor below 10 GiB)."""
    return GpuInfo("Test GPU", int(free_gib * GIB), int((free_gib + 2) * GIB))


def test_cpu_device_plans_everything_on_the_cpu():
    plan = plan_placement(SIZES, "cpu", None, gpu(80))
    assert plan.device == "cpu" and plan.cpu_expert_layers == (1, 2, 3, 4) and plan.gpu_bytes == 0
    assert plan.describe() == "placement: everything on the CPU"


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_no_gpu_falls_back_to_the_cpu_with_the_reason(device):
    plan = plan_placement(SIZES, device, None, None, "numba finds no CUDA driver or no NVIDIA GPU")
    assert plan.device == "cpu"
    assert "no usable GPU: numba finds no CUDA driver" in plan.describe()


def test_auto_never_takes_the_simulator_but_cuda_does():
    sim = GpuInfo("numba CUDA simulator", None, None, simulated=True)
    assert plan_placement(SIZES, "auto", None, sim).device == "cpu"
    assert "simulator is not a GPU" in plan_placement(SIZES, "auto", None, sim).note
    assert plan_placement(SIZES, "cuda", None, sim).gpu_expert_layers == (1, 2, 3, 4)


def test_everything_fits_on_a_large_gpu():
    plan = plan_placement(SIZES, "auto", None, gpu(80), context=1024)
    assert plan.device == "cuda" and plan.gpu_expert_layers == (1, 2, 3, 4) and not plan.cpu_expert_layers
    assert plan.gpu_bytes == 2 * GIB + 4 * GIB + 1024 * (1 << 20)
    assert "routed experts of 4 of 4 MoE layers" in plan.describe()


def test_auto_fits_as_many_expert_layers_as_free_memory_holds():
    # 6 GiB free - 0.5 GiB headroom = 5.5: dense 2 + KV 1 leaves room for 2 layers of experts.
    plan = plan_placement(SIZES, "auto", None, gpu(6.0), context=1024)
    assert plan.gpu_expert_layers == (1, 2) and plan.cpu_expert_layers == (3, 4)
    assert "on the CPU: routed experts of MoE layers 3-4" in plan.describe()
    assert "do not fit" in plan.note


def test_explicit_counts_all_and_none():
    assert plan_placement(SIZES, "cuda", 3, gpu(80)).gpu_expert_layers == (1, 2, 3)
    assert plan_placement(SIZES, "cuda", "3", gpu(80)).cpu_expert_layers == (4,)
    assert plan_placement(SIZES, "cuda", 99, gpu(80)).gpu_expert_layers == (1, 2, 3, 4)
    none = plan_placement(SIZES, "cuda", "none", gpu(80))
    assert none.device == "cuda" and none.gpu_expert_layers == () and none.expert_bytes == 0


def test_an_explicit_request_that_does_not_fit_is_an_error_naming_the_sizes():
    with pytest.raises(ErnieEdgeError, match=r"has 6.00 GiB free.*needs about 7.00 GiB"):
        plan_placement(SIZES, "cuda", "all", gpu(6.0), context=1024)


def test_when_not_even_the_dense_part_fits_auto_runs_on_the_cpu_and_cuda_refuses():
    plan = plan_placement(SIZES, "auto", None, gpu(2.0), context=1024)
    assert plan.device == "cpu" and "even with every routed expert on the CPU" in plan.note
    with pytest.raises(ErnieEdgeError, match="has 2.00 GiB free"):
        plan_placement(SIZES, "cuda", None, gpu(2.0), context=1024)


@pytest.mark.parametrize("bad", ["-1", "half", "2.5", True, ""])
def test_bad_gpu_experts_values_name_the_flag(bad):
    with pytest.raises(ErnieEdgeError, match="--gpu-experts"):
        parse_gpu_experts(bad)


def test_bad_device_is_refused():
    with pytest.raises(ErnieEdgeError, match="device 'tpu'"):
        plan_placement(SIZES, "tpu", None, None)


def test_model_sizes_split_the_manifest(tiny_edge_dir):
    from ernie_edge.edge_checkpoint import EdgeCheckpoint
    ck = EdgeCheckpoint(tiny_edge_dir)
    sizes = model_sizes(ck)
    cfg = ck.config
    assert sorted(sizes.expert_bytes) == cfg.moe_layers
    assert sizes.dense_bytes + sum(sizes.expert_bytes.values()) == sum(t.nbytes for t in ck.manifest.tensors.values())
    assert sizes.kv_bytes_per_token == 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.dim_head
    assert sizes.workspace_bytes > 0


def test_bench_with_device_auto_and_no_gpu_says_why_and_runs_on_the_cpu(tiny_edge_dir, tmp_path):
    """No CUDA driver (forced: a driver path that does not exist, and no simulator)."""
    env = dict(cli_env(), NUMBA_ENABLE_CUDASIM="0", NUMBA_CUDA_DRIVER=str(tmp_path / "no-libcuda.so"))
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "-m", "ernie_edge.cli", "bench", "--model", str(tiny_edge_dir),
                           "--prompt-tokens", "4", "--gen-tokens", "2", "--device", "auto", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "placement: everything on the CPU (no usable GPU:" in proc.stderr
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["placement"] is None


def test_cli_refuses_a_bad_gpu_experts_value(tiny_edge_dir):
    assert_user_error(run("bench", "--model", tiny_edge_dir, "--device", "cuda", "--gpu-experts", "some",
                          check=False), "--gpu-experts must be all, none or a number")


def test_serve_settings_check_the_device_flags():
    from ernie_edge.server import ServeSettings
    with pytest.raises(ErnieEdgeError, match="--gpu-experts"):
        ServeSettings(model="m", device="cuda", gpu_experts="x").check()
    assert ServeSettings(model="m", device="auto", gpu_experts="2").engine_settings().gpu_experts == "2"


def test_importing_and_loading_on_the_cpu_never_imports_numba_cuda(tiny_edge_dir):
    code = ("import sys, ernie_edge, ernie_edge.cli, ernie_edge.engine; ernie_edge.load(sys.argv[1]); "
            "assert not [m for m in sys.modules if m.startswith('numba.cuda')], 'numba.cuda was imported'")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_edge_dir)], capture_output=True, text=True,
                          env=dict(cli_env(), NUMBA_ENABLE_CUDASIM="0"), timeout=300)
    assert proc.returncode == 0, proc.stderr
