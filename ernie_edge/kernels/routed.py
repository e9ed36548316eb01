"""Decode's routed gate/up regions: a token's router (kernels/moe.py) and the gate, up and SwiGLU
of its experts and of the shared expert in ONE parallel region, bit-identical to moe's route and
then the paired kernel (kernels/q8.py for a q4 / q8 shared expert, q56.py for a q5 / q6 one).

Two phases over the work-unit claims of q8's schedule (`q8._next_unit`):
  1. the router's rows (moe.ROUTER_ROWS experts a unit) and the shared expert's rows, which do not
     depend on the routing: one thread computes the router while the other streams the shared
     expert, so the router's short read no longer stands alone between two regions;
  2. the routed experts' rows, once selected.
The thread that finishes the last router unit selects the experts (`moe.router_unit`) and
publishes them; a thread out of phase-1 units waits for that (`moe.wait_routed`). It waits only on
a unit some running thread has claimed, so the region cannot deadlock, however many of its threads
run at once (one thread alone does every unit).
"""

from __future__ import annotations

from functools import partial

from numba import prange

from . import moe, q8, q56
from ._jit import njit, pnjit
from .q8 import UNIT_QUADS, ActScratch, _gate_up_quad, _gate_up_tail, _next_unit, _units

SYNC = 2  # claims[0]: router units done; claims[1]: 1 once the experts are selected (moe.router_unit)


