"""Train the built-in demo model (models/demo/): a tiny ERNIE-4.5 MoE that really talks.

It made models/demo/ (its README.md has the figures: 49/50 held-out arithmetic through the
converted int4 model), which ernie_edge/demo.py converts on first use and
tests/test_demo_model.py checks end to end.

    python benchmarks/train_demo.py               # into models/demo/ (replaces the shipped model)
    python benchmarks/train_demo.py --out /tmp/demo-trial --steps 300   # a quick trial

Everything is seeded (--seed): one machine gives the same model on every run.

1. Dialogues from benchmarks/demo_data.py (English and Chinese: worked arithmetic, unit
   conversions, table look-ups, weather and calculator tool calls and their results, greetings).
2. A SentencePiece BPE tokenizer trained on them: byte fallback, one piece per digit, the ERNIE
   special tokens as single pieces, the files the real repository ships (tokenizer.model,
   tokenizer_config.json with the chat template, special_tokens_map.json).
3. transformers' Ernie4_5_MoeForCausalLM at a tiny size with the real layout: a dense first layer,
   then MoE layers (8 experts, top-2 routing, one shared expert), the real RoPE (theta 500000),
   tied embeddings. Trained with torch (fp32) on one CPU thread, loss on the assistant's tokens only.
4. The checkpoint as the real one is stored: bf16 safetensors with per-expert tensor names, the
   router weight and correction bias in fp32, config.json with the real keys.
5. Checks: transformers and ernie-edge's reference backend agree on the saved folder; held-out
   accuracy through transformers (greedy) and through ernie-edge after conversion to the int4 edge
   format (cpu backend, temperature 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script, this folder is sys.path[0]: its kernels.py would shadow the `kernels` package
# that transformers imports. Import ernie_edge and demo_data from the checkout root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

from benchmarks.demo_data import (SEED, Dialogue, held_out_arithmetic,  # noqa: E402
                                  current_turn, held_out_conversations, held_out_tool_dialogues,
                                  is_right, sample_dialogue)


@dataclass(frozen=True)
class TrainSettings:
    out: Path = ROOT / "models" / "demo"
    seed: int = SEED
    steps: int = 2400
    rows: int = 16
    row_tokens: int = 256
    lr: float = 3e-3
    warmup: int = 100
    pieces: int = 2048
    hidden: int = 128
    layers: int = 4
    experts: int = 8
    top_k: int = 2
    moe_intermediate: int = 128
    dense_intermediate: int = 384
    aux_loss: float = 0.01
    probe_every: int = 0
    evaluate_edge: bool = True
    threads: int = 1  # the number models/demo was made with: the same reproduces it bit for bit


def model_config(s: TrainSettings, vocab_size: int) -> dict:
    """config.json: the real checkpoint's keys (ernie_edge/quant/synthetic.py), tiny sizes."""
    return {
        "architectures": ["Ernie4_5_MoeForCausalLM"],
        "model_type": "ernie4_5_moe",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "intermediate_size": s.dense_intermediate,
        "max_position_embeddings": 4096,
        "num_attention_heads": s.hidden // 32,
        "num_key_value_heads": s.hidden // 64,
        "head_dim": 32,
        "num_hidden_layers": s.layers,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_bias": False,
        "use_cache": True,
        "vocab_size": vocab_size,
        "moe_num_experts": s.experts,
        "moe_k": s.top_k,
        "moe_num_shared_experts": 1,
        "moe_intermediate_size": s.moe_intermediate,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": s.layers - 1,
        "moe_layer_interval": 1,
        "moe_capacity": [64, 64, 64],
        "moe_gate": "topk",
        "moe_use_aux_free": True,
        "num_nextn_predict_layers": 0,
    }


# ---- tokenizer ----------------------------------------------------------------------------------

