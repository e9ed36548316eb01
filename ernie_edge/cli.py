"""`ernie-edge` command line. Each subcommand parses its flags into typed settings and calls the
library; argparse namespaces never leave this file. Errors caused by input (ErnieEdgeError) print
one clear message and exit with code 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ErnieEdgeError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _save_json(path: Path | None, obj) -> None:
    """--json OUT: write the figures as JSON (nothing when the flag is absent)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2))


# ---- synth -------------------------------------------------------------------------------------

def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic HF-format ERNIE checkpoint (real names and shapes)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--preset", choices=["tiny", "small", "full"], default="tiny")
    p.add_argument("--layers", type=_positive_int, default=None, help="number of layers (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_synth)


def _run_synth(a) -> int:
    from .quant.synthetic import write_checkpoint
    out = write_checkpoint(a.out, a.preset, layers=a.layers, seed=a.seed, progress=sys.stderr.isatty())
    print(out)
    return 0


# ---- convert / verify / info / eval --------------------------------------------------------------

def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert an HF checkpoint (folder or cached repo id) to an int4 edge folder")
    p.add_argument("src", help="HF checkpoint folder, or a repo id in the local HF cache")
    p.add_argument("dst", nargs="?", type=Path, default=None, help="output folder (default: the models store)")
    p.add_argument("--expert-bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--dense-bits", type=int, choices=[4, 8, 16], default=8)
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=32)
    p.add_argument("--force", action="store_true", help="replace a finished DST")
    p.add_argument("--threads", type=_positive_int, default=0, help="worker threads (0: all cores)")
    p.add_argument("--allow-nonfinite", action="store_true", help="zero NaN/Inf weights instead of failing")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_convert)


def _run_convert(a) -> int:
    from .quant.convert import ConvertSettings, convert
    from .formats.recipe import Recipe
    settings = ConvertSettings(
        source=a.src, dest=a.dst,
        recipe=Recipe(expert_bits=a.expert_bits, dense_bits=a.dense_bits, group_size=a.group_size),
        force=a.force, threads=a.threads, progress=not a.no_progress, allow_nonfinite=a.allow_nonfinite)
    print(convert(settings))
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check every file of a converted folder against its sha256")
    p.add_argument("model", type=Path)
    p.set_defaults(func=_run_verify)


def _run_verify(a) -> int:
    from .manifest import verify
    problems = verify(a.model, progress=sys.stderr.isatty())
    for line in problems:
        print(line)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="recipe, sizes, bits per weight and memory estimate of a model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run_info)


def _run_info(a) -> int:
    from .manifest import describe, format_description
    from .model_dir import resolve
    info = describe(resolve(a.model).path)
    print(json.dumps(info, indent=2) if a.json else format_description(info))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="KL divergence / top-1 agreement / perplexity of a quantized model vs its source")
    p.add_argument("--model", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--prompts", type=_positive_int, default=8)
    p.add_argument("--tokens", type=_positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    p.set_defaults(func=_run_eval)


def _run_eval(a) -> int:
    from .quant.evaluate import EvalSettings, evaluate, format_report
    report = evaluate(EvalSettings(model=a.model, reference=a.reference, prompts=a.prompts,
                                   tokens=a.tokens, seed=a.seed))
    print(format_report(report))
    _save_json(a.json, report)
    return 0


# ---- generate / chat / demo ----------------------------------------------------------------------

def _add_sampling_flags(p) -> None:
    g = p.add_argument_group("sampling (defaults: the model's generation_config.json)")
    g.add_argument("--max-tokens", type=_positive_int, default=None)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=_positive_int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--reasoning-budget", type=_positive_int, default=None,
                   help="at most this many thinking tokens, then the model is made to answer")


def _add_model_flags(p) -> None:
    p.add_argument("--threads", type=_positive_int, default=None, help="kernel threads (default: all cores)")
    _add_kv_dtype_flag(p)


def _add_kv_dtype_flag(p) -> None:
    from .model import KV_DTYPES
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="f16",
                   help="KV cache storage: f16 (default), or i8: half the memory and faster at long contexts, "
                        "slightly less exact (converted models only)")


def _load_model(a):
    """Load --model and get its kernels ready, telling the user what the wait is."""
    from . import load
    model = load(a.model, threads=a.threads, kv_dtype=a.kv_dtype)
    if model.backend_name == "cpu":
        print("preparing kernels (the first run compiles them, later runs load them from the cache) ...",
              file=sys.stderr, flush=True)
        print(f"kernels ready in {model.warmup():.1f} s", file=sys.stderr, flush=True)
    return model


def _sampling(a, model):
    from .sampling import SamplingParams
    return SamplingParams.from_generation_config(
        model.path, max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
        min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed)


