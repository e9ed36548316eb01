"""The chat template: OpenAI-style messages -> the prompt text the model was trained on.

A checkpoint's template is untrusted input (a template can try to escape the sandbox): it is rendered only in jinja2's
`ImmutableSandboxedEnvironment`, with three extra limits enforced by `_LimitedSandbox`:

- time: a trace function runs on every line of compiled template code and stops the render at a
  deadline, so even empty nested loops end;
- output: the rendered text is streamed and counted;
- memory: the operations that can multiply a size in one step (`*`, `**`, `%`, `+`, `~`, calls
  and filters with big arguments, joining buffers) are checked before they run.

Messages are validated and normalised before rendering (roles, string content, tool-call arguments
parsed into dicts), and every problem is a `TemplateError` naming the message index.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import logging
import re
import string
import sys
import threading
import time
import types
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ErnieEdgeError

log = logging.getLogger(__name__)

BUILTIN_TEMPLATE_NAME = "ernie_thinking.jinja"
ROLES = ("system", "user", "assistant", "tool")

DEFAULT_TIME_LIMIT_S = 1.0
_TIME_PER_MESSAGE_S = 2e-4  # long conversations get more time: 10^4 messages take ~0.4 s here
DEFAULT_MAX_OUTPUT_CHARS = 1_000_000
_INPUT_SLACK = 4  # a template may print each input string a few times: limit += 4 x input chars
_ESTIMATE_SLACK = 8  # one operation may build up to 8 x the output limit before it is checked
_MAX_POWER_BITS = 1 << 16  # largest integer `**` may produce
_TEMPLATE_FILENAME = "<ernie-edge chat template>"
_BIG_FORMAT_WIDTH = re.compile(r"\d{6,}")
_BIG_PERCENT_WIDTH = re.compile(r"%[-#0 +]*(?:\d{6,}|\d*\.\d{6,}|\*|\d*\.\*)")
_UNSAFE_STR_METHODS = frozenset({"translate", "maketrans", "expandtabs"})  # amplify, never needed


class TemplateError(ErnieEdgeError):
    """A chat template that cannot be loaded or rendered, or messages it cannot render."""


class _LimitExceeded(SecurityError):
    """Raised inside a render that ran past its time, output or memory limit."""


class _TemplateRaised(jinja2.TemplateError):
    """Raised by the template's own raise_exception(message): it refuses the messages."""


def builtin_template_source() -> str:
    """The text of the built-in ERNIE-4.5 Thinking template (ernie_edge/templates/)."""
    resource = importlib.resources.files("ernie_edge") / "templates" / BUILTIN_TEMPLATE_NAME
    return resource.read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# The sandbox
# --------------------------------------------------------------------------------------------


class _Limits:
    """The budget of one render: a deadline and a size limit (characters or elements)."""

    def __init__(self, time_limit_s: float, max_chars: int):
        self.deadline = time.monotonic() + time_limit_s
        self.time_limit_s = time_limit_s
        self.max_chars = max_chars
        self.max_estimate = max_chars * _ESTIMATE_SLACK

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"rendering took longer than {self.time_limit_s:.3g} s")

    def check_size(self, size: int, what: str) -> None:
        if size > self.max_estimate:
            raise _LimitExceeded(f"{what} would produce about {size} characters or items")


_SEQUENCES = (str, bytes, list, tuple, dict, set, frozenset)
# Callables whose integer arguments are widths or counts of the output they build.
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "to_bytes"})
_WIDTH_FILTERS = frozenset({"center", "indent", "wordwrap", "batch", "slice"})


def _length(value: Any) -> int:
    """Characters of a string, elements of a container; 0 for anything else."""
    return len(value) if isinstance(value, _SEQUENCES) else 0


def _estimate(operands: list[Any], widths: bool = False) -> int:
    """Upper bound for what one operation can build from its operands: it can repeat its
    biggest operand about as often as the next biggest says (join, replace, format), or as an
    integer width says when the operation takes one (`widths`). Integers as data do not count."""
    lengths = sorted((_length(v) for v in operands), reverse=True) + [0, 0]
    largest_int = 0
    if widths:
        ints = (abs(v) for v in operands if isinstance(v, int) and not isinstance(v, bool))
        largest_int = max(ints, default=0)
    return (lengths[0] + 1) * (max(lengths[1], largest_int) + 1)


