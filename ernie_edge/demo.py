"""The built-in demo model: a tiny ERNIE-4.5 MoE trained in this repository
(benchmarks/train_demo.py, models/demo/README.md). It has the real architecture, tokenizer files and
chat format, a few MB of weights, and it really talks: it reasons briefly, answers in
`<response>`, and calls the get_weather and calculator tools when they are offered.

Its Hugging Face checkpoint ships in `models/demo/` (an installed wheel carries it in
`share/ernie-edge/demo/`). The first use converts it into the models store as `ernie-demo`, and
converts it again whenever the shipped checkpoint (or ernie-edge's format) changes; a lock keeps two
programs starting at once (the app, `serve`, `demo`) from converting it twice.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import operator
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import ErnieEdgeError, ModelNotFoundError
from .paths import models_dir

DEMO_NAME = "ernie-demo"
DEMO_RECIPE = "q4g32-d8"  # int4 experts, int8 dense: the tiny model keeps its weights close
DEMO_PROMPT = "What is 47 + 38?"
DEMO_KEEP_TURNS = 1  # it was trained on single questions: the chat sends it the current one (with its tool exchange)
SOURCE_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                "tokenizer_config.json", "special_tokens_map.json")


def function_tool(name: str, description: str, parameter: str, parameter_description: str) -> dict:
    """An OpenAI-style function tool with one required string parameter."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object",
                       "properties": {parameter: {"type": "string", "description": parameter_description}},
                       "required": [parameter]}}}


# The tools the demo model was trained to call (benchmarks/demo_data.py); `ernie-edge demo`, the
# desktop app's first start and the tests offer them in this exact form.
WEATHER_TOOL = function_tool("get_weather", "Get the current weather in a city", "city",
                             "The city name, e.g. Paris")
CALCULATOR_TOOL = function_tool("calculator", "Evaluate an arithmetic expression exactly", "expression",
                                "The expression, e.g. 1234 * 56")
DEMO_TOOLS = (WEATHER_TOOL, CALCULATOR_TOOL)


# ---- the shipped checkpoint and its converted copy ------------------------------------------

def _candidates() -> tuple[Path, ...]:
    return (Path(__file__).resolve().parent.parent / "models" / "demo",
            Path(sys.prefix) / "share" / "ernie-edge" / "demo")


def shipped_demo_dir() -> Path | None:
    """The shipped HF checkpoint, or None: models/demo in a source checkout, share/ernie-edge/demo
    in an installed wheel."""
    return next((folder for folder in _candidates() if (folder / "config.json").is_file()), None)


def demo_source_dir() -> Path:
    """shipped_demo_dir(), or an error saying where it was looked for."""
    folder = shipped_demo_dir()
    if folder is None:
        raise ModelNotFoundError("the demo checkpoint is missing (looked in " + ", ".join(map(str, _candidates()))
                                 + "); check out the repository again or reinstall ernie-edge")
    return folder