def write_tokenizer(out: Path, texts: list[str], pieces: int, seed: int) -> None:
    """tokenizer.model (SentencePiece BPE) trained on the rendered dialogues, with
    tokenizer_config.json (chat template included) and special_tokens_map.json."""
    import io

    import sentencepiece as spm

    from ernie_edge.chat_template import builtin_template_source
    from ernie_edge.quant import synthetic_tokenizer as st

    lines = [line for text in texts for line in text.split("\n") if line]  # "\n" stays <0x0A>
    spm.set_random_generator_seed(seed)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, model_type="bpe", vocab_size=pieces,
        byte_fallback=True, num_threads=1, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, hard_vocab_limit=False, user_defined_symbols=list(st.SPECIAL_TOKENS),
        split_digits=True, split_by_unicode_script=False, max_sentence_length=8192, minloglevel=2)
    model = buffer.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model)
    processor = spm.SentencePieceProcessor(model_proto=model)
    _write_json(out / "tokenizer_config.json", st.tokenizer_config(processor, builtin_template_source()))
    _write_json(out / "special_tokens_map.json", st.special_tokens_map())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class Encoder:
    """Dialogue -> (token ids, loss mask) with the model folder's own tokenizer and template."""

    def __init__(self, model_dir: Path):
        from ernie_edge.chat_template import ChatTemplate
        from ernie_edge.tokenizer import Tokenizer

        self.template = ChatTemplate.from_model_dir(model_dir)
        self.tok = Tokenizer.from_dir(model_dir)

    def prompt(self, d: Dialogue) -> str:
        return self.template.render(d.messages, tools=d.tools, add_generation_prompt=True)

    def encode(self, d: Dialogue) -> tuple[list[int], int]:
        """Ids of prompt + completion, and where the completion starts."""
        prompt = self.tok.encode(self.prompt(d))
        return prompt + self.tok.encode(d.completion()), len(prompt)


# ---- training -----------------------------------------------------------------------------------

def build_model(config: dict, seed: int):
    import torch
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(seed)
    hf_config = Ernie4_5_MoeConfig(**config)
    return Ernie4_5_MoeForCausalLM._from_config(hf_config, attn_implementation="eager")


@dataclass
class Batch:
    ids: "torch.Tensor"        # [B, T] token ids; 0 (<unk>) in the padding
    positions: "torch.Tensor"  # [B, T] position of each token in its own dialogue
    mask: "torch.Tensor"       # [B, 1, T, T] additive attention mask: causal within a dialogue
    targets: "torch.Tensor"    # [B, T] bool: this token is the assistant's (predict it)


def batches(encoder: Encoder, rng: random.Random, rows: int, row_tokens: int):
    """Endless batches of `rows` rows of `row_tokens` tokens, each row packed with whole fresh
    dialogues. Every dialogue sees only itself (block-diagonal causal mask) and starts at
    position 0, exactly as if it were alone; a batch mixes every kind of dialogue."""
    import torch

    waiting: list[tuple[list[int], int]] = []  # encoded dialogues not yet placed
    while True:
        ids = torch.zeros(rows, row_tokens, dtype=torch.long)
        positions = torch.zeros(rows, row_tokens, dtype=torch.long)
        segment = torch.full((rows, row_tokens), -1, dtype=torch.long)  # -1: padding
        targets = torch.zeros(rows, row_tokens, dtype=torch.bool)
        for r in range(rows):
            used = 0
            while True:
                while len(waiting) < 8:
                    item = encoder.encode(sample_dialogue(rng))
                    if len(item[0]) <= row_tokens:  # a longer one (rare) is dropped
                        waiting.append(item)
                fits = [item for item in waiting if used + len(item[0]) <= row_tokens]
                if not fits:
                    break
                item = fits[0]
                waiting.remove(item)
                n = len(item[0])
                ids[r, used:used + n] = torch.tensor(item[0])
                positions[r, used:used + n] = torch.arange(n)
                segment[r, used:used + n] = used
                targets[r, used + item[1]:used + n] = True
                used += n
        same = segment[:, :, None] == segment[:, None, :]  # [B, T, T]
        causal = torch.ones(row_tokens, row_tokens, dtype=torch.bool).tril()
        allowed = (same & causal) | torch.eye(row_tokens, dtype=torch.bool)  # padding sees itself
        mask = torch.zeros(rows, 1, row_tokens, row_tokens)
        mask.masked_fill_(~allowed[:, None], -1e9)
        yield Batch(ids, positions, mask, targets)


