"""Tests for ernie_edge.sampling: settings validation, the sampler against a brute-force reference,
and stop strings over random splits."""

import json
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie_edge.errors import ConfigError, ErnieEdgeError
from ernie_edge.sampling import (
    DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Sampler, SamplingParams, SamplingParamsError, StopChecker,
    apply_penalties, load_generation_config, nucleus,
)

# ---- SamplingParams ----------------------------------------------------------------------------


def test_defaults_are_documented_values():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (DEFAULT_TEMPERATURE, DEFAULT_TOP_P, 0, 0.0)
    assert (DEFAULT_TEMPERATURE, DEFAULT_TOP_P) == (0.6, 0.95)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.max_tokens is None and p.stop == () and p.stop_token_ids == ()
    assert not p.greedy and SamplingParams(temperature=0).greedy


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("temperature", None), ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan), ("top_k", -1),
    ("top_k", 2.0), ("top_k", True), ("min_p", -0.01), ("min_p", 1.5), ("repetition_penalty", 0.0),
    ("repetition_penalty", math.inf), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("frequency_penalty", math.nan), ("seed", -1), ("seed", 2**64), ("seed", 1.5), ("max_tokens", 0),
    ("max_tokens", 2**0.5), ("stop", [""]), ("stop", ["a"] * 17), ("stop", [1]), ("stop", "x" * 2000),
    ("stop", {"a"}), ("stop_token_ids", [-1]), ("stop_token_ids", ["2"]), ("stop_token_ids", [True]),
    ("stop_token_ids", 2),
])
def test_invalid_values_name_the_parameter(field, value):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field and field in str(info.value)
    assert isinstance(info.value, ErnieEdgeError)


def test_valid_edge_values_and_normalisation():
    p = SamplingParams(temperature=0, top_p=1, top_k=5, min_p=1, presence_penalty=-2, seed=2**64 - 1,
                       max_tokens=1, stop="END", stop_token_ids=[np.int64(7)])
    assert p.stop == ("END",) and p.stop_token_ids == (7,)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_from_generation_config_reads_folder_file_and_dict(tmp_path):
    assert SamplingParams.from_generation_config(tmp_path) == SamplingParams()  # no file: defaults
    cfg = {"temperature": 0.8, "top_p": 0.8, "top_k": 40, "repetition_penalty": 1.05,
           "max_new_tokens": 1024, "eos_token_id": [2, 5], "do_sample": True}
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    expected = SamplingParams(temperature=0.8, top_p=0.8, top_k=40, repetition_penalty=1.05,
                              max_tokens=1024)
    assert SamplingParams.from_generation_config(tmp_path) == expected
    assert SamplingParams.from_generation_config(tmp_path / "generation_config.json") == expected
    assert SamplingParams.from_generation_config(cfg) == expected
    assert SamplingParams.from_generation_config(None) == SamplingParams()


def test_from_generation_config_overrides_and_greedy_flag():
    cfg = {"temperature": 0.8, "do_sample": False}
    assert SamplingParams.from_generation_config(cfg).temperature == 0.0  # as transformers does
    p = SamplingParams.from_generation_config(cfg, temperature=0.3, top_p=None, seed=3)
    assert (p.temperature, p.top_p, p.seed) == (0.3, DEFAULT_TOP_P, 3)
    with pytest.raises(SamplingParamsError, match="top_p"):
        SamplingParams.from_generation_config(cfg, top_p=2.0)
    with pytest.raises(TypeError, match="tempreature"):
        SamplingParams.from_generation_config(cfg, tempreature=0.3)


