"""Sampling settings, the token sampler, and stop strings.

`SamplingParams` holds one request's settings, checked on construction. `Sampler` turns one row of
logits into a token id with its own seeded `np.random.Generator`, in the order HF transformers
uses: penalties -> temperature -> top-k -> top-p -> min-p -> draw. `StopChecker` cuts streamed text
at the first stop string.

Dimension letters: V = logits row length (the embedding rows, 103424), N = tokenizer size (the ids
that may be sampled), K = ids left after filtering.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError, ErnieEdgeError

# docs/ERNIE_SPEC.md §8: no primary source publishes sampling values for the Thinking model. These follow
# the usual range for reasoning models (temperature 0.6, top_p 0.95, no penalties); a checkpoint's
# generation_config.json overrides them.
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
GENERATION_CONFIG = "generation_config.json"

# generation_config.json key -> SamplingParams field
_GENERATION_CONFIG_KEYS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "max_new_tokens": "max_tokens",
}
# top-p: sort this many of the largest first; else bins of log-probability down to exp(-16).
_NUCLEUS_GUESS = 1024
_NUCLEUS_BINS = 4096
_NUCLEUS_BINS_PER_NAT = 256


class SamplingParamsError(ErnieEdgeError):
    """A sampling setting is out of range or of the wrong type. `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# ---- settings -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings; invalid values raise SamplingParamsError naming the field.

    temperature 0 means greedy (top_k/top_p/min_p are then ignored). top_k 0, top_p 1 and min_p 0
    switch those filters off. repetition_penalty follows HF (CTRL): logits of ids seen in the prompt
    or the output are divided by it when positive and multiplied by it when negative; 1 is off.
    presence_penalty / frequency_penalty follow OpenAI, over the output ids: logit -= presence *
    (count > 0) + frequency * count. seed None draws a fresh seed. max_tokens None: until the end
    of turn or the context is full. stop: strings that end generation (not included in the text);
    stop_token_ids: extra ids that end generation, besides the model's own end-of-turn ids.
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        _number("temperature", self.temperature, 0.0, math.inf, "0 = greedy")
        _number("top_p", self.top_p, 0.0, 1.0, "1 = off", low_open=True)
        _integer("top_k", self.top_k, 0, None, "0 = off")
        _number("min_p", self.min_p, 0.0, 1.0, "0 = off")
        _number("repetition_penalty", self.repetition_penalty, 0.0, math.inf, "1 = off", low_open=True)
        _number("presence_penalty", self.presence_penalty, -2.0, 2.0, "0 = off")
        _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "0 = off")
        if self.seed is not None:
            _integer("seed", self.seed, 0, 2**64 - 1, "or null for a random seed")
        if self.max_tokens is not None:
            _integer("max_tokens", self.max_tokens, 1, None, "or null for no limit")
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _stop_token_ids(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, source: str | Path | dict | None = None,
                               **overrides: Any) -> "SamplingParams":
        """Settings from a checkpoint's generation_config.json, then `overrides` on top.

        `source` is a model folder (a missing generation_config.json there is fine), the file
        itself, an already-loaded dict, or None. Only keys present in the file count (temperature,
        top_p, top_k, min_p, repetition_penalty, presence/frequency_penalty, max_new_tokens ->
        max_tokens; an explicit `"do_sample": false` means greedy, as in transformers); everything
        else keeps the defaults above. Overrides whose value is None are ignored, so a request's
        unset fields can be passed straight through.
        """
        raw, where = load_generation_config(source)
        values = {field: raw[key] for key, field in _GENERATION_CONFIG_KEYS.items()
                  if raw.get(key) is not None}
        if raw.get("do_sample") is False:
            values["temperature"] = 0.0
        try:
            base = cls(**values)
        except SamplingParamsError as e:
            raise SamplingParamsError(e.param, f"{where}: {e} Fix or remove that field.") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown sampling settings: {', '.join(unknown)}")
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def load_generation_config(source: str | Path | dict | None) -> tuple[dict, str]:
    """Read generation_config.json -> (dict, where it came from). A model folder without one gives
    ({}, ...); an unreadable file, bad JSON, or a non-object is a ConfigError."""
    if source is None:
        return {}, "defaults"
    if isinstance(source, dict):
        return source, "generation config"
    path = Path(source)
    if path.is_dir():
        path = path / GENERATION_CONFIG
        if not path.exists():
            return {}, "defaults"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the generation config ({e}). "
                          f"Fix the file or delete it to use the default sampling settings.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}.")
    return raw, str(path)


def _number(name: str, value, low: float, high: float, note: str, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        low_bracket = "(" if low_open else "["
        high_text = "inf)" if high == math.inf else f"{high:g}]"
        raise SamplingParamsError(
            name, f"{name} must be a finite number in {low_bracket}{low:g}, {high_text} ({note}); "
                  f"got {value!r}.")


def _integer(name: str, value, low: int, high: int | None, note: str) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    ok = ok and value >= low and (high is None or value <= high)
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise SamplingParamsError(name, f"{name} must be an integer {bound} ({note}); got {value!r}.")


def _stop_strings(stop) -> tuple[str, ...]:
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP_STRINGS:
        raise SamplingParamsError("stop", f"stop must be a string or a list of at most "
                                          f"{MAX_STOP_STRINGS} strings; got {_short(stop)}.")
    for s in stop:
        if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
            raise SamplingParamsError("stop", f"each stop string must be a non-empty string of at "
                                              f"most {MAX_STOP_CHARS} characters; got {_short(s)}.")
    return tuple(stop)


def _stop_token_ids(ids) -> tuple[int, ...]:
    if not isinstance(ids, (list, tuple)) or len(ids) > MAX_STOP_TOKEN_IDS:
        raise SamplingParamsError("stop_token_ids", f"stop_token_ids must be a list of at most "
                                                    f"{MAX_STOP_TOKEN_IDS} token ids; got {_short(ids)}.")
    for i in ids:
        _integer("stop_token_ids", i, 0, None, "token ids")
    return tuple(int(i) for i in ids)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- the sampler --------------------------------------------------------------------------------

class Sampler:
    """Picks the next token from one row of logits. Owns a `np.random.Generator` seeded from
    `params.seed`: the same seed and the same logits give the same tokens.

    vocab_size: the tokenizer's size N; ids >= N (embedding rows past the tokenizer's pieces,
    ERNIE_SPEC §5) are never sampled. prompt_ids: the prompt, which repetition_penalty also counts.
    """

    def __init__(self, params: SamplingParams, vocab_size: int | None = None,
                 prompt_ids: Sequence[int] | np.ndarray = ()):
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.params = params
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(params.seed)
        prompt = np.unique(np.asarray(prompt_ids, dtype=np.int64))  # [P]
        self._prompt_ids = prompt[prompt >= 0]

    def sample(self, logits: np.ndarray, history: Sequence[int] | np.ndarray = ()) -> int:
        """The next token id. logits: [V] (any float dtype); history: the ids generated so far
        (an int array is cheapest; a list is converted on every call)."""
        ids, w = self._filtered(logits, history)
        if self.params.greedy:
            return int(ids[0])
        cdf = np.cumsum(w, dtype=np.float64)  # [K]
        i = min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), len(w) - 1)
        return i if ids is None else int(ids[i])

    def distribution(self, logits: np.ndarray,
                     history: Sequence[int] | np.ndarray = ()) -> tuple[np.ndarray, np.ndarray]:
        """The filtered distribution `sample` draws from: (ids [K] int64, probs [K] float64
        summing to 1), in no particular order. Greedy: the argmax with probability 1."""
        ids, w = self._filtered(logits, history)
        probs = w.astype(np.float64)
        ids = np.arange(len(w), dtype=np.int64) if ids is None else ids.astype(np.int64, copy=False)
        return ids, probs / probs.sum()

    def _filtered(self, logits, history) -> tuple[np.ndarray | None, np.ndarray]:
        """(ids [K] or None meaning ids 0..K-1, unnormalised probabilities w [K] float32)."""
        p = self.params
        x = self._logits_row(logits)  # [N]
        x = apply_penalties(x, history, self._prompt_ids, p)
        if p.greedy:
            i = int(np.argmax(x))
            _check_finite(x[i])
            return np.array([i], dtype=np.int64), np.ones(1, dtype=np.float32)
        ids = top_k_ids(x, p.top_k)  # [K] or None (all)
        z = x if ids is None else x[ids]
        top = z.max()
        _check_finite(top)
        # Temperature divides the gaps to the top logit, so nothing overflows. Below 1e-30 every
        # gap already maps to exp(-inf) = 0; the clamp only avoids 0/0 at the top entry.
        temperature = np.float32(max(p.temperature, 1e-30))
        w = np.exp((z - top) / temperature)  # [K] unnormalised probabilities, the top one is 1
        keep = nucleus(w, p.top_p) if p.top_p < 1.0 else None  # indices into w; None: all
        if p.min_p > 0.0:
            keep = min_p_keep(w, keep, p.min_p)
        if keep is None:
            return ids, w
        return (keep if ids is None else ids[keep]), w[keep]

    def _logits_row(self, logits: np.ndarray) -> np.ndarray:
        x = np.asarray(logits, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"logits must be one row [V], got shape {x.shape}")
        if self.vocab_size is not None:
            if self.vocab_size > len(x):
                raise ValueError(f"vocab_size {self.vocab_size} exceeds the logits row ({len(x)})")
            x = x[: self.vocab_size]
        return x


def apply_penalties(x: np.ndarray, history, prompt_ids: np.ndarray,
                    params: SamplingParams) -> np.ndarray:
    """Repetition (HF/CTRL: over prompt + output ids) and presence/frequency (OpenAI: over output
    ids) penalties. x: [N] float32. Returns x itself when no penalty is set, else a new array."""
    rep, presence, frequency = params.repetition_penalty, params.presence_penalty, params.frequency_penalty
    if rep == 1.0 and presence == 0.0 and frequency == 0.0:
        return x
    n = len(x)
    hist = np.asarray(history, dtype=np.int64)  # [T]
    counts = np.bincount(hist[hist < n], minlength=n)  # [N]
    out = x
    if rep != 1.0:
        seen = counts > 0  # [N]
        seen[prompt_ids[prompt_ids < n]] = True
        # Branch-free arithmetic: np.where over these random masks is several times slower.
        factor = np.float32(rep) + np.float32(1.0 / rep - rep) * (x > 0)  # [N] 1/rep if x > 0 else rep
        out = x * (np.float32(1.0) + (factor - np.float32(1.0)) * seen)  # unseen ids: factor 1
    if presence != 0.0 or frequency != 0.0:
        c = counts.astype(np.float32)  # [N]
        out = out - (np.float32(presence) * (c > 0) + np.float32(frequency) * c)
    return out


def top_k_ids(x: np.ndarray, k: int) -> np.ndarray | None:
    """Ids of the k largest entries of x [N] (O(N), via argpartition), or None when k is 0 or
    >= N. Ties at the boundary are broken arbitrarily (but deterministically)."""
    if k <= 0 or k >= len(x):
        return None
    return np.argpartition(x, len(x) - k)[len(x) - k:]


def nucleus(w: np.ndarray, top_p: float) -> np.ndarray:
    """Indices (in no particular order) of the smallest set of entries of w [K] (unnormalised
    probabilities, top entry 1) whose mass is >= top_p of the total; always at least the top entry.
    Ties at the boundary are broken arbitrarily (but deterministically).

    No full sort of the vocabulary: first the 1024 largest entries are sorted (enough for a
    peaked distribution); if the nucleus is bigger, entries go into bins of log-probability, the
    bins before the one where the mass reaches top_p are kept whole, and only that bin is sorted."""
    target = top_p * w.sum(dtype=np.float64)
    if len(w) <= _NUCLEUS_GUESS:
        return _sorted_prefix(np.arange(len(w)), w, target, 0.0)
    guess = np.argpartition(-w, _NUCLEUS_GUESS - 1)[:_NUCLEUS_GUESS]  # [G] the G largest
    kept = _sorted_prefix(guess, w, target, 0.0)
    if len(kept) < len(guess):
        return kept
    with np.errstate(divide="ignore"):
        gap = -np.log(w)  # [K] >= 0, inf where exp underflowed
    bins = np.minimum(gap * np.float32(_NUCLEUS_BINS_PER_NAT), _NUCLEUS_BINS - 1).astype(np.int32)
    cum = np.cumsum(np.bincount(bins, weights=w, minlength=_NUCLEUS_BINS))  # [B] bin 0 = largest
    b = min(int(np.searchsorted(cum, target, side="left")), _NUCLEUS_BINS - 1)
    edge = _sorted_prefix(np.flatnonzero(bins == b), w, target, cum[b - 1] if b > 0 else 0.0)
    return np.concatenate([np.flatnonzero(bins < b), edge])


def _sorted_prefix(idx: np.ndarray, w: np.ndarray, target: float, base: float) -> np.ndarray:
    """The entries idx of w, largest first, up to the first whose running mass (from `base`)
    reaches `target`; all of them if none does (rounding)."""
    order = idx[np.argsort(-w[idx], kind="stable")]
    reached = base + np.cumsum(w[order], dtype=np.float64)
    return order[: int(np.searchsorted(reached, target, side="left")) + 1]


def min_p_keep(w: np.ndarray, keep: np.ndarray | None, min_p: float) -> np.ndarray:
    """Of the indices `keep` into w [K] (None: all), those whose probability is >= min_p times the
    top probability. w is scaled so that its top entry is 1, which is always kept."""
    if keep is None:
        return np.flatnonzero(w >= np.float32(min_p))
    return keep[w[keep] >= np.float32(min_p)]


def _check_finite(value) -> None:
    if not np.isfinite(value):
        raise FloatingPointError(
            f"the logits hold NaN or infinity (max {value}): the model produced invalid numbers; "
            f"check the model files with `ernie-edge verify`")


# ---- stop strings -------------------------------------------------------------------------------

class StopChecker:
    """Cuts a stream of text at the first stop string (the occurrence that ends first; of two that
    end together, the longer). The stop string and everything after it are dropped.

    `feed(delta)` returns (text safe to emit now, stopped); text that may be the start of a stop
    string is held back until the next delta decides. When generation ends for another reason,
    `flush()` returns what is still held. `matched` is the stop string that was hit, if any.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(s for s in stop if s)
        self.stopped = False
        self.matched: str | None = None
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self._held + delta
        hit = None  # ((end, start), stop string)
        for s in self.stop:
            i = buf.find(s)
            if i >= 0 and (hit is None or (i + len(s), i) < hit[0]):
                hit = ((i + len(s), i), s)
        if hit is not None:
            self.stopped, self.matched, self._held = True, hit[1], ""
            return buf[: hit[0][1]], True
        keep = self._partial_match(buf)
        self._held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, when generation ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_match(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            start = buf.find(s[0], max(0, len(buf) - len(s) + 1))
            while 0 <= start and len(buf) - start > best:
                if s.startswith(buf[start:]):
                    best = len(buf) - start
                    break
                start = buf.find(s[0], start + 1)
        return best
