"""Tokenizer: synthetic tokenizer files, SentencePiece -> tokenizers conversion, caching, errors,
streaming detokenization. The reference is SentencePiece itself (and transformers on a subset)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from corpus_multilingual import METASPACE_STRINGS, corpus
from ernie_edge.quant import synthetic_tokenizer as st
from ernie_edge.tokenizer import (StreamDetokenizer, Tokenizer, TokenizerError,
                                  build_tokenizer_json)

CORPUS = corpus(600)
STACKED_MARKS = re.compile("[\u0300-\u036f]{2,}")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    st.write_tokenizer_files(folder, piece_count=2048)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir, tmp_path_factory):
    return Tokenizer.from_dir(tok_dir, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def sp(tok_dir):
    return spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))


def added_strings(folder: Path) -> list[str]:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    return [entry["content"] for entry in config["added_tokens_decoder"].values()]


def sentencepiece_reference(sp, text: str, specials: list[str]) -> list[int]:
    """What FastDeploy's ERNIE tokenizer does: split added tokens out first, then run
    SentencePiece on each text segment."""
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    ids = []
    for part in re.split(pattern, text):
        if part in specials:
            ids.append(sp.piece_to_id(part))
        elif part:
            ids.extend(sp.encode(part))
    return ids


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def write_variant(folder: Path, **options) -> Path:
    """A tokenizer folder whose SentencePiece model was trained with other settings."""
    folder.mkdir(parents=True, exist_ok=True)
    model = st.train_model(2048, 0, **options)
    processor = spm.SentencePieceProcessor(model_proto=model)
    (folder / "tokenizer.model").write_bytes(model)
    config = st.tokenizer_config(processor, "{{ messages }}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# -- synthetic tokenizer files -------------------------------------------------------------------


def test_synthetic_files_shape(tok_dir, sp):
    assert sorted(p.name for p in tok_dir.iterdir()) == [
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    assert sp.get_piece_size() == 2048
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.pad_id() == -1
    for token in st.SPECIAL_TOKENS:
        assert sp.encode(token) == [sp.piece_to_id(token)]
    assert sp.encode("\n", out_type=str) == ["<0x0A>"]
    assert sp.encode("😀", out_type=str) == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["model_max_length"] == 131072
    assert config["tokenizer_class"] == "Ernie4_5_Tokenizer"
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>"
    assert config["cls_token"] == "<|begin_of_sentence|>" and config["mask_token"] == "<mask:1>"
    decoder = config["added_tokens_decoder"]
    assert {e["content"] for e in decoder.values()} == set(st.CONTROL_TOKENS + st.SPECIAL_TOKENS)
    assert all(sp.piece_to_id(e["content"]) == int(i) for i, e in decoder.items())
    from ernie_edge.chat_template import builtin_template_source
    assert config["chat_template"] == builtin_template_source()


def test_synthetic_files_deterministic(tmp_path):
    st.write_tokenizer_files(tmp_path / "a", piece_count=1024)
    st.write_tokenizer_files(tmp_path / "b", piece_count=1024)
    script = ("import sys; from ernie_edge.quant.synthetic_tokenizer import write_tokenizer_files;"
              "write_tokenizer_files(sys.argv[1], piece_count=1024)")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "c")], check=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        data = (tmp_path / "a" / name).read_bytes()
        assert data == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "a" / "tokenizer.model"))
    assert sp.get_piece_size() == 1024
    other = st.train_model(1024, seed=1)
    assert other != (tmp_path / "a" / "tokenizer.model").read_bytes()


# -- equivalence with SentencePiece ------------------------------------------------------------


def test_corpus_is_big_and_varied():
    assert len(CORPUS) >= 500 and len(set(CORPUS)) == len(CORPUS)
    joined = "".join(CORPUS)
    for needle in ("<think>", "<|im_end|>", "\t", "\n", "中", "の", "😀", "def ", "    "):
        assert needle in joined


def test_encode_matches_sentencepiece(tok, sp, tok_dir):
    specials = added_strings(tok_dir)
    mismatches = [s for s in CORPUS if tok.encode(s) != sentencepiece_reference(sp, s, specials)]
    assert mismatches == []


def test_decode_round_trip(tok):
    assert [s for s in CORPUS if tok.decode(tok.encode(s)) != s] == []


def test_metaspace_character_encodes_like_sentencepiece(tok, sp, tok_dir):
    specials = added_strings(tok_dir)
    for text in METASPACE_STRINGS:
        assert tok.encode(text) == sentencepiece_reference(sp, text, specials)


def test_special_strings_become_single_ids(tok, sp):
    ids = tok.encode("a<think>b</think>\n<|im_end|><s>")
    assert ids[1] == tok.think_start_id and ids[3] == tok.think_end_id
    assert ids[4] == tok.newline_id and ids[5] == tok.im_end_id and ids[6] == tok.bos_id
    assert tok.encode("<think") != [tok.think_start_id]
    assert tok.encode("") == []


@pytest.mark.parametrize("options", [
    dict(model_type="unigram"),
    dict(add_dummy_prefix=True),
    dict(add_dummy_prefix=True, remove_extra_whitespaces=True, normalization_rule_name="nmt_nfkc"),
], ids=["unigram", "dummy_prefix", "nfkc_whitespace"])
def test_other_sentencepiece_settings_match(tmp_path, options):
    """The converter follows the model's own settings, not the synthetic ones."""
    folder = write_variant(tmp_path / "variant", **options)
    tokenizer = Tokenizer.from_dir(folder, cache_dir=tmp_path / "cache")
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    specials = added_strings(folder)
    texts = CORPUS[::2]
    if options.get("normalization_rule_name") == "nmt_nfkc":
        # tokenizers' Precompiled normalizer drops one of two stacked combining marks where
        # SentencePiece keeps both (transformers' conversion shares this). The synthetic tokenizer
        # has no charsmap; whether the real one has is unverified (docs/ERNIE_SPEC.md §5).
        texts = [s for s in texts if not STACKED_MARKS.search(s)]
    bad = [s for s in texts if tokenizer.encode(s) != sentencepiece_reference(processor, s, specials)]
    assert bad == []


