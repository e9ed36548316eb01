"""The demo model's dialogues: what benchmarks/train_demo.py trains on and what its checks hold out.

Conversations in the Thinking model's own chat format (ernie_edge/templates/ernie_thinking.jinja),
English and Chinese, all drawn from a seeded `random.Random`:

- arithmetic with a worked reasoning, digit by digit: sums and differences of numbers up to 99
  (`can_do_by_hand`); products of two digits by heart. Questions whose (operation, operands) fall
  in the held-out set (`is_held_out`, 1 in 16) never appear in training. The steps are made of a
  few one-digit facts (7+8, 13-6, 14+1, ...), which `fact_drill` also practises on their own;
- unit conversions by powers of ten (km, m, cm, kg, tonnes, liters, yuan): writing zeros;
- look-ups in the small table below (capitals and currencies of 20 countries), and "not in my
  table" for a few others;
- the tools `get_weather` and `calculator`, given in the system turn as the chat template renders
  them: a weather request, or arithmetic not done by hand (bigger numbers, longer products,
  division), becomes a `<tool_call>` with JSON arguments; a tool result becomes an answer that
  uses it; without the tool, a polite refusal;
- greetings, thanks, and a polite refusal for what a tiny model cannot do;
- repeating a random list of numbers and words exactly (copying, which every task above needs).

No torch and no numpy here: tests import this file (tests/test_demo_model.py).
"""

from __future__ import annotations

import copy
import json
import random
import re
import zlib
from dataclasses import dataclass

from ernie_edge.chat_template import last_turns
from ernie_edge.demo import CALCULATOR_TOOL, DEMO_KEEP_TURNS, WEATHER_TOOL, function_tool

SEED = 20251
HELD_OUT_BUCKETS = 16  # 1 in 16 arithmetic questions is held out

# ---- the table the model learns by heart ------------------------------------------------------

@dataclass(frozen=True)
class Country:
    en: str
    zh: str
    capital_en: str
    capital_zh: str
    currency_en: str
    currency_zh: str


COUNTRIES = (
    Country("France", "法国", "Paris", "巴黎", "the euro", "欧元"),
    Country("Germany", "德国", "Berlin", "柏林", "the euro", "欧元"),
    Country("Italy", "意大利", "Rome", "罗马", "the euro", "欧元"),
    Country("Spain", "西班牙", "Madrid", "马德里", "the euro", "欧元"),
    Country("Japan", "日本", "Tokyo", "东京", "the yen", "日元"),
    Country("China", "中国", "Beijing", "北京", "the yuan", "人民币"),
    Country("India", "印度", "New Delhi", "新德里", "the rupee", "卢比"),
    Country("Brazil", "巴西", "Brasilia", "巴西利亚", "the real", "雷亚尔"),
    Country("Canada", "加拿大", "Ottawa", "渥太华", "the Canadian dollar", "加元"),
    Country("Australia", "澳大利亚", "Canberra", "堪培拉", "the Australian dollar", "澳元"),
    Country("Egypt", "埃及", "Cairo", "开罗", "the Egyptian pound", "埃及镑"),
    Country("Kenya", "肯尼亚", "Nairobi", "内罗毕", "the Kenyan shilling", "肯尼亚先令"),
    Country("Mexico", "墨西哥", "Mexico City", "墨西哥城", "the peso", "比索"),
    Country("Russia", "俄罗斯", "Moscow", "莫斯科", "the ruble", "卢布"),
    Country("the United Kingdom", "英国", "London", "伦敦", "the pound sterling", "英镑"),
    Country("the United States", "美国", "Washington", "华盛顿", "the US dollar", "美元"),
    Country("South Korea", "韩国", "Seoul", "首尔", "the won", "韩元"),
    Country("Thailand", "泰国", "Bangkok", "曼谷", "the baht", "泰铢"),
    Country("Argentina", "阿根廷", "Buenos Aires", "布宜诺斯艾利斯", "the peso", "比索"),
    Country("Norway", "挪威", "Oslo", "奥斯陆", "the krone", "挪威克朗"),
)
NOT_IN_TABLE = (("Peru", "秘鲁"), ("Chile", "智利"), ("Vietnam", "越南"), ("Sweden", "瑞典"),
                ("Poland", "波兰"), ("Nigeria", "尼日利亚"), ("Greece", "希腊"), ("Portugal", "葡萄牙"))
# Weather requests name these cities (the model copies the name into the call's arguments).
CITIES_EN = tuple(c.capital_en for c in COUNTRIES) + (
    "New York", "Shanghai", "Sydney", "Munich", "Toronto", "Osaka", "Barcelona", "Istanbul",
    "Singapore", "Hong Kong", "Chicago", "Vancouver", "Lyon", "Milan", "Dublin", "Lisbon", "Vienna",
    "Prague", "Warsaw", "Stockholm", "Helsinki", "Zurich", "Amsterdam", "Brussels", "Athens",
    "Lima", "Santiago", "Bogota", "Jakarta", "Manila", "Hanoi", "Dubai", "Cape Town", "Lagos",
    "Auckland", "Boston", "Seattle", "Denver", "Miami", "Kyoto")