def _read_json_file(path: Path, what: str):
    from .errors import ErnieEdgeError
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ErnieEdgeError(f"{what} {path}: cannot read JSON: {e}") from None


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="one chat turn: render the template, generate, print the answer")
    p.add_argument("--model", required=True, help="model folder (converted or HF) or cached repo id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user message")
    src.add_argument("--messages", type=Path, help="JSON file: a list of OpenAI-style messages")
    p.add_argument("--system", default=None, help="system prompt (with --prompt)")
    p.add_argument("--tools", type=Path, default=None, help="JSON file: a list of OpenAI tool definitions")
    p.add_argument("--json", action="store_true", help="print one JSON object with reasoning, content, "
                                                       "tool_calls, finish_reason, usage, timings")
    _add_model_flags(p)
    _add_sampling_flags(p)
    p.set_defaults(func=_run_generate)


def _run_generate(a) -> int:
    from .generate import generate, render_prompt
    model = _load_model(a)
    if a.messages is not None:
        messages = _read_json_file(a.messages, "--messages")
    else:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": a.prompt}]
    tools = _read_json_file(a.tools, "--tools") if a.tools else None
    ids = render_prompt(model, messages, tools=tools)
    result = generate(model, ids, _sampling(a, model), reasoning_budget=a.reasoning_budget)
    if a.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return 0
    for call in result.tool_calls:
        print(f"[tool call] {call.name}({call.arguments})")
    if result.content is not None:
        print(result.content)
    elif not result.tool_calls:
        print(f"(no answer: the model was still thinking when it stopped ({result.finish_reason}); "
              "raise --max-tokens or set --reasoning-budget)", file=sys.stderr)
    return 0


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat in the terminal")
    p.add_argument("--model", required=True)
    p.add_argument("--system", default=None)
    p.add_argument("--hide-thinking", action="store_true", help="do not print the reasoning")
    _add_model_flags(p)
    _add_sampling_flags(p)
    p.set_defaults(func=_run_chat)


def _run_chat(a) -> int:
    from .terminal_chat import ChatSettings, TerminalChat
    model = _load_model(a)
    settings = ChatSettings(system=a.system, show_thinking=not a.hide_thinking,
                            reasoning_budget=a.reasoning_budget, params=_sampling(a, model))
    TerminalChat(model, settings).run()
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: build the tiny synthetic model (first run) and chat with it")
    p.add_argument("--prompt", default=None, help="answer one prompt and exit (default when stdin is not a terminal)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the demo model")
    p.set_defaults(func=_run_demo)


def _run_demo(a) -> int:
    from .demo import DemoSettings, run_demo
    run_demo(DemoSettings(prompt=a.prompt, rebuild=a.rebuild, interactive=sys.stdin.isatty()))
    return 0


# ---- bench ---------------------------------------------------------------------------------------

def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="prefill/decode speed, time to first token, memory, bandwidth fraction")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=_positive_int, default=512)
    p.add_argument("--gen-tokens", type=_positive_int, default=128)
    p.add_argument("--threads", type=_positive_int, default=None, help="kernel threads (default: all cores)")
    _add_kv_dtype_flag(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    p.set_defaults(func=_run_bench)


def _run_bench(a) -> int:
    from .bench import BenchSettings, format_bench, run_bench
    result = run_bench(BenchSettings(model=a.model, prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens,
                                     threads=a.threads, seed=a.seed, kv_dtype=a.kv_dtype))
    print(format_bench(result))
    _save_json(a.json, result)
    return 0


# ---- gui / install-desktop ---------------------------------------------------------------------------

def _add_gui(sub) -> None:
    from .gui.app import add_arguments  # argparse only: Qt is imported when the window opens
    p = sub.add_parser("gui", help="open the desktop app (same as ernie-edge-gui)")
    add_arguments(p)
    p.set_defaults(func=_run_gui)


def _run_gui(a) -> int:
    from .gui.app import settings_from
    from .gui.launch import run_gui
    return run_gui(settings_from(a))


def _add_install_desktop(sub) -> None:
    p = sub.add_parser("install-desktop", help="add the desktop app to the applications menu (freedesktop)")
    p.set_defaults(func=_run_install_desktop)


def _run_install_desktop(a) -> int:
    from .gui.launch import install_desktop
    for path in install_desktop():
        print(path)
    return 0


# ---- main ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ernie-edge", description=__doc__.split("\n")[0])
    from . import __version__
    parser.add_argument("--version", action="version", version=f"ernie-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_generate, _add_chat, _add_synth, _add_convert, _add_verify,
                _add_info, _add_eval, _add_bench, _add_gui, _add_install_desktop):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ErnieEdgeError as e:
        print(f"ernie-edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ernie-edge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
