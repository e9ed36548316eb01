"""Synthetic ERNIE-4.5 MoE checkpoints in the Hugging Face on-disk format.

Real tensor names (per-expert, as on disk), real shapes for the `full` preset (21.83 B parameters),
bf16 weights with the router weight and correction bias in fp32, `model-0000K-of-0000N.safetensors`
shards with `model.safetensors.index.json`, config.json, generation_config.json, and tokenizer files
shaped like the real ones. The multi-token-prediction tensors are included so the skip path runs.

Weights are random but sane: linear weights ~ N(0, 1/fan_in) keep activations finite through 28
layers; the tied embedding is scaled so logits have clear margins; router logits have unit-order
spread and the correction bias is large enough to change some expert choices.

Written streaming, one tensor (in chunks of rows) at a time: peak memory stays bounded even for
the 44 GB `full` checkpoint. Each tensor's values depend only on (seed, name), so presets with
fewer layers share their tensors with deeper ones.
"""

from __future__ import annotations

import errno
import json
import math
import zlib
from pathlib import Path

import numpy as np

from ernie_edge.config import ErnieConfig
from ernie_edge.errors import ErnieEdgeError
from ernie_edge.formats.hf_ernie import TensorSpec, expected_tensors
from ernie_edge.quant.safetensors_writer import PlannedTensor, StreamingWriter

PRESETS: dict[str, dict] = {
    # hidden 64, the real 20/4 head layout (explicit head_dim), 16 experts / 4 active, 2 shared.
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=20,
                 num_key_value_heads=4, head_dim=16, vocab_size=1024, moe_intermediate_size=32,
                 moe_num_experts=16, moe_k=4, moe_num_shared_experts=2),
    # enough width and depth for quantization-error measurements.
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4096, moe_intermediate_size=128,
                  moe_num_experts=32, moe_k=6, moe_num_shared_experts=2),
    # the real ERNIE-4.5-21B-A3B-Thinking shapes (docs/ERNIE_SPEC.md §1).
    "full": dict(hidden_size=2560, intermediate_size=12288, num_hidden_layers=28, num_attention_heads=20,
                 num_key_value_heads=4, vocab_size=103424, moe_intermediate_size=1536,
                 moe_num_experts=64, moe_k=6, moe_num_shared_experts=2),
}

# Tokenizer piece counts: the real vocab (103424 rows) is larger than any corpus we can train on,
# which the real model allows too (ERNIE_SPEC §5: never sample ids >= the tokenizer size).
_PIECES = {"tiny": 1024, "small": 4096, "full": 8192}

_CHUNK_ELEMENTS = 1 << 24  # 64 MB of fp32 per generated chunk
# What _write_tokenizer_and_generation_config writes (removed again when a later write fails).
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json")


def make_config(preset: str = "tiny", layers: int | None = None, **overrides) -> dict:
    """The config.json dict for a preset, with real-checkpoint keys and values."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = {
        "architectures": ["Ernie4_5_MoeForCausalLM"],
        "model_type": "ernie4_5_moe",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_bias": False,
        "use_cache": True,
        "moe_layer_start_index": 1,
        "moe_layer_interval": 1,
        "moe_capacity": [64, 64, 64],
        "moe_gate": "topk",
        "moe_use_aux_free": True,
        "num_nextn_predict_layers": 1,
        **PRESETS[preset],
    }
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    cfg.update(overrides)
    cfg["moe_layer_end_index"] = cfg.get("moe_layer_end_index", cfg["num_hidden_layers"] - 1)
    return cfg


def mtp_tensors(cfg: ErnieConfig) -> list[TensorSpec]:
    """A multi-token-prediction head like the real checkpoint's (skipped by every loader)."""
    H = cfg.hidden_size
    p = "model.mtp_block.0."
    return [
        TensorSpec("model.mtp_emb_norm.0.weight", (H,), "norm"),
        TensorSpec("model.mtp_hidden_norm.0.weight", (H,), "norm"),
        TensorSpec("model.mtp_linear_proj.0.weight", (H, 2 * H), "attn"),
        TensorSpec(p + "input_layernorm.weight", (H,), "norm"),
        TensorSpec(p + "self_attn.q_proj.weight", (cfg.q_dim, H), "attn"),
        TensorSpec(p + "self_attn.k_proj.weight", (cfg.kv_dim, H), "attn"),
        TensorSpec(p + "self_attn.v_proj.weight", (cfg.kv_dim, H), "attn"),
        TensorSpec(p + "self_attn.o_proj.weight", (H, cfg.q_dim), "attn"),
        TensorSpec(p + "post_attention_layernorm.weight", (H,), "norm"),
    ]


def _std(spec: TensorSpec, cfg: ErnieConfig) -> float:
    fan_in = spec.shape[-1]
    if spec.role == "embed":
        return 3.0 / math.sqrt(cfg.hidden_size)
    if spec.role == "router":
        return 1.5 / math.sqrt(fan_in)
    if spec.role == "router_bias":
        return 0.02
    return 1.0 / math.sqrt(fan_in)


def _generate_chunks(spec: TensorSpec, cfg: ErnieConfig, seed: int):
    """Yield float32 row-chunks of the tensor; values depend only on (seed, name)."""
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    rows = spec.shape[0]
    row_size = int(np.prod(spec.shape[1:], dtype=np.int64)) if len(spec.shape) > 1 else 1
    step = max(1, _CHUNK_ELEMENTS // row_size)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        if spec.role == "norm":
            x = 1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)
        else:
            x = rng.standard_normal((n, *spec.shape[1:]), dtype=np.float32)
            x *= np.float32(_std(spec, cfg))
        yield x


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits with round-to-nearest-even (what torch's .to(bfloat16) does)."""
    u = x.view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))
    return (rounded >> 16).astype(np.uint16)


