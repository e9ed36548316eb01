"""int5 / int6 kernels (kernels/q56.py) against the spec (formats.quant.dequantize_qn) and against
the numpy twin of the int16-activation arithmetic in tests/test_kernels_q4.py (natural block order:
its gs = 32 case), on the host's SIMD path here and on the avx2 / generic paths in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ernie_edge.formats.quant import FP16_MAX, dequantize_qn, pack_qn
from ernie_edge.kernels import _jit, q56
from ernie_edge.kernels.q8 import ActScratch

from test_kernels_q4 import act_error_bound, twin_matvec

RNG = np.random.default_rng(56)
BITS = (5, 6)


def random_qn(o, k, gs, bits, scale=0.05, rng=RNG):
    off = 1 << (bits - 1)
    codes = rng.integers(-off, off, size=(o, k))
    scales = (rng.random((o, k // gs)) * scale + scale / 10).astype(np.float16)
    return codes, pack_qn(codes, bits), scales


def check_matvec(x, codes, packed, scales, gs, bits):
    """The kernel equals the twin to float rounding and the exact product within the bound."""
    out = np.full(codes.shape[0], np.nan, np.float32)
    q56.matvec(x, packed, scales, out, ActScratch(x.shape[0]), bits)
    y, mag = twin_matvec(x, codes, scales.astype(np.float32).repeat(gs // 32, axis=1), 32)
    np.testing.assert_array_less(np.abs(out - y), 1e-5 * mag + 1e-30)
    w = dequantize_qn(packed, scales, gs, bits).astype(np.float64)
    np.testing.assert_array_less(np.abs(out - w @ x), act_error_bound(x, w, 32) + 1e-6 * mag + 1e-30)
    return out


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("o", [1, 4, 5, 37])
@pytest.mark.parametrize("k,gs", [(32, 32), (64, 64), (2560, 32), (2560, 128)])
def test_matvec_matches_twin_and_bound(bits, o, k, gs):
    codes, packed, scales = random_qn(o, k, gs, bits)
    check_matvec(RNG.standard_normal(k).astype(np.float32), codes, packed, scales, gs, bits)


@pytest.mark.parametrize("bits", BITS)
def test_matvec_extreme_codes_scales_and_integer_sums(bits):
    """Codes at both ends with every xq at +-32767 (all-equal blocks): the largest lane sums must
    stay exact; fp16 extremes and negative scales go through."""
    off = 1 << (bits - 1)
    o, k, gs = 9, 256, 64
    codes = np.where(RNG.random((o, k)) < 0.5, -off, off - 1)
    codes[3], codes[4] = -off, off - 1
    scales = np.full((o, k // gs), 0.25, np.float16)
    scales[0], scales[1], scales[2], scales[5] = FP16_MAX / 64, np.float16(6e-8), 0.0, -0.5
    for x in (np.full(k, 1.5, np.float32), np.full(k, -1.5, np.float32), RNG.standard_normal(k).astype(np.float32)):
        out = check_matvec(x, codes, pack_qn(codes, bits), scales, gs, bits)
        assert out[2] == 0.0
    out = np.empty(o, np.float32)
    q56.matvec(np.full(k, 1.5, np.float32), pack_qn(codes, bits), scales, out, ActScratch(k), bits)
    np.testing.assert_array_equal(out[3:5], [0.25 * 1.5 * -off * k, 0.25 * 1.5 * (off - 1) * k])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("t", [1, 3, 17, 100])
@pytest.mark.parametrize("o,k,gs", [(5, 64, 32), (37, 256, 64), (130, 2560, 128)])
def test_matmul_small_and_exact(bits, t, o, k, gs):
    """matmul_small: each row is the decode matvec of that token, bit for bit; matmul_exact: exact
    float32."""
    codes, packed, scales = random_qn(o, k, gs, bits)
    X = RNG.standard_normal((t, k)).astype(np.float32)
    out = np.full((t, o), np.nan, np.float32)
    q56.matmul_small(X, packed, scales, out, bits)
    for i in (0, t - 1):
        one = np.empty(o, np.float32)
        q56.matvec(X[i], packed, scales, one, ActScratch(k), bits)
        np.testing.assert_array_equal(out[i], one)
    w = dequantize_qn(packed, scales, gs, bits).astype(np.float64)
    q56.matmul_exact(X, packed, scales, out, bits)
    scale = np.abs(X).astype(np.float64) @ np.abs(w).T
    np.testing.assert_array_less(np.abs(out - X.astype(np.float64) @ w.T), 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_dequant_rows_is_the_spec(bits, gs):
    codes, packed, scales = random_qn(11, 256, gs, bits)
    scales[5, 0], scales[6, 0] = FP16_MAX, np.float16(-6e-8)
    tile = np.empty((4, 256), np.float32)
    q56.dequant_rows(packed, scales, 5, tile, bits)
    np.testing.assert_array_equal(tile, dequantize_qn(packed, scales, gs, bits)[5:9])


def test_matvec_accepts_uint16_scales_and_larger_scratch():
    codes, packed, scales = random_qn(6, 64, 32, 6)
    x = RNG.standard_normal(64).astype(np.float32)
    a, b = np.empty(6, np.float32), np.empty(6, np.float32)
    q56.matvec(x, packed, scales, a, ActScratch(64), 6)
    q56.matvec(x, packed, scales.view(np.uint16), b, ActScratch(4096, rows=3), 6)
    np.testing.assert_array_equal(a, b)


def test_rejects_bad_arguments():
    codes, packed, scales = random_qn(6, 64, 32, 6)
    x, out = np.zeros(64, np.float32), np.empty(6, np.float32)
    for args, match in [((x, packed, scales, np.empty(5, np.float32), ActScratch(64), 6), "out must be"),
                        ((x, packed, scales, out, ActScratch(64), 5), "does not take an input"),
                        ((x, packed, scales, out, ActScratch(64), 4), "bits must be 5 or 6"),
                        ((np.zeros(32, np.float32), packed, scales, out, ActScratch(64), 6), "does not take"),
                        ((x, packed, scales[:, :1], out, ActScratch(64), 6), "scales"),
                        ((x, np.asfortranarray(packed), scales, out, ActScratch(64), 6), "C-contiguous"),
                        ((x, packed.view(np.int8), scales, out, ActScratch(64), 6), "uint8")]:
        with pytest.raises(ValueError, match=match):
            q56.matvec(*args)
    with pytest.raises(TypeError):
        q56.matvec(x, packed, scales.astype(np.float32), out, ActScratch(64), 6)
    with pytest.raises(ValueError, match="out must be"):
        q56.matmul_small(np.zeros((3, 64), np.float32), packed, scales, np.empty((3, 5), np.float32), 6)
    with pytest.raises(ValueError, match="out of range"):
        q56.dequant_rows(packed, scales, 4, np.empty((3, 64), np.float32), 6)


# ---- the other SIMD paths ---------------------------------------------------------------------

PATH_CHECK = """
import sys
import numpy as np
from ernie_edge.kernels import _jit, q56
from ernie_edge.kernels.q8 import ActScratch
from ernie_edge.formats.quant import dequantize_qn, pack_qn
assert _jit.SIMD == sys.argv[1], _jit.SIMD
rng = np.random.default_rng(0)
for bits in (5, 6):
    off = 1 << (bits - 1)
    for gs in (32, 128):
        codes = rng.integers(-off, off, size=(7, 256)); sc = (rng.random((7, 256 // gs)) * 0.1).astype(np.float16)
        p = pack_qn(codes, bits)
        w = dequantize_qn(p, sc, gs, bits)
        x = rng.standard_normal(256).astype(np.float32)
        out = np.empty(7, np.float32)
        q56.matvec(x, p, sc, out, ActScratch(256), bits)
        assert np.abs(out - w @ x).max() < 2e-4 * np.abs(w @ x).max(), (out, w @ x)
        xc = np.full(256, 1.5, np.float32)
        q56.matvec(xc, p, sc, out, ActScratch(256), bits)  # exact integer sums on this path too
        np.testing.assert_allclose(out, w.astype(np.float64) @ xc, rtol=1e-5)
        X = rng.standard_normal((3, 256)).astype(np.float32)
        y = np.empty((3, 7), np.float32)
        for matmul in (q56.matmul_small, q56.matmul_exact):
            matmul(X, p, sc, y, bits)
            assert np.abs(y - X @ w.T).max() < 2e-4 * np.abs(X @ w.T).max()
print("ok")
"""


@pytest.mark.parametrize("path", ["avx2", "generic"])
def test_other_simd_paths_in_subprocess(path, tmp_path):
    if path != "generic" and path not in _jit._host_paths():
        pytest.skip(f"this CPU has no {path} path")
    if path == _jit.SIMD:
        pytest.skip(f"{path} is this process's path (tested above)")
    env = dict(os.environ, ERNIE_EDGE_SIMD=path, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", PATH_CHECK, path], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