def source_digest(folder: Path) -> str:
    """sha256 over the checkpoint's files and the converter's version: the converted copy is
    rebuilt when this changes."""
    from .quant.convert import CREATED_BY

    h = hashlib.sha256(CREATED_BY.encode())
    for name in SOURCE_FILES:
        path = folder / name
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: missing from the demo checkpoint; check out the "
                                     "repository again or reinstall ernie-edge")
        h.update(f"\0{name}\0".encode())
        h.update(path.read_bytes())  # a few MB in all
    return h.hexdigest()


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on lock_path (blocking): one process converts, the others wait and
    then find the folder ready."""
    with open(lock_path, "a+b") as f:
        try:
            import fcntl
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # Windows
            import msvcrt
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
        yield  # the lock goes with the file's close


def ensure_demo_model(rebuild: bool = False, log=None) -> Path:
    """The converted demo model in the models store, converted first if it is missing, stale or
    `rebuild` is asked. log(text): progress notes (default: stderr)."""
    from .formats.recipe import Recipe
    from .model_dir import MANIFEST_NAME
    from .quant.convert import ConvertSettings, convert

    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    source = demo_source_dir()
    digest = source_digest(source)
    store = models_dir()
    store.mkdir(parents=True, exist_ok=True)
    dest, stamp = store / DEMO_NAME, store / f".{DEMO_NAME}.source-sha256"
    with _exclusive(store / f".{DEMO_NAME}.lock"):
        fresh = (dest / MANIFEST_NAME).is_file() and stamp.is_file() and stamp.read_text().strip() == digest
        if fresh and not rebuild:
            return dest
        log(f"converting the demo model {source} -> {dest} ...")
        convert(ConvertSettings(source=str(source), dest=dest, recipe=Recipe.from_name(DEMO_RECIPE),
                                force=True, progress=False, threads=1))
        tmp = stamp.with_suffix(".tmp")
        tmp.write_text(digest + "\n")
        os.replace(tmp, stamp)  # written after the folder is complete: a crash before means reconvert
    return dest


# ---- the calculator the demo runs for the model -----------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
MAX_DIGITS = 60


def calculate(expression: str) -> int | float:
    """Evaluate an arithmetic expression: numbers, + - * / // %, unary minus, parentheses. Nothing
    else is evaluated (no names, calls or powers). Raises ErnieEdgeError naming what is wrong."""
    try:
        tree = ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        raise ErnieEdgeError(f"calculator: {expression!r} is not an arithmetic expression") from None

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            try:
                result = _OPS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ErnieEdgeError(f"calculator: division by zero in {expression!r}") from None
            if isinstance(result, int) and len(str(abs(result))) > MAX_DIGITS:
                raise ErnieEdgeError(f"calculator: the result of {expression!r} has over {MAX_DIGITS} digits")
            return result
        raise ErnieEdgeError(f"calculator: {expression!r}: only numbers, + - * / // % and parentheses")

    result = value(tree.body)
    if isinstance(result, float) and result.is_integer() and abs(result) < 2 ** 53:
        return int(result)
    return result


def run_demo_tool(name: str, arguments: str) -> str | None:
    """The demo's tool runner: calculator calls are evaluated here (the result as JSON, as the
    model was trained to read it); get_weather needs the internet, so the user answers it (None)."""
    if name != "calculator":
        return None
    try:
        expression = json.loads(arguments)["expression"]
        return json.dumps({"result": calculate(str(expression))})
    except (ValueError, KeyError, TypeError, ErnieEdgeError) as e:
        return json.dumps({"error": str(e)})


# ---- `ernie-edge demo` ----------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoSettings:
    prompt: str | None = None
    rebuild: bool = False
    interactive: bool = True
    max_tokens: int = 256


def run_demo(settings: DemoSettings) -> None:
    from . import load
    from .kernel_warmup import console_warm_up
    from .sampling import SamplingParams
    from .terminal_chat import ChatSettings, TerminalChat

    model = load(ensure_demo_model(settings.rebuild))
    console_warm_up(model)
    # Greedy: a tiny model is at its most accurate at temperature 0.
    params = SamplingParams(temperature=0.0, max_tokens=settings.max_tokens)
    chat = TerminalChat(model, ChatSettings(params=params, tools=[dict(t) for t in DEMO_TOOLS],
                                            run_tool=run_demo_tool, keep_turns=DEMO_KEEP_TURNS))
    if settings.prompt is None and settings.interactive:
        chat.write("The demo model: a tiny ERNIE-4.5 MoE trained for this repository. Ask it small sums "
                   "(What is 47 + 38?), unit conversions, capitals and currencies, or the weather "
                   "(it calls get_weather: answer with /tool RESULT); bigger arithmetic goes to the "
                   "calculator, which runs here. English or Chinese.\n")
        chat.run()
        return
    prompt = settings.prompt or DEMO_PROMPT
    chat.write(f"demo model: {model.path}\nyou> {prompt}\n")
    chat.answer(prompt)