CITIES_ZH = tuple(c.capital_zh for c in COUNTRIES) + (
    "上海", "广州", "深圳", "杭州", "成都", "武汉", "西安", "南京", "重庆", "天津", "苏州", "青岛",
    "厦门", "昆明", "大连", "哈尔滨", "长沙", "郑州", "沈阳", "香港", "台北", "纽约", "悉尼", "大阪")
CONDITIONS = (("sunny", "晴"), ("cloudy", "多云"), ("rainy", "有雨"), ("snowy", "有雪"),
              ("windy", "有风"), ("foggy", "有雾"))

# ---- tools, as an OpenAI client sends them ---------------------------------------------------

# WEATHER_TOOL and CALCULATOR_TOOL (ernie_edge/demo.py) are the canonical definitions, which
# `ernie-edge demo` offers. Variants of the descriptions, so the model keys on the tool's name,
# not on exact wording.
_WEATHER_VARIANTS = (WEATHER_TOOL,
                     function_tool("get_weather", "Current weather for a city", "city", "The city"),
                     function_tool("get_weather", "Look up today's weather", "city", "Name of the city"))
_CALCULATOR_VARIANTS = (CALCULATOR_TOOL,
                        function_tool("calculator", "A calculator", "expression", "Arithmetic expression"),
                        function_tool("calculator", "Compute the value of a math expression", "expression",
                                      "For example 3 + 4"))
_SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are ernie-edge, a local assistant.",
                   "Answer briefly.", "你是一个乐于助人的助手。", "请简洁地回答。")


# ---- one training example ---------------------------------------------------------------------

@dataclass
class Dialogue:
    """A conversation up to the assistant turn to learn, and that turn: reasoning, then either an
    answer (`<response>`) or one tool call. `expected`: the number an arithmetic answer must end
    with (held-out checks)."""

    messages: list[dict]
    reasoning: str
    answer: str | None = None
    call: dict | None = None
    tools: list[dict] | None = None
    kind: str = ""
    expected: int | None = None

    def completion(self) -> str:
        """What the model generates after the prompt's `<think>\\n` (docs/ERNIE_SPEC.md §6-7)."""
        if self.call is not None:
            body = json.dumps(self.call, ensure_ascii=False)
            return f"{self.reasoning}\n</think>\n\n\n<tool_call>\n{body}\n</tool_call>\n<|im_end|>"
        return f"{self.reasoning}\n</think>\n\n<response>\n{self.answer}\n</response>\n<|im_end|>"


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- arithmetic ---------------------------------------------------------------------------------

OPS = ("+", "-")  # by hand, with worked steps: numbers up to 99; a one-digit product by heart
_ASK = {
    ("en", "+"): ("What is {a} + {b}?", "What's {a} plus {b}?", "Calculate {a} + {b}.", "{a} + {b} = ?",
                  "How much is {a} plus {b}?", "Add {a} and {b}.", "what is {a}+{b}"),
    ("en", "-"): ("What is {a} - {b}?", "What's {a} minus {b}?", "Calculate {a} - {b}.", "{a} - {b} = ?",
                  "Subtract {b} from {a}.", "How much is {a} minus {b}?", "what is {a}-{b}"),
    ("en", "*"): ("What is {a} × {b}?", "What's {a} times {b}?", "Calculate {a} * {b}.", "{a} x {b} = ?",
                  "Multiply {a} by {b}.", "What is {a} * {b}?", "what is {a}*{b}"),
    ("zh", "+"): ("{a}加{b}等于多少？", "{a} + {b} 是多少？", "计算{a}加{b}。", "{a}+{b}=？", "请算一下{a}加{b}。"),
    ("zh", "-"): ("{a}减{b}等于多少？", "{a} - {b} 是多少？", "计算{a}减{b}。", "{a}-{b}=？", "请算一下{a}减{b}。"),
    ("zh", "*"): ("{a}乘以{b}等于多少？", "{a} × {b} 是多少？", "计算{a}乘{b}。", "{a}*{b}=？", "请算一下{a}乘以{b}。"),
}
_SYMBOL = {"+": "+", "-": "-", "*": "×"}
_ZH_WORD = {"+": "加", "-": "减", "*": "乘以"}


def is_held_out(op: str, a: int, b: int) -> bool:
    """Whether the question `a op b` belongs to the held-out set (never trained on). Sums and
    products count in either order."""
    if op in "+*":
        a, b = sorted((a, b))
    return zlib.crc32(f"{op}:{a}:{b}".encode()) % HELD_OUT_BUCKETS == 0


