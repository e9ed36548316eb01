"""ernie_edge/formats/recipe.py: precision per tensor role, option validation, manifest round trip."""

import json
import re

import pytest

from ernie_edge.config import ErnieConfig
from ernie_edge.errors import ErnieEdgeError
from ernie_edge.formats.hf_ernie import expected_tensors
from ernie_edge.formats.recipe import ROLES, Recipe, RecipeError

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, moe_intermediate_size=32, moe_num_experts=4,
            moe_k=2, moe_num_shared_experts=1, architectures=["Ernie4_5_MoeForCausalLM"],
            model_type="ernie4_5_moe")


def test_defaults():
    r = Recipe()
    assert (r.expert_bits, r.dense_bits, r.group_size) == (4, 8, 32)
    assert {role: r.precision_for(role) for role in ROLES} == {
        "expert": "q4", "attn": "q8", "dense_mlp": "q8", "shared_expert": "q8", "embed": "q8",
        "router": "f32", "router_bias": "f32", "norm": "f32"}


@pytest.mark.parametrize("expert_bits,dense_bits,expert,dense", [
    (4, 4, "q4", "q4"), (8, 8, "q8", "q8"), (4, 16, "q4", "f16"), (8, 16, "q8", "f16")])
def test_options_map_to_precisions(expert_bits, dense_bits, expert, dense):
    r = Recipe(expert_bits=expert_bits, dense_bits=dense_bits, group_size=128)
    assert r.precision_for("expert") == expert
    for role in ("attn", "dense_mlp", "shared_expert", "embed"):
        assert r.precision_for(role) == dense
    for role in ("router", "router_bias", "norm"):  # never quantized (docs/ERNIE_SPEC.md P3)
        assert r.precision_for(role) == "f32"


def test_every_checkpoint_role_has_a_precision():
    cfg = ErnieConfig.from_dict(TINY)
    roles = {spec.role for spec in expected_tensors(cfg).values()}
    assert roles == set(ROLES)
    for role in roles:
        assert Recipe().precision_for(role) in ("q4", "q8", "f16", "f32")


@pytest.mark.parametrize("kwargs,option", [
    ({"expert_bits": 16}, "--expert-bits"), ({"expert_bits": 2}, "--expert-bits"),
    ({"dense_bits": 32}, "--dense-bits"), ({"dense_bits": "8"}, "--dense-bits"),
    ({"group_size": 16}, "--group-size"), ({"group_size": 32.0}, "--group-size"),
    ({"expert_bits": True}, "--expert-bits")])
def test_bad_options_name_the_option(kwargs, option):
    with pytest.raises(RecipeError, match=option) as e:
        Recipe(**kwargs)
    assert isinstance(e.value, ErnieEdgeError) and isinstance(e.value, ValueError)


def test_unknown_role():
    with pytest.raises(ValueError, match="unknown tensor role 'lm_head'.*expert"):
        Recipe().precision_for("lm_head")


def test_frozen():
    with pytest.raises(AttributeError):
        Recipe().expert_bits = 8


def test_manifest_round_trip():
    r = Recipe(expert_bits=8, dense_bits=16, group_size=64)
    d = json.loads(json.dumps(r.to_dict()))
    assert d == {"expert_bits": 8, "dense_bits": 16, "group_size": 64}
    assert Recipe.from_dict(d) == r


@pytest.mark.parametrize("d,match", [
    ({"expert_bits": 4, "dense_bits": 8}, "missing field.*group_size"),
    ({"expert_bits": 4, "dense_bits": 8, "group_size": 32, "lm_head_bits": 4}, "unknown field.*lm_head_bits"),
    ({"expert_bits": 3, "dense_bits": 8, "group_size": 32}, "--expert-bits"),
    ([4, 8, 32], "JSON object")])
