"""The routed gate/up regions (kernels/routed.py): the
router of one token and the gate, up and SwiGLU of its experts and of the shared expert in one
parallel region, kernels/q8.py's (q4 / q8 shared expert) and q56.py's (q5 / q6 shared expert).
Each must give exactly what the router followed by the paired kernel gives, call after call,
and must finish when fewer threads run than it was bound for."""

from __future__ import annotations

from functools import partial

import numba
import numpy as np
import pytest

from ernie_edge.formats.quant import quantize_q4
from ernie_edge.kernels import moe, q8, q56, routed
from ernie_edge.kernels.q8 import ActScratch

from test_kernels_q56 import random_qn

H, INTER, SHARED, K = 256, 96, 128, 6


def _weights(E: int, shared_bits: int, rng):
    bank = lambda: quantize_q4(rng.standard_normal((E, INTER, H)).astype(np.float32) * 0.1, 128)  # noqa: E731
    (wg, sg), (wu, su) = bank(), bank()
    router = rng.standard_normal((E, H)).astype(np.float32) * 0.2
    bias = (rng.random(E) * 0.05).astype(np.float32)
    if shared_bits == 8:  # a q4 / q8 shared expert: a one-expert int8 bank (kernels/q8.py)
        s8 = lambda: (rng.integers(-127, 128, size=(1, SHARED, H)).astype(np.int8),  # noqa: E731
                      (rng.random((1, SHARED, H // 32)) * 0.01).astype(np.float16))
        shared = (*s8(), *s8())
    else:  # q5 / q6 (kernels/q56.py)
        (_, gw, gs), (_, uw, us) = (random_qn(SHARED, H, 32, shared_bits, rng=rng) for _ in range(2))
        shared = (gw, gs, uw, us)
    return (wg, sg, wu, su), router, bias, shared


class _Calls:
    """The same token through the routed region (`fused`) and through moe.route, then the paired
    kernel (`separate`), each with its own buffers."""

    def __init__(self, E: int, shared_bits: int, use_bias: bool, act8: bool, rng):
        bank, router, bias, shared = _weights(E, shared_bits, rng)
        self.x = np.zeros(H, np.float32)
        self.bufs = []
        for _ in range(2):
            idx, w = np.zeros((1, K), np.int64), np.zeros((1, K), np.float32)
            he = np.zeros((K, INTER), np.float32)
            g = np.zeros((1, SHARED) if shared_bits == 8 else SHARED, np.float32)
            act_a, act_b = ActScratch(H, rows=K), ActScratch(H)
            self.bufs.append((idx, w, he, g, act_a, act_b, np.zeros((3, E), np.float32)))
        b = bias if use_bias else None
        idx, w, he, g, act_a, act_b, work = self.bufs[0]
        route = moe.router_args(self.x, router, b, K, idx, w, 1e-12, work)
        if shared_bits == 8:
            sh = (*shared[:2], *shared[2:], np.zeros(1, np.int64), g, 8)
            self.fused = routed.bind_experts_pair_gate_up_silu(route, self.x, (*bank, he, 4), sh, act_a, act_b, act8)
        else:
            self.fused = routed.bind_pair_gate_up_silu(route, self.x, (*bank, he, 4), (*shared, g, shared_bits), act_a,
                                                       act_b, act8)
        idx, w, he, g, act_a, act_b, work = self.bufs[1]

        def separate():
            moe.route(self.x, router, b, K, idx, w, 1e-12, work)
            if shared_bits == 8:
                q8.experts_pair_gate_up_silu(self.x, (*bank, idx[0], he, 4),
                                             (*shared, np.zeros(1, np.int64), g, 8), act_a, act_b, act8)
            else:
                q56.pair_gate_up_silu(self.x, (*bank, idx[0], he, 4), (*shared, g, shared_bits), act_a, act_b,
                                      act8)
        self.separate = separate

    def outputs(self, i: int):
        return self.bufs[i][:4]


@pytest.mark.parametrize("shared_bits", [8, 5, 6])
@pytest.mark.parametrize("E, use_bias, act8", [(64, True, False), (64, True, True), (20, False, True)])
def test_routed_region_is_route_then_pair(shared_bits, E, use_bias, act8):
    """Experts, weights, routed and shared activations bit for bit, for new tokens in the bound
    buffer (E = 20: a last router unit of 4 rows)."""
    rng = np.random.default_rng(shared_bits * 100 + E)
    calls = _Calls(E, shared_bits, use_bias, act8, rng)
    chosen = set()
    for _ in range(4):
        calls.x[:] = rng.standard_normal(H).astype(np.float32)
        calls.fused()
        calls.separate()
        for got, want in zip(calls.outputs(0), calls.outputs(1)):
            np.testing.assert_array_equal(got, want)
        chosen.update(calls.outputs(0)[0][0].tolist())
    assert len(chosen) > K  # the tokens were routed to different experts


@pytest.mark.parametrize("shared_bits", [8, 5])
def test_routed_region_finishes_on_fewer_threads(shared_bits):
    """Bound for two threads but run by one (numba's thread count lowered after binding, as a
    nested or oversubscribed call could find it): one thread does every unit of both phases,
    so the wait for the router never waits on a thread that is not running."""
    rng = np.random.default_rng(3)
    calls = _Calls(64, shared_bits, True, True, rng)
    bound = calls.fused
    calls.fused = partial(bound.func, *bound.args[:-1], 2)  # two threads' shares, whatever get_threads() is
    calls.x[:] = rng.standard_normal(H).astype(np.float32)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        calls.fused()
    finally:
        numba.set_num_threads(threads)
    calls.separate()
    for got, want in zip(calls.outputs(0), calls.outputs(1)):
        np.testing.assert_array_equal(got, want)


def test_routed_region_routes_its_own_token():
    """The router's arguments must be of the same single token the experts read."""
    rng = np.random.default_rng(5)
    bank, router, bias, shared = _weights(64, 5, rng)
    x, other = np.zeros(H, np.float32), np.zeros(H, np.float32)
    idx, w, he, g = np.zeros((1, K), np.int64), np.zeros((1, K), np.float32), np.zeros((K, INTER), np.float32), \
        np.zeros(SHARED, np.float32)
    act_a, act_b, work = ActScratch(H, rows=K), ActScratch(H), np.zeros((3, 64), np.float32)
    route = moe.router_args(other, router, bias, K, idx, w, 1e-12, work)
    with pytest.raises(ValueError, match="same x"):
        routed.bind_pair_gate_up_silu(route, x, (*bank, he, 4), (*shared, g, 5), act_a, act_b)
    two = np.zeros((2, H), np.float32)
    route = moe.router_args(two, router, bias, K, np.zeros((2, K), np.int64), np.zeros((2, K), np.float32), 1e-12,
                            work)
    with pytest.raises(ValueError, match="one token"):
        routed.bind_pair_gate_up_silu(route, two[0], (*bank, he, 4), (*shared, g, 5), act_a, act_b)