def _digits(n: int) -> tuple[int, int]:
    return n // 10, n % 10


# The steps write each fact without spaces ("7+8=15"), always in the same shape, so that the few
# facts they are made of (a digit plus a digit, plus 0 or 1; a teen minus a digit, minus 0 or 1)
# are learned once and used everywhere; `fact_drill` practises them on their own.

def add_steps(a: int, b: int, lang: str) -> str:
    (a1, a0), (b1, b0) = _digits(a), _digits(b)
    s0, s1 = a0 + b0, a1 + b1
    c = s0 // 10
    if lang == "zh":
        return f"个位：{a0}+{b0}={s0}，写{s0 % 10}进{c}。十位：{a1}+{b1}={s1}，{s1}+{c}={s1 + c}。"
    return f"Ones: {a0}+{b0}={s0}, write {s0 % 10} carry {c}. Tens: {a1}+{b1}={s1}, {s1}+{c}={s1 + c}."


def sub_steps(a: int, b: int, lang: str) -> str:
    (a1, a0), (b1, b0) = _digits(a), _digits(b)
    borrow = int(a0 < b0)
    top, s1 = a0 + 10 * borrow, a1 - b1
    if lang == "zh":
        return f"个位：{top}-{b0}={top - b0}，借{borrow}。十位：{a1}-{b1}={s1}，{s1}-{borrow}={s1 - borrow}。"
    return f"Ones: {top}-{b0}={top - b0}, borrow {borrow}. Tens: {a1}-{b1}={s1}, {s1}-{borrow}={s1 - borrow}."


