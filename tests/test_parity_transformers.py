"""The reference forward pass is the same model as transformers' Ernie4_5_MoeForCausalLM."""

import numpy as np
import pytest

import ernie_edge
from hf_parity import compare, edge_forward, edge_greedy, hf_forward, hf_greedy, load_hf

TOL = 1e-4


@pytest.fixture(scope="module")
def pair(parity_dir):
    return ernie_edge.load(parity_dir), load_hf(parity_dir)


@pytest.mark.parametrize("length, offset", [(7, 0), (512, 0), (64, 1000), (48, 8192)])
def test_logits_and_routing_match(pair, parity_dir, length, offset):
    model, hf = pair
    ids = np.random.default_rng(length + offset).integers(0, model.config.vocab_size, length)
    r = compare(parity_dir, hf, ids, offset, model=model)
    print(f"\n{parity_dir.name}: {r}")
    assert r["max_abs_dlogit"] <= TOL
    assert r["argmax_agreement"] == 1.0
    assert r["routing_identical_layers"] == r["moe_layers"] > 0


def test_greedy_continuation_matches(pair):
    model, hf = pair
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 20)
    assert edge_greedy(model, ids, 32) == hf_greedy(hf, ids, 32)


def test_prefill_then_decode_equals_full_prefill(pair):
    model, _ = pair
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, 40)
    full = model.logits(ids)
    cache = model.new_cache()
    steps = [model.prefill(ids[:25], cache)]
    steps += [model.decode(int(t), cache) for t in ids[25:]]
    np.testing.assert_allclose(np.stack(steps), full[24:], rtol=0, atol=1e-4)


# (not k_all_dense_last: with k == experts every expert is chosen, so the bias cannot matter)
@pytest.mark.parametrize("name", ["real_heads", "interval2"])
def test_correction_bias_changes_routing(make_parity_dir, name):
    """The bias path is really exercised: routing with it differs from routing without it, and
    only the version with it matches transformers."""
    folder = make_parity_dir(name)
    with_bias = ernie_edge.load(folder)
    without = ernie_edge.load(folder, use_correction_bias=False)
    ids = np.random.default_rng(3).integers(0, with_bias.config.vocab_size, 128)
    _, a = edge_forward(with_bias, ids)
    _, b = edge_forward(without, ids)
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    _, ref = hf_forward(load_hf(folder), ids)
    assert all(np.array_equal(a[k], ref[k]) for k in ref)
