"""Synthetic tokenizer files shaped like the real ERNIE-4.5 Thinking repository's
(docs/ERNIE_SPEC.md §5).

`write_tokenizer_files` trains a small SentencePiece BPE `tokenizer.model` in-process from a
built-in multilingual corpus and writes `tokenizer_config.json` and `special_tokens_map.json`
next to it. Like the real files: byte fallback (a newline is the piece `<0x0A>`), `<unk>`=0,
`<s>`=1, `</s>`=2, no pad piece, the ERNIE special tokens as single pieces, no automatic BOS/EOS,
and no `tokenizer.json` (ernie-edge builds that itself). Token ids differ from the real ones,
which is the point: nothing may hard-code them.

The output is deterministic: the same arguments give the same bytes.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import sentencepiece as spm

# The specials of the real tokenizer (ERNIE_SPEC §5), in id order after <unk>, <s>, </s>.
SPECIAL_TOKENS = (
    "<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:1>",
    "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<response>", "</response>",
    "<tool_call>", "</tool_call>", "<mask:4>", "<mask:5>", "<mask:6>", "<mask:7>",
)
CONTROL_TOKENS = ("<unk>", "<s>", "</s>")
MODEL_MAX_LENGTH = 131072

_ENGLISH = (
    "the of and to in is that for it as with was on be by at this from or have an they which one "
    "you were all we her she there would their will when who him been has more if no out do so can "
    "what up said about other into than its time only could new them man some these then two first "
    "may any like now my such make over our even most me state after also made many before must "
    "through back years where much your way well down should because each just those people how "
    "too little us good very world still own see men work long get here between both life being "
    "under never day same another know while last might great old year off come since against go "
    "came right used take three model token answer question reason think step number value result "
    "function return list string error file data system user server request response memory cache "
    "weight expert layer attention vector matrix python code test build run start stop open close "
    "read write load save small large fast slow true false hello thanks please sorry yes okay"
).split()
_CHINESE = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子"
    "说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机"
    "当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心"
    "反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题程展"
    "五果料象员位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论"
    "运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金"
    "增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至"
    "达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且"
    "究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便"
    "团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却"
    "专状育厂京识适属圆包火住调满县局照参红细引听该铁价严模型推理答案问题思考"
)
_JAPANESE = (
    "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをんが"
    "ぎぐげござじずぜぞだでどばびぶべぼぱぴぷぺぽっゃゅょアイウエオカキクケコサシスセソタチツテトナニ"
    "ヌネノハヒフヘホマミムメモヤユヨラリルレロワンガギグゲゴザジズゼゾダデドバビブベボパピプペポッャ"
    "ュョー日本語私今日天気東京"
)
_CODE = (
    "def ", "return ", "import ", "from ", "class ", "self.", "for i in range(", "if x == ",
    "print(", "):", "{", "}", "[]", "()", " = ", " == ", " != ", " += 1", "=>", "const ", "let ",
    "function ", "#include <stdio.h>", "int main(void)", "// ", "/* ", " */", "0x", "None", "True",
    "False", "null", "async ", "await ", "lambda x: ", "np.zeros(", "x.shape", "json.dumps(",
    "<div>", "</div>", "SELECT * FROM ", " WHERE ", "git commit -m ", "pip install ", "$HOME",
)
_PUNCTUATION_EN = ".,!?:;'\"()-"
_PUNCTUATION_CJK = "，。！？：；、「」（）"


def training_corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """The built-in multilingual corpus the synthetic tokenizer is trained on (deterministic).

    It has no newlines or tabs, so those always come out as byte-fallback pieces, as "\\n" does
    in the real tokenizer (`<0x0A>`).
    """
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.35:
            words = [rng.choice(_ENGLISH) for _ in range(rng.randint(4, 16))]
            text = " ".join(words).capitalize() + rng.choice(_PUNCTUATION_EN)
        elif kind < 0.6:
            text = "".join(rng.choice(_CHINESE) for _ in range(rng.randint(6, 30)))
            text += rng.choice(_PUNCTUATION_CJK)
        elif kind < 0.75:
            text = "".join(rng.choice(_JAPANESE) for _ in range(rng.randint(6, 24))) + "。"
        elif kind < 0.9:
            text = "".join(rng.choice(_CODE) for _ in range(rng.randint(3, 9)))
            text += str(rng.randint(0, 9999))
        else:  # mixed scripts and numbers
            text = (f"{rng.choice(_ENGLISH)} {rng.randint(0, 999)} "
                    + "".join(rng.choice(_CHINESE) for _ in range(rng.randint(2, 8)))
                    + f" {rng.choice(_ENGLISH)}{rng.choice(_PUNCTUATION_EN)}")
        out.append(text)
    return out


def train_model(piece_count: int = 2048, seed: int = 0, **options) -> bytes:
    """A serialized SentencePiece model trained on `training_corpus(seed)`.

    `options` override the SentencePiece trainer settings (tests use this to build variants,
    e.g. `model_type="unigram"` or `add_dummy_prefix=True`). The model may have fewer than
    `piece_count` pieces when the corpus cannot support that many (hard_vocab_limit=False).
    """
    settings = dict(
        model_type="bpe", vocab_size=piece_count, byte_fallback=True, num_threads=1,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        user_defined_symbols=list(SPECIAL_TOKENS), split_digits=False, minloglevel=2,
    )
    settings.update(options)
    spm.set_random_generator_seed(seed)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(training_corpus(seed)),
                                   model_writer=buffer, **settings)
    return buffer.getvalue()


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def tokenizer_config(processor: spm.SentencePieceProcessor, chat_template: str) -> dict:
    """tokenizer_config.json for a trained model, in the shape of the real repository's."""
    specials = CONTROL_TOKENS + SPECIAL_TOKENS
    decoder = {str(processor.piece_to_id(t)): _added_token(t) for t in specials}
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(SPECIAL_TOKENS[3:]),
        "bos_token": "<s>",
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "cls_token": "<|begin_of_sentence|>",
        "eos_token": "</s>",
        "extra_special_tokens": {},
        "mask_token": "<mask:1>",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<unk>",
        "padding_side": "left",
        "sep_token": "<|end_of_sentence|>",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "Ernie4_5_Tokenizer",
        "unk_token": "<unk>",
    }


def special_tokens_map() -> dict:
    """special_tokens_map.json, as transformers writes it for the real tokenizer."""
    return {
        "additional_special_tokens": list(SPECIAL_TOKENS[3:]),
        "bos_token": "<s>",
        "cls_token": "<|begin_of_sentence|>",
        "eos_token": "</s>",
        "mask_token": "<mask:1>",
        "pad_token": "<unk>",
        "sep_token": "<|end_of_sentence|>",
        "unk_token": "<unk>",
    }


def write_tokenizer_files(out_dir: Path, piece_count: int = 2048, seed: int = 0) -> None:
    """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json into out_dir.

    piece_count: SentencePiece pieces (at most; pass a value <= the model's vocab_size). It must
    leave room for the 3 control pieces, 15 specials, 256 byte pieces and the corpus characters:
    1024 is about the smallest that trains. Same arguments, same bytes.
    """
    from ernie_edge.chat_template import builtin_template_source

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = train_model(piece_count, seed)
    processor = spm.SentencePieceProcessor(model_proto=model)
    config = tokenizer_config(processor, builtin_template_source())
    (out_dir / "tokenizer.model").write_bytes(model)
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special_tokens_map())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