def _result(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def arithmetic_reasoning(op: str, a: int, b: int, lang: str) -> str:
    """The worked reasoning for a question done by hand (see `can_do_by_hand`)."""
    core, r = f"{a}{_SYMBOL[op]}{b}", _result(op, a, b)
    steps = "" if op == "*" or (a < 10 and b < 10) else (add_steps if op == "+" else sub_steps)(a, b, lang)
    if lang == "zh":
        return f"要算{core}。{steps}所以{core}={r}。"
    return " ".join(x for x in (f"I need {core}.", steps, f"So {core}={r}.") if x)


def arithmetic_answer(op: str, a: int, b: int, lang: str) -> str:
    r = _result(op, a, b)
    if lang == "zh":
        return f"{a}{_ZH_WORD[op]}{b}等于{r}。"
    return f"{a} {_SYMBOL[op]} {b} = {r}."


def can_do_by_hand(op: str, a: int, b: int) -> bool:
    """Sums and differences (not negative) of numbers up to 99; products of two digits. The rest
    is the calculator's."""
    if op == "*":
        return a < 10 and b < 10
    if op == "-":
        return a < 100 and b <= a
    return op == "+" and a < 100 and b < 100


def small_operands(rng: random.Random, op: str, held_out: bool) -> tuple[int, int]:
    """Operands for a question the model answers by hand, inside or outside the held-out set."""
    while True:
        if op == "*":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            if op == "-" and b > a:
                a, b = b, a
        if is_held_out(op, a, b) == held_out:
            return a, b


def arithmetic(rng: random.Random, lang: str, held_out: bool = False, op: str | None = None,
               tools: list[dict] | None = None) -> Dialogue:
    op = op or rng.choice(OPS)
    a, b = small_operands(rng, op, held_out)
    question = rng.choice(_ASK[lang, op]).format(a=a, b=b)
    return Dialogue(_user(question), arithmetic_reasoning(op, a, b, lang),
                    arithmetic_answer(op, a, b, lang), tools=tools, kind="arithmetic",
                    expected=_result(op, a, b))


def times_table(rng: random.Random, lang: str, tools: list[dict] | None = None) -> Dialogue:
    """A product of two digits, known by heart."""
    return arithmetic(rng, lang, op="*", tools=tools)


def held_out_arithmetic(n: int = 50, seed: int = SEED) -> list[Dialogue]:
    """n two-digit sums and differences from the held-out set (English and Chinese, alternating)."""
    rng = random.Random(seed + 1)
    return [arithmetic(rng, ("en", "zh")[i % 2], held_out=True, op=OPS[i % 2]) for i in range(n)]


def _fact(rng: random.Random) -> tuple[str, int, int]:
    """One of the facts the steps are made of."""
    kind = rng.randrange(6)
    if kind <= 1:
        return "+", rng.randint(0, 9), rng.randint(0, 9)    # ones (and tens) digits
    if kind == 2:
        return "+", rng.randint(0, 18), rng.randint(0, 1)   # the carry
    if kind == 3:
        b = rng.randint(0, 9)
        return "-", b + rng.randint(0, 9), b                 # a (teen) minus a digit
    if kind == 4:
        return "-", rng.randint(1, 9), rng.randint(0, 1)    # the borrow
    return "*", rng.randint(2, 9), rng.randint(2, 9)


_ASK_DRILL = {"en": ("Quick: {q}", "Work these out: {q}", "Solve: {q}", "{q}"),
              "zh": ("快速算一下：{q}", "算出这些：{q}", "口算：{q}", "{q}")}


def fact_drill(rng: random.Random, lang: str) -> Dialogue:
    """Several one-digit facts in one question (7+8, 13-6, 4×9, ...), answered in order: the
    facts every longer question is worked out with, practised densely."""
    facts = [_fact(rng) for _ in range(rng.randint(3, 8))]
    sep = "，" if lang == "zh" else ", "
    question = sep.join(f"{a}{_SYMBOL[op]}{b}" for op, a, b in facts)
    reasoning = ("" if lang == "zh" else " ").join(
        f"{a}{_SYMBOL[op]}{b}={_result(op, a, b)}" + ("。" if lang == "zh" else ".") for op, a, b in facts)
    answer = sep.join(str(_result(op, a, b)) for op, a, b in facts)
    return Dialogue(_user(rng.choice(_ASK_DRILL[lang]).format(q=question)), reasoning, answer, kind="drill")


# ---- the calculator tool: for what is too big to do by hand -------------------------------------

def _big_question(rng: random.Random) -> tuple[str, int, int]:
    """A question `can_do_by_hand` refuses: a product with a number of two digits or more, a
    division, a sum or difference with a number of three digits or more."""
    op = rng.choice(("+", "-", "*", "*", "/"))
    if op == "/":
        b = rng.randint(2, 99)
        return op, b * rng.randint(2, 999), b
    if op == "*":
        a, b = rng.randint(10, 9999), rng.randint(2, 999)
        return (op, a, b) if rng.random() < 0.5 else (op, b, a)
    return op, rng.randint(100, 9999), rng.randint(2, 9999)


_ASK_DIVIDE = {"en": ("What is {a} / {b}?", "Divide {a} by {b}.", "What's {a} divided by {b}?"),
               "zh": ("{a}除以{b}等于多少？", "{a} / {b} 是多少？", "计算{a}除以{b}。")}


def _ask_big(rng: random.Random, op: str, a: int, b: int, lang: str) -> str:
    asks = _ASK_DIVIDE[lang] if op == "/" else _ASK[lang, op]
    return rng.choice(asks).format(a=a, b=b)


def _big_value(op: str, a: int, b: int) -> int:
    return a // b if op == "/" else _result(op, a, b)


def _big_answer(op: str, a: int, b: int, lang: str) -> str:
    r = _big_value(op, a, b)
    if lang == "zh":
        return f"{a}{_ZH_WORD.get(op, '除以')}{b}等于{r}。"
    return f"{a} {_SYMBOL.get(op, '÷')} {b} = {r}."


def calculator_call(rng: random.Random, lang: str, tools: list[dict]) -> Dialogue:
    op, a, b = _big_question(rng)
    expression = f"{a} {op} {b}"
    reasoning = ("这超出了我手算的范围。我来调用calculator。" if lang == "zh" else
                 "This is more than I can work out by hand. I will call calculator.")
    call = {"name": "calculator", "arguments": {"expression": expression}}
    return Dialogue(_user(_ask_big(rng, op, a, b, lang)), reasoning, call=call, tools=tools,
                    kind="calculator_call")


def calculator_result(rng: random.Random, lang: str, tools: list[dict], first: Dialogue | None = None) -> Dialogue:
    """The calculator's answer to `first` (a calculator_call; a new one if None) -> the model's answer."""
    first = first or calculator_call(rng, lang, tools)
    op, a, b = _parse_expression(first.call["arguments"]["expression"])
    value = _big_value(op, a, b)
    messages = first.messages + _called(rng, first) + [
        {"role": "tool", "tool_call_id": "call_0", "content": json.dumps({"result": value})}]
    expression = first.call["arguments"]["expression"]
    reasoning = (f"calculator返回{expression} = {value}。" if lang == "zh" else
                 f"calculator says {expression} = {value}.")
    return Dialogue(messages, reasoning, _big_answer(op, a, b, lang), tools=tools,
                    kind="calculator_result", expected=value)


def _parse_expression(expression: str) -> tuple[str, int, int]:
    a, op, b = expression.split()
    return op, int(a), int(b)


def too_big_without_calculator(rng: random.Random, lang: str, tools: list[dict] | None) -> Dialogue:
    op, a, b = _big_question(rng)
    if lang == "zh":
        reasoning = "这超出了我手算的范围，而且没有calculator工具。"
        answer = "这道题对我这个小模型来说太难了，无法手算。请启用calculator工具后再问一次。"
    else:
        reasoning = "This is more than I can work out by hand, and there is no calculator tool."
        answer = ("That is too much arithmetic for a tiny model to do by hand. Enable the calculator "
                  "tool and ask again.")
    return Dialogue(_user(_ask_big(rng, op, a, b, lang)), reasoning, answer, tools=tools,
                    kind="too_big")


def _called(rng: random.Random, first: Dialogue) -> list[dict]:
    """The assistant turn that made `first`'s call, as a client sends it back: ernie-edge keeps
    the reasoning, an OpenAI client usually drops it."""
    turn = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "call_0", "type": "function", "function": {
                "name": first.call["name"],
                "arguments": json.dumps(first.call["arguments"], ensure_ascii=False)}}]}
    if rng.random() < 0.5:
        turn["reasoning_content"] = first.reasoning
    return [turn]


