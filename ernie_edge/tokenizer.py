"""The tokenizer: text <-> token ids, on the `tokenizers` library (docs/ERNIE_SPEC.md §5).

A model folder has a `tokenizer.json`, or only the SentencePiece `tokenizer.model` the real ERNIE
repository ships. In the second case the SentencePiece model is converted once into an equivalent
`tokenizers` tokenizer (the same pieces, BPE merges ranked by piece score, byte fallback, the
model's own normalizer settings) and cached in the user cache dir; the converter writes it into
converted folders with `build_tokenizer_json`.

Encoding never adds BOS/EOS. Added tokens (`<|im_start|>`, `<think>`, ...) in the text are split
out first and become their single ids; the text between them is encoded as SentencePiece would.
Token ids of the special tokens are looked up in the files, never hard-coded.

Known difference: with a normalization charsmap (e.g. nmt_nfkc), tokenizers' `Precompiled`
normalizer drops one of two stacked combining marks where SentencePiece keeps both (transformers'
conversion has the same behaviour). Models without a charsmap (identity) match exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, decoders, normalizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE, Unigram

from . import paths
from .errors import ErnieEdgeError

log = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"
GENERATION_CONFIG = "generation_config.json"

# Bump when the SentencePiece conversion changes, so cached tokenizer.json files are rebuilt.
_CONVERTER_VERSION = "1"

# Tokens the ERNIE-4.5 Thinking chat format and output parsers need (ERNIE_SPEC §5-7).
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"
RESPONSE_START, RESPONSE_END = "<response>", "</response>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
NEWLINE_PIECE = "<0x0A>"
REQUIRED_TOKENS = (IM_START, IM_END, THINK_START, THINK_END, RESPONSE_START, RESPONSE_END,
                   TOOL_CALL_START, TOOL_CALL_END, NEWLINE_PIECE)
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token",
                   "mask_token")

# SentencePiece ModelProto enums (sentencepiece_model.proto).
_SPM_UNIGRAM, _SPM_BPE = 1, 2
_SPM_NORMAL, _SPM_CONTROL, _SPM_USER_DEFINED = 1, 3, 4
_NEVER = -1e9  # a unigram score no segmentation chooses


class TokenizerError(ErnieEdgeError):
    """Tokenizer files that are missing, corrupt or inconsistent, or text/ids we cannot handle."""


# --------------------------------------------------------------------------------------------
# Reading the tokenizer files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AddedSpec:
    """One added token as the files describe it; id None when the files give none."""

    content: str
    id: int | None
    special: bool
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False


def _read_json(path: Path) -> Any:
    """The JSON in path, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path} is not readable JSON ({exc}); restore it from the original "
                             "checkpoint") from None