def test_bad_manifest_recipe(d, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict(d)


@pytest.mark.parametrize("name, fields", [
    ("q4g32-d8", (4, 8, 32)), ("q4g32-d4", (4, 4, 32)), ("q8g128-d16", (8, 16, 128)), ("Q4G64-D8", (4, 8, 64))])
def test_names_round_trip(name, fields):
    r = Recipe.from_name(name)
    assert (r.expert_bits, r.dense_bits, r.group_size) == fields
    assert r.name == name.lower() and Recipe.from_name(r.name) == r


def test_default_name_is_the_readme_default():
    assert Recipe.default().name == "q4g128-d6-s5g32"
    assert Recipe().name == "q4g32-d8"  # the plain recipe the three --*-bits / --group-size flags start from


@pytest.mark.parametrize("name, message", [
    ("q4-d8", "expected q{expert bits}g{group size}-d{dense bits}"),
    ("", "expected q"),
    ("q4g33-d8", "--recipe 'q4g33-d8': --group-size"),
    ("q3g32-d8", "--expert-bits"),
])
def test_bad_names_say_the_accepted_form(name, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        Recipe.from_name(name)


# ---- per-role overrides (q5 / q6 and per-role group sizes) --------------------------------------------

@pytest.mark.parametrize("name, base, roles", [
    ("q4g32-d5-h6", (4, 5, 32), (("embed", 6, 32),)),
    ("q4g32-d4-h6", (4, 4, 32), (("embed", 6, 32),)),
    ("q4g64-d6-a8g32-s5", (4, 6, 64), (("attn", 8, 32), ("shared_expert", 5, 64))),
    ("q8g32-d8-m16", (8, 8, 32), (("dense_mlp", 16, 32),)),
])
def test_override_names_round_trip(name, base, roles):
    r = Recipe.from_name(name)
    assert (r.expert_bits, r.dense_bits, r.group_size) == base and r.roles == roles
    assert r.name == name and Recipe.from_name(r.name) == r
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_overrides_set_format_and_group_per_role():
    r = Recipe.from_name("q4g32-d5-a6g128-h6")
    assert r.storage_for("attn") == ("q6", 128)
    assert r.storage_for("embed") == ("q6", 32)
    assert r.storage_for("dense_mlp") == r.storage_for("shared_expert") == ("q5", 32)
    assert r.storage_for("expert") == ("q4", 32) and r.storage_for("norm") == ("f32", None)
    assert Recipe.from_name("q4g32-d8-h16").storage_for("embed") == ("f16", None)
    assert r.precision_for("attn") == "q6"


def test_overrides_are_canonical():
    """Overrides equal to the dense default vanish, and order does not matter: equal recipes are
    equal, with one name, and a recipe without overrides writes the three-field manifest object
    that every earlier ernie-edge reads."""
    a = Recipe(4, 5, 32, roles=(("embed", 6, 32), ("attn", 5, 32)))
    b = Recipe(4, 5, 32, roles=(("embed", 6, 32),))
    assert a == b and a.name == "q4g32-d5-h6"
    assert Recipe.from_name("q4g32-d8-a8-h8") == Recipe() and Recipe.from_name("q4g32-d8-a8").name == "q4g32-d8"
    assert Recipe().to_dict() == {"expert_bits": 4, "dense_bits": 8, "group_size": 32}
    assert Recipe.from_name("q4g32-d4").to_dict() == {"expert_bits": 4, "dense_bits": 4, "group_size": 32}


@pytest.mark.parametrize("kwargs, match", [
    ({"roles": (("expert", 6, 32),)}, "not one of attn"),
    ({"roles": (("attn", 7, 32),)}, "bits must be one of"),
    ({"roles": (("attn", 6, 48),)}, "group size must be one of"),
    ({"roles": (("attn", 6, 32), ("attn", 5, 32))}, "given twice"),
    ({"roles": (("attn", 6),)}, "each entry is"),
])
def test_bad_overrides(kwargs, match):
    with pytest.raises(RecipeError, match=match):
        Recipe(**kwargs)


@pytest.mark.parametrize("name, message", [
    ("q4g32-d5-x6", "expected q"),
    ("q4g32-d5-h7", "bits must be one of"),
    ("q4g32-d5-h6g48", "group size must be one of"),
    ("q4g32-d5-h6-h5", "given twice"),
])
def test_bad_override_names(name, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        Recipe.from_name(name)


@pytest.mark.parametrize("roles", [[1, 2], {"attn": {"bits": 6}}, {"attn": 6}])
def test_bad_manifest_roles(roles):
    with pytest.raises(RecipeError, match="'roles' must map dense roles"):
        Recipe.from_dict({"expert_bits": 4, "dense_bits": 5, "group_size": 32, "roles": roles})
