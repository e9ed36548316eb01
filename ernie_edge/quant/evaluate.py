"""How much does quantization change the model? llama.cpp `--kl-divergence` style.

On a fixed, deterministic set of token sequences, both models (the quantized one and its
unquantized reference, e.g. the HF folder it was converted from) compute next-token distributions
at every position. We report the KL divergence KL(P_ref || P_q) per position (mean, median, p99,
max), the top-1 agreement (llama.cpp's "same top p"), and each model's perplexity on the
sequences' own next tokens.

Sequences are windows of a built-in text tokenized with the model's tokenizer when it has one,
else random token ids below the tokenizer size (synthetic models with random weights have no
meaningful text; the comparison of the two distributions is what matters).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

import ernie_edge
from ernie_edge.errors import ErnieEdgeError

# A few paragraphs of mixed text (English, Chinese, code, numbers), enough for many windows.
EVAL_TEXT = """\
The history of computing is a story of machines that became smaller, cheaper and more personal.
Early computers filled rooms and were shared by many people; today a laptop holds more memory than
all of them together. Large language models follow the same path: trained on clusters, they are
compressed so that one person can run them offline, on their own machine, with their own data.
Compression has a price. Every weight rounded to four bits moves the model a little away from what
it learned, and the question is whether the answers change. We measure it directly: for each
position in a text, both models predict the next token, and we compare the two distributions.
人工智能正在改变我们的工作方式。大型语言模型可以回答问题、编写代码、翻译文本，也可以帮助人们学习新的知识。
在没有网络的情况下，本地运行的模型同样可以保护隐私，并且响应迅速。量化把权重从十六位压缩到四位，
模型的大小因此减少到原来的四分之一左右。
def fibonacci(n: int) -> list[int]:
    sequence = [0, 1]
    while len(sequence) < n:
        sequence.append(sequence[-1] + sequence[-2])
    return sequence[:n]