def test_matches_transformers_conversion(tok, tok_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = copy_folder(tok_dir, tmp_path / "hf")
    (folder / "config.json").write_text(json.dumps({"model_type": "ernie4_5_moe"}))
    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - any failure to load offline means "cannot compare"
        pytest.skip(f"transformers cannot load the synthetic tokenizer offline: {exc}")
    texts = CORPUS[::3]
    assert [s for s in texts if hf.encode(s, add_special_tokens=False) != tok.encode(s)] == []
    ids = tok.encode("中文 <think>x</think>\n")
    assert hf.decode(ids) == tok.decode(ids)


# -- ids and files ------------------------------------------------------------------------------------


def test_special_ids_resolved_from_files(tok, sp):
    expected = {
        "bos_id": "<s>", "eos_id": "</s>", "im_start_id": "<|im_start|>", "im_end_id": "<|im_end|>",
        "think_start_id": "<think>", "think_end_id": "</think>", "response_start_id": "<response>",
        "response_end_id": "</response>", "tool_call_start_id": "<tool_call>",
        "tool_call_end_id": "</tool_call>", "newline_id": "<0x0A>",
    }
    for attribute, piece in expected.items():
        assert getattr(tok, attribute) == sp.piece_to_id(piece), attribute
    assert tok.vocab_size == 2048
    assert tok.token_to_id("<think>") == sp.piece_to_id("<think>")
    assert tok.id_to_token(tok.im_end_id) == "<|im_end|>"
    assert tok.id_to_token(10**6) is None and tok.token_to_id("no such token") is None
    assert tok.is_special(tok.im_end_id) and not tok.is_special(tok.newline_id)
    assert tok.stop_ids() == [tok.im_end_id, tok.eos_id]


def test_stop_ids_include_generation_config(tok_dir, tmp_path):
    folder = copy_folder(tok_dir, tmp_path / "m")
    tokenizer = Tokenizer.from_dir(folder, cache_dir=tmp_path / "cache")
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [tokenizer.eos_id, 77, tokenizer.im_end_id]}))
    tokenizer = Tokenizer.from_dir(folder, cache_dir=tmp_path / "cache")
    assert tokenizer.stop_ids() == [tokenizer.im_end_id, tokenizer.eos_id, 77]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert Tokenizer.from_dir(folder, cache_dir=tmp_path / "cache").stop_ids()[-1] == 5
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(TokenizerError, match="generation_config.json"):
        Tokenizer.from_dir(folder, cache_dir=tmp_path / "cache")


