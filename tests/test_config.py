import json

import pytest

from ernie_edge.config import ErnieConfig
from ernie_edge.errors import ConfigError
from ernie_edge.formats.hf_ernie import count_parameters
from ernie_edge.quant.synthetic import make_config


def full():
    return ErnieConfig.from_dict(make_config("full"))


def test_real_model_facts():
    cfg = full()
    assert cfg.dim_head == 128 and cfg.gqa_group == 5
    assert cfg.shared_intermediate_size == 3072  # one MLP of 2 x 1536 (docs/ERNIE_SPEC.md P6)
    assert not cfg.is_moe_layer(0)               # layer 0 is dense (P7)
    assert cfg.moe_layers == list(range(1, 28))
    assert count_parameters(cfg) == 21_825_437_888  # 21.83B, tied embeddings


def test_interval_and_end_index_follow_transformers_rule():
    cfg = ErnieConfig.from_dict(make_config("tiny", layers=8, moe_layer_start_index=2,
                                            moe_layer_interval=2, moe_layer_end_index=6))
    assert cfg.moe_layers == [3, 5]


def test_v5_names_and_rope_parameters_accepted():
    raw = make_config("tiny")
    for old, new in (("moe_num_experts", "num_experts"), ("moe_k", "num_experts_per_tok")):
        raw[new] = raw.pop(old)
    del raw["rope_theta"]
    raw["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    raw["some_unknown_key"] = [1, 2]
    cfg = ErnieConfig.from_dict(raw)
    assert (cfg.moe_num_experts, cfg.moe_k, cfg.rope_theta) == (16, 4, 10000.0)


def test_round_trip_through_to_dict():
    cfg = full()
    assert ErnieConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"num_key_value_heads": 3}, "num_attention_heads"),
    ({"moe_k": 17}, "moe_k"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers"),
    ({"moe_num_experts": 0}, "moe_num_experts"),
    ({"vocab_size": -5}, "vocab_size"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"max_position_embeddings": 2**40}, "max_position_embeddings"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_bad_values_name_the_field(change, field):
    raw = make_config("tiny")
    raw.update(change)
    with pytest.raises(ConfigError, match=field):
        ErnieConfig.from_dict(raw)


def test_hidden_not_divisible_without_head_dim():
    raw = make_config("tiny")
    del raw["head_dim"]  # 64 / 20 heads is not an integer
    with pytest.raises(ConfigError, match="hidden_size"):
        ErnieConfig.from_dict(raw)


def test_missing_required_field(tmp_path):
    raw = make_config("tiny")
    del raw["moe_intermediate_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config.json.*moe_intermediate_size"):
        ErnieConfig.from_file(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ErnieConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ErnieConfig.from_file(tmp_path / "config.json")