print(fibonacci(12))  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89]
A mixture-of-experts layer sends each token to a few of its experts: the router scores all of them,
keeps the best six of sixty-four, and adds their outputs weighted by the router's probabilities.
Most parameters sit in experts that a given token never touches, which is why such a model can be
large and still fast. Step 1: read the question. Step 2: think about it. Step 3: answer clearly.
"""


@dataclass(frozen=True)
class EvalSettings:
    """model: the quantized model (edge folder); reference: the unquantized one (HF folder or repo
    id). prompts x tokens positions are compared; seed picks the sequences."""

    model: str
    reference: str
    prompts: int = 8
    tokens: int = 128
    seed: int = 0


def evaluate(settings: EvalSettings, on_sequence: Callable[[int, int], None] | None = None) -> dict:
    """Compare `settings.model` against `settings.reference`; returns the report dict.
    on_sequence(done, total) is called after each sequence (the command line's progress bar)."""
    if settings.prompts < 1 or settings.tokens < 2:
        raise ErnieEdgeError(f"eval: need --prompts >= 1 and --tokens >= 2, got {settings.prompts} and "
                             f"{settings.tokens}")
    model = ernie_edge.load(settings.model)
    reference = ernie_edge.load(settings.reference)
    if model.config.vocab_size != reference.config.vocab_size:
        raise ErnieEdgeError(f"eval: {settings.model} has vocabulary {model.config.vocab_size} but "
                             f"{settings.reference} has {reference.config.vocab_size}: not the same model")
    sequences, kind = eval_sequences(model, settings.prompts, settings.tokens, settings.seed)
    kld, agree, nll_q, nll_ref = [], [], [], []
    for done, ids in enumerate(sequences, start=1):
        s = compare_logits(model.logits(ids), reference.logits(ids), ids)
        if on_sequence is not None:
            on_sequence(done, len(sequences))
        kld.append(s["kld"])
        agree.append(s["top1_agree"])
        nll_q.append(s["nll_model"])
        nll_ref.append(s["nll_reference"])
    return summarize(settings, kind, np.concatenate(kld), np.concatenate(agree),
                     np.concatenate(nll_q), np.concatenate(nll_ref))


def eval_sequences(model, prompts: int, tokens: int, seed: int) -> tuple[list[np.ndarray], str]:
    """`prompts` sequences of `tokens` ids: windows of EVAL_TEXT ("text"), else random ("random")."""
    rng = np.random.default_rng(seed)
    text_ids, limit = _text_ids(model)
    if text_ids is not None and len(text_ids) >= tokens:
        starts = rng.integers(0, len(text_ids) - tokens + 1, size=prompts)
        return [text_ids[s:s + tokens] for s in starts], "text"
    return [rng.integers(0, limit, size=tokens, dtype=np.int64) for _ in range(prompts)], "random"


def _text_ids(model) -> tuple[np.ndarray | None, int]:
    """EVAL_TEXT tokenized (None when the model has no usable tokenizer) and the id limit."""
    vocab = model.config.vocab_size
    try:
        tok = model.tokenizer
        ids = np.asarray(tok.encode(EVAL_TEXT), dtype=np.int64)
        limit = min(vocab, int(tok.vocab_size))
    except (ImportError, ErnieEdgeError, OSError):
        return None, vocab
    if ids.size == 0 or ids.max() >= vocab:
        return None, limit
    return ids, limit


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[T, V] float64 log-probabilities."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(logits_q: np.ndarray, logits_ref: np.ndarray, ids: np.ndarray) -> dict:
    """Per-position statistics of one sequence: kld [T], top1_agree [T], and the negative
    log-likelihood of each next token [T-1] under both models."""
    lq, lr = log_softmax(logits_q), log_softmax(logits_ref)  # [T, V]
    kld = np.maximum(np.sum(np.exp(lr) * (lr - lq), axis=-1), 0.0)  # [T]; tiny negatives are rounding
    agree = np.argmax(logits_q, axis=-1) == np.argmax(logits_ref, axis=-1)  # [T]
    nxt = np.asarray(ids)[1:]
    rows = np.arange(len(nxt))
    return {"kld": kld, "top1_agree": agree,
            "nll_model": -lq[rows, nxt], "nll_reference": -lr[rows, nxt]}


def summarize(settings: EvalSettings, kind: str, kld: np.ndarray, agree: np.ndarray,
              nll_q: np.ndarray, nll_ref: np.ndarray) -> dict:
    ppl_q, ppl_ref = float(np.exp(nll_q.mean())), float(np.exp(nll_ref.mean()))
    return {
        "settings": asdict(settings),
        "sequences": kind,
        "positions": int(kld.size),
        "kld": {"mean": float(kld.mean()), "median": float(np.median(kld)),
                "p99": float(np.percentile(kld, 99)), "max": float(kld.max())},
        "top1_agreement": float(agree.mean()),
        "perplexity": {"model": ppl_q, "reference": ppl_ref, "ratio": ppl_q / ppl_ref},
    }


def format_report(report: dict) -> str:
    """The report as llama.cpp-style text."""
    s, k, p = report["settings"], report["kld"], report["perplexity"]
    return "\n".join([
        f"ernie-edge eval: {s['model']}",
        f"  reference: {s['reference']}",
        f"  {s['prompts']} sequences x {s['tokens']} tokens ({report['sequences']}), seed {s['seed']}: "
        f"{report['positions']} positions",
        f"  PPL(Q)                : {p['model']:.4f}",
        f"  PPL(base)             : {p['reference']:.4f}",
        f"  PPL(Q)/PPL(base)      : {p['ratio']:.4f}",
        f"  Mean    KLD           : {k['mean']:.6f}",
        f"  Median  KLD           : {k['median']:.6f}",
        f"  99.0%   KLD           : {k['p99']:.6f}",
        f"  Maximum KLD           : {k['max']:.6f}",
        f"  Same top-1            : {100 * report['top1_agreement']:.2f} %",
    ])
