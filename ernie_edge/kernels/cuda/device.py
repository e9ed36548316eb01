"""What every CUDA kernel module shares: the jit decorators, block sizes, small device helpers,
and the probe for a usable GPU.

NUMBA_ENABLE_CUDASIM=1 (set before numba is first imported) runs every kernel in numba's CUDA
simulator: each CUDA thread a Python thread, so the tests use tiny shapes. The simulator has no warp
shuffles (and numba compiles its shuffle wrapper only with a device present), so block reductions
go through shared memory: each thread stores its partial sum, one `syncthreads`, then lane 0 of a
warp adds the warp's 32 partials in a fixed order (deterministic, and one barrier instead of five).

Block sizes: the row kernels (matvec, experts, norms, router) use THREADS threads per block, a
multiple of the warp; the simulator uses 64 (two warps, so the cross-warp paths still run) to keep
the tests fast. The tiled matmul and attention kernels have fixed tile shapes (quant_matmul.py,
attention.py).
"""

from __future__ import annotations

import numba
from numba import cuda, float32

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
WARP = 32
THREADS = 64 if SIMULATOR else 256  # threads per block of the row kernels
ROWS = THREADS // WARP  # output rows per block of a matvec: one warp per row
MAX_THREADS = 256  # shared-memory arrays are sized for this many threads
# Kernels loop over their work with grid strides, so any grid covers it; on a device the grid is
# the whole work (one pass), the simulator caps it (each simulated thread is a Python thread).
GRID_CAP = 2 if SIMULATOR else 1 << 30


def jit(fn):
    """A kernel: strict IEEE float32 (no fastmath: the attention softmax relies on -inf), cached on
    disk on a real device."""
    if SIMULATOR:
        return cuda.jit(fn)
    return cuda.jit(fn, cache=True)


def device_jit(fn):
    """A device function, inlined into its kernels."""
    return cuda.jit(fn, device=True, inline=True)


# numba 0.68's built-in CUDA target types the builtin min / max through their iterable overload and
# fails to compile them (a TypeError on a real device; the simulator runs Python's): kernels use these.
@device_jit
def dmin(a, b):
    return a if a <= b else b


@device_jit
def dmax(a, b):
    return a if a >= b else b


@device_jit
def warp_total(part, base):
    """Sum of part[base : base + 32] in index order (lane 0 of a warp calls it after a barrier)."""
    s = float32(0.0)
    for i in range(WARP):
        s += part[base + i]
    return s


@device_jit
def block_total(part, n):
    """Sum of part[0:n] in index order (one thread calls it after a barrier)."""
    s = float32(0.0)
    for i in range(n):
        s += part[i]
    return s


@device_jit
def block_max(part, n):
    m = part[0]
    for i in range(1, n):
        if part[i] > m:
            m = part[i]
    return m


def blocks(n: int, per_block: int) -> int:
    """Blocks of `per_block` items that cover n items in one pass (at least one; capped under the
    simulator, the kernels' grid-stride loops doing the rest)."""
    return min(max(1, -(-n // per_block)), GRID_CAP)


# ---- the device probe ------------------------------------------------------------------------------

def probe() -> tuple[dict | None, str]:
    """({name, free_bytes, total_bytes, compute_capability, simulated}, "") of the current CUDA
    device, or (None, why there is none). Never raises: a missing driver, no NVIDIA GPU, or a
    failing context are all reasons. (ernie_edge/placement.py turns it into a GpuInfo.)"""
    try:
        if not cuda.is_available():
            return None, "numba finds no CUDA driver or no NVIDIA GPU (see `numba -s`)"
        ctx = cuda.current_context()
        cc = tuple(ctx.device.compute_capability)
        if SIMULATOR:
            return dict(name="numba CUDA simulator", free_bytes=None, total_bytes=None, compute_capability=cc,
                        simulated=True), ""
        from numba.cuda.cudadrv import nvvm
        if not nvvm.is_available():
            return None, ("a CUDA driver is there but not NVVM, the compiler numba needs (the CUDA toolkit; or "
                          "`pip install nvidia-cuda-nvcc-cu12` and CUDA_HOME=<site-packages>/nvidia/cuda_nvcc)")
        free, total = ctx.get_memory_info()
        name = ctx.device.name
        name = name.decode() if isinstance(name, bytes) else str(name)
        return dict(name=name, free_bytes=int(free), total_bytes=int(total), compute_capability=cc,
                    simulated=False), ""
    except Exception as e:  # noqa: BLE001 (any driver failure means: no usable GPU)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"CUDA is not usable: {first}"