def test_bad_generation_config_is_a_clear_error(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="generation_config.json"):
        SamplingParams.from_generation_config(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_generation_config(path)
    with pytest.raises(ConfigError):
        load_generation_config(tmp_path / "missing.json")
    path.write_text(json.dumps({"top_p": 0}))
    with pytest.raises(SamplingParamsError, match="generation_config.json.*top_p") as info:
        SamplingParams.from_generation_config(tmp_path)
    assert info.value.param == "top_p"


# ---- the brute-force reference -----------------------------------------------------------------

def reference_distribution(logits, params, vocab_size=None, history=(), prompt=()):
    """Exact filtered distribution, the slow obvious way: {token id: probability}."""
    x = np.asarray(logits, dtype=np.float64)[:vocab_size].copy()
    counts = Counter(int(t) for t in history)
    for t in set(counts) | {int(t) for t in prompt}:
        if t < len(x) and params.repetition_penalty != 1:
            r = params.repetition_penalty
            x[t] = x[t] / r if x[t] > 0 else x[t] * r
    for t, c in counts.items():
        if t < len(x):
            x[t] -= params.presence_penalty + params.frequency_penalty * c
    if params.temperature == 0:
        return {int(np.argmax(x)): 1.0}
    x = x / params.temperature
    order = np.argsort(-x, kind="stable")
    if 0 < params.top_k < len(x):
        order = order[: params.top_k]
    p = np.exp(x[order] - x[order[0]])
    p /= p.sum()
    if params.top_p < 1:
        n = int(np.searchsorted(np.cumsum(p), params.top_p)) + 1
        order, p = order[:n], p[:n] / p[:n].sum()
    keep = p >= params.min_p * p[0]
    order, p = order[keep], p[keep] / p[keep].sum()
    return dict(zip(order.tolist(), p.tolist()))


def near_boundary(logits, params):
    """True when float32-vs-float64 rounding could move a top-p or min-p boundary."""
    x = np.sort(np.asarray(logits, np.float64))[::-1] / max(params.temperature, 1e-30)
    if params.top_k:
        x = x[: params.top_k]
    p = np.exp(x - x[0])
    p /= p.sum()
    near_top_p = params.top_p < 1 and np.abs(np.cumsum(p) - params.top_p).min() < 1e-4
    near_min_p = params.min_p > 0 and np.abs(p / p[0] - params.min_p).min() < 1e-4
    return near_top_p or near_min_p


def as_dict(ids, probs):
    assert len(set(ids.tolist())) == len(ids)
    assert probs.sum() == pytest.approx(1.0)
    return dict(zip(ids.tolist(), probs.tolist()))


PARAM_GRID = [
    SamplingParams(temperature=1.0, top_p=1.0),
    SamplingParams(),
    SamplingParams(temperature=0.7, top_k=5, top_p=1.0),
    SamplingParams(temperature=1.3, top_p=0.5),
    SamplingParams(temperature=0.9, top_p=1.0, min_p=0.2),
    SamplingParams(temperature=0.8, top_k=12, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, top_p=0.01),
    SamplingParams(temperature=0),
    SamplingParams(temperature=1e-40),
    SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5,
                   frequency_penalty=0.4, top_p=0.9),
]


@pytest.mark.parametrize("params", PARAM_GRID)
def test_distribution_matches_reference(params):
    rng = np.random.default_rng(1)
    checked = 0
    for trial in range(40):
        vocab = int(rng.integers(2, 60))
        logits = (rng.standard_normal(vocab + 3) * rng.uniform(0.5, 4)).astype(np.float32)
        logits[vocab:] = 50.0  # rows past the tokenizer must never be sampled
        history = rng.integers(0, vocab + 3, int(rng.integers(0, 20)))
        prompt = rng.integers(0, vocab, 5)
        if near_boundary(apply_penalties(logits[:vocab], history, np.unique(prompt), params), params):
            continue
        sampler = Sampler(params, vocab_size=vocab, prompt_ids=prompt)
        got = as_dict(*sampler.distribution(logits, history))
        want = reference_distribution(logits, params, vocab, history, prompt)
        assert got.keys() == want.keys()  # exact support
        assert np.allclose([got[k] for k in want], list(want.values()), rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked >= 30


def test_large_nucleus_uses_bins_and_matches_reference():
    rng = np.random.default_rng(2)
    for scale, top_p in [(0.05, 0.95), (0.5, 0.9), (3.0, 0.999), (1.0, 0.3)]:
        logits = (rng.standard_normal(50000) * scale).astype(np.float32)
        params = SamplingParams(temperature=1.0, top_p=top_p)
        got = as_dict(*Sampler(params).distribution(logits))
        want = reference_distribution(logits, params)
        assert got.keys() == want.keys()
        assert np.allclose([got[k] for k in want], list(want.values()), rtol=1e-5)
        assert len(want) > 1024  # past the first guess: the binned path


def test_nucleus_keeps_top_token_and_has_minimal_support():
    w = np.array([0.1, 1.0, 0.5, 0.25], dtype=np.float32)
    assert nucleus(w, 1e-9).tolist() == [1]
    total = w.sum()
    assert sorted(nucleus(w, 1.0 / total).tolist()) == [1]
    assert sorted(nucleus(w, 1.5 / total).tolist()) == [1, 2]
    assert sorted(nucleus(w, 1.5001 / total).tolist()) == [1, 2, 3]
    assert sorted(nucleus(w, 1.0).tolist()) == [0, 1, 2, 3]


def test_penalties_follow_hf_and_openai_rules():
    x = np.array([2.0, -2.0, 1.0, -1.0, 0.5], dtype=np.float32)
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(x, np.array([0, 1, 1]), np.array([3]), params)
    # id 0: 2/2 - 0.5 - 0.25; id 1: -2*2 - 0.5 - 0.5; id 3: prompt only, repetition only.
    assert out.tolist() == pytest.approx([0.25, -5.0, 1.0, -2.0, 0.5])
    assert apply_penalties(x, [0], np.array([], np.int64), SamplingParams()) is x


def test_greedy_is_argmax_and_respects_vocab_limit():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal(100).astype(np.float32)
    logits[95] = 100.0
    sampler = Sampler(SamplingParams(temperature=0), vocab_size=90)
    assert sampler.sample(logits) == int(np.argmax(logits[:90]))
    hot = Sampler(SamplingParams(temperature=5.0, top_p=1.0), vocab_size=90)
    assert max(hot.sample(logits) for _ in range(500)) < 90


def test_same_seed_same_tokens():
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((60, 1000)).astype(np.float32)

    def run(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler.sample(row) for row in rows]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_empirical_frequencies_match_distribution():
    """Chi-square goodness of fit of 20000 draws against the exact filtered distribution."""
    logits = np.array([2.0, 1.5, 1.4, 0.3, 0.0, -0.5, -3.0, 1.0], dtype=np.float32)
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.95, min_p=0.05, seed=123)
    want = reference_distribution(logits, params)
    sampler = Sampler(params)
    n = 20000
    counts = Counter(sampler.sample(logits) for _ in range(n))
    assert set(counts) <= set(want)
    chi2 = sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in want.items())
    k = len(want) - 1
    critical = k * (1 - 2 / (9 * k) + 3.09 * math.sqrt(2 / (9 * k))) ** 3  # p = 0.001 (Wilson-Hilferty)
    assert len(want) >= 4 and chi2 < critical


