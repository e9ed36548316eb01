"""Tests for ernie_edge.parsers: the whole-text rules, and that streaming matches them for any split."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ernie_edge.parsers import (
    Delta, ParsedOutput, StreamParser, ToolCall, counter_tool_call_ids, parse_output, parse_tool_call,
    strip_end_markers,
)

ANSWER = "Let me think.\nThe user greets me.\n</think>\n\n<response>\nHello! 你好\n</response>\n"
TOOL = ('The user wants the weather.\n</think>\n\n\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "北京", "unit": "c"}}\n</tool_call>\n')


def parse(text, **kw):
    return parse_output(text, new_id=counter_tool_call_ids(), **kw)


def stream(pieces, **kw):
    """Feed the pieces, return the concatenated result as a ParsedOutput and the deltas."""
    parser = StreamParser(new_id=counter_tool_call_ids(), **kw)
    deltas = [parser.feed(p) for p in pieces] + [parser.finish()]
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    calls = [c for d in deltas for c in d.tool_calls]
    malformed = any(d.malformed for d in deltas)
    assert malformed == parser.malformed
    return ParsedOutput(reasoning or None, content or None, calls, malformed), deltas


# ---- whole-text rules --------------------------------------------------------------------------

def test_answer_shape():
    out = parse(ANSWER)
    assert out == ParsedOutput("Let me think.\nThe user greets me.", "Hello! 你好", [], False)


def test_tool_call_shape_keeps_non_ascii_and_reserialises():
    out = parse(TOOL)
    assert out.reasoning == "The user wants the weather."
    assert out.content is None and not out.malformed
    assert out.tool_calls == [ToolCall("call_" + "0" * 24, "get_weather",
                                       '{"city": "北京", "unit": "c"}')]


def test_several_tool_calls_get_distinct_ids_in_order():
    call = '<tool_call>\n{{"name": "{}", "arguments": {{"n": {}}}}}\n</tool_call>\n'
    text = "r\n</think>\n\n\n" + call.format("a", 1) + call.format("b", json.dumps([1, {"x": None}]))
    out = parse(text)
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [
        ("a", {"n": 1}), ("b", {"n": [1, {"x": None}]})]
    assert [c.id for c in out.tool_calls] == ["call_" + "0" * 24, "call_" + "0" * 23 + "1"]
    assert out.content is None


def test_no_think_close_is_all_reasoning_unstripped():
    assert parse("still thinking\n") == ParsedOutput("still thinking\n", None)
    assert parse("") == ParsedOutput(None, None)


def test_leading_think_and_its_newline_are_dropped():
    assert parse("<think>\nabc\n</think>\n\n<response>\nx\n</response>").reasoning == "abc"
    assert parse("<think>abc").reasoning == "abc"
    assert parse("a<think>b").reasoning == "a<think>b"  # only a leading one


def test_exactly_one_newline_removed_around_reasoning_and_response_body():
    out = parse("\nabc\n\n</think>\n\n<response>\n\nbody\n\n</response>\n")
    assert out.reasoning == "\nabc\n"
    assert out.content == "\nbody\n"


def test_answer_without_response_wrapper():
    assert parse("r\n</think>\n\nplain answer\n\n").content == "plain answer"
    assert parse("r\n</think>\n\n").content is None


def test_unterminated_response_keeps_its_text():
    assert parse("r</think>\n\n<response>\npartial answer\n").content == "partial answer\n"


def test_text_between_blocks_is_content_unless_strict():
    text = ("r\n</think>\n\nchatter\n<response>\nA\n</response>\nmore\n"
            '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n')
    assert parse(text).content == "chatter\nA\nmore"
    strict = parse(text, strict_response=True)
    assert strict.content == "A"
    assert [c.name for c in strict.tool_calls] == ["f"]


@pytest.mark.parametrize("inner", [
    "{bad json", '{"name": "f"}', '{"arguments": {}}', '{"name": "", "arguments": {}}',
    '{"name": 3, "arguments": {}}', '{"name": "f", "arguments": "{}"}', "[1, 2]",
    '{"name": "f", "arguments": {"x": NaN}}', "[" * 100000 + "]" * 100000,
])
def test_malformed_tool_call_goes_to_content(inner):
    block = f"<tool_call>\n{inner}\n</tool_call>"
    out = parse(f"r\n</think>\n\n\n{block}\n")
    assert out.malformed and out.tool_calls == []
    assert out.content == block


def test_unterminated_tool_call_is_malformed_content():
    text = 'r\n</think>\n\n\n<tool_call>\n{"name": "f", "argum'
    out = parse(text)
    assert out.malformed and out.tool_calls == []
    assert out.content == '<tool_call>\n{"name": "f", "argum'


def test_tool_call_ends_at_first_close_tag():
    text = 'r</think><tool_call>{"name": "f", "arguments": {}} x</tool_call>{"a": 1}</tool_call>'
    out = parse(text)
    assert out.malformed
    assert out.content == '<tool_call>{"name": "f", "arguments": {}} x</tool_call>{"a": 1}</tool_call>'


def test_tool_call_inside_reasoning_is_reasoning():
    text = 'maybe <tool_call>{"name": "f", "arguments": {}}</tool_call>\n</think>\n\n<response>\nno\n</response>'
    out = parse(text)
    assert out.tool_calls == [] and out.reasoning.startswith("maybe <tool_call>")


def test_trailing_end_markers_are_stripped_only_at_the_end():
    assert strip_end_markers("a</s><|im_end|></s>") == "a"
    assert parse(ANSWER + "<|im_end|>") == parse(ANSWER)
    assert parse("strike <s>x</s> out</s>").reasoning == "strike <s>x</s> out"


def test_parse_tool_call_directly():
    call = parse_tool_call(' {"name": "f", "arguments": {"q": "é"}} ', lambda: "id1")
    assert call == ToolCall("id1", "f", '{"q": "é"}')
    assert parse_tool_call("", lambda: "id1") is None


# ---- streaming ---------------------------------------------------------------------------------

def test_reasoning_streams_without_delay():
    parser = StreamParser()
    assert parser.feed("<think>\nHel").reasoning == "Hel"
    assert parser.feed("lo wor").reasoning == "lo wor"
    assert parser.feed("ld\n").reasoning == "ld"          # the "\n" may precede </think>
    assert parser.feed("next <").reasoning == "\nnext "    # "<" may start </think>
    assert parser.feed("b").reasoning == "<b"
    assert not parser.reasoning_done
    d = parser.feed("\n</think>\n\n<response>\nHi")
    assert (d.reasoning, d.content) == ("", "Hi") and parser.reasoning_done
    assert parser.feed(" there").content == " there"
    assert parser.feed("\n").content == ""                 # may precede </response>
    assert parser.feed("\n</response>\n").content == "\n"
    assert parser.finish() == Delta()


def test_tool_call_is_emitted_whole_when_closed():
    parser = StreamParser(new_id=counter_tool_call_ids())
    deltas = [parser.feed(c) for c in TOOL]
    assert [i for i, d in enumerate(deltas) if d.tool_calls] == [len(TOOL) - 2]  # at the ">"
    assert parser.finish() == Delta()


def test_finish_turns_unterminated_call_into_malformed_content():
    parser = StreamParser()
    parser.feed('r</think>\n<tool_call>\n{"name"')
    end = parser.finish()
    assert end.malformed and parser.malformed and end.content == '<tool_call>\n{"name"'


def test_examples_stream_like_whole_text_char_by_char():
    for text in [ANSWER, TOOL, ANSWER + "<|im_end|>", "<think>", "<think>\n</think>", "</s",
                 "a</think>b</s>c", "r</think>\n<response></response>\n<response>\n\n"]:
        for strict in (False, True):
            assert stream(list(text), strict_response=strict)[0] == parse(text, strict_response=strict)


# ---- property: any split of any output gives the whole-text result -------------------------------

FRAGMENTS = ["<", ">", "/", "\n", "\n\n", " ", "x", "é", "中文", "🙂", "{", "}", '"',
             "<think>", "</thin", "</think", "</think>", "<respon", "<response>", "</response",
             "</response>", "<tool_", "<tool_call>", "</tool_cal", "</tool_call>", "<|im_en",
             "<|im_end|>", "</s", "</s>", "<s>"]
free_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text("ab <>/\n{}\"é中", max_size=4)),
                     max_size=6).map("".join)
json_values = st.one_of(st.integers(-5, 5), st.text(max_size=6), st.booleans(), st.none())
MALFORMED = ["{bad", '{"name": "x"}', '{"name": 1, "arguments": {}}', '{"arguments": {}}', "[]",
             '{"name": "x", "arguments": "{}"}', '{"name": "x", "arguments": {"a": NaN}}', ""]


@st.composite
def tool_call_text(draw):
    if draw(st.integers(0, 3)) == 0:
        inner = draw(st.sampled_from(MALFORMED))
    else:
        obj = {"name": draw(st.sampled_from(["get_weather", "搜索", "f"])),
               "arguments": draw(st.dictionaries(st.text(max_size=4), json_values, max_size=3))}
        inner = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    nl = draw(st.sampled_from(["", "\n"]))
    return f"<tool_call>{nl}{inner}{nl}</tool_call>" + draw(st.sampled_from(["", "\n"]))


@st.composite
def response_text(draw):
    open_nl, close_nl = draw(st.sampled_from(["", "\n", "\n\n"])), draw(st.sampled_from(["", "\n", "\n\n"]))
    closing = draw(st.sampled_from(["</response>\n", "</response>", ""]))
    return f"<response>{open_nl}{draw(free_text)}{close_nl}{closing}"


@st.composite
def model_outputs(draw):
    parts = [draw(st.sampled_from(["", "", "<think>", "<think>\n"])), draw(free_text)]
    if draw(st.integers(0, 4)) > 0:
        parts.append(draw(st.sampled_from(["\n</think>", "</think>", "\n\n</think>"])))
        parts.append(draw(st.sampled_from(["", "\n", "\n\n", "\n\n\n"])))
        blocks = st.one_of(tool_call_text(), response_text(), free_text, st.just("\n"))
        parts += draw(st.lists(blocks, max_size=4))
        if draw(st.integers(0, 5)) == 0:
            parts.append('<tool_call>\n{"name": "f", "argu')
    parts.append(draw(st.sampled_from(["", "", "<|im_end|>", "</s>", "</s><|im_end|>", "</s"])))
    return "".join(parts)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=model_outputs(), data=st.data(), strict=st.booleans())
def test_any_split_streams_like_whole_text(text, data, strict):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    expected = parse(text, strict_response=strict)
    assert stream(pieces, strict_response=strict)[0] == expected
    assert stream(list(text), strict_response=strict)[0] == expected


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join), data=st.data())
def test_any_split_of_tag_soup_streams_like_whole_text(text, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    assert stream(pieces)[0] == parse(text)