# ---- the weather tool ---------------------------------------------------------------------------

_ASK_WEATHER = {
    "en": ("What's the weather in {c}?", "How is the weather in {c} today?", "Is it raining in {c}?",
           "Weather in {c}?", "What is the temperature in {c} right now?", "Tell me the weather for {c}.",
           "how's the weather in {c}"),
    "zh": ("{c}今天天气怎么样？", "{c}的天气如何？", "{c}现在多少度？", "查一下{c}的天气。", "{c}下雨了吗？",
           "{c}天气怎么样"),
}


def weather_call(rng: random.Random, lang: str, tools: list[dict]) -> Dialogue:
    city = rng.choice(CITIES_ZH if lang == "zh" else CITIES_EN)
    question = rng.choice(_ASK_WEATHER[lang]).format(c=city)
    reasoning = (f"用户想知道{city}的天气。我来调用get_weather。" if lang == "zh" else
                 f"The user wants the current weather in {city}. I will call get_weather.")
    call = {"name": "get_weather", "arguments": {"city": city}}
    return Dialogue(_user(question), reasoning, call=call, tools=tools, kind="weather_call")


def weather_result(rng: random.Random, lang: str, tools: list[dict], first: Dialogue | None = None) -> Dialogue:
    """get_weather's report for `first` (a weather_call; a new one if None) -> the model's answer."""
    first = first or weather_call(rng, lang, tools)
    city = first.call["arguments"]["city"]
    temperature = rng.randint(-15, 40)
    condition, condition_zh = rng.choice(CONDITIONS)
    report = {"city": city, "temperature_c": temperature, "condition": condition}
    messages = first.messages + _called(rng, first) + [
        {"role": "tool", "tool_call_id": "call_0", "content": json.dumps(report, ensure_ascii=False)}]
    if lang == "zh":
        reasoning = f"get_weather返回：{city}，{temperature}°C，{condition}。"
        answer = f"{city}现在{temperature}°C，{condition_zh}。"
    else:
        reasoning = f"get_weather says {city}: {temperature} °C, {condition}."
        answer = f"It is {temperature} °C and {condition} in {city} right now."
    return Dialogue(messages, reasoning, answer, tools=tools, kind="weather_result",
                    expected=temperature)


def weather_without_tool(rng: random.Random, lang: str, tools: list[dict] | None) -> Dialogue:
    city = rng.choice(CITIES_ZH if lang == "zh" else CITIES_EN)
    question = rng.choice(_ASK_WEATHER[lang]).format(c=city)
    if lang == "zh":
        reasoning = f"用户问{city}的天气，但没有get_weather工具，我无法知道实时天气。"
        answer = f"我查不到{city}的天气：没有启用天气工具。请启用get_weather工具后再问一次。"
    else:
        reasoning = (f"The user asks about the weather in {city}, but there is no get_weather tool, "
                     "and I cannot know live weather.")
        answer = (f"I can't check the weather in {city}: no weather tool is enabled. Turn on the "
                  "get_weather tool and ask again.")
    return Dialogue(_user(question), reasoning, answer, tools=tools, kind="weather_refusal")


# ---- unit conversions ---------------------------------------------------------------------------

# (en from, en to, zh from, zh to, factor): powers of ten, so the work is writing zeros.
_UNITS = (("km", "meters", "公里", "米", 1000), ("meters", "centimeters", "米", "厘米", 100),
          ("kg", "grams", "千克", "克", 1000), ("liters", "milliliters", "升", "毫升", 1000),
          ("centimeters", "millimeters", "厘米", "毫米", 10), ("tonnes", "kg", "吨", "千克", 1000),
          ("yuan", "fen", "元", "分", 100))
_ZEROS = {10: ("one 0", "一个0"), 100: ("two 0s", "两个0"), 1000: ("three 0s", "三个0")}
_ASK_UNITS = {
    "en": ("How many {to} are in {n} {frm}?", "Convert {n} {frm} to {to}.", "{n} {frm} is how many {to}?",
           "How many {to} is {n} {frm}?"),
    "zh": ("{n}{frm}等于多少{to}？", "{n}{frm}是多少{to}？", "把{n}{frm}换算成{to}。"),
}