def _read_json_object(path: Path) -> dict:
    data = _read_json(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token entry: "text" or {"content": "text", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_strings(config: dict, special_map: dict) -> dict[str, str]:
    """bos_token, eos_token, ... -> token text (tokenizer_config.json wins over the map)."""
    out = {}
    for key in _NAMED_SPECIALS:
        value = _token_content(config.get(key)) or _token_content(special_map.get(key))
        if value is not None:
            out[key] = value
    return out


def _additional_specials(config: dict, special_map: dict) -> list[str]:
    names = []
    for source in (special_map.get("additional_special_tokens"),
                   config.get("additional_special_tokens")):
        for item in source or []:
            content = _token_content(item)
            if content is not None and content not in names:
                names.append(content)
    return names


def _added_specs(model_dir: Path) -> list[_AddedSpec]:
    """Added tokens described by tokenizer_config.json, added_tokens.json, special_tokens_map.json."""
    config_path = model_dir / TOKENIZER_CONFIG
    config = _read_json_object(config_path)
    special_map = _read_json_object(model_dir / SPECIAL_TOKENS_MAP)
    specials = set(_special_strings(config, special_map).values())
    specials.update(_additional_specials(config, special_map))
    specs: dict[str, _AddedSpec] = {}
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{config_path}: added_tokens_decoder must be an object")
    for key, entry in decoder.items():
        content = _token_content(entry)
        if not key.isdigit() or content is None:
            raise TokenizerError(f"{config_path}: added_tokens_decoder entry {key!r} must map a "
                                 "numeric id to {\"content\": ...}")
        specs[content] = _AddedSpec(
            content, int(key), bool(entry.get("special", content in specials)),
            bool(entry.get("lstrip", False)), bool(entry.get("rstrip", False)),
            bool(entry.get("single_word", False)), bool(entry.get("normalized", False)))
    added_path = model_dir / ADDED_TOKENS
    for content, token_id in _read_json_object(added_path).items():
        if not isinstance(token_id, int) or token_id < 0:
            raise TokenizerError(f"{added_path}: the id of {content!r} must be an integer >= 0")
        specs.setdefault(content, _AddedSpec(content, token_id, content in specials))
    for content in sorted(specials):
        specs.setdefault(content, _AddedSpec(content, None, True))
    return list(specs.values())


# --------------------------------------------------------------------------------------------
# SentencePiece -> tokenizers
# --------------------------------------------------------------------------------------------


def _load_sentencepiece(path: Path):
    from sentencepiece import sentencepiece_model_pb2
    from google.protobuf.message import DecodeError

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except (OSError, DecodeError) as exc:
        raise TokenizerError(f"{path} is not a SentencePiece model ({exc}); restore it from the "
                             "original checkpoint") from None
    if not proto.pieces or proto.trainer_spec.model_type not in (_SPM_UNIGRAM, _SPM_BPE):
        raise TokenizerError(f"{path} is not a SentencePiece BPE or unigram model "
                             f"({len(proto.pieces)} pieces, model type "
                             f"{proto.trainer_spec.model_type}); restore it from the checkpoint")
    if proto.normalizer_spec.name not in ("", "identity") and not proto.normalizer_spec.precompiled_charsmap:
        raise TokenizerError(f"{path}: normalizer {proto.normalizer_spec.name!r} has no "
                             "precompiled charsmap, which ernie-edge needs")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise TokenizerError(f"{path}: treat_whitespace_as_suffix models are not supported")
    return proto


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """SentencePiece BPE merges as (left, right) pairs, best first.

    SentencePiece merges, among adjacent pairs whose concatenation is a normal piece, the one
    whose result scores highest (leftmost on ties). So every split of a normal piece into two
    normal pieces is a merge, ranked by the piece's score (then id, to be deterministic).
    """
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _SPM_NORMAL}
    ranked = []
    for piece, (score, piece_id) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, piece_id, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _sentencepiece_model(proto):
    unk = proto.trainer_spec.unk_piece or "<unk>"
    byte_fallback = proto.trainer_spec.byte_fallback
    if proto.trainer_spec.model_type == _SPM_BPE:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        return BPE(vocab=vocab, merges=_bpe_merges(proto), unk_token=unk, fuse_unk=True,
                   byte_fallback=byte_fallback)
    # SentencePiece's lattice holds only normal pieces: the others (bytes, controls) get a score
    # that no segmentation picks, so a literal "<0x0A>" in text stays text.
    vocab = [(p.piece, p.score if p.type == _SPM_NORMAL else _NEVER) for p in proto.pieces]
    return Unigram(vocab, proto.trainer_spec.unk_id, byte_fallback)


def _sentencepiece_normalizer(spec):
    """SentencePiece's normalizer, step by step: charsmap, whitespace, dummy prefix, escaping."""
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))  # on each text segment, as SentencePiece is
    if spec.escape_whitespaces:                 # called on each segment between added tokens
        steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps)


def _sentencepiece_decoder(spec, byte_fallback: bool):
    steps = [decoders.Replace("▁", " ")] if spec.escape_whitespaces else []
    if byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # after Fuse: only the start of the text
    return decoders.Sequence(steps)


def _tokenizer_from_sentencepiece(model_dir: Path) -> HFTokenizer:
    model_path = model_dir / TOKENIZER_MODEL
    proto = _load_sentencepiece(model_path)
    tokenizer = HFTokenizer(_sentencepiece_model(proto))
    tokenizer.normalizer = _sentencepiece_normalizer(proto.normalizer_spec)
    tokenizer.decoder = _sentencepiece_decoder(proto.normalizer_spec,
                                               proto.trainer_spec.byte_fallback)
    # SentencePiece emits control and user-defined pieces whole: they are added tokens here.
    pieces = [_AddedSpec(p.piece, i, p.type == _SPM_CONTROL)
              for i, p in enumerate(proto.pieces) if p.type in (_SPM_CONTROL, _SPM_USER_DEFINED)]
    _register_added(tokenizer, pieces, model_path)
    return tokenizer


def _register_added(tokenizer: HFTokenizer, specs: Iterable[_AddedSpec], source: Path) -> None:
    """Make each spec an added token of the tokenizer, at the id the files give it."""
    for spec in sorted(specs, key=lambda s: (s.id is None, s.id or 0)):
        existing = tokenizer.token_to_id(spec.content)
        if spec.id is None and existing is None:
            continue  # a named special the vocabulary lacks (e.g. a pad token nobody uses)
        token = AddedToken(spec.content, single_word=spec.single_word, lstrip=spec.lstrip,
                           rstrip=spec.rstrip, normalized=spec.normalized, special=spec.special)
        if spec.special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
        got = tokenizer.token_to_id(spec.content)
        if spec.id is not None and got != spec.id:
            raise TokenizerError(f"{source}: token {spec.content!r} should have id {spec.id} but "
                                 f"the vocabulary gives it {got}; the tokenizer files disagree "
                                 "(restore them from the original checkpoint)")


