"""Compile every CUDA kernel to PTX for a real GPU without one: type-checks what the simulator
(which runs the kernels as plain Python) cannot. Needs NVVM and libdevice, e.g.

    pip install --target /tmp/nvvm nvidia-cuda-nvcc-cu12
    CUDA_HOME=/tmp/nvvm/nvidia/cuda_nvcc python scripts/cuda_ptx_check.py [--cc 9.0]

Each host entry point of ernie_edge/kernels/cuda is called with numpy arrays of the dtypes the CUDA
backend passes; instead of launching, each kernel is compiled for those argument types. Prints
one line per kernel and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

os.environ.pop("NUMBA_ENABLE_CUDASIM", None)

import numpy as np  # noqa: E402
from numba import cuda, typeof  # noqa: E402
from numba.cuda import dispatcher  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

RESULTS: dict[str, str] = {}


class _FakeDevice:
    compute_capability = (9, 0)


class _Recorder:
    """Stands in for a kernel: `kernel[grid, block, stream](*args)` compiles PTX for args' types."""

    def __init__(self, name, kernel, cc):
        self.name, self.kernel, self.cc = name, kernel, cc

    def __getitem__(self, config):
        def launch(*args):
            sig = tuple(typeof(a) for a in args)
            try:
                ptx, _ = cuda.compile_ptx(self.kernel.py_func, sig, cc=self.cc)
                RESULTS.setdefault(self.name, f"ok ({len(ptx)} bytes of PTX)")
            except Exception:  # noqa: BLE001 (reported, the script goes on)
                RESULTS[self.name] = "FAILED\n" + traceback.format_exc()[-3000:]
        return launch


def _patch(modules, cc):
    _FakeDevice.compute_capability = cc
    dispatcher.get_current_device = lambda: _FakeDevice()
    cuda.device_array = lambda shape, dtype=np.float32, **kw: np.zeros(shape, dtype)
    for m in modules:
        for name, obj in list(vars(m).items()):
            if isinstance(obj, dispatcher.CUDADispatcher) and not obj.targetoptions.get("device"):
                setattr(m, name, _Recorder(f"{m.__name__.rsplit('.', 1)[-1]}.{name}", obj, cc))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", default="9.0", help="compute capability to compile for (default 9.0)")
    a = ap.parse_args()
    cc = tuple(int(p) for p in a.cc.split("."))
    from ernie_edge.kernels.cuda import attention, moe, norm_rope, quant_matmul, quant_matvec, sampling
    _patch([attention, moe, norm_rope, quant_matmul, quant_matvec, sampling], cc)
    f32, f16, i64 = np.float32, np.float16, np.int64
    z = np.zeros
    H, I, O, E, k, D, T = 64, 32, 16, 8, 2, 16, 3
    for bits, codes_dtype, width in ((4, np.uint8, H // 2), (8, np.int8, H)):
        codes = z((O, width), codes_dtype)
        words = quant_matvec.as_words(codes)
        sc = z((O, 2), f16)
        quant_matvec.matvec(words, sc, bits, 32, z(H, f32), z(O, f32))
        quant_matvec.matvec3((words, sc), (words, sc), (words, sc), bits, 32, z(H, f32), z(O, f32), z(O, f32),
                             z(O, f32))
        quant_matmul.matmul(z((T, H), f32), codes, sc, bits, 32, z((T, O), f32))
        bank = z((E, I, width), codes_dtype), z((E, I, 2), f16)
        down = z((E, H, I * bits // 8), codes_dtype), z((E, H, 1), f16)
        tiles = z(1, i64), z(1, i64), z(1, i64)
        quant_matmul.grouped_gate_up(z((T, H), f32), z(T * k, i64), tiles, bank, bank, bits, 32, z((T * k, I), f32))
        quant_matmul.grouped_down(z((T * k, I), f32), tiles, down, bits, 32, z(T * k, f32), z((T * k, H), f32))
        norm_rope.embed((codes, sc, bits, 32), z(T, i64), z((T, H), f32))
        wbank = quant_matvec.as_words(bank[0]), bank[1]
        wdown = quant_matvec.as_words(down[0]), down[1]
        moe.experts_gate_up(z(H, f32), z(k, i64), k, (*wbank, *wbank, bits, 32), (*wbank, *wbank, 8, 32),
                            z((k, I), f32), z(I, f32))
        moe.experts_down(z((k, I), f32), z(k, i64), z(k, f32), k, (*wdown, bits, 32), z(I, f32),
                         (*wdown, 8, 32), z(H, f32))
    quant_matvec.fmatvec(z((O, H), f32), z(H, f32), z(O, f32))
    quant_matmul.fmatmul(z((T, H), f32), z((O, H), f32), z((T, O), f32))
    norm_rope.rmsnorm(z((T, H), f32), z(H, f32), 1e-5, z((T, H), f32))
    norm_rope.embed(z((O, H), f16), z(T, i64), z((T, H), f32))
    norm_rope.rope_kv_write(z((T, 4, D), f32), z((T, 2, D), f32), z((T, 2, D), f32), z(T, i64), z(D // 2, f32),
                            z((2, D, 64), f16), z((2, 64, D), f16), 0)
    norm_rope.silu_mul(z(H, f32), z(H, f32), z(H, f32))
    attention.attention_decode(z((4, D), f32), z((2, D, 256), f16), z((2, 256, D), f16), 200, z((4, D), f32),
                               attention.DecodeScratch(4, D, 256))
    attention.attention_prefill(z((T, 4, D), f32), z((2, D, 64), f16), z((2, 64, D), f16), 5, z((T, 4, D), f32))
    moe.route(z((T, H), f32), z((E, H), f32), z(E, f32), k, 1e-12, z((T, k), i64), z((T, k), f32),
              norm=(z((T, H), f32), z(H, f32), 1e-5))
    moe.combine(z((T * k, H), f32), z((T, k), i64), z((T, H), f32), z((T, H), f32))
    scratch = sampling.TokenScratch()
    sampling.sample(z(100, f32), 90, 0.7, 0.5, scratch)
    width = max(map(len, RESULTS))
    for name, result in sorted(RESULTS.items()):
        print(f"{name:<{width}}  {result}")
    failed = [n for n, r in RESULTS.items() if r.startswith("FAILED")]
    print(f"{len(RESULTS) - len(failed)} kernels compiled for sm_{cc[0]}{cc[1]}, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
