"""Numba kernels (CPU) and, under cuda/, their numba.cuda twins. Every kernel is tested against
the plain numpy functions in ernie_edge.reference / ernie_edge.formats.quant."""
