"""Numba kernels (CPU). Every kernel is tested against the plain numpy functions in
ernie_edge.reference / ernie_edge.formats.quant. Numba options and code-generation choices live in
_jit.py, the LLVM IR toolkit of the intrinsics in ir.py."""
