"""Where a model's weights go: the CPU, the GPU, or both (MoE-aware placement, llama.cpp's
--cpu-moe / --n-cpu-moe). Pure Python: planned and tested without a GPU.

Everything that runs every token (embedding and LM head, attention, norms, router, layer 0's dense
MLP, the shared experts) and the KV cache go to the GPU; the routed experts of the first N MoE
layers go with them and the rest stay in host memory, run by the CPU kernels (`--gpu-experts
all|none|N`). `--device auto` takes the GPU when there is one and fits the largest N into its free
memory; with no GPU (no NVIDIA GPU, no CUDA driver, or numba's simulator) it says why and runs on
the CPU.

    gpu, why = probe_gpu()
    plan = plan_placement(model_sizes(ck), "auto", None, gpu, why, context=8192)
    print(plan.describe())

The estimate counts the weights as stored (the device copy has the file's layout), the fp16 KV
cache for `context` positions, and the activation buffers of a decode step and a prefill chunk;
HEADROOM_BYTES (or HEADROOM_FRACTION of the card, if larger) stays free for the CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ErnieConfig
from .errors import ErnieEdgeError

DEVICES = ("cpu", "cuda", "auto")
HEADROOM_BYTES = 512 << 20
HEADROOM_FRACTION = 0.05
DEFAULT_CONTEXT = 8192  # KV positions reserved when no context is given
PREFILL_CHUNK = 512  # tokens per prefill step of the CUDA backend (its buffers are sized for it)


@dataclass(frozen=True)
class GpuInfo:
    """A CUDA device. free/total in bytes; None under numba's simulator (no limit)."""

    name: str
    free_bytes: int | None
    total_bytes: int | None
    simulated: bool = False


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of a converted model, as stored: what is not a routed expert, and each MoE layer's
    routed expert banks; and the shapes the KV cache and activation buffers follow from."""

    dense_bytes: int
    expert_bytes: dict[int, int]  # MoE layer -> bytes of its routed experts
    kv_bytes_per_token: int  # fp16 K and V, all layers
    workspace_bytes: int  # activation buffers (decode step + one prefill chunk)


@dataclass(frozen=True)
class Plan:
    device: str  # "cpu" or "cuda"
    gpu_expert_layers: tuple[int, ...] = ()  # MoE layers whose routed experts run on the GPU
    cpu_expert_layers: tuple[int, ...] = ()  # ... on the CPU (all of them for device "cpu")
    context: int = 0
    dense_bytes: int = 0  # on the GPU
    expert_bytes: int = 0  # routed experts on the GPU
    kv_bytes: int = 0
    workspace_bytes: int = 0
    gpu_name: str | None = None
    free_bytes: int | None = None
    note: str = ""  # why the plan is what it is (a fallback, a fitted N)

    @property
    def gpu_bytes(self) -> int:
        return self.dense_bytes + self.expert_bytes + self.kv_bytes + self.workspace_bytes

    def describe(self) -> str:
        """The plan and its memory estimate, for the user (printed before loading)."""
        if self.device == "cpu":
            return "placement: everything on the CPU" + (f" ({self.note})" if self.note else "")
        gib = 2 ** 30
        moe = len(self.gpu_expert_layers) + len(self.cpu_expert_layers)
        free = "no limit (simulator)" if self.free_bytes is None else f"{self.free_bytes / gib:.2f} GiB free"
        lines = [f"placement: GPU {self.gpu_name} ({free})",
                 f"  on the GPU: attention, norms, router, shared experts, embedding/LM head "
                 f"({self.dense_bytes / gib:.2f} GiB), routed experts of {len(self.gpu_expert_layers)} of "
                 f"{moe} MoE layers ({self.expert_bytes / gib:.2f} GiB), KV cache for {self.context} positions "
                 f"({self.kv_bytes / gib:.2f} GiB), buffers ({self.workspace_bytes / gib:.2f} GiB): "
                 f"{self.gpu_bytes / gib:.2f} GiB in all"]
        if self.cpu_expert_layers:
            lines.append(f"  on the CPU: routed experts of MoE layers {_ranges(self.cpu_expert_layers)}")
        if self.note:
            lines.append(f"  ({self.note})")
        return "\n".join(lines)


def parse_gpu_experts(value) -> str | int | None:
    """--gpu-experts: "all", "none", a count N >= 0 (the first N MoE layers), or None (fit)."""
    if value is None or value in ("all", "none"):
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if isinstance(value, bool) or n < 0 or str(n) != str(value).strip():
        raise ErnieEdgeError(f"--gpu-experts must be all, none or a number of MoE layers >= 0; got {value!r}")
    return n


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise ErnieEdgeError(f"device {device!r} is not one of {', '.join(DEVICES)}")


def plan_placement(sizes: ModelSizes, device: str, gpu_experts, gpu: GpuInfo | None, why_no_gpu: str = "",
                   context: int = DEFAULT_CONTEXT) -> Plan:
    """The plan for `device` ("cpu", "cuda", "auto") and `gpu_experts` ("all", "none", N, or None:
    as many as fit). A GPU that lacks room for an explicit request is an error naming the sizes;
    `auto` falls back to fewer experts, then to the CPU."""
    check_device(device)
    gpu_experts = parse_gpu_experts(gpu_experts)
    layers = tuple(sorted(sizes.expert_bytes))
    cpu_plan = Plan("cpu", cpu_expert_layers=layers)
    if device == "cpu":
        return cpu_plan
    if gpu is not None and gpu.simulated and device == "auto":
        gpu, why_no_gpu = None, "numba's CUDA simulator is not a GPU"
    if gpu is None:
        return Plan("cpu", cpu_expert_layers=layers,
                    note=f"no usable GPU: {why_no_gpu or 'none found'}; running on the CPU")
    kv = sizes.kv_bytes_per_token * context
    base = sizes.dense_bytes + kv + sizes.workspace_bytes
    budget = None if gpu.free_bytes is None else gpu.free_bytes - max(
        HEADROOM_BYTES, int(HEADROOM_FRACTION * (gpu.total_bytes or gpu.free_bytes)))

    def fits(n: int) -> bool:
        return budget is None or base + sum(sizes.expert_bytes[i] for i in layers[:n]) <= budget

    note = ""
    if gpu_experts is None:
        n = next((m for m in range(len(layers), -1, -1) if fits(m)), None)
        if n is None:
            if device == "auto":
                return Plan("cpu", cpu_expert_layers=layers, note=(
                    f"the GPU {gpu.name} has {_gib(gpu.free_bytes)} free, the model needs {_gib(base)} there "
                    f"even with every routed expert on the CPU; running on the CPU"))
            raise ErnieEdgeError(_too_big(gpu, base, context))
        if n < len(layers):
            note = f"the routed experts of {len(layers) - n} MoE layers do not fit in the GPU's free memory"
    else:
        n = len(layers) if gpu_experts == "all" else 0 if gpu_experts == "none" else min(gpu_experts, len(layers))
        if not fits(n):
            need = base + sum(sizes.expert_bytes[i] for i in layers[:n])
            raise ErnieEdgeError(_too_big(gpu, need, context) + "; try fewer --gpu-experts (or leave the flag out "
                                 "to fit as many as the GPU holds)")
    return Plan("cuda", gpu_expert_layers=layers[:n], cpu_expert_layers=layers[n:], context=context,
                dense_bytes=sizes.dense_bytes, expert_bytes=sum(sizes.expert_bytes[i] for i in layers[:n]),
                kv_bytes=kv, workspace_bytes=sizes.workspace_bytes, gpu_name=gpu.name, free_bytes=gpu.free_bytes,
                note=note)


def model_sizes(ck, chunk: int = PREFILL_CHUNK) -> ModelSizes:
    """ModelSizes of a converted folder (an EdgeCheckpoint), from its manifest."""
    from .manifest import bank_name
    cfg: ErnieConfig = ck.config
    experts = {i: sum(ck.manifest.tensors[bank_name(i, p)].nbytes for p in ("gate", "up", "down"))
               for i in cfg.moe_layers}
    total = sum(t.nbytes for t in ck.manifest.tensors.values())
    return ModelSizes(dense_bytes=total - sum(experts.values()), expert_bytes=experts,
                      kv_bytes_per_token=kv_bytes_per_token(cfg), workspace_bytes=workspace_bytes(cfg, chunk))


def kv_bytes_per_token(cfg: ErnieConfig) -> int:
    return 2 * 2 * cfg.num_hidden_layers * cfg.kv_dim  # K and V, fp16


def workspace_bytes(cfg: ErnieConfig, chunk: int = PREFILL_CHUNK) -> int:
    """float32 activations of one prefill chunk (the larger of the step's buffers) and the logits."""
    k = max(cfg.moe_k, 1)
    widest = max(cfg.intermediate_size, cfg.shared_intermediate_size, cfg.moe_intermediate_size)
    per_token = (4 * cfg.hidden_size + 2 * cfg.q_dim + 2 * cfg.kv_dim + k * (cfg.moe_intermediate_size
                 + cfg.hidden_size) + widest + cfg.hidden_size)
    return 4 * (chunk * per_token + cfg.vocab_size)


def _too_big(gpu: GpuInfo, need: int, context: int) -> str:
    return (f"the GPU {gpu.name} has {_gib(gpu.free_bytes)} free, this placement needs about {_gib(need)} "
            f"(KV cache for {context} positions included)")


def _gib(n: int | None) -> str:
    return "unlimited" if n is None else f"{n / 2 ** 30:.2f} GiB"


def _ranges(layers) -> str:
    """(1, 2, 3, 7) -> "1-3, 7"."""
    out, start = [], None
    for i, v in enumerate(layers):
        if start is None:
            start = v
        if i + 1 == len(layers) or layers[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


def probe_gpu() -> tuple[GpuInfo | None, str]:
    """(the CUDA device numba would use, "") or (None, why there is none). Imports numba.cuda only
    now, so that `import ernie_edge` never needs CUDA."""
    try:
        from .kernels.cuda.device import probe
    except Exception as e:  # noqa: BLE001 (a broken CUDA install is "no GPU", with its reason)
        return None, f"numba.cuda cannot be imported ({e})"
    found, why = probe()
    if found is None:
        return None, why
    return GpuInfo(found["name"], found["free_bytes"], found["total_bytes"], found["simulated"]), ""