def train(model, encoder: Encoder, s: TrainSettings, probe=None) -> list[float]:
    """AdamW with warmup and cosine decay, in fp32 (at this size bf16 autocast was slower here).
    Loss: next-token cross-entropy on the assistant's tokens + the router's load-balancing loss.
    probe(): called every s.probe_every steps (a progress check; it must leave the model in
    train mode)."""
    import torch
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import load_balancing_loss_func

    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = lambda step: min(1.0, (step + 1) / s.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / s.steps))))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    embed = model.model.embed_tokens.weight  # [V, H], tied: also the LM head
    data = batches(encoder, random.Random(s.seed + 10), s.rows, s.row_tokens)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(s.steps):
        b = next(data)
        predict = b.targets[:, 1:]  # [B, T-1]: position t predicts token t+1
        out = model.model(input_ids=b.ids, position_ids=b.positions, attention_mask=b.mask,
                          output_router_logits=True)
        hidden = out.last_hidden_state[:, :-1][predict]  # [N, H]
        logits = hidden @ embed.T  # [N, V]
        loss = torch.nn.functional.cross_entropy(logits, b.ids[:, 1:][predict])
        aux = load_balancing_loss_func(out.router_logits, s.experts, s.top_k)
        (loss + s.aux_loss * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == s.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            elapsed = time.perf_counter() - t0
            speed = (step + 1) * s.rows * s.row_tokens / elapsed
            print(f"step {step:5d}  loss {recent:.4f}  aux {aux.item():.3f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {elapsed:6.0f} s  {speed:5.0f} tok/s", flush=True)
        if probe is not None and s.probe_every and step % s.probe_every == s.probe_every - 1:
            probe()
    model.eval()
    return losses


# ---- the checkpoint -----------------------------------------------------------------------------

def hf_tensors(model, config: dict) -> dict:
    """The trained weights under the real checkpoint's names (per-expert tensors, router and
    correction bias in fp32, everything else bf16; no lm_head: the embedding is tied)."""
    import torch

    state = {k: v.detach() for k, v in model.state_dict().items()}
    I = config["moe_intermediate_size"]
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            continue
        m = re.match(r"(model\.layers\.\d+\.mlp\.)(experts\.gate_up_proj|experts\.down_proj|"
                     r"gate\.weight|gate\.moe_statics\.e_score_correction_bias)$", name)
        if m is None:
            out[name] = t.to(torch.bfloat16)
            continue
        prefix, what = m.groups()
        if what == "gate.weight":
            out[prefix + "gate.weight"] = t.float()
        elif what.endswith("e_score_correction_bias"):
            out[prefix + "moe_statics.e_score_correction_bias"] = t.float()
        elif what == "experts.gate_up_proj":  # [E, 2I, H]: gate rows first, then up
            for e in range(t.shape[0]):
                out[f"{prefix}experts.{e}.gate_proj.weight"] = t[e, :I].to(torch.bfloat16)
                out[f"{prefix}experts.{e}.up_proj.weight"] = t[e, I:].to(torch.bfloat16)
        else:  # experts.down_proj [E, H, I]
            for e in range(t.shape[0]):
                out[f"{prefix}experts.{e}.down_proj.weight"] = t[e].to(torch.bfloat16)
    return {k: v.contiguous() for k, v in sorted(out.items(), key=lambda kv: _tensor_order(kv[0]))}


def _tensor_order(name: str) -> tuple:
    """Checkpoint order: embedding, layers in order (experts by index), final norm."""
    m = re.match(r"model\.layers\.(\d+)\.(.*)$", name)
    if m is None:
        return (0 if "embed" in name else 2, 0, name)
    rest = re.sub(r"experts\.(\d+)\.", lambda e: f"experts.{int(e.group(1)):04d}.", m.group(2))
    return (1, int(m.group(1)), rest)


def save_checkpoint(model, config: dict, out: Path) -> None:
    from safetensors.torch import save_file

    from ernie_edge.tokenizer import Tokenizer

    save_file(hf_tensors(model, config), str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    im_end = Tokenizer.from_dir(out).im_end_id
    _write_json(out / "generation_config.json", {
        "bos_token_id": 1, "eos_token_id": [2, im_end], "pad_token_id": 0,
        "do_sample": True, "temperature": 0.6, "top_p": 0.95})


# ---- evaluation ---------------------------------------------------------------------------------

@dataclass
class Score:
    right: int = 0
    total: int = 0
    failures: list[str] = field(default_factory=list)

    def add(self, ok: bool, note: str) -> None:
        self.right += ok
        self.total += 1
        if not ok and len(self.failures) < 5:
            self.failures.append(note)

    def __str__(self) -> str:
        return f"{self.right}/{self.total} ({100 * self.right / max(self.total, 1):.0f} %)"


def evaluate(generate_text, encoder: Encoder, dialogues: list[Dialogue]) -> Score:
    """generate_text(prompt_ids) -> completion text (greedy)."""
    from ernie_edge.parsers import parse_output

    score = Score()
    for d in dialogues:
        text = generate_text(encoder.tok.encode(encoder.prompt(d)))
        score.add(is_right(d, parse_output(text)), f"{d.messages[-1]['content']!r} -> {text!r}")
    return score


def torch_generator(model, encoder: Encoder, max_new_tokens: int = 120):
    import torch

    stop = encoder.tok.stop_ids()

    def generate_text(ids: list[int]) -> str:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=0)
        return encoder.tok.decode(out[0, len(ids):].tolist())
    return generate_text


def edge_generator(model_dir: Path, max_new_tokens: int = 120):
    import ernie_edge
    from ernie_edge.generate import generate
    from ernie_edge.sampling import SamplingParams

    model = ernie_edge.load(model_dir, backend="cpu", threads=1)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    return lambda ids: generate(model, ids, params).text


def parity(model_dir: Path) -> float:
    """max |logit difference| between transformers (loading the saved folder) and ernie-edge's
    reference backend: proves the names, layout and config round-trip."""
    import numpy as np
    import torch
    from transformers import Ernie4_5_MoeForCausalLM

    import ernie_edge

    hf = Ernie4_5_MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ours = ernie_edge.load(model_dir, backend="reference")
    ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, 64)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)[None]).logits[0].numpy()
    return float(np.max(np.abs(ours.logits(ids) - ref)))


