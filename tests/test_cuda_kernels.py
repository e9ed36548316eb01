"""The CUDA matrix kernels against the numpy spec (ernie_edge/formats/quant.py dequantizers):
decode matvecs, prefill matmuls, the grouped expert matmuls. Simulator by default (tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cuda_helpers import FORMATS, dev, host, quantized
from ernie_edge import reference as ref
from ernie_edge.kernels.cuda import moe, quant_matmul as qmm, quant_matvec as qmv

pytestmark = pytest.mark.usefixtures("simulator_gil")


@pytest.mark.parametrize("bits,group_size", FORMATS)
def test_cuda_matvec_matches_the_dequantized_matrix(bits, group_size):
    rng = np.random.default_rng(bits + group_size)
    codes, scales, w = quantized(rng, (5, 256), bits, group_size)  # 5 rows: a partly filled block
    x = rng.standard_normal(256).astype(np.float32)
    out = dev(np.zeros(5, np.float32))
    qmv.matvec(dev(qmv.as_words(codes)), dev(scales), bits, group_size, dev(x), out)
    np.testing.assert_allclose(host(out), w @ x, rtol=1e-5, atol=1e-4)
    qmv.matvec(dev(qmv.as_words(codes)), dev(scales), bits, group_size, dev(x), out, accumulate=True)
    np.testing.assert_allclose(host(out), 2 * (w @ x), rtol=1e-5, atol=2e-4)


def test_cuda_matvec3_and_float_matvec():
    rng = np.random.default_rng(1)
    mats = [quantized(rng, (o, 64), 8, 32) for o in (6, 2, 3)]
    x = rng.standard_normal(64).astype(np.float32)
    outs = [dev(np.zeros(o, np.float32)) for o in (6, 2, 3)]
    qmv.matvec3(*[(dev(qmv.as_words(c)), dev(s)) for c, s, _ in mats], 8, 32, dev(x), *outs)
    for (_, _, w), out in zip(mats, outs):
        np.testing.assert_allclose(host(out), w @ x, rtol=1e-5, atol=1e-4)
    wf = rng.standard_normal((3, 40)).astype(np.float32)
    out = dev(np.ones(3, np.float32))
    qmv.fmatvec(dev(wf), dev(x[:40]), out, accumulate=True)
    np.testing.assert_allclose(host(out), 1 + wf @ x[:40], rtol=1e-5, atol=1e-5)


def test_cuda_as_words_keeps_the_bytes():
    codes = np.arange(32, dtype=np.uint8).reshape(2, 16)
    words = qmv.as_words(codes)
    assert words.shape == (2, 4) and words.dtype == np.uint32
    assert words.view(np.uint8).tobytes() == codes.tobytes()
    with pytest.raises(ValueError, match="32-bit words"):
        qmv.as_words(np.zeros((2, 6), np.uint8))


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (8, 64)])
def test_cuda_matmul_tiles_match_the_dequantized_matrix(bits, group_size):
    rng = np.random.default_rng(7 + bits)
    O, K, T = 70, 128, 35  # past one tile in every direction (BO 64, TK 64, BT 32)
    codes, scales, w = quantized(rng, (O, K), bits, group_size)
    X = rng.standard_normal((T, K)).astype(np.float32)
    out = dev(np.zeros((T, O), np.float32))
    qmm.matmul(dev(X), dev(codes), dev(scales), bits, group_size, out)
    np.testing.assert_allclose(host(out), X @ w.T, rtol=1e-4, atol=1e-3)
    qmm.matmul(dev(X), dev(codes), dev(scales), bits, group_size, out, accumulate=True)
    np.testing.assert_allclose(host(out), 2 * (X @ w.T), rtol=1e-4, atol=2e-3)


def test_cuda_float_matmul():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((3, 40)).astype(np.float32)
    w = rng.standard_normal((5, 40)).astype(np.float32)
    out = dev(np.zeros((3, 5), np.float32))
    qmm.fmatmul(dev(X), dev(w), out)
    np.testing.assert_allclose(host(out), X @ w.T, rtol=1e-5, atol=1e-5)


def test_cuda_group_tokens_orders_pairs_by_expert():
    idx = np.array([[0, 3], [1, 3], [0, 1], [2, 3]], np.int64)
    order, perm, pos, (te, ts, tc) = moe.group_tokens(idx, tile_rows=2)
    grouped = idx.reshape(-1)[order]
    assert list(grouped) == [0, 0, 1, 1, 2, 3, 3, 3]
    assert list(perm) == [0, 2, 1, 2, 3, 0, 1, 3]  # tokens ascending within an expert
    assert all(grouped[pos[t, s]] == idx[t, s] and perm[pos[t, s]] == t for t in range(4) for s in range(2))
    assert list(zip(te, ts, tc)) == [(0, 0, 2), (1, 2, 2), (2, 4, 1), (3, 5, 2), (3, 7, 1)]


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 32)])
def test_cuda_grouped_experts_match_the_reference_moe(bits, group_size):
    """grouped_gate_up + grouped_down + combine = reference mlp per expert, weighted, ascending id."""
    rng = np.random.default_rng(11)
    T, H, I, E, k = 9, 64, 96, 4, 2
    gate, up = (quantized(rng, (E, I, H), bits, group_size) for _ in range(2))
    down = quantized(rng, (E, H, I), bits, group_size)
    X = rng.standard_normal((T, H)).astype(np.float32)
    idx = np.sort(np.stack([rng.choice(E, k, replace=False) for _ in range(T)]), axis=1).astype(np.int64)
    wts = rng.random((T, k)).astype(np.float32)
    order, perm, pos, tiles = moe.group_tokens(idx, tile_rows=qmm.BT)
    R = T * k
    Hg = dev(np.zeros((R, I), np.float32))
    Yg = dev(np.zeros((R, H), np.float32))
    d_tiles = tuple(dev(a) for a in tiles)
    qmm.grouped_gate_up(dev(X), dev(perm), d_tiles, (dev(gate[0]), dev(gate[1])), (dev(up[0]), dev(up[1])),
                        bits, group_size, Hg)
    qmm.grouped_down(Hg, d_tiles, (dev(down[0]), dev(down[1])), bits, group_size,
                     dev(wts.reshape(-1)[order]), Yg)
    shared_y = rng.standard_normal((T, H)).astype(np.float32)
    x0 = rng.standard_normal((T, H)).astype(np.float32)
    x = dev(x0)
    moe.combine(Yg, dev(pos), dev(shared_y), x)
    want = np.zeros((T, H), np.float32)
    for e in range(E):
        rows, slots = np.nonzero(idx == e)
        want[rows] += ref.mlp(X[rows], gate[2][e], up[2][e], down[2][e]) * wts[rows, slots][:, None]
    np.testing.assert_allclose(host(x), x0 + want + shared_y, rtol=1e-4, atol=1e-3)