def _disk_dtype(spec: TensorSpec) -> str:
    return "F32" if spec.role in ("router", "router_bias") else "BF16"


def _plan_shards(specs: list[TensorSpec], num_shards: int) -> list[list[TensorSpec]]:
    sizes = [PlannedTensor(s.name, _disk_dtype(s), s.shape).nbytes for s in specs]
    budget = sum(sizes) / num_shards
    shards: list[list[TensorSpec]] = [[]]
    acc = 0.0
    for spec, size in zip(specs, sizes):
        if shards[-1] and acc + size > budget * len(shards) and len(shards) < num_shards:
            shards.append([])
        shards[-1].append(spec)
        acc += size
    return shards


class SynthError(ErnieEdgeError):
    """The output folder cannot be written: not empty, a file, read-only, or the disk is full."""


def write_checkpoint(out_dir: str | Path, preset: str = "tiny", layers: int | None = None,
                     seed: int = 0, num_shards: int | None = None, progress: bool = False,
                     tokenizer: bool = True, force: bool = False, **overrides) -> Path:
    """Write a synthetic HF checkpoint folder and return its path.

    An existing non-empty folder is refused (SynthError) unless `force`, which writes into it. On
    any write error (read-only, disk full) the files this call wrote are removed, a folder it
    created too, and a SynthError says what happened; config.json is written last, so a folder
    without it is never taken for a checkpoint."""
    out = Path(out_dir)
    raw_cfg = make_config(preset, layers, **overrides)
    cfg = ErnieConfig.from_dict(raw_cfg)
    created = _check_out(out, force)
    written: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_files(out, preset, raw_cfg, cfg, seed, num_shards, progress, tokenizer, written)
    except BaseException as e:
        for path in written:
            path.unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if isinstance(e, OSError):
            raise _synth_error(e, out) from None
        raise
    return out


def _check_out(out: Path, force: bool) -> bool:
    """Refuse a file or a non-empty folder (unless force); returns whether the folder is new."""
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out}: is a file; give a new or empty folder for the checkpoint")
    if not out.exists():
        return True
    if any(out.iterdir()) and not force:
        raise SynthError(f"{out}: the folder is not empty; give a new folder, or pass --force to "
                         "write the checkpoint into it (files of the same names are replaced)")
    return False


def _synth_error(e: OSError, out: Path) -> SynthError:
    where = e.filename or out
    if e.errno == errno.ENOSPC:
        return SynthError(f"{where}: disk full while writing the checkpoint; free some space (the "
                          "partial files were removed) and run the command again")
    return SynthError(f"{where}: cannot write the checkpoint: {e.strerror or e}")


def _write_files(out: Path, preset: str, raw_cfg: dict, cfg: ErnieConfig, seed: int,
                 num_shards: int | None, progress: bool, tokenizer: bool, written: list[Path]) -> None:
    specs = list(expected_tensors(cfg).values()) + mtp_tensors(cfg)
    total = sum(PlannedTensor(s.name, _disk_dtype(s), s.shape).nbytes for s in specs)
    if num_shards is None:
        num_shards = max(2, math.ceil(total / 4e9))

    weight_map: dict[str, str] = {}
    bar = _progress(total, progress)
    shards = _plan_shards(specs, num_shards)
    try:
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            written.append(out / fname)
            _write_shard(out / fname, shard, cfg, seed, bar)
            weight_map.update((spec.name, fname) for spec in shard)
    finally:
        if bar is not None:
            bar.close()

    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    written += [out / "model.safetensors.index.json", out / "config.json"]
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer:
        written += [out / name for name in _TOKENIZER_FILES]
        _write_tokenizer_and_generation_config(out, preset, cfg)
    (out / "config.json").write_text(json.dumps(raw_cfg, indent=2))


def _write_shard(path: Path, shard: list[TensorSpec], cfg: ErnieConfig, seed: int, bar) -> None:
    planned = [PlannedTensor(s.name, _disk_dtype(s), s.shape) for s in shard]
    writer = StreamingWriter(path, planned, metadata={"format": "pt"}, alignment=8)
    try:
        for spec in shard:
            writer.begin(spec.name)
            for chunk in _generate_chunks(spec, cfg, seed):
                data = chunk if _disk_dtype(spec) == "F32" else _bf16_bits(chunk)
                writer.write_chunk(data)
                if bar is not None:
                    bar.update(data.nbytes)
            writer.end()
        writer.close(fsync=False)
    except BaseException:
        writer.abort()
        raise


def _write_tokenizer_and_generation_config(out: Path, preset: str, cfg: ErnieConfig) -> None:
    from ernie_edge.quant.synthetic_tokenizer import write_tokenizer_files
    import sentencepiece as spm

    pieces = min(_PIECES.get(preset, 1024), cfg.vocab_size)
    write_tokenizer_files(out, piece_count=pieces)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    im_end = sp.piece_to_id("<|im_end|>")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": [cfg.eos_token_id, im_end],
           "pad_token_id": cfg.pad_token_id, "do_sample": True,
           "temperature": 0.6, "top_p": 0.95}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="synth")
