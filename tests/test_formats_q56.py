"""ernie_edge/formats/quant.py's int5 / int6 formats (q5, q6): the layout pinned by hand-written
bytes, the numba quantizer against a numpy twin of its search (tests/test_formats.py), round-trip
error, and what every quantizer refuses."""

import numpy as np
import pytest

from ernie_edge.formats import quant as F
from ernie_edge.formats.quant import QuantizationError, dequantize_qn, pack_qn, quantize_qn, unpack_qn

from test_formats import gaussian, heavy_tailed, special_groups, twin_codes, twin_search

BITS = F.QN_BITS


def twin_qn(w, group_size, bits):
    off = 1 << (bits - 1)
    groups = np.asarray(w, np.float32).reshape(-1, group_size)
    scales = twin_search(groups, F.QN_DIVISORS[bits], True, -float(off), -off, off - 1)
    codes = twin_codes(groups, scales, -off, off - 1)
    return pack_qn(codes.reshape(*w.shape[:-1], -1), bits), scales.astype(np.float16)


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_inverse_over_all_codes(bits):
    off = 1 << (bits - 1)
    codes = ((np.arange(2 * off)[:, None] + np.arange(128)[None, :]) % (2 * off) - off).astype(np.int8)
    packed = pack_qn(codes, bits)  # every code at every position of a block
    assert packed.dtype == np.uint8 and packed.shape == (2 * off, 128 * bits // 8)
    np.testing.assert_array_equal(unpack_qn(packed, bits), codes)
    every_byte = np.random.default_rng(bits).integers(0, 256, (16, 8 * bits), dtype=np.uint8)
    np.testing.assert_array_equal(pack_qn(unpack_qn(every_byte, bits), bits), every_byte)


def test_q6_layout_hand_written_example():
    # u = code + 32 = j (0..31) for the first block, 32 + j for the second: low nibbles as q4 g32,
    # then byte 16 + i = (u_i >> 4) | (u_{i+8} >> 4) << 2 | (u_{i+16} >> 4) << 4 | (u_{i+24} >> 4) << 6
    u = np.r_[np.arange(32), 32 + np.arange(32)]
    packed = pack_qn((u - 32)[None], 6)[0]
    lo = bytes((j & 15) | ((j + 16) & 15) << 4 for j in range(16))
    first = lo + bytes([0b01010000] * 8)  # highs 0, 0, 1, 1 (codes i, i+8 < 16 <= i+16, i+24)
    second = lo + bytes([0b11111010] * 8)  # highs 2, 2, 3, 3
    assert packed.tobytes() == first + second


def test_q5_layout_hand_written_example():
    # byte 16 + i bit t = bit 4 of u_{i + 4t}: codes 0..15 have it clear, 16..31 set
    u = np.arange(32)
    packed = pack_qn((u - 16)[None], 5)[0]
    lo = bytes((j & 15) | ((j + 16) & 15) << 4 for j in range(16))
    assert packed.tobytes() == lo + bytes([0b11110000] * 4)


@pytest.mark.parametrize("bits", BITS)
def test_negative_scale_when_pivot_is_positive(bits):
    off = 1 << (bits - 1)
    w = np.zeros(32, np.float32)
    w[:3] = [off * 0.25, -(off - 1) * 0.25, 0.5]  # the pivot goes to code -off: scale -0.25
    packed, scales = quantize_qn(w, 32, bits)
    assert scales.tolist() == [-0.25]
    assert unpack_qn(packed, bits)[:4].tolist() == [-off, off - 1, -2, 0]
    np.testing.assert_array_equal(dequantize_qn(packed, scales, 32, bits), w)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("size", F.GROUP_SIZES)
def test_matches_numpy_twin(bits, size):
    w = np.concatenate([gaussian((30, size), 1), heavy_tailed((30, size), 2),
                        0.02 * gaussian((30, size), 3), special_groups(size)])
    packed, scales = quantize_qn(w, size, bits)
    want_packed, want_scales = twin_qn(w, size, bits)
    np.testing.assert_array_equal(packed, want_packed)
    np.testing.assert_array_equal(scales.view(np.uint16), want_scales.view(np.uint16).reshape(-1, 1))


@pytest.mark.parametrize("bits, rms", [(5, 0.041), (6, 0.0205)])
def test_round_trip_error(bits, rms):
    """Gaussian data at g32: relative RMS about half of the next lower bit width (q4: 0.081),
    each non-clamped element within half a step of its weight."""
    w = gaussian((64, 2560), 9)
    packed, scales = quantize_qn(w, 32, bits)
    back = dequantize_qn(packed, scales, 32, bits)
    assert np.linalg.norm(back - w) / np.linalg.norm(w) < rms
    s = np.abs(scales.astype(np.float32)).repeat(32, axis=1)
    off = 1 << (bits - 1)
    inside = np.abs(w) < (off - 1) * s
    assert np.all(np.abs(back - w)[inside] <= s[inside] / 2 * (1 + 1e-6))
    stats = F.quant_error_stats(w, bits, 32)
    assert stats["bits_per_weight"] == bits + 0.5 and stats["rel_rms"] < rms


@pytest.mark.parametrize("bits", BITS)
def test_refuses_what_no_fp16_scale_reaches(bits):
    limit = F.FP16_MAX * (1 << (bits - 1))
    w = np.zeros((2, 64), np.float32)
    w[1, 5] = 1.01 * limit
    with pytest.raises(QuantizationError, match=f"too large for int{bits}") as e:
        quantize_qn(w, 32, bits)
    assert e.value.index == (1, 5)
    w[1, 5] = np.nan
    with pytest.raises(QuantizationError, match="non-finite"):
        quantize_qn(w, 32, bits)
    with pytest.raises(ValueError, match="not a multiple of group_size 64"):
        quantize_qn(np.zeros((2, 96), np.float32), 64, bits)
    with pytest.raises(ValueError, match="bits 7 not supported"):
        quantize_qn(np.zeros((2, 64), np.float32), 32, 7)


@pytest.mark.parametrize("bits", BITS)
def test_leading_axes_and_zero_groups(bits):
    w = gaussian((3, 4, 128), 11)
    w[1, 2, 32:64] = 0.0
    packed, scales = quantize_qn(w, 64, bits)
    assert packed.shape == (3, 4, 128 * bits // 8) and scales.shape == (3, 4, 2)
    flat = quantize_qn(w.reshape(12, 128), 64, bits)
    np.testing.assert_array_equal(packed.reshape(12, -1), flat[0])
    back = dequantize_qn(packed, scales, 64, bits)
    assert back.shape == w.shape and np.all(back[1, 2, 32:64] == 0.0)
