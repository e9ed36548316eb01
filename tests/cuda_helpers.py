"""Helpers of the CUDA kernel tests: quantized test matrices and device uploads. The tests run in
numba's CUDA simulator (tests/conftest.py) at tiny shapes, or on a GPU under benchmarks/gpu_check.sh."""

from __future__ import annotations

import numpy as np

from ernie_edge.formats.quant import dequantize_q4, dequantize_q8, quantize_q4, quantize_q8

FORMATS = [(4, 32), (4, 64), (4, 128), (8, 32)]  # (bits, group size)


def quantized(rng, shape, bits: int, group_size: int):
    """(codes, fp16 scales, the dequantized float32 matrix: the spec) of a random [..., O, K]."""
    w = rng.standard_normal(shape).astype(np.float32)
    if bits == 4:
        codes, scales = quantize_q4(w, group_size)
        return codes, scales, dequantize_q4(codes, scales, group_size)
    codes, scales = quantize_q8(w, group_size)
    return codes, scales, dequantize_q8(codes, scales, group_size)


def dev(a):
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(a))


def host(d):
    return d.copy_to_host()
