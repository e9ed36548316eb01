"""The storage formats of an edge model folder, one row each (llama.cpp's `type_traits` habit).

A row binds everything the rest of the code needs to know about a format: its bits, the stored
arrays (safetensors dtype, tensor names, shapes), its size on disk, and its reference quantize /
dequantize functions (ernie_edge/formats/quant.py is the spec of q4, q5, q6 and q8). The manifest, the
converter, the loader, `ernie-edge info` and the CLI read this table; a backend binds its kernels
to a row by name (the CPU backend's binding is `CPU_KERNELS` in ernie_edge/cpu_weights.py), so a
new format or a new backend is a new row, not a new branch in the model.

  name  identifier      stored arrays                                         bits / weight
  q4    int4-sym-g{G}   NAME.qweight U8 [..., O, K/2]   NAME.scales F16 [..., O, K/G]   4 + 16/G
  q5    int5-sym-g{G}   NAME.qweight U8 [..., O, 5K/8]  NAME.scales F16 [..., O, K/G]   5 + 16/G
  q6    int6-sym-g{G}   NAME.qweight U8 [..., O, 3K/4]  NAME.scales F16 [..., O, K/G]   6 + 16/G
  q8    int8-sym-g{G}   NAME.qweight I8 [..., O, K]     NAME.scales F16 [..., O, K/G]   8 + 16/G
  f16   f16             NAME F16 [..., K]                                              16
  f32   f32             NAME F32 [..., K]                                              32
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP_SIZES = (32, 64, 128)  # weights per fp16 scale; the kernels need multiples of 32


@dataclass(frozen=True)
class Format:
    """One storage format. `grouped` formats keep one fp16 scale per group of `group_size` inputs."""

    name: str  # the manifest's "quant" value
    bits: int  # bits per stored code or value
    dtype: str  # safetensors dtype of the stored data
    grouped: bool
    spec: str = ""  # suffix of its reference functions in formats/quant.py: quantize_SPEC, dequantize_SPEC

    def identifier(self, group_size: int | None) -> str:
        """The format's long name, e.g. "int4-sym-g32" (docs/FORMAT.md)."""
        return f"int{self.bits}-sym-g{group_size}" if self.grouped else self.name

    def bits_per_weight(self, group_size: int | None) -> float:
        return self.bits + 16.0 / group_size if self.grouped else float(self.bits)

    def fits(self, k: int, group_size: int | None) -> bool:
        """Whether a tensor with input width k can be stored in this format at this group size."""
        return not self.grouped or (group_size in GROUP_SIZES and k % group_size == 0)

    def stored_names(self, name: str) -> tuple[str, str | None]:
        """(data tensor, scales tensor or None) names inside the safetensors file."""
        return (name + ".qweight", name + ".scales") if self.grouped else (name, None)

    def stored_shapes(self, shape: tuple[int, ...], group_size: int | None):
        """(data shape, scales shape or None) of a logical [..., K] tensor."""
        *lead, k = shape
        if not self.grouped:
            return tuple(shape), None
        return (*lead, k * self.bits // 8), (*lead, k // group_size)

    def nbytes(self, shape: tuple[int, ...], group_size: int | None) -> int:
        """Bytes on disk of a logical tensor: codes plus fp16 scales, or plain values."""
        count = 1
        for d in shape:
            count *= int(d)
        scales = (count // group_size) * 2 if self.grouped else 0
        return count * self.bits // 8 + scales

    def quantize(self, w: np.ndarray, group_size: int | None) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 [..., K] -> (data, fp16 scales or None) in this format's stored layout."""
        if self.grouped:
            return self._reference("quantize")(w, group_size)
        return np.ascontiguousarray(w, np.float16 if self.bits == 16 else np.float32), None

    def dequantize(self, data: np.ndarray, scales: np.ndarray | None, group_size: int | None) -> np.ndarray:
        """The stored arrays back to float32 [..., K] (scales as float16 or their uint16 bits)."""
        if self.grouped:
            return self._reference("dequantize")(data, scales.view(np.float16), group_size)
        return data.astype(np.float32)

    def _reference(self, what: str):
        from . import quant  # numba-compiled quantizers: imported on first use, not by the CLI's start

        return getattr(quant, f"{what}_{self.spec}")


Q4 = Format("q4", 4, "U8", True, "q4")
Q5 = Format("q5", 5, "U8", True, "q5")
Q6 = Format("q6", 6, "U8", True, "q6")
Q8 = Format("q8", 8, "I8", True, "q8")
F16 = Format("f16", 16, "F16", False)
F32 = Format("f32", 32, "F32", False)
FORMATS: dict[str, Format] = {f.name: f for f in (Q4, Q5, Q6, Q8, F16, F32)}


def get_format(name: str) -> Format:
    """The row of a format name; a KeyError-free ValueError naming the known ones otherwise."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown format {name!r} (known: {', '.join(FORMATS)})") from None


def choose_storage(name: str, k: int, group_size: int) -> tuple[str, int | None]:
    """The (format, group size) a tensor of input width k gets when the recipe asks for `name` at
    `group_size`: that, if k is a multiple of it; else the same format at the largest other group
    size that divides k; else f16 (the tensor keeps its precision class, never silently drops to
    fewer bits). Non-grouped formats ignore the group size."""
    fmt = get_format(name)
    if not fmt.grouped:
        return name, None
    if fmt.fits(k, group_size):
        return name, group_size
    for g in sorted(GROUP_SIZES, reverse=True):
        if fmt.fits(k, g):
            return name, g
    return "f16", None
