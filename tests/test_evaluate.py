"""quant/evaluate.py: KL divergence, top-1 agreement and perplexity of a quantized model against
its unquantized source."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ernie_edge
from ernie_edge.errors import ErnieEdgeError
from ernie_edge.quant import synthetic
from ernie_edge.quant.convert import ConvertSettings, convert
from ernie_edge.quant.evaluate import (EvalSettings, compare_logits, eval_sequences, evaluate, format_report,
                                       log_softmax)
from ernie_edge.formats.recipe import Recipe

# A stand-in tokenizer.json without the ERNIE chat tokens: Model.tokenizer refuses it, so the
# evaluation falls back to random ids (test_text_sequences covers the real tokenizer).
TOKENIZER_JSON = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    src = synthetic.write_checkpoint(tmp_path_factory.mktemp("src"), "tiny", tokenizer=False)
    (src / "tokenizer.json").write_text(TOKENIZER_JSON)
    base = tmp_path_factory.mktemp("edge")
    q4 = convert(ConvertSettings(source=str(src), dest=base / "q4", progress=False))
    q8 = convert(ConvertSettings(source=str(src), dest=base / "q8", progress=False,
                                 recipe=Recipe(expert_bits=8, dense_bits=16)))
    return src, q4, q8


def test_compare_logits_by_hand():
    lr = np.array([[0.0, 0.0], [2.0, 0.0]], np.float32)
    lq = np.array([[np.log(3.0), 0.0], [2.0, 0.0]], np.float32)
    s = compare_logits(lq, lr, np.array([0, 1]))
    # KL([.5, .5] || [.75, .25]) = .5 ln(.5/.75) + .5 ln(.5/.25)
    assert s["kld"][0] == pytest.approx(0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(2.0))
    assert s["kld"][1] == pytest.approx(0.0, abs=1e-12)
    assert list(s["top1_agree"]) == [True, True]
    assert s["nll_reference"][0] == pytest.approx(np.log(2.0))
    assert s["nll_model"][0] == pytest.approx(-np.log(0.25))
    np.testing.assert_allclose(np.exp(log_softmax(lr)).sum(-1), 1.0)


def test_model_against_itself(models):
    src = models[0]
    r = evaluate(EvalSettings(model=str(src), reference=str(src), prompts=2, tokens=16))
    assert r["kld"]["max"] == pytest.approx(0.0, abs=1e-9)
    assert r["top1_agreement"] == 1.0 and r["perplexity"]["ratio"] == pytest.approx(1.0)


def test_quantized_against_source(models):
    src, q4, q8 = models
    r4 = evaluate(EvalSettings(model=str(q4), reference=str(src), prompts=4, tokens=32))
    r8 = evaluate(EvalSettings(model=str(q8), reference=str(src), prompts=4, tokens=32))
    assert r4["positions"] == 128 and r4["sequences"] in ("text", "random")
    assert 0 < r8["kld"]["mean"] < r4["kld"]["mean"] < 1.0  # int8 experts are closer than int4
    assert r4["kld"]["median"] <= r4["kld"]["p99"] <= r4["kld"]["max"]
    assert 0.5 < r4["top1_agreement"] <= r8["top1_agreement"] <= 1.0
    assert np.isfinite(r4["perplexity"]["model"]) and r4["perplexity"]["reference"] > 1
    text = format_report(r4)
    assert "Mean    KLD" in text and "Same top-1" in text and str(q4) in text


def test_deterministic(models):
    src, q4, _ = models
    a = evaluate(EvalSettings(model=str(q4), reference=str(src), prompts=2, tokens=16, seed=3))
    b = evaluate(EvalSettings(model=str(q4), reference=str(src), prompts=2, tokens=16, seed=3))
    # Same sequences, same counts; the statistics agree to float rounding. (Bit-equality of the
    # floats is not promised: numpy may take a BLAS or a non-BLAS matmul path for the reference
    # depending on a temporary's memory alignment. One CI run differed by 1e-8 relative.)
    assert (a["settings"], a["sequences"], a["positions"]) == (b["settings"], b["sequences"], b["positions"])
    assert a["top1_agreement"] == b["top1_agreement"]
    for key in ("kld", "perplexity"):
        assert a[key] == pytest.approx(b[key], rel=1e-6)


def test_sequences_are_fixed_and_in_range(models):
    model = ernie_edge.load(models[1])
    a, kind = eval_sequences(model, 3, 20, seed=1)
    b, _ = eval_sequences(model, 3, 20, seed=1)
    c, _ = eval_sequences(model, 3, 20, seed=2)
    assert all((x == y).all() for x, y in zip(a, b)) and not all((x == y).all() for x, y in zip(a, c))
    assert all(len(x) == 20 and x.min() >= 0 and x.max() < model.config.vocab_size for x in a)


@pytest.mark.parametrize("prompts, tokens", [(0, 16), (2, 1)])
def test_bad_settings(models, prompts, tokens):
    with pytest.raises(ErnieEdgeError, match="--prompts >= 1 and --tokens >= 2"):
        evaluate(EvalSettings(model=str(models[1]), reference=str(models[0]), prompts=prompts, tokens=tokens))


def test_text_sequences(tmp_path):
    pytest.importorskip("ernie_edge.tokenizer")
    src = synthetic.write_checkpoint(tmp_path / "src", "tiny", layers=2)
    q4 = convert(ConvertSettings(source=str(src), dest=tmp_path / "q4", progress=False))
    seqs, kind = eval_sequences(ernie_edge.load(q4), 2, 24, seed=0)
    assert kind == "text" and all(len(s) == 24 for s in seqs)
    r = evaluate(EvalSettings(model=str(q4), reference=str(src), prompts=2, tokens=24))
    assert r["sequences"] == "text" and r["kld"]["mean"] > 0