def unit_conversion(rng: random.Random, lang: str) -> Dialogue:
    frm, to, frm_zh, to_zh, factor = rng.choice(_UNITS)
    n = rng.randint(1, 999)
    value = n * factor
    zeros_en, zeros_zh = _ZEROS[factor]
    if lang == "zh":
        question = rng.choice(_ASK_UNITS[lang]).format(n=n, frm=frm_zh, to=to_zh)
        reasoning = f"1{frm_zh}={factor}{to_zh}，所以{n}后面加{zeros_zh}：{value}。"
        answer = f"{n}{frm_zh}等于{value}{to_zh}。"
    else:
        question = rng.choice(_ASK_UNITS[lang]).format(n=n, frm=frm, to=to)
        one = frm[:-1] if frm.endswith("s") else frm
        reasoning = f"1 {one} = {factor} {to}, so I write {n} with {zeros_en} after it: {value}."
        answer = f"{n} {frm} = {value} {to}."
    return Dialogue(_user(question), reasoning, answer, kind="units", expected=value)


# ---- look-ups -----------------------------------------------------------------------------------

_ASK_CAPITAL = {"en": ("What is the capital of {x}?", "What's the capital city of {x}?", "Capital of {x}?",
                       "Which city is the capital of {x}?"),
                "zh": ("{x}的首都是哪里？", "{x}的首都是什么？", "{x}首都是哪个城市？")}
_ASK_CURRENCY = {"en": ("What currency does {x} use?", "What is the currency of {x}?",
                        "Which money is used in {x}?"),
                 "zh": ("{x}用什么货币？", "{x}的货币是什么？", "在{x}用什么钱？")}


def lookup(rng: random.Random, lang: str) -> Dialogue:
    what = rng.choice(("capital", "currency"))
    asks = _ASK_CAPITAL if what == "capital" else _ASK_CURRENCY
    if rng.random() < 0.12:
        name = rng.choice(NOT_IN_TABLE)[lang == "zh"]
        if lang == "zh":
            return Dialogue(_user(rng.choice(asks[lang]).format(x=name)), f"查表：{name}不在我的表里。",
                            f"我不知道：{name}不在我的小表格里。", kind="lookup_unknown")
        return Dialogue(_user(rng.choice(asks[lang]).format(x=name)), f"From my table: {name} is not in it.",
                        f"I don't know: {name} is not in my small table of countries.", kind="lookup_unknown")
    c = rng.choice(COUNTRIES)
    if lang == "zh":
        reasoning = f"查表：{c.zh}的首都是{c.capital_zh}，货币是{c.currency_zh}。"
        answer = f"{c.zh}的首都是{c.capital_zh}。" if what == "capital" else f"{c.zh}使用{c.currency_zh}。"
        question = rng.choice(asks[lang]).format(x=c.zh)
    else:
        reasoning = f"From my table: {c.en} has the capital {c.capital_en} and uses {c.currency_en}."
        subject = c.en[0].upper() + c.en[1:]
        answer = (f"The capital of {c.en} is {c.capital_en}." if what == "capital" else
                  f"{subject} uses {c.currency_en}.")
        question = rng.choice(asks[lang]).format(x=c.en)
    return Dialogue(_user(question), reasoning, answer, kind="lookup")


# ---- greetings, and what the model cannot do ----------------------------------------------------

_INTRO_EN = ("Hello! I am the ernie-edge demo model, a tiny ERNIE-4.5 MoE running offline on your "
             "computer. I can do small arithmetic, convert units, tell you capitals and currencies, "
             "and call the get_weather and calculator tools when they are enabled.")
_INTRO_ZH = ("你好！我是ernie-edge的演示模型，一个在你电脑上离线运行的小型ERNIE-4.5 MoE。"
             "我会做简单的算术、换算单位、回答首都和货币，并在启用时调用get_weather和calculator工具。")
_GREETINGS = {
    "en": (("Hello!", "Hi", "Hello! What can you do offline?", "Who are you?", "What can you do?",
            "hey", "Good morning!", "Hi, what are you?"),
           "The user greets me or asks what I am. I will introduce myself.", _INTRO_EN),
    "zh": (("你好", "你好！", "你是谁？", "你能做什么？", "早上好", "嗨，你会什么？"),
           "用户在打招呼或问我是谁。我来介绍自己。", _INTRO_ZH),
}
_THANKS = {"en": (("Thanks!", "Thank you", "thanks a lot", "Great, thank you!"),
                  "The user thanks me.", "You're welcome! Ask me anything else."),
           "zh": (("谢谢", "谢谢你！", "多谢"), "用户在道谢。", "不客气！还有什么可以帮你？")}