# ---- main ---------------------------------------------------------------------------------------

def main(s: TrainSettings) -> dict:
    import torch

    torch.set_num_threads(s.threads)
    t_start = time.perf_counter()
    out = s.out
    out.mkdir(parents=True, exist_ok=True)
    corpus_rng = random.Random(s.seed)
    corpus = [sample_dialogue(corpus_rng) for _ in range(6000)]
    from ernie_edge.chat_template import ChatTemplate
    template = ChatTemplate.builtin()
    write_tokenizer(out, [template.render(d.messages, tools=d.tools) + d.completion() for d in corpus],
                    s.pieces, s.seed)
    encoder = Encoder(out)
    config = model_config(s, encoder.tok.vocab_size)
    model = build_model(config, s.seed)
    params = sum(p.numel() for p in model.parameters())  # tied: lm_head is embed_tokens
    print(f"tokenizer: {encoder.tok.vocab_size} pieces; model: {params / 1e6:.2f} M parameters", flush=True)

    def probe() -> None:
        model.eval()
        score = evaluate(torch_generator(model, encoder), encoder, held_out_arithmetic()[:20])
        print(f"  held-out arithmetic (first 20): {score}", flush=True)
        for failure in score.failures[:2]:
            print("    miss:", failure, flush=True)
        model.train()

    t_train = time.perf_counter()
    losses = train(model, encoder, s, probe)
    train_s = time.perf_counter() - t_train
    save_checkpoint(model, config, out)
    size = (out / "model.safetensors").stat().st_size
    print(f"trained in {train_s / 60:.1f} min; model.safetensors {size / 2**20:.2f} MiB", flush=True)
    gap = parity(out)
    print(f"parity transformers vs ernie-edge reference: max |dlogit| {gap:.2e}")

    arithmetic_set, tool_set = held_out_arithmetic(), held_out_tool_dialogues()
    turns = [d for conversation in held_out_conversations() for d in conversation]
    torch_gen = torch_generator(model, encoder)
    scores = {"transformers_arithmetic": evaluate(torch_gen, encoder, arithmetic_set),
              "transformers_tools": evaluate(torch_gen, encoder, tool_set),
              "transformers_conversation_turns": evaluate(torch_gen, encoder, turns)}
    print(f"held-out arithmetic (transformers, fp32 weights, greedy): {scores['transformers_arithmetic']}")
    print(f"held-out tools (transformers): {scores['transformers_tools']}")
    if s.evaluate_edge:
        import tempfile

        from ernie_edge.demo import DEMO_RECIPE
        from ernie_edge.formats.recipe import Recipe
        from ernie_edge.quant.convert import ConvertSettings, convert
        with tempfile.TemporaryDirectory() as tmp:
            edge = convert(ConvertSettings(source=str(out), dest=Path(tmp) / "edge", progress=False,
                                           recipe=Recipe.from_name(DEMO_RECIPE)))
            edge_gen = edge_generator(edge)
            scores["edge_arithmetic"] = evaluate(edge_gen, encoder, arithmetic_set)
            scores["edge_tools"] = evaluate(edge_gen, encoder, tool_set)
            scores["edge_conversation_turns"] = evaluate(edge_gen, encoder, turns)
            scores["edge_current_turns"] = evaluate(edge_gen, encoder, [current_turn(d) for d in turns])
        print(f"held-out arithmetic (ernie-edge {DEMO_RECIPE}, cpu, temperature 0): {scores['edge_arithmetic']}")
        for failure in scores["edge_arithmetic"].failures:
            print("  miss:", failure)
        print(f"held-out tools (ernie-edge): {scores['edge_tools']}")
        print(f"held-out conversation turns (ernie-edge): {scores['edge_conversation_turns']}")
        for failure in scores["edge_conversation_turns"].failures[:3]:
            print("  miss:", failure[-300:])
    total_s = time.perf_counter() - t_start
    print(f"total {total_s / 60:.1f} min")
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(s).items()},
              "parameters": params, "vocab_size": encoder.tok.vocab_size, "checkpoint_bytes": size,
              "train_s": round(train_s, 1), "total_s": round(total_s, 1),
              "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4), "parity_max_dlogit": gap,
              "held_out": {k: {"right": v.right, "total": v.total} for k, v in scores.items()},
              "machine": machine(), "commit": git_commit(), "torch": torch.__version__}
    write_provenance(out, config, report)
    return report