def build_tokenizer(model_dir: str | Path) -> HFTokenizer:
    """The `tokenizers` tokenizer of a model folder, built from its files without caching:
    tokenizer.json if present, else converted from tokenizer.model; plus the added tokens of
    tokenizer_config.json / added_tokens.json / special_tokens_map.json."""
    model_dir = Path(model_dir)
    json_path = model_dir / TOKENIZER_JSON
    if json_path.is_file():
        tokenizer = _load_tokenizer_json(json_path)
    elif (model_dir / TOKENIZER_MODEL).is_file():
        tokenizer = _tokenizer_from_sentencepiece(model_dir)
    else:
        raise TokenizerError(f"{model_dir} has neither {TOKENIZER_JSON} nor {TOKENIZER_MODEL}; "
                             "copy the tokenizer files of the original checkpoint into it")
    _register_added(tokenizer, _added_specs(model_dir), model_dir / TOKENIZER_CONFIG)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def build_tokenizer_json(model_dir: str | Path, out_path: str | Path) -> Path:
    """Write the tokenizer.json equivalent of a model folder's tokenizer files to out_path
    (atomically). The converter calls this once for each converted folder."""
    out_path = Path(out_path)
    _atomic_write(out_path, build_tokenizer(model_dir).to_str())
    return out_path


