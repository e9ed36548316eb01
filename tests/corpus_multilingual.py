"""A deterministic multilingual corpus for tokenizer tests (not a test module itself).

`corpus()` returns >= 500 strings: English, Chinese, Japanese, Korean and other scripts, code,
emoji (skin tones, ZWJ sequences, flags), whitespace runs, tabs, newlines, control characters,
and special-token strings glued to text ("<think>", "<|im_end|>", partial ones). Many characters
are absent from the synthetic tokenizer's training corpus, so byte fallback is exercised.

Strings containing "▁" (U+2581, SentencePiece's space marker) cannot survive a decode round trip
in any SentencePiece tokenizer; they are in `METASPACE_STRINGS`, not in `corpus()`.
"""

from __future__ import annotations

import random

SPECIALS = (
    "<think>", "</think>", "<response>", "</response>", "<tool_call>", "</tool_call>",
    "<|im_start|>", "<|im_end|>", "<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:1>",
    "<mask:4>", "<mask:7>", "<s>", "</s>", "<unk>",
)
PARTIAL_SPECIALS = ("<think", "think>", "<|im_", "im_end|>", "</", "<tool_call", "<mask:", "<0x0A>",
                    "<<think>>", "<|im_end|", "< think >", "<THINK>")

EDGE_CASES = [
    "", " ", "  ", "\n", "\n\n\n", "\t", "\t\t\t", " \n \t ", "\r\n", "a\r\nb", "\x00", "a\x00b",
    "\x01\x02\x7f", "\u200b", "\ufeffBOM", "\u2028\u2029", "\ufffd", "e\u0301", "\u00e9", "Å",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𠀀𠀁", "\ue000", "trailing spaces   ", "   leading spaces", "a     b",
    "tab\tseparated\tvalues", "line1\nline2\n", "\n\nparagraph\n\n", "mixed \t\n whitespace",
    "<think>", "<|im_end|>", "<think></think>", "<think><think>", "a<think>b", "<s>x</s>",
    "<|im_start|>user\nhi<|im_end|>\n\n<|im_start|>assistant\n<think>\n",
    "reasoning\n</think>\n\n<response>\nanswer\n</response>\n",
    '\n</think>\n\n\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n',
    "<unk><unk>", "<mask:1>text<mask:4>", "text<|end_of_sentence|>", "😀", "👍🏽", "👨‍👩‍👧‍👦",
    "🇯🇵🇨🇳", "❤️", "1️⃣", "e\u0301\u0301\u0301", "0123456789", "3.14159265358979",
    "https://example.com/path?q=1&r=%20", '{"key": [1, 2, {"nested": null}]}', "a" * 300,
    "中" * 100, "ab" * 150, "😀" * 20, " " * 64, "\n" * 32, "\t" * 16,
]

ENGLISH = (
    "the quick brown fox jumps over lazy dog model token answer question reasoning quantization "
    "expert router attention cache latency throughput laptop offline Zürich naïve café résumé "
    "don't it's we're I'm they'll hello world thanks please error warning ok"
).split()
CHINESE = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动模型推理答案问题思考龘鬱齉爨饕餮魑魅魍魉"
CHINESE_PUNCT = "，。！？：；、「」（）《》…—"
JAPANESE = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもアイウエオカキクケコーッャュョ日本語東京薔薇憂鬱"
OTHER_SCRIPTS = (
    "안녕하세요 세계", "Привет, мир", "مرحبا بالعالم", "שלום עולם", "สวัสดีชาวโลก", "नमस्ते दुनिया",
    "Γειά σου Κόσμε", "Xin chào thế giới", "Olá, mundo", "Ελληνικά και Русский", "ᚠᚢᚦᚨᚱᚲ",
)
EMOJI = ("😀", "😂", "🤖", "🚀", "👍🏽", "👩‍💻", "👨‍👩‍👧", "🇩🇪", "❤️", "✅", "⚡", "🧠", "🐍", "🎉")
CODE = (
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "import numpy as np\narr = np.zeros((4, 4), dtype=np.float32)\n",
    "const add = (a, b) => a + b;\n",
    "SELECT id, name FROM users WHERE age > 30;\n",
    "<div class=\"x\">\n  <span>hi</span>\n</div>\n",
    "if __name__ == \"__main__\":\n    main()\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); }\n",
    "    indented\n        twice\n\t\ttabbed\n",
    "```python\nprint('hi')\n```\n",
    "$ pip install ernie-edge && ernie-edge run\n",
    "x = {'a': [1, 2, 3], \"b\": None}  # comment\n",
)
WHITESPACE = (" ", "  ", "   ", "\t", "\n", "\n\n", " \t", "\t ", "\r\n", "    ")


def _english(rng: random.Random) -> str:
    words = [rng.choice(ENGLISH) for _ in range(rng.randint(1, 20))]
    return " ".join(words).capitalize() + rng.choice(".?!:,;")


def _chinese(rng: random.Random) -> str:
    return "".join(rng.choice(CHINESE + CHINESE_PUNCT) for _ in range(rng.randint(1, 40)))


def _japanese(rng: random.Random) -> str:
    return "".join(rng.choice(JAPANESE) for _ in range(rng.randint(1, 30))) + rng.choice("。、！")


def _emoji(rng: random.Random) -> str:
    return "".join(rng.choice(EMOJI) + rng.choice(("", " ", "", "x")) for _ in range(rng.randint(1, 6)))


def _code(rng: random.Random) -> str:
    return "".join(rng.choice(CODE) for _ in range(rng.randint(1, 3)))


def _whitespace(rng: random.Random) -> str:
    parts = [rng.choice(WHITESPACE) * rng.randint(1, 5) for _ in range(rng.randint(1, 4))]
    return rng.choice(ENGLISH).join(parts) + rng.choice(("", "end"))


def _specials(rng: random.Random) -> str:
    """Special-token strings glued to text, other specials, partial specials and whitespace."""
    pieces = []
    for _ in range(rng.randint(1, 6)):
        pool = rng.random()
        if pool < 0.45:
            pieces.append(rng.choice(SPECIALS))
        elif pool < 0.6:
            pieces.append(rng.choice(PARTIAL_SPECIALS))
        else:
            pieces.append(rng.choice((_english, _chinese, _emoji, _whitespace))(rng).strip(".?!"))
    return "".join(pieces)


def _mixed(rng: random.Random) -> str:
    makers = (_english, _chinese, _japanese, _emoji, _code, _whitespace, _specials)
    parts = [rng.choice(makers)(rng) for _ in range(rng.randint(2, 5))]
    parts += [rng.choice(OTHER_SCRIPTS)] if rng.random() < 0.3 else []
    rng.shuffle(parts)
    return rng.choice(("", " ", "\n")).join(parts)


_MAKERS = (_english, _chinese, _japanese, _emoji, _code, _whitespace, _specials, _mixed, _mixed)


def corpus(count: int = 600, seed: int = 0) -> list[str]:
    """`count` distinct test strings (at least the fixed edge cases); the same list for the same
    arguments."""
    rng = random.Random(seed)
    out = list(dict.fromkeys([*EDGE_CASES, *OTHER_SCRIPTS, *CODE]))
    seen = set(out)
    while len(out) < count:
        text = _MAKERS[len(out) % len(_MAKERS)](rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


METASPACE_STRINGS = ["▁", "a▁b", "▁▁x ▁", "<think>▁</think>", "中▁文"]