def machine() -> str:
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def git_commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_provenance(out: Path, config: dict, report: dict) -> None:
    """models/demo/README.md (what the model is, how it was made, what it scores), LICENSE, and
    the figures as train_report.json."""
    import shutil

    shutil.copyfile(ROOT / "LICENSE", out / "LICENSE")
    _write_json(out / "train_report.json", report)
    held = report["held_out"]
    st = report["settings"]

    def score(key: str) -> str:
        if key not in held:
            return "not measured"
        return f"{held[key]['right']}/{held[key]['total']}"
    (out / "README.md").write_text(f"""# The ernie-edge demo model

A tiny model with the exact architecture of Baidu's ERNIE-4.5-21B-A3B-Thinking
(`Ernie4_5_MoeForCausalLM`), trained from scratch for ernie-edge's demo, screenshots and end-to-end
tests. It reasons briefly in the Thinking model's format, ends with `</think>`, answers in
`<response>`, and calls the `get_weather` and `calculator` tools in `<tool_call>` when they are
offered. It knows small arithmetic (sums and differences up to 99, worked digit by digit; one-digit
products), unit conversions by powers of ten, the capitals and currencies of 20 countries, and
greetings, in English and Chinese. It knows nothing else: it is a demonstration, not an assistant.
It was trained on single questions (one in ten with one earlier exchange in front), so
`ernie-edge demo` sends it the current question only (with its tool call and result); in longer
conversations, as the desktop app sends them, it slips after a few turns.

| | |
|---|---|
| parameters | {report['parameters'] / 1e6:.2f} M ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}, {config['num_attention_heads']} query / {config['num_key_value_heads']} KV heads of {config['head_dim']}; layer 0 dense, then MoE: {config['moe_num_experts']} experts, top-{config['moe_k']}, {config['moe_num_shared_experts']} shared expert; RoPE theta {config['rope_theta']:g}; tied embeddings) |
| tokenizer | SentencePiece BPE, {report['vocab_size']} pieces, with the ERNIE special tokens and chat template |
| files | bf16 `model.safetensors` ({report['checkpoint_bytes'] / 2**20:.2f} MiB), `config.json`, `generation_config.json`, `tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json` |
| held-out arithmetic, 50 questions never trained on, through ernie-edge's int4 model at temperature 0 | {score('edge_arithmetic')} |
| held-out tool dialogues (calls and answers from results), ernie-edge int4 | {score('edge_tools')} |
| turns of 10 held-out 4-turn conversations (every kind above, both tools offered), ernie-edge int4 | {score('edge_conversation_turns')} with the whole conversation in the prompt; {score('edge_current_turns')} with the current question only, as `ernie-edge demo` sends it |
| the same through transformers (fp32 weights, greedy) | {score('transformers_arithmetic')} arithmetic, {score('transformers_tools')} tools, {score('transformers_conversation_turns')} conversation turns |

## Provenance

Everything here was made by `benchmarks/train_demo.py` (commit {report['commit']}), seed {st['seed']},
{st['steps']} steps of {st['rows']} rows of {st['row_tokens']} tokens, torch {report['torch']} on the CPU
({report['machine']}, {st['threads']} thread{'s' if st['threads'] != 1 else ''}): {report['train_s'] / 60:.1f} min of training,
{report['total_s'] / 60:.1f} min in all; final training loss {report['final_loss']}. The dialogues are
synthetic, generated by `benchmarks/demo_data.py` from templates and a random number generator; no
text from people, the web or another model went in, and no weights of Baidu's (or anyone's) models.
The tokenizer was trained on the same dialogues. The chat template is ernie-edge's
(`ernie_edge/templates/ernie_thinking.jinja`), in the format of the real model's.

To make it again: `python benchmarks/train_demo.py` (needs the test extras: `scripts/setup.sh --test`).
The same machine gives the same model; another CPU may differ in the last bits.

## License

Apache License 2.0 (`LICENSE`), like ernie-edge. The architecture is ERNIE 4.5's, as implemented by
Hugging Face transformers (Apache 2.0).
""", encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> TrainSettings:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = TrainSettings()
    p.add_argument("--out", type=Path, default=d.out,
                   help="checkpoint folder (default: models/demo)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--rows", type=int, default=d.rows, help="rows of 256 tokens per batch")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (default: 1)")
    p.add_argument("--probe-every", type=int, default=0, help="held-out check every N steps")
    p.add_argument("--no-edge-eval", action="store_true", help="skip the converted-model evaluation")
    a = p.parse_args(argv)
    return TrainSettings(out=a.out, seed=a.seed, steps=a.steps, layers=a.layers, rows=a.rows, lr=a.lr,
                         hidden=a.hidden, threads=a.threads,
                         probe_every=a.probe_every, evaluate_edge=not a.no_edge_eval)


if __name__ == "__main__":
    main(parse_args())