@njit(inline="always")
def _phases(claims, n_experts, shared_quads, routed_quads):
    """Split the claim flags for the two phases and clear them: (router units, claims of phase 1,
    its unit count, quads per shared-expert unit, claims of phase 2, its unit count, quads per
    routed unit). Phase 1's units are the router's, then the shared expert's."""
    claims[:SYNC] = 0
    half = (claims.shape[0] - SYNC) // 2
    c1, c2 = claims[SYNC:SYNC + half], claims[SYNC + half:]
    nr = moe.router_units(n_experts)
    uq1 = max(UNIT_QUADS, -(-shared_quads // (half - nr)))
    n1 = nr + -(-shared_quads // uq1)
    c1[:n1] = 0
    uq2, n2 = _units(routed_quads, c2)
    return nr, c1, n1, uq1, c2, n2, uq2


@njit(inline="always")
def _routed_phase(claims, c2, n2, uq2, t, nt, wg, sg, wu, su, ids, out, xq, xd, xs, nb, l2, tiled):
    """Phase 2 for thread t: wait for the experts, then the routed bank's units."""
    moe.wait_routed(claims)
    nq = wg.shape[1] // 4
    total = ids.shape[0] * nq
    u, k, pos = _next_unit(c2, t, nt, n2, 0, t * n2 // nt)
    while u >= 0:
        for q in range(u * uq2, min(total, (u + 1) * uq2)):
            _gate_up_quad(wg, sg, wu, su, ids, out, q, nq, xq, xd, xs, nb, l2, tiled)
        u, k, pos = _next_unit(c2, t, nt, n2, k, pos)


@pnjit()
def _routed_experts2_gate_up_silu(xr, wr, bias, use_bias, kr, norm_min, idx, w, logits, p,
                                  x, wga, sga, wua, sua, idsa, outa, xqa, xda, xsa, gsa, tiled_a,
                                  wgb, sgb, wub, sub, idsb, outb, xqb, xdb, xsb, gsb, tiled_b, quantize_b, claims, nt):
    """moe's router of token x, then q8's `_experts2_gate_up_silu` with the experts it selects for
    bank a (idsa is idx[0]); bank b is the q4 / q8 shared expert as a one-expert bank."""
    nb, l2a, l2b = q8._quantize_two(x, sga, xqa, xda, xsa, gsa, sgb, xqb, xdb, xsb, gsb, quantize_b)
    nqb = wgb.shape[1] // 4
    tb = idsb.shape[0] * nqb
    nr, c1, n1, uq1, c2, n2, uq2 = _phases(claims, wr.shape[0], tb, idsa.shape[0] * (wga.shape[1] // 4))
    for t in prange(nt):
        u, k, pos = _next_unit(c1, t, nt, n1, 0, t * n1 // nt)
        while u >= 0:
            if u < nr:
                moe.router_unit(u, xr, wr, bias, use_bias, kr, norm_min, idx, w, logits, p, claims)
            else:
                for q in range((u - nr) * uq1, min(tb, (u - nr + 1) * uq1)):
                    _gate_up_quad(wgb, sgb, wub, sub, idsb, outb, q, nqb, xqb, xdb, xsb, nb, l2b, tiled_b)
            u, k, pos = _next_unit(c1, t, nt, n1, k, pos)
        _routed_phase(claims, c2, n2, uq2, t, nt, wga, sga, wua, sua, idsa, outa, xqa, xda, xsa, nb, l2a, tiled_a)
    _gate_up_tail(wga, sga, wua, sua, idsa, outa, xqa, xda, xsa, nb, l2a)
    _gate_up_tail(wgb, sgb, wub, sub, idsb, outb, xqb, xdb, xsb, nb, l2b)


@pnjit()
def _routed_pair_gate_up(xr, wr, bias, use_bias, kr, norm_min, idx, w, logits, p,
                         x, wga, sga, wua, sua, idsa, outa, xqa, xda, xsa, gsa, tiled_a,
                         wgb, sgb, wub, sub, outb, xqb, xdb, xsb, bits, tiled_b, claims, nt):
    """moe's router of token x, then q56's `_pair_gate_up` with the experts it selects for the
    routed bank a (idsa is idx[0]); b is the q5 / q6 shared expert."""
    nb, l2a, lgb, lub = q56._quantize_pair(x, sga, xqa, xda, xsa, gsa, sgb, sub, xqb, xdb, xsb)
    nsh = (outb.shape[0] + 3) // 4
    nr, c1, n1, uq1, c2, n2, uq2 = _phases(claims, wr.shape[0], nsh, idsa.shape[0] * (wga.shape[1] // 4))
    for t in prange(nt):
        u, k, pos = _next_unit(c1, t, nt, n1, 0, t * n1 // nt)
        while u >= 0:
            if u < nr:
                moe.router_unit(u, xr, wr, bias, use_bias, kr, norm_min, idx, w, logits, p, claims)
            else:
                for q in range((u - nr) * uq1, min(nsh, (u - nr + 1) * uq1)):
                    q56._gate_up_rows(bits, wgb, sgb, wub, sub, outb, 4 * q, xqb, xdb, xsb, nb, lgb, lub, tiled_b)
            u, k, pos = _next_unit(c1, t, nt, n1, k, pos)
        _routed_phase(claims, c2, n2, uq2, t, nt, wga, sga, wua, sua, idsa, outa, xqa, xda, xsa, nb, l2a, tiled_a)
    _gate_up_tail(wga, sga, wua, sua, idsa, outa, xqa, xda, xsa, nb, l2a)


def bind_experts_pair_gate_up_silu(route: tuple, x, a, b, act_a: ActScratch, act_b: ActScratch, act8: bool = False):
    """The router of one token x, then q8.experts_pair_gate_up_silu with the experts it selects
    for bank a, in ONE parallel region, as a call to repeat. route: moe.router_args of x (its
    idx_out [1, k] gets the experts); a: (gate, gate_scales, up, up_scales, out_h, bits) without
    ids; b: as q8.experts_pair_gate_up_silu takes it (the shared expert as a one-expert bank)."""
    call = q8.bind_experts_pair_gate_up_silu(x, (*a[:4], moe.routed_ids(route, x), *a[4:]), b, act_a, act_b, act8)
    return partial(_routed_experts2_gate_up_silu, *route, *call.args)


def bind_pair_gate_up_silu(route: tuple, x, routed, shared, act_a: ActScratch, act_b: ActScratch,
                           act8: bool = False):
    """The router of one token x, then q56.pair_gate_up_silu with the experts it selects, in ONE
    parallel region, as a call to repeat. route: as above; routed: (gate, gate_scales, up,
    up_scales, out_h, bits) without ids; shared: as q56.pair_gate_up_silu takes it."""
    routed = (*routed[:4], moe.routed_ids(route, x), *routed[4:])
    call = q56.bind_pair_gate_up_silu(x, routed, shared, act_a, act_b, act8)
    return partial(_routed_pair_gate_up, *route, *call.args)