def test_invalid_logits_raise():
    sampler = Sampler(SamplingParams(temperature=1.0))
    with pytest.raises(FloatingPointError, match="NaN"):
        sampler.sample(np.array([0.0, np.nan, 1.0], dtype=np.float32))
    with pytest.raises(FloatingPointError):
        Sampler(SamplingParams(temperature=0)).sample(np.array([np.nan, 1.0], dtype=np.float32))
    with pytest.raises(ValueError, match="vocab_size"):
        Sampler(SamplingParams(), vocab_size=10).sample(np.zeros(5, np.float32))
    masked = np.array([-np.inf, 3.0, -np.inf], dtype=np.float32)
    assert sampler.sample(masked) == 1


# ---- stop strings ------------------------------------------------------------------------------

def reference_stop(text, stops):
    """Cut at the occurrence that ends first (the longer one if two end together)."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    return (text[: min(hits)[1]], True) if hits else (text, False)


def run_stop_checker(pieces, stops):
    checker = StopChecker(stops)
    out, stopped = [], False
    for piece in pieces:
        text, stopped = checker.feed(piece)
        out.append(text)
    if not stopped:
        out.append(checker.flush())
    return "".join(out), stopped, checker


def test_stop_checker_examples():
    checker = StopChecker(["</answer>", "STOP"])
    assert checker.feed("Hello </ans") == ("Hello ", False)
    assert checker.feed("wer") == ("", False)
    assert checker.feed("> tail") == ("", True)
    assert checker.matched == "</answer>" and checker.feed("more") == ("", True)
    checker = StopChecker(["abcd", "c"])
    assert checker.feed("abc") == ("ab", True) and checker.matched == "c"
    checker = StopChecker(["xyz"])
    assert checker.feed("ab xy") == ("ab ", False) and checker.flush() == "xy"
    assert StopChecker([]).feed("anything") == ("anything", False)


@settings(max_examples=400, deadline=None)
@given(text=st.text("abc✓", max_size=30), stops=st.lists(st.text("abc✓", min_size=1, max_size=4),
                                                         max_size=3), data=st.data())
def test_stop_checker_any_split_matches_reference(text, stops, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    got, stopped, checker = run_stop_checker(pieces, stops)
    assert (got, stopped) == reference_stop(text, stops)
    assert run_stop_checker(list(text), stops)[:2] == (got, stopped)
    if stopped:
        assert checker.matched in stops
