"""The CUDA layer kernels against ernie_edge/reference.py: RMSNorm, embedding rows, interleaved
RoPE with the KV-cache write, SwiGLU, GQA attention (decode and causal prefill), the router and the
decode expert kernels, and device token choice. Simulator by default (tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cuda_helpers import dev, host, quantized
from ernie_edge import reference as ref
from ernie_edge.kernels.cuda import attention as att, moe, norm_rope as nr, quant_matvec as qmv
from ernie_edge.kernels.cuda import sampling

pytestmark = pytest.mark.usefixtures("simulator_gil")


def test_cuda_rmsnorm_and_add_rmsnorm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 80)).astype(np.float32)
    d = rng.standard_normal((3, 80)).astype(np.float32)
    w = rng.random(80).astype(np.float32)
    out = dev(np.zeros_like(x))
    nr.rmsnorm(dev(x), dev(w), 1e-5, out)
    np.testing.assert_allclose(host(out), ref.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    dx = dev(x)
    nr.add_rmsnorm(dx, dev(d), dev(w), 1e-5, out)
    np.testing.assert_allclose(host(dx), x + d, rtol=1e-6)
    np.testing.assert_allclose(host(out), ref.rms_norm(x + d, w, 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, 32)])
def test_cuda_embedding_rows_are_the_dequantized_rows(bits, group_size):
    rng = np.random.default_rng(bits)
    codes, scales, w = quantized(rng, (10, 128), bits, group_size)
    ids = np.array([7, 0, 7, 9])
    out = dev(np.zeros((4, 128), np.float32))
    nr.embed((dev(codes), dev(scales), bits, group_size), dev(ids), out)
    np.testing.assert_array_equal(host(out), w[ids])
    nr.embed(dev(w.astype(np.float16)), dev(ids), out)
    np.testing.assert_array_equal(host(out), w.astype(np.float16).astype(np.float32)[ids])


def test_cuda_rope_matches_the_reference_and_fills_the_cache():
    rng = np.random.default_rng(2)
    T, Nq, Nkv, D, S = 3, 4, 2, 16, 8
    q = rng.standard_normal((T, Nq, D)).astype(np.float32)
    k = rng.standard_normal((T, Nkv, D)).astype(np.float32)
    v = rng.standard_normal((T, Nkv, D)).astype(np.float32)
    pos = np.array([5, 6, 70000])  # a large position: the angle's fp32 rounding matters
    inv = ref.rope_inv_freq(D, 500000.0)
    kc = dev(np.zeros((Nkv, D, S), np.float16))
    vc = dev(np.zeros((Nkv, S, D), np.float16))
    dq = dev(q)
    nr.rope_kv_write(dq, dev(k), dev(v), dev(pos), dev(inv), kc, vc, 2)
    np.testing.assert_allclose(host(dq), ref.apply_rope(q, pos, inv), rtol=1e-4, atol=1e-4)
    k_rot = ref.apply_rope(k, pos, inv)
    got_k = host(kc)
    np.testing.assert_allclose(got_k[:, :, 2:5].transpose(2, 0, 1), k_rot.astype(np.float16), atol=2e-3)
    np.testing.assert_array_equal(host(vc)[:, 2:5].transpose(1, 0, 2), v.astype(np.float16))
    assert not got_k[:, :, :2].any() and not got_k[:, :, 5:].any()  # other slots untouched


def test_cuda_silu_mul():
    rng = np.random.default_rng(3)
    g, u = rng.standard_normal((2, 300)).astype(np.float32)
    out = dev(np.zeros(300, np.float32))
    nr.silu_mul(dev(g), dev(u), out)
    np.testing.assert_allclose(host(out), ref.silu(g) * u, rtol=1e-5, atol=1e-6)


def _cache(rng, Nkv, D, S, L):
    k = rng.standard_normal((L, Nkv, D)).astype(np.float16)
    v = rng.standard_normal((L, Nkv, D)).astype(np.float16)
    kc = np.zeros((Nkv, D, S), np.float16)
    vc = np.zeros((Nkv, S, D), np.float16)
    kc[:, :, :L] = k.transpose(1, 2, 0)
    vc[:, :L] = v.transpose(1, 0, 2)
    return k.astype(np.float32), v.astype(np.float32), kc, vc


@pytest.mark.parametrize("length", [1, 37, att.CHUNK + 5])
def test_cuda_attention_decode_matches_the_reference(length):
    rng = np.random.default_rng(length)
    Nq, Nkv, D, S = 4, 2, 16, 2 * att.CHUNK
    k, v, kc, vc = _cache(rng, Nkv, D, S, length)
    q = rng.standard_normal((Nq, D)).astype(np.float32)
    out = dev(np.zeros((Nq, D), np.float32))
    att.attention_decode(dev(q), dev(kc), dev(vc), length, out, att.DecodeScratch(Nq, D, S))
    want = ref.attention(q[None], k, v, np.array([length - 1]))
    np.testing.assert_allclose(host(out).reshape(1, -1), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("i0,T", [(0, 5), (30, 20)])
def test_cuda_attention_prefill_is_causal_over_the_cache(i0, T):
    """Queries at slots i0.. see the cached keys before them and the chunk's own up to themselves."""
    rng = np.random.default_rng(i0 + T)
    Nq, Nkv, D, S = 4, 2, 16, 64
    k, v, kc, vc = _cache(rng, Nkv, D, S, i0 + T)
    q = rng.standard_normal((T, Nq, D)).astype(np.float32)
    out = dev(np.zeros((T, Nq, D), np.float32))
    att.attention_prefill(dev(q), dev(kc), dev(vc), i0, out)
    want = ref.attention(q, k, v, np.arange(i0, i0 + T))
    np.testing.assert_allclose(host(out).reshape(T, -1), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_bias", [True, False])
def test_cuda_router_matches_the_reference_in_ascending_expert_order(use_bias):
    rng = np.random.default_rng(5)
    T, H, E, k = 4, 64, 16, 4
    h = rng.standard_normal((T, H)).astype(np.float32)
    wg = rng.standard_normal((E, H)).astype(np.float32)
    bias = (rng.random(E) * 0.2).astype(np.float32) if use_bias else None
    idx, w = dev(np.zeros((T, k), np.int64)), dev(np.zeros((T, k), np.float32))
    moe.route(dev(h), dev(wg), None if bias is None else dev(bias), k, 1e-12, idx, w)
    want_idx, want_w = ref.route(h, wg, bias, k)
    order = np.argsort(want_idx, axis=1)
    np.testing.assert_array_equal(host(idx), np.take_along_axis(want_idx, order, 1))
    np.testing.assert_allclose(host(w), np.take_along_axis(want_w, order, 1), rtol=1e-5)


def test_cuda_router_with_the_fused_norm():
    rng = np.random.default_rng(6)
    H, E, k = 64, 8, 2
    x = rng.standard_normal((1, H)).astype(np.float32)
    nw = rng.random(H).astype(np.float32)
    wg = rng.standard_normal((E, H)).astype(np.float32)
    h = dev(np.zeros((1, H), np.float32))
    idx, w = dev(np.zeros((1, k), np.int64)), dev(np.zeros((1, k), np.float32))
    moe.route(h, dev(wg), None, k, 1e-12, idx, w, norm=(dev(x), dev(nw), 1e-5))
    hn = ref.rms_norm(x, nw, 1e-5)
    np.testing.assert_allclose(host(h), hn, rtol=1e-5, atol=1e-6)
    want_idx, _ = ref.route(hn, wg, None, k)
    np.testing.assert_array_equal(host(idx), np.sort(want_idx, axis=1))


def _bank(rng, E, O, K, bits, G=32):
    codes, scales, w = quantized(rng, (E, O, K), bits, G)
    return dev(qmv.as_words(codes)), dev(scales), w


@pytest.mark.parametrize("with_shared", [True, False])
def test_cuda_decode_experts_match_the_reference_moe(with_shared):
    """Routed experts (q4) and the shared expert (q8, another width) of one token, as ReferenceModel._moe."""
    rng = np.random.default_rng(8)
    H, I, Is, E, k = 64, 32, 64, 6, 3
    g, u, d = _bank(rng, E, I, H, 4), _bank(rng, E, I, H, 4), _bank(rng, E, H, I, 4)
    sg, su, sd = _bank(rng, 1, Is, H, 8), _bank(rng, 1, Is, H, 8), _bank(rng, 1, H, Is, 8)
    x = rng.standard_normal(H).astype(np.float32)
    ids = np.array([1, 2, 5], np.int64)
    wts = np.array([0.5, 0.3, 0.2], np.float32)
    hbuf, hs = dev(np.zeros((k, I), np.float32)), dev(np.zeros(Is, np.float32))
    shared_up = (sg[0], sg[1], su[0], su[1], 8, 32) if with_shared else None
    moe.experts_gate_up(dev(x), dev(ids), k, (g[0], g[1], u[0], u[1], 4, 32), shared_up, hbuf, hs)
    resid = rng.standard_normal(H).astype(np.float32)
    out = dev(resid)
    moe.experts_down(hbuf, dev(ids), dev(wts), k, (d[0], d[1], 4, 32), hs,
                     (sd[0], sd[1], 8, 32) if with_shared else None, out)
    want = sum(wts[j] * ref.mlp(x[None], g[2][e], u[2][e], d[2][e])[0] for j, e in enumerate(ids))
    if with_shared:
        want = want + ref.mlp(x[None], sg[2][0], su[2][0], sd[2][0])[0]
    np.testing.assert_allclose(host(out), resid + want, rtol=1e-4, atol=1e-4)


def test_cuda_decode_dense_mlp_as_a_one_expert_bank():
    rng = np.random.default_rng(9)
    H, I = 64, 96
    g, u, d = _bank(rng, 1, I, H, 8), _bank(rng, 1, I, H, 8), _bank(rng, 1, H, I, 8)
    x = rng.standard_normal(H).astype(np.float32)
    ids = dev(np.zeros(1, np.int64))
    hbuf, hs = dev(np.zeros((1, I), np.float32)), dev(np.zeros(I, np.float32))
    moe.experts_gate_up(dev(x), ids, 0, None, (g[0], g[1], u[0], u[1], 8, 32), hbuf, hs)
    out = dev(np.zeros(H, np.float32))
    moe.experts_down(hbuf, ids, dev(np.ones(1, np.float32)), 0, None, hs, (d[0], d[1], 8, 32), out,
                     accumulate=False)
    np.testing.assert_allclose(host(out), ref.mlp(x[None], g[2][0], u[2][0], d[2][0])[0], rtol=1e-4, atol=1e-4)


def test_cuda_argmax_and_sampling():
    rng = np.random.default_rng(10)
    V, n = 5000, 4000
    logits = rng.standard_normal(V).astype(np.float32)
    logits[4500] = 99.0  # past n: never chosen
    logits[[17, 3001]] = 9.0  # a tie: the lower id wins
    s = sampling.TokenScratch()
    assert host(sampling.argmax(dev(logits), n, s))[0] == 17
    # A peaked distribution: the inverse CDF at u lands well inside one id's interval.
    peaked = np.full(V, -30.0, np.float32)
    peaked[[5, 2000, 3999]] = [2.0, 3.0, 1.0]
    p = np.exp(peaked[:n] - peaked.max()) / np.exp(peaked[:n] - peaked.max()).sum()
    cdf = np.cumsum(p.astype(np.float64))
    for u in (0.05, 0.5, 0.97):
        want = int(np.searchsorted(cdf, u, side="right"))
        got = host(sampling.sample(dev(peaked), n, 1.0, u, s))
        assert got[0] == want and got[1] == 1
    assert host(sampling.sample(dev(peaked), n, 0.0, 0.5, s))[0] == 2000
