"""ernie_edge/formats/budget.py: bytes of weights a decoded token reads, per role."""

import pytest

from ernie_edge.config import ErnieConfig
from ernie_edge.formats.budget import decode_bytes, decode_reads, recipe_bytes
from ernie_edge.formats.recipe import Recipe
from ernie_edge.manifest import read_manifest
from ernie_edge.quant.convert import ConvertSettings, convert
from ernie_edge.quant.synthetic import make_config

FULL4 = ErnieConfig.from_dict(make_config("full", layers=4))


def test_full_width_four_layers_by_hand():
    """The 4-layer full-width model under q4g32-d8, summed from the shapes by hand."""
    H, V, L = 2560, 103424, 4
    attn = 2 * H * H + 2 * 512 * H
    q8, q4 = 8.5 / 8, 4.5 / 8
    want = {
        "lm_head": (V + 1) * H * q8,
        "attn": L * attn * q8,
        "dense_mlp": 3 * 12288 * H * q8,
        "shared_expert": (L - 1) * 3 * 3072 * H * q8,
        "expert": (L - 1) * 6 * 3 * 1536 * H * q4,  # 6 of 64 experts per layer
        "router": (L - 1) * (64 * H + 64) * 4,
        "norm": (2 * L + 1) * H * 4,
    }
    got = recipe_bytes(Recipe(), FULL4)
    assert got.keys() == {*want, "total"}
    for role, b in want.items():
        assert got[role] == pytest.approx(b, rel=1e-12), role
    assert got["total"] == pytest.approx(sum(want.values()), rel=1e-12)
    assert 645.0e6 < got["total"] < 645.2e6  # docs/PERF.md: 0.645 GB


def test_overrides_move_only_their_role():
    base, head6 = recipe_bytes(Recipe.from_name("q4g32-d4"), FULL4), recipe_bytes(Recipe.from_name("q4g32-d4-h6"), FULL4)
    assert head6["lm_head"] == pytest.approx(base["lm_head"] * 6.5 / 4.5)
    assert {k: v for k, v in head6.items() if k not in ("lm_head", "total")} == \
        {k: v for k, v in base.items() if k not in ("lm_head", "total")}


def test_reads_cover_every_tensor_once():
    reads = decode_reads(FULL4)
    assert len({spec.name for spec, _ in reads}) == len(reads)
    fracs = {spec.role: frac for spec, frac in reads}
    assert fracs["expert"] == 6 / 64 and fracs["attn"] == 1.0 and fracs["embed"] == 1 + 1 / 103424
    assert decode_bytes(FULL4, lambda spec: 0)["total"] == 0


@pytest.mark.parametrize("name", ["q4g32-d8", "q4g32-d5-a6g64-h6"])
def test_agrees_with_what_the_converter_writes(tiny_dir, tmp_path, name):
    """The byte count of each tensor is the manifest's: budget and converter choose the same
    formats and groups (including fallbacks where a group size does not divide the width)."""
    recipe = Recipe.from_name(name)
    m = read_manifest(convert(ConvertSettings(source=str(tiny_dir), dest=tmp_path / name, recipe=recipe,
                                              progress=False)))
    cfg = m.erniecfg()
    sizes = {t.name: t.nbytes for t in m.tensors.values()}

    def stored(spec):
        if spec.role != "expert":
            return sizes[spec.name]
        parts = spec.name.split(".")  # model.layers.L.mlp.experts.E.PROJ_proj.weight
        bank = sizes[f"layers.{int(parts[2]):02d}.experts.{parts[6].removesuffix('_proj')}"]
        return bank // cfg.moe_num_experts

    assert decode_bytes(cfg, stored) == pytest.approx(recipe_bytes(recipe, cfg))
