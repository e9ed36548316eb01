"""Chat template: the exact ERNIE-4.5 Thinking prompt for each message shape (docs/ERNIE_SPEC.md
§6), validation errors, loading from a model folder, and the sandbox: escape attempts, time and
size limits, fuzzed messages, and a template that differs from the built-in one."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from ernie_edge.chat_template import ChatTemplate, TemplateError, builtin_template_source
from ernie_edge.errors import ErnieEdgeError

SYSTEM_TURN = "<|im_start|>system\n<global_setting>\nthink_mode=True\n</global_setting><|im_end|>\n\n"
GENERATION_PROMPT = "<|im_start|>assistant\n<think>\n"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
WEATHER_TOOL_JSON = (
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, '
    '"required": ["city"]}}}')


@pytest.fixture(scope="module")
def template():
    return ChatTemplate.builtin()


def user(text):
    return {"role": "user", "content": text}


def weather_call(arguments='{"city": "Paris"}'):
    return {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}


# -- the exact rendered text ----------------------------------------------------------------------


def test_single_user_turn(template):
    assert template.render([user("Hello")]) == (
        "<|im_start|>system\n<global_setting>\nthink_mode=True\n</global_setting><|im_end|>\n\n"
        "<|im_start|>user\nHello<|im_end|>\n\n<|im_start|>assistant\n<think>\n")


def test_system_message(template):
    messages = [{"role": "system", "content": "Be brief."}, user("Hi")]
    assert template.render(messages) == (
        "<|im_start|>system\n<system_setting>\nBe brief.\n</system_setting>\n\n"
        "<global_setting>\nthink_mode=True\n</global_setting><|im_end|>\n\n"
        "<|im_start|>user\nHi<|im_end|>\n\n" + GENERATION_PROMPT)


def test_multi_turn_drops_old_reasoning(template):
    messages = [user("Q1"), {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
                user("Q2")]
    assert template.render(messages) == (
        SYSTEM_TURN + "<|im_start|>user\nQ1<|im_end|>\n\n"
        "<|im_start|>assistant\n<response>\nA1\n</response>\n<|im_end|>\n\n"
        "<|im_start|>user\nQ2<|im_end|>\n\n" + GENERATION_PROMPT)


def test_tools_in_system_turn(template):
    messages = [{"role": "system", "content": "S"}, user("Weather?")]
    assert template.render(messages, tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\n<system_setting>\nS\n</system_setting>\n\n"
        "<global_setting>\nthink_mode=True\n</global_setting>\n\n"
        "<tool_list>\n[" + WEATHER_TOOL_JSON + "]\n</tool_list><|im_end|>\n\n"
        "<|im_start|>user\nWeather?<|im_end|>\n\n" + GENERATION_PROMPT)


def test_two_tools_joined_and_bare_function_wrapped(template):
    bare = {"name": "now", "parameters": {}}
    text = template.render([user("x")], tools=[WEATHER_TOOL, bare])
    assert ("<tool_list>\n[" + WEATHER_TOOL_JSON + ', {"type": "function", "function": '
            '{"name": "now", "parameters": {}}}]\n</tool_list>') in text


def test_tool_call_and_tool_result(template):
    messages = [user("Weather in Paris?"),
                {"role": "assistant", "content": None, "reasoning_content": "Need the tool.",
                 "tool_calls": [weather_call()]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    assert template.render(messages, tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\n<global_setting>\nthink_mode=True\n</global_setting>\n\n"
        "<tool_list>\n[" + WEATHER_TOOL_JSON + "]\n</tool_list><|im_end|>\n\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n\n"
        "<|im_start|>assistant\n<think>\nNeed the tool.\n</think>\n\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        "<|im_end|>\n\n"
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n\n'
        + GENERATION_PROMPT)


def test_several_tool_calls_and_dict_arguments(template):
    calls = [weather_call({"city": "Paris"}), weather_call('{"city": "北京"}')]
    messages = [user("Both?"), {"role": "assistant", "content": "", "tool_calls": calls}]
    text = template.render(messages, add_generation_prompt=False)
    assert text.endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
        "<|im_end|>\n\n")


def test_reasoning_history_of_current_turn(template):
    messages = [user("Q"), {"role": "assistant", "content": "\nA\n", "reasoning_content": "R\n"}]
    assert template.render(messages, add_generation_prompt=False) == (
        SYSTEM_TURN + "<|im_start|>user\nQ<|im_end|>\n\n"
        "<|im_start|>assistant\n<think>\nR\n</think>\n\n<response>\nA\n</response>\n<|im_end|>\n\n")


def test_old_tool_calls_lose_reasoning(template):
    messages = [user("Q1"), {"role": "assistant", "reasoning_content": "R",
                             "tool_calls": [weather_call()]},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."},
                user("Q2")]
    text = template.render(messages)
    assert "R" not in text.replace("Paris", "")
    assert ("<|im_start|>assistant\n\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<|im_end|>') in text
    assert "<|im_start|>assistant\n<response>\nSunny.\n</response>\n<|im_end|>\n\n" in text


def test_tool_loop_prompt_extends_previous_prompt(template):
    """The next step's prompt starts with the previous prompt plus what the model generated, so
    the KV cache can be reused (ERNIE_SPEC §6 output format)."""
    first = [user("Weather in Paris?")]
    prompt1 = template.render(first, tools=[WEATHER_TOOL])
    generated = ('Need the tool.\n</think>\n\n\n<tool_call>\n'
                 '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<|im_end|>')
    second = first + [{"role": "assistant", "content": None, "reasoning_content": "Need the tool.\n",
                       "tool_calls": [weather_call()]},
                      {"role": "tool", "content": "21 C"}]
    assert template.render(second, tools=[WEATHER_TOOL]).startswith(prompt1 + generated)


def test_generation_prompt_switch_and_no_bos(template):
    text = template.render([user("x")], add_generation_prompt=False)
    assert text == SYSTEM_TURN + "<|im_start|>user\nx<|im_end|>\n\n"
    assert not template.render([user("x")]).startswith(("<s>", "<|begin_of_sentence|>"))


def test_content_is_never_evaluated(template):
    nasty = "{{7*7}} {% for x in range(3) %}{{x}}{% endfor %} {# c #} {{ cycler.__init__ }}"
    text = template.render([{"role": "system", "content": nasty}, user(nasty),
                            {"role": "assistant", "content": nasty, "reasoning_content": nasty}])
    assert text.count(nasty) == 4 and "49" not in text


def test_text_parts_are_joined(template):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]
    assert template.render([{"role": "user", "content": parts}]) == template.render([user("Hello world")])


def test_rendered_prompt_tokenizes_with_single_special_ids(template, tmp_path):
    from ernie_edge.quant.synthetic_tokenizer import write_tokenizer_files
    from ernie_edge.tokenizer import Tokenizer

    write_tokenizer_files(tmp_path / "m", piece_count=1024)
    tok = Tokenizer.from_dir(tmp_path / "m", cache_dir=tmp_path / "cache")
    prompt = template.render([user("你好")])
    ids = tok.encode(prompt)
    assert ids[0] == tok.im_start_id and ids[-2:] == [tok.think_start_id, tok.newline_id]
    assert ids.count(tok.im_end_id) == 2 and tok.bos_id not in ids
    assert tok.decode(ids) == prompt


# -- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("messages, match", [
    ([user("a"), {"role": "robot", "content": "x"}], r"messages\[1\]\.role: unknown role 'robot'"),
    ([user("a"), user("b"), {"role": "user", "content": 42}], r"messages\[2\]\.content must be a string"),
    ([{"role": "user", "content": {"text": "x"}}], r"messages\[0\]\.content must be a string"),
    ([{"role": "user"}], r"messages\[0\]\.content must be a string"),
    ([{"role": "tool", "content": None}], r"messages\[0\]\.content"),
    (["hello"], r"messages\[0\] must be an object"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([user("a\ud800")], r"messages\[0\]\.content is not valid Unicode"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"messages\[0\]\.content\[0\]"),
    ([user("a"), {"role": "assistant", "tool_calls": [weather_call("{not json")]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"),
    ([user("a"), {"role": "assistant", "tool_calls": [weather_call("[1, 2]")]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments must be a JSON object"),
    ([user("a"), {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.name must be a string"),
    ([user("a"), {"role": "assistant", "tool_calls": "f()"}], r"messages\[1\]\.tool_calls must be a list"),
    ([user("a"), {"role": "assistant", "content": "x", "reasoning_content": 5}],
     r"messages\[1\]\.reasoning_content must be a string"),
    ([user("a"), {"role": "system", "content": "late"}], r"messages\[1\]: a system message"),
])
def test_invalid_messages(template, messages, match):
    with pytest.raises(TemplateError, match=match) as info:
        template.render(messages)
    assert isinstance(info.value, ErnieEdgeError)


@pytest.mark.parametrize("tools, match", [
    ("get_weather", "tools must be a list"),
    ([42], r"tools\[0\] must be"),
    ([{"type": "retrieval"}], r"tools\[0\]\.type must be 'function'"),
    ([{"type": "function", "function": {"description": "no name"}}], r"tools\[0\]\.function\.name"),
])
def test_invalid_tools(template, tools, match):
    with pytest.raises(TemplateError, match=match):
        template.render([user("x")], tools=tools)


def test_input_is_not_modified(template):
    messages = [user("x"), {"role": "assistant", "content": None, "tool_calls": [weather_call()]}]
    snapshot = json.dumps(messages)
    template.render(messages)
    assert json.dumps(messages) == snapshot


# -- loading from a model folder -------------------------------------------------------------------


def write_config(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", **fields}))
    return folder


def test_from_model_dir_sources(tmp_path):
    folder = write_config(tmp_path / "a", chat_template="A{{ messages[0].content }}")
    loaded = ChatTemplate.from_model_dir(folder)
    assert loaded.render([user("x")]) == "Ax" and not loaded.is_builtin
    assert loaded.origin.endswith("tokenizer_config.json")
    (folder / "chat_template.jinja").write_text("J{{ bos_token }}{{ messages|length }}")
    assert ChatTemplate.from_model_dir(folder).render([user("x")]) == "J<s>1"
    listed = write_config(tmp_path / "b", chat_template=[
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}])
    assert ChatTemplate.from_model_dir(listed).render([user("x")]) == "D"
    bad_list = write_config(tmp_path / "c", chat_template=[{"name": "tool_use", "template": "T"}])
    with pytest.raises(TemplateError, match="without a 'default'"):
        ChatTemplate.from_model_dir(bad_list)
    separate = write_config(tmp_path / "d")
    (separate / "chat_template.json").write_text(json.dumps({"chat_template": "S"}))
    assert ChatTemplate.from_model_dir(separate).render([user("x")]) == "S"


def test_fallback_to_builtin_is_logged(tmp_path, caplog):
    folder = write_config(tmp_path / "none")
    with caplog.at_level(logging.WARNING, logger="ernie_edge.chat_template"):
        loaded = ChatTemplate.from_model_dir(folder)
    assert loaded.is_builtin and loaded.matches_builtin
    assert "built-in" in caplog.text
    assert ChatTemplate.from_model_dir(tmp_path / "empty-missing").is_builtin


def test_sha256_and_builtin_flags(tmp_path, caplog):
    builtin = ChatTemplate.builtin()
    folder = write_config(tmp_path / "same", chat_template=builtin_template_source())
    with caplog.at_level(logging.INFO, logger="ernie_edge.chat_template"):
        same = ChatTemplate.from_model_dir(folder)
    assert same.sha256 == builtin.sha256 and len(same.sha256) == 64
    assert same.matches_builtin and not same.is_builtin
    assert same.sha256 in caplog.text
    one_char = builtin_template_source().replace("think_mode=True", "think_mode=Trve")
    with caplog.at_level(logging.INFO, logger="ernie_edge.chat_template"):
        other = ChatTemplate.from_model_dir(write_config(tmp_path / "other", chat_template=one_char))
    assert not other.matches_builtin and other.sha256 != builtin.sha256
    assert f"{other.sha256} (differs from the built-in template)" in caplog.text
    assert other.render([user("x")]).count("think_mode=Trve") == 1  # still loads, sandboxed


def test_bad_template_files(tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text("{ nope")
    with pytest.raises(TemplateError, match="tokenizer_config.json"):
        ChatTemplate.from_model_dir(folder)
    syntax = write_config(tmp_path / "syntax", chat_template="{% for x in %}")
    with pytest.raises(TemplateError, match="syntax error at line 1"):
        ChatTemplate.from_model_dir(syntax)
    wrong_type = write_config(tmp_path / "type", chat_template=42)
    with pytest.raises(TemplateError, match="must be a string"):
        ChatTemplate.from_model_dir(wrong_type)


# -- the sandbox ----------------------------------------------------------------------------------------


ATTACKS = {
    "globals_via_cycler": "{{ cycler.__init__.__globals__.os.popen('touch CANARY').read() }}",
    "globals_via_joiner": "{{ joiner.__init__.__globals__['os'].system('touch CANARY') }}",
    "lipsum_globals": "{{ lipsum.__globals__['os'].popen('touch CANARY') }}",
    "mro_subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "format_attribute": "{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}",
    "attr_filter_format": "{{ ('{0.__class__}'|attr('format'))(1) }}",
    "namespace_mutation": "{{ messages.append(1) }}{{ messages.clear() }}",
    "huge_range": "{% for i in range(10**9) %}{% endfor %}",
    "huge_string": "{{ 'a' * 10**10 }}",
    "huge_list": "{{ ([1] * 10**10)|length }}",
    "nested_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "replace_blowup": "{% set s = 'a' * 99999 %}{{ s.replace('a', s) }}",
    "join_blowup": "{% set s = 'a' * 99999 %}{{ s|join(s) }}",
    "center_blowup": "{{ 'x'|center(10**10) }}",
    "format_width": "{{ '{:>9999999999}'.format(1) }}",
    "percent_width": "{{ '%9999999999d' % 1 }}",
    "percent_star_width": "{{ '%*d' % (10**9, 1) }}",
    "to_bytes": "{{ (5).to_bytes(10**10, 'big') }}",
    "batch_fill": "{{ [1]|batch(10**9, 0)|list|length }}",
    "power": "{{ 9 ** 999999999 }}",
    "output_flood": "{% for i in range(100000) %}{{ 'a' * 50000 }}{% endfor %}",
    "recursion": "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
    "include": "{% include '/etc/passwd' %}",
    "raise": "{{ raise_exception('bad template') }}",
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_sandbox_attacks_fail_fast(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    messages = [user("hi")]
    start = time.perf_counter()
    with pytest.raises(TemplateError):
        ChatTemplate(ATTACKS[name], origin="attack").render(messages)
    assert time.perf_counter() - start < 1.5
    assert not (tmp_path / "CANARY").exists()
    assert messages == [user("hi")]


def test_trace_function_restored(template):
    def tracer(frame, event, arg):
        return None

    sys.settrace(tracer)
    try:
        template.render([user("x")])
        with pytest.raises(TemplateError):
            ChatTemplate(ATTACKS["nested_loops"], origin="t", time_limit_s=0.05).render([user("x")])
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)


def test_limits_are_configurable():
    loop = ChatTemplate("{% for i in range(100000) %}{% for j in range(100) %}{% endfor %}{% endfor %}",
                        origin="t", time_limit_s=0.1)
    start = time.perf_counter()
    with pytest.raises(TemplateError, match="longer than 0.1 s"):
        loop.render([user("x")])
    assert time.perf_counter() - start < 1.0  # the 0.1 s deadline is enforced, not merely reported
    flood = ChatTemplate("{% for i in range(5) %}{{ 'a' * 100 }}{% endfor %}", origin="t",
                         max_output_chars=300)
    with pytest.raises(TemplateError, match="rendered prompt is longer than 304 characters"):
        flood.render([user("x")])
    assert len(ChatTemplate(flood.source, origin="t", max_output_chars=500).render([user("x")])) == 500


def test_long_inputs_render(template):
    big = "长文本 " * 200_000  # 1.2 M characters: the output limit grows with the input
    assert big in template.render([user(big)])
    messages = []
    for i in range(5000):
        messages += [user(f"question {i}"), {"role": "assistant", "content": f"answer {i}"}]
    text = template.render(messages)
    assert text.count("<|im_start|>user") == 5000


def test_helpers(template):
    tojson = ChatTemplate('{{ {"b": "é", "a": [1, 2]}|tojson }}|{{ x|tojson(indent=1) }}', origin="t")
    assert tojson.render([user("x")], x=[1]) == '{"b": "é", "a": [1, 2]}|[\n 1\n]'
    now = ChatTemplate("{{ strftime_now('%Y') }}", origin="t").render([user("x")])
    assert now.isdigit() and len(now) == 4
    with pytest.raises(TemplateError, match="bad input here"):
        ChatTemplate("{{ raise_exception('bad input here') }}", origin="t").render([user("x")])


def test_concurrent_renders(template):
    results, errors = [], []

    def work(i):
        try:
            results.append(template.render([user(f"message {i}")]) == template.render([user(f"message {i}")]))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [True] * 8


def test_jinja_version_has_sandbox_fixes():
    major, minor, patch = (int(x) for x in jinja2.__version__.split(".")[:3])
    assert (major, minor, patch) >= (3, 1, 6)


text_with_markup = hs.text(alphabet=hs.characters(blacklist_categories=("Cs",)), max_size=40).map(
    lambda s: s + "{{7*7}}{% if 1 %}x{% endif %}")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hs.lists(hs.fixed_dictionaries({
    "role": hs.sampled_from(["user", "assistant", "tool", "system", "bot", 3]),
    "content": hs.one_of(text_with_markup, hs.none(), hs.integers()),
}), min_size=1, max_size=6))
def test_fuzzed_messages_render_or_fail_cleanly(template, messages):
    try:
        text = template.render(messages)
    except TemplateError:
        return
    for message in messages:
        if isinstance(message["content"], str) and message["content"]:
            if message["role"] == "assistant":
                assert message["content"].strip("\n") in text
            else:
                assert message["content"] in text
    assert "49" not in text.replace("".join(m["content"] or "" for m in messages
                                            if isinstance(m["content"], str)), "")


def test_ordinary_template_code_is_not_limited():
    code = ("{{ 1700000000 * 1000 }} {{ '%d'|format(1700000000) }} {{ '%d' % 1700000000 }} "
            "{{ {1234567890: 'x'}.get(1234567890) }} {% for i in range(20000, 20002) %}{{ i }}{% endfor %} "
            "{{ 'ab' * 3 }} {{ [1, 2] + [3] }} {{ 'x'|center(5) }}|{{ 2 ** 64 }}")
    assert ChatTemplate(code, origin="t").render([user("x")]) == (
        "1700000000000 1700000000 1700000000 x 2000020001 ababab [1, 2, 3]   x  |18446744073709551616")
