"""ernie_edge/formats/table.py: one row per storage format, read by manifest, converter and loader."""

from __future__ import annotations

import numpy as np
import pytest

from ernie_edge.formats.quant import GROUP_SIZES
from ernie_edge.formats.table import FORMATS, F16, F32, Q4, Q5, Q6, Q8, choose_storage, get_format


def gaussian(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_bits_per_weight_and_nbytes():
    assert Q4.bits_per_weight(32) == 4.5 and Q8.bits_per_weight(32) == 8.5
    assert Q4.bits_per_weight(128) == 4.125 and F16.bits_per_weight(None) == 16.0
    bank = (64, 1536, 2560)  # one ERNIE expert bank (gate or up)
    assert Q4.nbytes(bank, 32) == 64 * 1536 * 1280 + 64 * 1536 * 80 * 2
    assert Q4.nbytes(bank, 32) * 8 == 4.5 * 64 * 1536 * 2560
    assert F32.nbytes((2560,), None) == 2560 * 4
    assert F16.nbytes((4, 64), None) == 4 * 64 * 2
    assert Q4.identifier(32) == "int4-sym-g32" and Q8.identifier(128) == "int8-sym-g128"
    assert Q5.bits_per_weight(32) == 5.5 and Q6.bits_per_weight(64) == 6.25
    assert Q6.nbytes((2560, 2560), 32) == 2560 * 2560 * 3 // 4 + 2560 * 80 * 2
    assert Q5.stored_shapes((7, 2560), 64) == ((7, 1600), (7, 40)) and Q6.identifier(32) == "int6-sym-g32"
    assert F16.identifier(None) == "f16"


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_row_describes_what_quantize_stores(name):
    """Every row's stored shapes, dtype and byte count match the arrays its quantize returns, and
    dequantize inverts it within the format's error."""
    fmt = get_format(name)
    shape = (3, 2, 256)
    w = gaussian(shape)
    for group in (GROUP_SIZES if fmt.grouped else (None,)):
        data, scales = fmt.quantize(w, group)
        data_shape, scales_shape = fmt.stored_shapes(shape, group)
        assert data.shape == data_shape and (scales is None) == (scales_shape is None)
        assert data.dtype == {"U8": np.uint8, "I8": np.int8, "F16": np.float16, "F32": np.float32}[fmt.dtype]
        if scales is not None:
            assert scales.shape == scales_shape and scales.dtype == np.float16
        assert fmt.nbytes(shape, group) == data.nbytes + (0 if scales is None else scales.nbytes)
        back = fmt.dequantize(data, scales, group)
        rel = np.linalg.norm(back - w) / np.linalg.norm(w)
        assert back.shape == shape and rel < {4: 0.12, 5: 0.06, 6: 0.03, 8: 0.01, 16: 1e-3, 32: 0}[fmt.bits] + 1e-9
    assert fmt.stored_names("x") == (("x.qweight", "x.scales") if fmt.grouped else ("x", None))


def test_dequantize_takes_scales_as_uint16_bits():
    w = gaussian((4, 64))
    data, scales = Q4.quantize(w, 32)
    np.testing.assert_array_equal(Q4.dequantize(data, scales, 32), Q4.dequantize(data, scales.view(np.uint16), 32))


def test_choose_storage_falls_back_per_tensor():
    assert choose_storage("q4", 2560, 32) == ("q4", 32)
    assert choose_storage("q4", 2560, 128) == ("q4", 128)
    assert choose_storage("q4", 96, 64) == ("q4", 32)  # 64 does not divide 96; 32 does
    assert choose_storage("q8", 192, 128) == ("q8", 64)  # the largest group that divides
    assert choose_storage("q4", 48, 32) == ("f16", None)  # no group size divides 48
    assert choose_storage("q8", 80, 32) == ("f16", None)
    assert choose_storage("f32", 48, 32) == ("f32", None)


def test_unknown_format_names_the_known_ones():
    with pytest.raises(ValueError, match="q4, q5, q6, q8, f16, f32"):
        get_format("q3")