def _load_tokenizer_json(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception for any parse error
        raise TokenizerError(f"{path} is not a valid tokenizer.json ({str(exc)[:200]}); delete "
                             "it to rebuild it from tokenizer.model, or restore it") from None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _source_digest(model_dir: Path) -> str:
    """sha256 over tokenizer.model and the files that add tokens: the cache key."""
    digest = hashlib.sha256(f"ernie-edge tokenizer v{_CONVERTER_VERSION}\n".encode())
    for name in (TOKENIZER_MODEL, TOKENIZER_CONFIG, ADDED_TOKENS, SPECIAL_TOKENS_MAP):
        path = model_dir / name
        if path.is_file():
            digest.update(f"{name}\n".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _cached_tokenizer(model_dir: Path, cache_dir: Path) -> HFTokenizer:
    """tokenizer.model converted once, then loaded from cache_dir/<digest>.json."""
    cached = cache_dir / f"{_source_digest(model_dir)}.json"
    if cached.is_file():
        try:
            tokenizer = HFTokenizer.from_file(str(cached))
            tokenizer.no_truncation()
            tokenizer.no_padding()
            return tokenizer
        except Exception as exc:  # a damaged cache entry is rebuilt
            log.warning("rebuilding damaged tokenizer cache %s (%s)", cached, str(exc)[:100])
    tokenizer = build_tokenizer(model_dir)
    try:
        _atomic_write(cached, tokenizer.to_str())
    except OSError as exc:
        log.warning("could not cache the converted tokenizer in %s (%s); it will be converted "
                    "again next time", cache_dir, exc)
    return tokenizer


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """The model's tokenizer. Thread-safe; build it with `Tokenizer.from_dir`."""

    def __init__(self, tokenizer: HFTokenizer, *, source: str, bos_token: str = "<s>",
                 eos_token: str = "</s>", generation_eos_ids: Iterable[int] = ()):
        """Wrap a `tokenizers.Tokenizer`. Checks that the ERNIE chat tokens, BOS and EOS exist
        (TokenizerError naming `source` otherwise)."""
        self._tok = tokenizer
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError(f"the tokenizer in {source} has an empty vocabulary")
        self._vocab_size = max(vocab.values()) + 1
        missing = [t for t in (*REQUIRED_TOKENS, bos_token, eos_token) if t not in vocab]
        if missing:
            raise TokenizerError(f"the tokenizer in {source} has no {', '.join(missing)} token; "
                                 "is this an ERNIE-4.5 Thinking checkpoint?")
        self._ids = {t: vocab[t] for t in (*REQUIRED_TOKENS, bos_token, eos_token)}
        self._bos, self._eos = bos_token, eos_token
        self._generation_eos_ids = tuple(generation_eos_ids)
        self._special_ids = frozenset(
            i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)

    @classmethod
    def from_dir(cls, path: str | Path, cache_dir: str | Path | None = None) -> Tokenizer:
        """Load the tokenizer of a model folder (HF checkpoint or edge folder).

        Uses tokenizer.json when present; else converts tokenizer.model and caches the result
        under `cache_dir` (default: the user cache dir's `tokenizers/`), keyed by the sha256 of
        the tokenizer files. The model folder itself is never written.
        """
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path} is not a folder; pass the model folder")
        if (path / TOKENIZER_JSON).is_file() or not (path / TOKENIZER_MODEL).is_file():
            tokenizer = build_tokenizer(path)
        else:
            cache = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / "tokenizers"
            tokenizer = _cached_tokenizer(path, cache)
        config = _read_json_object(path / TOKENIZER_CONFIG)
        names = _special_strings(config, _read_json_object(path / SPECIAL_TOKENS_MAP))
        return cls(tokenizer, source=str(path), bos_token=names.get("bos_token", "<s>"),
                   eos_token=names.get("eos_token", "</s>"),
                   generation_eos_ids=_generation_eos_ids(path / GENERATION_CONFIG))

    # -- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of text. No BOS/EOS is added; added-token strings become their ids."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode text (str), not {type(text).__name__}")
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # tokenizers refuses strings that are not valid Unicode
            _check_unicode(text)
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids. Raises TokenizerError for ids outside [0, vocab_size)."""
        ids = list(ids)
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < self._vocab_size:
                raise TokenizerError(f"token id {i!r} is outside the vocabulary "
                                     f"[0, {self._vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (a piece or an added token), or None."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of an id, or None when out of range."""
        if not isinstance(token_id, int) or not 0 <= token_id < self._vocab_size:
            return None
        return self._tok.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """True for special added tokens (the ones `skip_special_tokens` drops)."""
        return token_id in self._special_ids

    def stream_detokenizer(self, skip_special_tokens: bool = False) -> StreamDetokenizer:
        """A new StreamDetokenizer over this tokenizer (one per generated sequence)."""
        return StreamDetokenizer(self, skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (max id + 1). The model's embedding may have more rows; never
        sample ids >= this."""
        return self._vocab_size

    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    # -- special ids ------------------------------------------------------------------------------

    @property
    def bos_id(self) -> int:
        return self._ids[self._bos]

    @property
    def eos_id(self) -> int:
        return self._ids[self._eos]

    @property
    def im_start_id(self) -> int:
        return self._ids[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._ids[IM_END]

    @property
    def think_start_id(self) -> int:
        return self._ids[THINK_START]

    @property
    def think_end_id(self) -> int:
        return self._ids[THINK_END]

    @property
    def response_start_id(self) -> int:
        return self._ids[RESPONSE_START]

    @property
    def response_end_id(self) -> int:
        return self._ids[RESPONSE_END]

    @property
    def tool_call_start_id(self) -> int:
        return self._ids[TOOL_CALL_START]

    @property
    def tool_call_end_id(self) -> int:
        return self._ids[TOOL_CALL_END]

    @property
    def newline_id(self) -> int:
        """The byte-fallback piece `<0x0A>`, which is how "\\n" is encoded."""
        return self._ids[NEWLINE_PIECE]

    def stop_ids(self) -> list[int]:
        """Ids that end a reply: `<|im_end|>`, the EOS token, and generation_config.json's
        eos_token_id entries (in that order, without repeats)."""
        ids = [self.im_end_id, self.eos_id, *self._generation_eos_ids]
        return list(dict.fromkeys(ids))


def _generation_eos_ids(path: Path) -> list[int]:
    config = _read_json_object(path)
    value = config.get("eos_token_id")
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TokenizerError(f"{path}: eos_token_id must be an integer >= 0 or a list of them, "
                             f"not {value!r}")
    return values


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenizerError(f"text is not valid Unicode ({exc.reason} at character "
                             f"{exc.start}); send UTF-8 text") from None


# --------------------------------------------------------------------------------------------
# Streaming detokenization
# --------------------------------------------------------------------------------------------


class StreamDetokenizer:
    """Token ids in, text deltas out, never half a character.

    A character that byte fallback spells as several `<0xNN>` tokens decodes to U+FFFD until its
    last byte arrives, so a delta is held back while the decoded text ends in U+FFFD. Each step
    decodes a short window that starts one emitted step back, so decoders that look at the
    previous token (leading-space rules) see the same context as a full decode. The
    concatenated deltas equal `tokenizer.decode(all_ids)` for valid text.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the window: ids since the start of the previous emission
        self._read = 0              # ids in the window whose text has been emitted
        self._read_text = ""        # decode(self._ids[:self._read])

    def feed(self, token_id: int) -> str:
        """Add one token id; return the new text (possibly "")."""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, self._skip)
        if text.endswith("\ufffd") or len(text) < len(self._read_text):
            return ""  # an incomplete UTF-8 character: wait for its next byte
        delta = text[len(self._read_text):]
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._read_text = self._tokenizer.decode(self._ids, self._skip)
        return delta

    def flush(self) -> str:
        """Return the text still held back (e.g. an unfinished character, as U+FFFD), and reset."""
        text = self._tokenizer.decode(self._ids, self._skip)
        delta = text[len(self._read_text):] if len(self._ids) > self._read else ""
        self._ids, self._read, self._read_text = [], 0, ""
        return delta
