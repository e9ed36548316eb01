"""Synthetic HF checkpoints: real names, shapes, dtypes, shards + index, deterministic."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from ernie_edge.config import ErnieConfig
from ernie_edge.hf_checkpoint import HFCheckpoint
from ernie_edge.quant import synthetic
from ernie_edge.formats.hf_ernie import count_parameters


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("model-*"))}


def test_layout_names_dtypes(tmp_path):
    folder = synthetic.write_checkpoint(tmp_path / "t", "tiny", tokenizer=False, num_shards=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    ck = HFCheckpoint(folder)  # validates names, shapes and dtypes against config.json
    assert set(ck.skipped) == {n for n in index["weight_map"] if n.startswith("model.mtp_")} != set()
    dtypes = {name: info.dtype for name, (_, info) in ck.tensors.items()}
    assert dtypes["model.layers.1.mlp.gate.weight"] == "F32"
    assert dtypes["model.layers.1.mlp.moe_statics.e_score_correction_bias"] == "F32"
    assert dtypes["model.layers.1.mlp.experts.3.down_proj.weight"] == "BF16"
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in folder.glob("model-*")) - sum(
        f.data_start for f in ck.shards.values())


def test_deterministic_and_depth_independent(tmp_path):
    a = synthetic.write_checkpoint(tmp_path / "a", "tiny", tokenizer=False, seed=7)
    b = synthetic.write_checkpoint(tmp_path / "b", "tiny", tokenizer=False, seed=7)
    assert digest(a) == digest(b)
    deep = HFCheckpoint(synthetic.write_checkpoint(tmp_path / "c", "tiny", layers=5, tokenizer=False, seed=7))
    shallow = HFCheckpoint(a)
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    np.testing.assert_array_equal(deep.raw(name)[0], shallow.raw(name)[0])


def test_activations_stay_finite_and_logits_have_margin(tmp_path):
    import ernie_edge
    model = ernie_edge.load(synthetic.write_checkpoint(tmp_path / "s", "tiny", layers=6, tokenizer=False))
    logits = model.logits(np.arange(1, 200))
    assert np.isfinite(logits).all()
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert np.median(top2[:, 1] - top2[:, 0]) > 1e-2


def test_full_preset_has_the_real_parameter_count():
    cfg = ErnieConfig.from_dict(synthetic.make_config("full"))
    assert count_parameters(cfg) == 21_825_437_888
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.moe_num_experts, cfg.vocab_size) == (2560, 28, 64, 103424)


@pytest.mark.slow
def test_full_width_synth_memory_is_bounded(tmp_path):
    """Two full-width layers (~2.4 GB of bf16) are written with a peak RSS far below their size."""
    code = ("import resource, sys; from ernie_edge.quant.synthetic import write_checkpoint;"
            "write_checkpoint(sys.argv[1], 'full', layers=2, tokenizer=False);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], check=True,
                         capture_output=True, text=True)
    peak_kb = int(out.stdout.strip().splitlines()[-1])
    assert peak_kb * 1024 < 1.5e9
