"""`ernie-edge bench`: the figures it reports (contract keys) on the tiny converted model."""

import json
import subprocess
import sys

import numpy as np
import pytest

import ernie_edge

from ernie_edge.bench import (BenchSettings, _dense_pieces, _read_pieces, _read_sum, _token_pieces, run_bench,
                               weights_bytes_per_token)

KEYS = {"prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "jit_s", "peak_rss_bytes", "anon_rss_bytes",
        "file_rss_bytes", "weights_bytes_per_token", "read_bandwidth_gbs", "bandwidth_fraction",
        "weights_read_gbs", "weights_bandwidth_fraction"}


@pytest.fixture(scope="module")
def tiny_edge(tiny_dir, tmp_path_factory):
    from ernie_edge.quant.convert import ConvertSettings, convert
    return convert(ConvertSettings(source=str(tiny_dir), dest=tmp_path_factory.mktemp("b") / "edge",
                                   progress=False))


def test_read_probe_sums_every_element():
    a = np.arange(300 * 64, dtype=np.float32).reshape(300, 64) % 7
    assert _read_sum(a, 2) == pytest.approx(float(a.sum()))
    assert _read_sum(a, 3) == pytest.approx(float(a.sum()))


def test_bench_reports_the_contract_keys(tiny_edge):
    r = run_bench(BenchSettings(model=str(tiny_edge), prompt_tokens=20, gen_tokens=5, probe_bytes=1 << 24))
    assert KEYS <= set(r)
    assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["read_bandwidth_gbs"] > 0
    assert 0 < r["decode_ms_p50"] <= r["decode_ms_p90"]
    assert r["decode_ms_p50"] * r["gen_tokens"] <= 1e3 * r["gen_tokens"] / r["decode_tok_s"] * 1.5
    assert r["bandwidth_fraction"] == pytest.approx(
        r["decode_tok_s"] * r["weights_bytes_per_token"] / (r["read_bandwidth_gbs"] * 1e9))
    assert r["weights_read_gbs"] > 0
    assert r["weights_bandwidth_fraction"] == pytest.approx(
        r["decode_tok_s"] * r["weights_bytes_per_token"] / (r["weights_read_gbs"] * 1e9))


def test_pieces_probe_reads_every_block_of_every_piece():
    from numba.typed import List
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 2**63, (n, 64), dtype=np.uint64) for n in (1, 3, 0, 17)]
    want = int(sum(int(p.sum(dtype=np.uint64)) for p in pieces) % 2**64)
    for nt in (1, 2, 3):
        assert int(_read_pieces(List(pieces), nt)) == want


def test_token_pieces_are_the_bytes_one_decode_step_reads(tiny_edge):
    model = ernie_edge.load(tiny_edge)
    cfg, ck = model.config, model.weights
    rng = np.random.default_rng(1)
    pieces = _token_pieces(model, rng)
    got = sum(p.nbytes for p in pieces)
    per_token = weights_bytes_per_token(model)
    embed = ck.qtensor("model.embed_tokens.weight")
    # each piece is a tensor's (or one expert's) bytes cut to whole 512-byte blocks
    assert per_token - embed.nbytes // cfg.vocab_size - 512 * len(pieces) <= got <= per_token
    gate = ck.expert_bank(cfg.moe_layers[0], "gate").data  # [E, I, ...]
    experts = {e for p in pieces for e in range(cfg.moe_num_experts) if np.shares_memory(p, gate[e])}
    assert gate[0].nbytes >= 512 and len(experts) == cfg.moe_k  # k distinct experts of that bank


def test_token_pieces_read_the_heads_tiled_copy(tiny_edge):
    """Where decode reads the LM head from a copy in 4-row tiles (cpu_weights.TiledHead), the read
    ceiling reads that copy, not the mapped matrix."""
    model = ernie_edge.load(tiny_edge)
    embed = model.weights.qtensor("model.embed_tokens.weight")
    model.backend.lm_head.tiles = tiles = np.ones_like(embed.data)  # stands for it: tiny's rows have no tiles
    tiles.flags.writeable = False
    pieces = _dense_pieces(model)
    assert any(np.shares_memory(p, tiles) for p in pieces)
    assert not any(np.shares_memory(p, embed.data) for p in pieces)


def test_weights_per_token_counts_k_experts_not_all(tiny_edge):
    import ernie_edge
    model = ernie_edge.load(tiny_edge)
    cfg, ck = model.config, model.weights
    per_token = weights_bytes_per_token(model)
    all_bytes = sum(f.file_size for f in ck.files.values())
    banks = [ck.expert_bank(cfg.moe_layers[0], p) for p in ("gate", "up", "down")]
    one_expert = sum(t.nbytes for t in banks) // cfg.moe_num_experts
    assert per_token < all_bytes
    assert per_token >= cfg.moe_k * one_expert * len(cfg.moe_layers)


def test_bench_cli_writes_json(tiny_edge, tmp_path):
    out = tmp_path / "b.json"
    subprocess.run([sys.executable, "-m", "ernie_edge.cli", "bench", "--model", str(tiny_edge),
                    "--prompt-tokens", "8", "--gen-tokens", "3", "--json", str(out)],
                   check=True, capture_output=True, timeout=300)
    assert KEYS <= set(json.loads(out.read_text()))


def test_bench_cli_int8_kv_cache_is_half_the_bytes(tiny_edge, tmp_path):
    figures = {}
    for kv in ("f16", "i8"):
        out = tmp_path / f"{kv}.json"
        subprocess.run([sys.executable, "-m", "ernie_edge.cli", "bench", "--model", str(tiny_edge),
                        "--prompt-tokens", "8", "--gen-tokens", "3", "--kv-dtype", kv, "--json", str(out)],
                       check=True, capture_output=True, timeout=300)
        figures[kv] = json.loads(out.read_text())
    assert figures["i8"]["kv_dtype"] == "i8" and figures["f16"]["kv_dtype"] == "f16"
    d = ernie_edge.load(tiny_edge).config.dim_head
    assert figures["i8"]["kv_cache_bytes"] / figures["f16"]["kv_cache_bytes"] == pytest.approx((d + 4) / (2 * d))


def test_bench_cli_ctx_size(tiny_edge, tmp_path):
    """--ctx-size loads the model with that context (a long-context bench sizes it to the prompt); one
    that cannot hold the prompt and the answer is refused before loading, naming both flags."""
    cmd = [sys.executable, "-m", "ernie_edge.cli", "bench", "--model", str(tiny_edge), "--prompt-tokens", "8",
           "--gen-tokens", "3"]
    bad = subprocess.run([*cmd, "--ctx-size", "16", "--prompt-tokens", "14"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "--ctx-size 16 does not hold --prompt-tokens 14 + --gen-tokens 3" in bad.stderr
    out = tmp_path / "ctx.json"
    subprocess.run([*cmd, "--ctx-size", "128", "--json", str(out)], check=True, capture_output=True, timeout=300)
    assert KEYS <= set(json.loads(out.read_text()))
