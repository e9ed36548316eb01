"""numba.cuda kernels: the GPU half of the kernel set (docs/ARCHITECTURE.md, "cuda backend").

Nothing here is imported by `import ernie_edge`: the CUDA backend (ernie_edge/cuda_model.py) imports
these modules when a model is loaded with device="cuda". Each kernel reads the weights in the
stored layout of ernie_edge/formats/quant.py and is tested against a plain numpy twin in
tests/test_cuda_kernels*.py, in numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) on machines without
a GPU and on the device itself by benchmarks/gpu_check.sh.
"""