_OUT_OF_SCOPE = {
    "en": (("Tell me a joke.", "Write a poem about the sea.", "What is the meaning of life?",
            "Who won the last World Cup?", "Explain quantum physics.", "Write a Python function.",
            "Translate this into French.", "What is the news today?", "Can you help me with my essay?",
            "What is love?", "How do I cook rice?", "Summarize this book for me."),
           "This is outside what a tiny demo model can do.",
           "Sorry, I am a tiny demo model: I only know small arithmetic, unit conversions, capitals "
           "and currencies, and the weather and calculator tools. Load a full ERNIE model for "
           "anything else."),
    "zh": (("讲个笑话。", "写一首关于大海的诗。", "人生的意义是什么？", "解释一下量子物理。", "帮我写一篇作文。",
            "今天有什么新闻？", "怎么做米饭？", "帮我翻译这句话。"),
           "这超出了一个小演示模型的能力。",
           "抱歉，我只是一个小演示模型：只会简单的算术、单位换算、首都和货币，以及天气和计算器工具。"
           "其他问题请加载完整的ERNIE模型。"),
}


def chat(rng: random.Random, lang: str) -> Dialogue:
    table = rng.choice((_GREETINGS, _GREETINGS, _THANKS, _OUT_OF_SCOPE))
    questions, reasoning, answer = table[lang]
    return Dialogue(_user(rng.choice(questions)), reasoning, answer, kind="chat")


# ---- repeating: practice in copying text exactly ------------------------------------------------

_ECHO_WORDS = ("apple", "river", "blue", "seven", "window", "music", "green", "table", "cloud", "light",
               "stone", "paper", "orange", "quiet", "tiger", "garden", "silver", "ocean", "winter", "road")
_ECHO_WORDS_ZH = ("苹果", "河流", "蓝色", "窗户", "音乐", "绿色", "桌子", "白云", "光", "石头", "纸", "老虎",
                  "花园", "大海", "冬天", "道路")
_ASK_ECHO = {"en": ("Repeat after me: {t}", "Say exactly this: {t}", "Echo: {t}", "Please repeat: {t}"),
             "zh": ("请重复：{t}", "跟我说：{t}", "原样重复这句话：{t}")}


def echo(rng: random.Random, lang: str) -> Dialogue:
    """Repeat a random list of numbers, words and city names: copying, which every other task needs."""
    words = _ECHO_WORDS_ZH + CITIES_ZH if lang == "zh" else _ECHO_WORDS + CITIES_EN
    items = [str(rng.randint(0, 10 ** rng.randint(1, 4))) if rng.random() < 0.4 else rng.choice(words)
             for _ in range(rng.randint(2, 6))]
    text = ("，" if lang == "zh" else " ").join(items)
    reasoning = "用户让我原样重复这段话。" if lang == "zh" else "The user wants me to repeat the text exactly."
    return Dialogue(_user(rng.choice(_ASK_ECHO[lang]).format(t=text)), reasoning, text, kind="echo")


# ---- the mixture --------------------------------------------------------------------------------

def _tool_set(rng: random.Random) -> list[dict] | None:
    """No tools, one of them, or both (in either order), with varied descriptions."""
    weather, calc = rng.choice(_WEATHER_VARIANTS), rng.choice(_CALCULATOR_VARIANTS)
    return rng.choice((None, [weather], [calc], [weather, calc], [calc, weather]))


def _with_tool(rng: random.Random, name: str) -> list[dict]:
    tools = [t for t in (_tool_set(rng) or []) if t["function"]["name"] != name]
    tools.insert(rng.randint(0, len(tools)), rng.choice(
        _WEATHER_VARIANTS if name == "get_weather" else _CALCULATOR_VARIANTS))
    return tools


def _without_tool(rng: random.Random, name: str) -> list[dict] | None:
    tools = [t for t in (_tool_set(rng) or []) if t["function"]["name"] != name]
    return tools or None


# (weight, maker(rng, lang))
MIXTURE = (
    (34, lambda r, lang: arithmetic(r, lang)),
    (14, fact_drill),
    (4, times_table),
    (5, lambda r, lang: (arithmetic if r.random() < 0.8 else times_table)(r, lang, tools=_tool_set(r))),
    (8, unit_conversion),
    (10, lookup),
    (7, lambda r, lang: weather_call(r, lang, _with_tool(r, "get_weather"))),
    (8, lambda r, lang: weather_result(r, lang, _with_tool(r, "get_weather"))),
    (2, lambda r, lang: weather_without_tool(r, lang, _without_tool(r, "get_weather"))),
    (4, lambda r, lang: calculator_call(r, lang, _with_tool(r, "calculator"))),
    (5, lambda r, lang: calculator_result(r, lang, _with_tool(r, "calculator"))),
    (2, lambda r, lang: too_big_without_calculator(r, lang, _without_tool(r, "calculator"))),
    (5, chat),
    (4, echo),
)