def test_conversion_is_cached_and_model_folder_untouched(tok_dir, tmp_path):
    folder = copy_folder(tok_dir, tmp_path / "m")
    before = sorted(p.name for p in folder.iterdir())
    cache = tmp_path / "cache"
    first = Tokenizer.from_dir(folder, cache_dir=cache)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".json"
    mtime = entries[0].stat().st_mtime_ns
    second = Tokenizer.from_dir(folder, cache_dir=cache)
    assert entries[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    assert second.encode("中文 test\n") == first.encode("中文 test\n")
    assert sorted(p.name for p in folder.iterdir()) == before
    entries[0].write_text("{ damaged")
    assert Tokenizer.from_dir(folder, cache_dir=cache).encode("x\n") == first.encode("x\n")
    # another tokenizer.model is another cache entry
    (folder / "tokenizer.model").write_bytes(st.train_model(1024, seed=3))
    Tokenizer.from_dir(folder, cache_dir=cache)
    assert len(list(cache.glob("*.json"))) == 2


def test_unwritable_cache_still_loads(tok_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    tokenizer = Tokenizer.from_dir(tok_dir, cache_dir=blocker / "cache")
    assert tokenizer.decode(tokenizer.encode("ok\n")) == "ok\n"


def test_build_tokenizer_json_is_used(tok, tok_dir, tmp_path):
    folder = copy_folder(tok_dir, tmp_path / "edge")
    build_tokenizer_json(folder, folder / "tokenizer.json")
    (folder / "tokenizer.model").unlink()
    from_json = Tokenizer.from_dir(folder, cache_dir=tmp_path / "unused")
    assert not (tmp_path / "unused").exists()
    assert all(from_json.encode(s) == tok.encode(s) for s in CORPUS[::5])
    assert from_json.stop_ids() == tok.stop_ids()


def test_added_token_beyond_sentencepiece_vocab(tok_dir, tmp_path):
    folder = copy_folder(tok_dir, tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["2048"] = {"content": "<|extra|>", "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_dir(folder, cache_dir=tmp_path / "cache")
    assert tokenizer.encode("a<|extra|>") == [tokenizer.token_to_id("a"), 2048]
    assert tokenizer.vocab_size == 2049
    config["added_tokens_decoder"]["2050"] = config["added_tokens_decoder"].pop("2048")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="disagree"):
        Tokenizer.from_dir(folder, cache_dir=tmp_path / "cache")


# -- errors ---------------------------------------------------------------------------------------------


def test_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_dir(tmp_path, cache_dir=tmp_path / "c")
    with pytest.raises(TokenizerError, match="not a folder"):
        Tokenizer.from_dir(tmp_path / "nope")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_tokenizer_model(tok_dir, tmp_path, damage):
    folder = copy_folder(tok_dir, tmp_path / "m")
    data = (folder / "tokenizer.model").read_bytes()
    bad = {"garbage": b"\xff\x00not a model" * 10, "truncated": data[: len(data) // 2],
           "empty": b""}[damage]
    (folder / "tokenizer.model").write_bytes(bad)
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_dir(folder, cache_dir=tmp_path / "cache")


def test_corrupt_json_files(tok_dir, tmp_path):
    folder = copy_folder(tok_dir, tmp_path / "m")
    (folder / "tokenizer_config.json").write_text("{ not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(folder, cache_dir=tmp_path / "cache")
    folder = copy_folder(tok_dir, tmp_path / "n")
    (folder / "tokenizer.json").write_text('{"model": 42}')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(folder, cache_dir=tmp_path / "cache")


def test_missing_ernie_token_is_reported(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    symbols = [s for s in st.SPECIAL_TOKENS if s != "<think>"]
    (folder / "tokenizer.model").write_bytes(st.train_model(1024, user_defined_symbols=symbols))
    with pytest.raises(TokenizerError, match="<think>"):
        Tokenizer.from_dir(folder, cache_dir=tmp_path / "cache")


def test_bad_text_and_ids(tok):
    with pytest.raises(TokenizerError, match="Unicode"):
        tok.encode("lone \ud800 surrogate")
    with pytest.raises(TokenizerError, match="str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    for bad in ([tok.vocab_size], [-1], [1.5]):
        with pytest.raises(TokenizerError, match="outside the vocabulary"):
            tok.decode(bad)


def test_runtime_imports_neither_transformers_nor_torch(tok_dir, tmp_path):
    script = (
        "import sys\n"
        "from ernie_edge.tokenizer import Tokenizer\n"
        "from ernie_edge.chat_template import ChatTemplate\n"
        f"t = Tokenizer.from_dir({str(tok_dir)!r}, cache_dir={str(tmp_path / 'c')!r})\n"
        f"p = ChatTemplate.from_model_dir({str(tok_dir)!r}).render([{{'role': 'user', 'content': 'hi'}}])\n"
        "assert t.decode(t.encode(p)) == p\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


# -- streaming detokenization --------------------------------------------------------------------


def stream(tok, ids, **kwargs) -> list[str]:
    detok = StreamDetokenizer(tok, **kwargs)
    return [detok.feed(i) for i in ids] + [detok.flush()]


def test_stream_holds_split_characters(tok):
    ids = tok.encode("中文😀é")
    pieces = [tok.id_to_token(i) for i in ids]
    assert pieces.count("<0xF0>") == 1  # the emoji arrives as four byte tokens
    deltas = stream(tok, ids)
    assert "".join(deltas) == "中文😀é"
    assert "😀" in deltas and all("\ufffd" not in d for d in deltas)
    emoji_at = pieces.index("<0xF0>")
    assert deltas[emoji_at:emoji_at + 3] == ["", "", ""] and deltas[emoji_at + 3] == "😀"


def test_stream_equals_decode_on_corpus(tok):
    for text in CORPUS:
        deltas = stream(tok, tok.encode(text))
        assert "".join(deltas) == text
        assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text


def test_stream_skip_special_tokens_and_flush(tok):
    ids = tok.encode("<think>\nplan</think>\n\n<response>\nok\n</response>")
    assert "".join(stream(tok, ids, skip_special_tokens=True)) == tok.decode(ids, True)
    assert "".join(stream(tok, ids, skip_special_tokens=True)) == "\nplan\n\n\nok\n"
    unfinished = tok.encode("a😀")[:-1]  # the emoji's last byte never comes
    deltas = stream(tok, unfinished)
    assert deltas[:-1] == ["a", "", "", ""] and deltas[-1] == "\ufffd" * 3
    detok = tok.stream_detokenizer()
    assert isinstance(detok, StreamDetokenizer) and detok.flush() == ""
    assert [detok.feed(i) for i in tok.encode("hi")] and detok.flush() == ""
