"""benchmarks/edge_deepen.py: a deeper edge folder made from a shallower one (the 28-layer speed
benchmarks), valid for the loader and `verify`, its new layers copies of the source's MoE layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import ernie_edge
from ernie_edge.manifest import read_manifest, verify
from ernie_edge.quant import synthetic
from ernie_edge.quant.convert import ConvertSettings, convert

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "edge_deepen.py"


def test_deepened_folder_loads_verifies_and_repeats_layers(tmp_path):
    src = synthetic.write_checkpoint(tmp_path / "src", "tiny", layers=3)
    edge = convert(ConvertSettings(source=str(src), dest=tmp_path / "edge", progress=False))
    deep = tmp_path / "deep"
    subprocess.run([sys.executable, str(SCRIPT), str(edge), str(deep), "--layers", "6"], check=True,
                   capture_output=True, text=True, timeout=300)
    assert read_manifest(deep).config["num_hidden_layers"] == 6
    assert verify(deep) == []  # every file's size and sha256 as the manifest says
    model = ernie_edge.load(deep)
    assert model.config.num_hidden_layers == 6
    ck = model.weights
    for i, s in ((3, 1), (4, 2), (5, 1)):  # layer i copies MoE layer 1 + (i - 1) % 2
        np.testing.assert_array_equal(ck.expert_bank(i, "down").data, ck.expert_bank(s, "down").data)
        np.testing.assert_array_equal(ck.qtensor(f"model.layers.{i}.self_attn.q_proj.weight").data,
                                      ck.qtensor(f"model.layers.{s}.self_attn.q_proj.weight").data)
    logits = model.logits([1, 2, 3])
    assert logits.shape == (3, model.config.vocab_size) and np.isfinite(logits).all()