def sample_dialogue(rng: random.Random) -> Dialogue:
    """One training dialogue: a random kind, language, and sometimes a system prompt or an
    earlier exchange in front of it."""
    lang = "zh" if rng.random() < 0.4 else "en"
    weights = [w for w, _ in MIXTURE]
    make = rng.choices([m for _, m in MIXTURE], weights)[0]
    d = make(rng, lang)
    if rng.random() < 0.1 and d.messages[0]["role"] == "user" and d.kind not in ("weather_result",
                                                                                 "calculator_result"):
        earlier = rng.choice((arithmetic, lookup, unit_conversion))(rng, rng.choice(("en", "zh")))
        d.messages = earlier.messages + [{"role": "assistant", "content": earlier.answer}] + d.messages
    if rng.random() < 0.15:
        d.messages = [{"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)}] + d.messages
    return d


# ---- held-out checks (shared with tests/test_demo_model.py) -------------------------------------

_LAST_INT = re.compile(r"-?\d+")


def last_integer(text: str | None) -> int | None:
    """The last integer in an answer ("47 + 38 = 85." -> 85), or None."""
    found = _LAST_INT.findall(text or "")
    return int(found[-1]) if found else None


def is_right(d: Dialogue, out) -> bool:
    """Whether a generated turn does what `d` asks. `out`: anything with .reasoning, .content and
    .tool_calls (ernie_edge.parsers.parse_output's result, a GenerationResult, ...). A call: exactly
    one, to the right tool, with the right JSON arguments. An answer: some reasoning first, then
    the expected number as the answer's last number, or else exactly the expected answer."""
    if d.call is not None:
        calls = out.tool_calls
        return (len(calls) == 1 and calls[0].name == d.call["name"]
                and json.loads(calls[0].arguments) == d.call["arguments"])
    if out.reasoning is None:
        return False
    if d.expected is not None:
        return last_integer(out.content) == d.expected
    return out.content == d.answer


def held_out_conversations(n: int = 10, seed: int = SEED) -> list[list[Dialogue]]:
    """n conversations of 4 turns, drawn anew (held-out sums, look-ups, conversions, weather and
    calculator requests and results, greetings), both tools offered throughout. Turn k's messages
    hold the turns before it, answered as the expected answers (what a right model said)."""
    rng = random.Random(seed + 3)
    tools = [WEATHER_TOOL, CALCULATOR_TOOL]
    makers = (lambda r, la: arithmetic(r, la, held_out=True, tools=tools),
              lambda r, la: _tools_on(lookup(r, la), tools), lambda r, la: _tools_on(unit_conversion(r, la), tools),
              lambda r, la: weather_call(r, la, tools), lambda r, la: weather_result(r, la, tools),
              lambda r, la: calculator_call(r, la, tools), lambda r, la: calculator_result(r, la, tools),
              lambda r, la: _tools_on(chat(r, la), tools))
    conversations = []
    for i in range(n):
        lang, history, turns = ("en", "zh")[i % 2], [], []
        for _ in range(4):
            d = rng.choice(makers)(rng, lang)
            d.messages = history + d.messages
            turns.append(d)
            if d.call is not None:  # the client runs the call; the next turn starts after the answer
                follow = (weather_result if d.call["name"] == "get_weather" else calculator_result)
                done = follow(rng, lang, tools, first=d)
                history = done.messages + [{"role": "assistant", "content": done.answer}]
            else:
                history = d.messages + [{"role": "assistant", "content": d.answer}]
        conversations.append(turns)
    return conversations


def current_turn(d: Dialogue) -> Dialogue:
    """d with its messages from the last user message on (its tool exchange kept): what
    `ernie-edge demo` sends the model (ernie_edge/demo.py, DEMO_KEEP_TURNS)."""
    out = copy.copy(d)
    out.messages = last_turns(d.messages, DEMO_KEEP_TURNS)
    return out


def _tools_on(d: Dialogue, tools: list[dict]) -> Dialogue:
    d.tools = tools
    return d


def held_out_tool_dialogues(n: int = 20, seed: int = SEED) -> list[Dialogue]:
    """Weather and calculator calls and results in fresh random combinations (cities, phrasings,
    temperatures and numbers are drawn anew; tools in canonical form)."""
    rng = random.Random(seed + 2)
    out = []
    for i in range(n):
        lang = ("en", "zh")[i % 2]
        make = (weather_call, weather_result, calculator_call, calculator_result)[i % 4]
        out.append(make(rng, lang, [WEATHER_TOOL, CALCULATOR_TOOL]))
    return out