def _materialise(value: Any) -> Any:
    """Turn a generator into a list so that its size can be checked (its source is bounded)."""
    if isinstance(value, (types.GeneratorType, map, filter, zip)):
        return list(value)
    return value


def _check_format_string(text: str) -> None:
    for _, _, spec, _ in string.Formatter().parse(text):
        if spec and _BIG_FORMAT_WIDTH.search(spec):
            raise _LimitExceeded(f"format width too large in {text[:40]!r}")


def _check_percent_format(text: str) -> None:
    if _BIG_PERCENT_WIDTH.search(text):
        raise _LimitExceeded(f"format width too large in {text[:40]!r}")


class _CheckedConcatCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` to a size-checked join (jinja would call str_join directly)."""

    def visit_Concat(self, node, frame):  # noqa: N802 (jinja's visitor naming)
        self.write("environment.checked_concat(")
        super().visit_Concat(node, frame)
        self.write(")")


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment plus time, output and memory limits.

    The limits of the render running in the current thread are `self.limits` (thread-local, so
    one compiled template serves several threads); `ChatTemplate.render` sets them.
    """

    code_generator_class = _CheckedConcatCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        # The same options transformers uses for chat templates, so checkpoint templates behave
        # as they do there.
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self._local = threading.local()
        self.globals.pop("lipsum", None)  # builds text of any size from two integers
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.filters["tojson"] = _tojson
        # Compiled templates call filter functions directly, so the checks wrap each filter.
        self.filters = {name: self._checked_filter(name, f) for name, f in self.filters.items()}
        self.concat = self.checked_join  # used by the compiled code for blocks and macros

    @property
    def limits(self) -> _Limits:
        limits = getattr(self._local, "limits", None)
        return limits or _Limits(DEFAULT_TIME_LIMIT_S, DEFAULT_MAX_OUTPUT_CHARS)

    @limits.setter
    def limits(self, value: _Limits) -> None:
        self._local.limits = value

    # -- attribute and call checks ------------------------------------------------------------

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr in _UNSAFE_STR_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any):
        wrapper = super().wrap_str_format(value)
        if wrapper is not None:
            _check_format_string(value.__self__)
        return wrapper

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        args = tuple(_materialise(a) for a in args)
        bound_to = getattr(__obj, "__self__", None)
        widths = (isinstance(bound_to, (str, bytes, int))
                  and getattr(__obj, "__name__", "") in _WIDTH_METHODS)
        operands = [bound_to, *args, *kwargs.values()]
        __self.limits.check_size(_estimate(operands, widths), "a call")
        result = super().call(__context, __obj, *args, **kwargs)
        __self.limits.check_size(_length(result), "a call")
        return result

    def unsafe_undefined(self, obj: Any, attribute: str):
        # jinja returns an Undefined that fails only when used, and prints as "": fail now.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} "
                            "object is unsafe")

    def _checked_filter(self, name: str, function):
        """Wrap a filter: its operands and its result must fit the size limit."""

        @functools.wraps(function)  # keeps jinja's pass_context / pass_eval_context marks
        def checked(*args, **kwargs):
            args = tuple(_materialise(a) for a in args)
            if name == "format" and any(isinstance(a, str) for a in args):
                _check_percent_format(next(a for a in args if isinstance(a, str)))
            operands = [*args, *kwargs.values()]
            widths = name in _WIDTH_FILTERS
            self.limits.check_size(_estimate(operands, widths), f"filter {name!r}")
            result = function(*args, **kwargs)
            self.limits.check_size(_length(result), f"filter {name!r}")
            return result

        return checked

    def call_binop(self, context, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "**":
            self._check_power(left, right)
        elif operator_name == "%" and isinstance(left, str):
            _check_percent_format(left)
            operands = [left, *(right if isinstance(right, tuple) else (right,))]
            self.limits.check_size(_estimate(operands), "'%' formatting")
        elif operator_name == "*" and (isinstance(left, _SEQUENCES) or isinstance(right, _SEQUENCES)):
            self.limits.check_size(_estimate([left, right], widths=True), "'*'")
        elif operator_name == "+":
            self.limits.check_size(_length(left) + _length(right), "'+'")
        return super().call_binop(context, operator_name, left, right)

    def _check_power(self, base: Any, exponent: Any) -> None:
        if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
            if max(abs(base).bit_length(), 1) * exponent > _MAX_POWER_BITS:
                raise _LimitExceeded(f"{base} ** {exponent} is too large")

    # -- joining strings ----------------------------------------------------------------------

    def checked_concat(self, joined: str) -> str:
        self.limits.check_size(len(joined), "'~'")
        return joined

    def checked_join(self, parts) -> str:
        parts = [p if isinstance(p, str) else str(p) for p in parts]
        self.limits.check_size(sum(len(p) for p in parts), "a block")
        return "".join(parts)

    def compile_source(self, source: str) -> jinja2.Template:
        """Compile with our own file name, which the deadline tracer looks for."""
        code = self.compile(source, filename=_TEMPLATE_FILENAME)
        return self.template_class.from_code(self, code, self.make_globals(None), None)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """json.dumps as transformers' chat templates have it: no HTML escaping, keys in order."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _Deadline:
    """A trace function that checks the time on every line of compiled template code.

    Template code is plain Python (jinja compiles it), so a loop without calls is stopped too.
    Other frames are not traced. The previous trace function (a debugger, coverage) is restored.
    """

    def __init__(self, limits: _Limits):
        self.limits = limits
        self.previous = None

    def __enter__(self) -> _Deadline:
        self.previous = sys.gettrace()
        sys.settrace(self._tracer())
        return self

    def __exit__(self, *exc_info) -> None:
        sys.settrace(self.previous)

    def _tracer(self):
        deadline, monotonic, limits = self.limits.deadline, time.monotonic, self.limits

        def on_line(frame, event, arg):  # runs for every line: keep it small
            if monotonic() > deadline:
                limits.check_time()
            return on_line

        def on_call(frame, event, arg):
            if frame.f_code.co_filename == _TEMPLATE_FILENAME:
                limits.check_time()
                return on_line
            return None

        return on_call


# --------------------------------------------------------------------------------------------
# Message validation
# --------------------------------------------------------------------------------------------


def _check_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TemplateError(f"{where} must be a string, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TemplateError(f"{where} is not valid Unicode text ({exc.reason} at "
                            f"character {exc.start}); send UTF-8 text") from None
    return value


def _content_text(content: Any, where: str) -> str:
    """Message content as a string. A list of {"type": "text", "text": ...} parts is joined."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise TemplateError(f"{where}[{j}]: only text parts are supported "
                                    "(this model reads text only)")
            texts.append(_check_text(part.get("text"), f"{where}[{j}].text"))
        return "".join(texts)
    return _check_text(content, where)


def _tool_call(call: Any, where: str) -> dict:
    if not isinstance(call, Mapping):
        raise TemplateError(f"{where} must be an object")
    function = call.get("function", call)
    if not isinstance(function, Mapping):
        raise TemplateError(f"{where}.function must be an object")
    name = _check_text(function.get("name"), f"{where}.function.name")
    arguments = function.get("arguments")
    if arguments is None:
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise TemplateError(f"{where}.function.arguments is not valid JSON ({exc.msg} at "
                                f"character {exc.pos})") from None
    if not isinstance(arguments, Mapping):
        raise TemplateError(f"{where}.function.arguments must be a JSON object")
    normalised = {"type": "function", "function": {"name": name, "arguments": dict(arguments)}}
    if call.get("id") is not None:
        normalised["id"] = _check_text(call["id"], f"{where}.id")
    return normalised


def _message(message: Any, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise TemplateError(f"{where} must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise TemplateError(f"{where}.role: unknown role {role!r}; expected one of {', '.join(ROLES)}")
    out = dict(message)
    content = message.get("content")
    if role == "assistant" and content is None:
        out["content"] = ""
    else:
        out["content"] = _content_text(content, f"{where}.content")
    if role == "assistant":
        reasoning = message.get("reasoning_content", message.get("reasoning"))
        if reasoning is not None:
            out["reasoning_content"] = _check_text(reasoning, f"{where}.reasoning_content")
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise TemplateError(f"{where}.tool_calls must be a list")
        out.pop("tool_calls", None)  # absent rather than empty: templates test "is defined"
        if calls:
            out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]")
                                 for j, c in enumerate(calls)]
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            out[key] = _check_text(message[key], f"{where}.{key}")
    return out


def validate_messages(messages: Any) -> list[dict]:
    """Check OpenAI-style messages and return normalised copies (the input is not modified).

    Content becomes a string (text parts joined; None allowed for assistant turns, becoming "").
    Assistant turns: `reasoning` is accepted as an alias of `reasoning_content`; `tool_calls`,
    when non-empty, become {"type": "function", "function": {"name", "arguments": dict}} with
    JSON-string arguments parsed. Raises TemplateError naming the first bad message.
    """
    if not isinstance(messages, list) or not messages:
        raise TemplateError("messages must be a non-empty list")
    return [_message(m, i) for i, m in enumerate(messages)]


def validate_tools(tools: Any) -> list[dict] | None:
    """Check an OpenAI-style tools list; returns copies or None when there are no tools."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise TemplateError("tools must be a list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise TemplateError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        if "function" in tool or "type" in tool:
            if tool.get("type", "function") != "function":
                raise TemplateError(f"tools[{i}].type must be 'function'")
            function = tool.get("function")
        else:
            function = tool  # a bare function description: {"name": ..., "parameters": ...}
        if not isinstance(function, Mapping):
            raise TemplateError(f"tools[{i}].function must be an object")
        _check_text(function.get("name"), f"tools[{i}].function.name")
        out.append(dict(tool))
    return out or None


def last_turns(messages: list[dict], n: int | None) -> list[dict]:
    """messages from the n-th last user message on (what follows each user message, tool calls
    and results included, stays with it); all of them when n is None or there are no more."""
    if n is None:
        return messages
    starts = [i for i, m in enumerate(messages) if m["role"] == "user"]
    return messages[starts[-n]:] if len(starts) > n else messages


def _input_chars(messages: list[dict], tools: list[dict] | None, extra: dict) -> int:
    """Rough size of everything the caller passes in, to scale the output limit."""
    total = len(json.dumps(tools, ensure_ascii=False, default=str)) if tools else 0
    for m in messages:
        total += len(m["content"]) + len(m.get("reasoning_content") or "")
        total += sum(len(json.dumps(c, ensure_ascii=False, default=str)) for c in m.get("tool_calls") or [])
    return total + sum(len(v) for v in extra.values() if isinstance(v, str))


# --------------------------------------------------------------------------------------------
# ChatTemplate
# --------------------------------------------------------------------------------------------


class ChatTemplate:
    """A compiled, sandboxed chat template.

    Build it with `from_model_dir` (the checkpoint's own template, else the built-in one) or
    `builtin()`. `render` is safe to call from several threads.
    """

    def __init__(self, source: str, *, origin: str, is_builtin: bool = False,
                 special_tokens: Mapping[str, str] | None = None,
                 time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                 max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS):
        """Compile `source`. `origin` names where it came from (a path, or "built-in") for
        messages; `special_tokens` (bos_token, eos_token, ...) are passed to every render as
        transformers does. Raises TemplateError if the template does not compile."""
        self.source = source
        self.origin = origin
        self.is_builtin = is_builtin
        self.special_tokens = dict(special_tokens or {})
        self.time_limit_s = time_limit_s
        self.max_output_chars = max_output_chars
        self.sha256 = _sha256(source)
        self._env, self._template = self._compile()  # a syntax error fails at load time

    @classmethod
    def builtin(cls, **kwargs) -> ChatTemplate:
        """The built-in ERNIE-4.5 Thinking template (docs/ERNIE_SPEC.md §6)."""
        return cls(builtin_template_source(), origin="built-in", is_builtin=True, **kwargs)

    @classmethod
    def from_model_dir(cls, path: str | Path, **kwargs) -> ChatTemplate:
        """The template of a model folder: `chat_template.jinja`, else `chat_template.json`,
        else `tokenizer_config.json`'s `chat_template` (a string, or a list of {name, template}
        from which "default" is taken). Falls back to the built-in template, with a log line,
        when the folder has none. The template's sha256 is logged."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        special_tokens = _special_token_strings(config)
        found = _find_template(path, config)
        if found is None:
            log.warning("%s has no chat template; using ernie-edge's built-in ERNIE-4.5 Thinking "
                        "template", path)
            return cls.builtin(special_tokens=special_tokens or None, **kwargs)
        source, origin = found
        template = cls(source, origin=origin, special_tokens=special_tokens, **kwargs)
        log.info("chat template from %s, sha256 %s%s", origin, template.sha256,
                 "" if template.matches_builtin else " (differs from the built-in template)")
        return template

    @property
    def matches_builtin(self) -> bool:
        """True when the text is identical to the built-in template (whatever its origin)."""
        return self.sha256 == _sha256(builtin_template_source())

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render messages (and tools) to the prompt text.

        Validates the messages first (TemplateError naming the message index). Extra keyword
        arguments are passed to the template as variables. A template that raises, runs longer
        than `time_limit_s` (+ 0.2 ms per message), or produces more than `max_output_chars` (+ 4 x the input size)
        characters gives a TemplateError.
        """
        messages = validate_messages(messages)
        tools = validate_tools(tools)
        variables = {**self.special_tokens, **extra, "messages": messages, "tools": tools,
                     "add_generation_prompt": add_generation_prompt}
        max_chars = self.max_output_chars + _INPUT_SLACK * _input_chars(messages, tools, extra)
        limits = _Limits(self.time_limit_s + _TIME_PER_MESSAGE_S * len(messages), max_chars)
        self._env.limits = limits
        try:
            return self._generate(self._template, variables, limits)
        except TemplateError:
            raise
        except _LimitExceeded as exc:
            raise TemplateError(f"chat template from {self.origin} was stopped: {exc}") from None
        except _TemplateRaised as exc:
            raise TemplateError(f"chat template from {self.origin} refused the messages: "
                                f"{str(exc)[:300]}") from None
        except (jinja2.TemplateError, RecursionError, ArithmeticError, TypeError, ValueError,
                LookupError, AttributeError, MemoryError) as exc:
            raise TemplateError(f"chat template from {self.origin} failed: "
                                f"{type(exc).__name__}: {str(exc)[:300]}") from exc

    def _generate(self, template: jinja2.Template, variables: dict, limits: _Limits) -> str:
        chunks, size = [], 0
        with _Deadline(limits):
            for chunk in template.generate(**variables):
                size += len(chunk)
                if size > limits.max_chars:
                    raise _LimitExceeded(f"the rendered prompt is longer than {limits.max_chars} "
                                         "characters")
                chunks.append(chunk)
        return "".join(chunks)

    def _compile(self) -> tuple[_LimitedSandbox, jinja2.Template]:
        env = _LimitedSandbox()
        try:
            return env, env.compile_source(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template from {self.origin} has a syntax error at line "
                                f"{exc.lineno}: {exc.message}") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TemplateError(f"{path} is not readable JSON ({exc}); restore it from the "
                            "original checkpoint") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{path} must hold a JSON object")
    return data


def _special_token_strings(config: dict) -> dict[str, str]:
    """bos_token, eos_token, ... from tokenizer_config.json (strings or {"content": ...})."""
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token",
                "mask_token"):
        value = config.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _find_template(path: Path, config: dict) -> tuple[str, str] | None:
    """(source, origin) of the folder's own template, or None."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"{jinja_file} is not readable UTF-8 text ({exc})") from None
    json_file = path / "chat_template.json"
    for file, data in ((json_file, _read_json(json_file)), (path / "tokenizer_config.json", config)):
        if "chat_template" in data:
            return _template_field(data["chat_template"], file), str(file)
    return None


def _template_field(value: Any, file: Path) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, Mapping) and entry.get("name") == "default":
                if isinstance(entry.get("template"), str):
                    return entry["template"]
        raise TemplateError(f"{file}: chat_template is a list without a 'default' template")
    raise TemplateError(f"{file}: chat_template must be a string or a list of "
                        "{name, template} objects")


__all__ = ["ChatTemplate", "TemplateError", "builtin_template_source", "validate_messages",
           "validate_tools", "ROLES"]
