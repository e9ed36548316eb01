"""`ernie-edge` command line. Each subcommand has an `_add_NAME` function (its flags) and a
`_run_NAME` function (flags -> typed settings -> the library); argparse namespaces never leave
this file, and longer output logic lives in cli_*.py modules.

Errors caused by input (ErnieEdgeError, bad flags, invalid numbers from a model, files that
cannot be read or written) print one line and exit with code 2; Ctrl-C exits with 130; a closed
stdout pipe (`ernie-edge info M | head -1`) exits quietly with 141. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import ErnieEdgeError, one_line
from .formats.recipe import DENSE_BITS, EXPERT_BITS, GROUP_SIZES

DESCRIPTION = ("Run ERNIE-4.5-21B-A3B-Thinking offline: convert a Hugging Face checkpoint once, then "
               "chat, generate or benchmark with the converted model.")
EPILOG = ("--model takes a name from `ernie-edge list` (the models store, where convert puts models), "
          "a converted folder, or, with --backend reference, an HF checkpoint folder or cached repo id.")
EXIT_USAGE, EXIT_CANCELLED, EXIT_BROKEN_PIPE = 2, 130, 141


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _check_writable(path: Path | None, flag: str) -> None:
    """Fail before a long run, not after it, when `flag PATH` cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise ErnieEdgeError(f"{flag} {path}: is a folder; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ErnieEdgeError(f"{flag} {path}: cannot write there ({parent} is not a writable folder)")


def _save_json(path: Path | None, obj, flag: str = "--json") -> None:
    """--json OUT: write the figures as JSON (nothing when the flag is absent)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2))
    except OSError as e:
        raise ErnieEdgeError(f"{flag} {path}: cannot write it: {e.strerror or e} (the report is printed "
                             "above)") from None


def _read_text(name: str, what: str) -> str:
    """A file's text, or stdin's for "-"."""
    try:
        if name == "-":
            return sys.stdin.read()
        return Path(name).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ErnieEdgeError(f"{what} {name}: cannot read it: {getattr(e, 'strerror', None) or e}") from None


def _read_json_file(name: str | Path, what: str):
    text = _read_text(str(name), what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ErnieEdgeError(f"{what} {name}: cannot read JSON: {e}") from None


# ---- flags shared by the commands that run a model -----------------------------------------------

def _add_model_arg(p, help_extra: str = "", required: bool = True) -> None:
    p.add_argument("--model", required=required, metavar="NAME|PATH",
                   help="model: a name from `ernie-edge list`, or a converted folder" + help_extra)


def _add_model_flags(p, model_required: bool = True) -> None:
    from .model import BACKENDS
    _add_model_arg(p, "; an HF folder or cached repo id only with --backend reference"
                   + ("" if model_required else "; default: the built-in demo model"), model_required)
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default): the kernels, for converted models; reference: the slow numpy "
                        "spec, which also runs unconverted HF checkpoints")
    p.add_argument("--threads", type=_int_at_least(0), default=None, help="kernel threads (default: all cores)")
    p.add_argument("--ctx-size", type=_int_at_least(16), default=None, metavar="N",
                   help="context: prompt + answer tokens at most (default: the model's 131072); "
                        "also caps the KV cache's memory")
    _add_kv_dtype_flag(p)
    _add_device_flags(p)


def _add_device_flags(p) -> None:
    from .placement import DEVICES
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="cpu (default); cuda: an NVIDIA GPU (attention, shared experts, router and KV cache on "
                        "it, routed experts as --gpu-experts says); auto: the GPU when there is one, fitted to "
                        "its free memory. The placement and its memory estimate are printed before loading")
    p.add_argument("--gpu-experts", default=None, metavar="all|none|N",
                   help="with a GPU: the MoE layers whose routed experts go on it: all, none (all on the CPU), "
                        "or N (the first N; the rest run on the CPU). Default: as many as fit")


def _add_kv_dtype_flag(p) -> None:
    from .model import KV_DTYPES
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="f16",
                   help="KV cache storage: f16 (default), or i8: half the memory and faster at long contexts, "
                        "slightly less exact (converted models only)")


def _add_sampling_flags(p) -> None:
    g = p.add_argument_group("sampling (defaults: the model's generation_config.json)")
    g.add_argument("--max-tokens", metavar="N", type=_int_at_least(1), default=None,
                   help="at most this many generated tokens, thinking included (default: up to 4096)")
    g.add_argument("--temperature", metavar="T", type=float, default=None, help="randomness; 0 = greedy (always the likeliest)")
    g.add_argument("--top-p", metavar="P", type=float, default=None, help="sample from the likeliest tokens holding this "
                                                             "much probability (1 = off)")
    g.add_argument("--top-k", metavar="K", type=_int_at_least(0), default=None, help="sample from the k likeliest tokens (0 = off)")
    g.add_argument("--min-p", metavar="P", type=float, default=None,
                   help="drop tokens less likely than this fraction of the likeliest (0 = off)")
    g.add_argument("--repetition-penalty", metavar="X", type=float, default=None,
                   help="> 1 discourages tokens already in the prompt or answer (1 = off)")
    g.add_argument("--presence-penalty", metavar="X", type=float, default=None,
                   help="-2..2: subtracted from tokens already generated (0 = off)")
    g.add_argument("--frequency-penalty", metavar="X", type=float, default=None,
                   help="-2..2: subtracted once per time a token was generated (0 = off)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the model writes TEXT (not printed); repeat for several")
    g.add_argument("--seed", metavar="N", type=int, default=None, help="random seed, for repeatable answers")
    g.add_argument("--reasoning-budget", type=_int_at_least(0), default=None, metavar="N",
                   help="at most N thinking tokens, then the model is made to answer")


def _sampling(a, model_path: Path):
    from .sampling import SamplingParams
    return SamplingParams.from_generation_config(
        model_path, max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
        min_p=a.min_p, repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty, stop=tuple(a.stop) if a.stop else None, seed=a.seed)


def _note(text: str) -> None:
    """Progress notes go to a terminal only: a script's stderr holds errors alone."""
    if sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)


def _load_model(a):
    """Load --model with its sampling settings: an unconverted checkpoint is refused unless
    --backend reference, and bad settings are found before the load; the kernels are then got
    ready, telling the user what the wait is. Returns (model, SamplingParams)."""
    from . import load
    from .model_dir import resolve
    from .models_store import conversion_advice
    location = resolve(a.model)
    if location.kind == "hf" and a.backend != "reference":
        raise ErnieEdgeError(conversion_advice(a.model, location))
    params = _sampling(a, location.path)
    model = load(a.model, backend=a.backend, threads=a.threads, kv_dtype=a.kv_dtype, max_context=a.ctx_size,
                 device=a.device, gpu_experts=a.gpu_experts)
    if model.backend_name == "cpu" and sys.stderr.isatty():
        from .kernel_warmup import console_warm_up
        console_warm_up(model)
    elif model.backend_name == "cpu":
        model.warmup()
    return model, params


def _tools(path: Path | None) -> list[dict] | None:
    if path is None:
        return None
    from .chat_template import validate_tools
    tools = _read_json_file(path, "--tools")
    try:
        return validate_tools(tools)
    except ErnieEdgeError as e:
        raise ErnieEdgeError(f"--tools {path}: {e}") from None


# ---- generate / chat / demo ----------------------------------------------------------------------

def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="one chat turn: the answer streams as it is generated",
                       description="One chat turn: render the chat template, generate, stream the answer.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user message; - reads it from stdin")
    src.add_argument("--prompt-file", metavar="FILE", help="read the user message from FILE (- = stdin)")
    src.add_argument("--messages", metavar="FILE", help="JSON file: a list of OpenAI-style messages (- = stdin)")
    p.add_argument("--system", default=None, help="system prompt (with --prompt / --prompt-file)")
    p.add_argument("--tools", type=Path, default=None, metavar="FILE",
                   help="JSON file: a list of OpenAI tool definitions")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end: reasoning "
                   "(and reasoning_content), content, tool_calls, finish_reason, usage, timings")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--show-thinking", action="store_true",
                       help="print the thinking before the answer even when stdout is not a terminal")
    shown.add_argument("--hide-thinking", action="store_true", help="print the answer only, also on a terminal")
    _add_model_flags(p)
    _add_sampling_flags(p)
    p.set_defaults(func=_run_generate)


def _messages(a) -> list[dict]:
    if a.messages is not None:
        from .chat_template import validate_messages
        messages = _read_json_file(a.messages, "--messages")
        try:
            return validate_messages(messages)
        except ErnieEdgeError as e:
            raise ErnieEdgeError(f"--messages {a.messages}: {e}") from None
    if a.prompt_file is not None:
        text = _read_text(a.prompt_file, "--prompt-file")
    else:
        text = _read_text("-", "--prompt") if a.prompt == "-" else a.prompt
    if not text.strip():
        raise ErnieEdgeError("the prompt is empty")
    system = [{"role": "system", "content": a.system}] if a.system else []
    return system + [{"role": "user", "content": text}]


def _run_generate(a) -> int:
    from .cli_generate import GenerateSettings, run_generate, wants_color
    messages, tools = _messages(a), _tools(a.tools)
    model, params = _load_model(a)
    show = a.show_thinking or (sys.stdout.isatty() and not a.hide_thinking)
    settings = GenerateSettings(params=params, tools=tools, reasoning_budget=a.reasoning_budget,
                                max_context=a.ctx_size, json=a.json, show_thinking=show,
                                color=wants_color(sys.stdout))
    return run_generate(model, messages, settings)


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat in the terminal (/help lists its commands)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--tools", type=Path, default=None, metavar="FILE",
                   help="JSON file: OpenAI tool definitions the model may call (answer with /tool RESULT)")
    p.add_argument("--hide-thinking", action="store_true", help="do not print the reasoning (/think toggles it)")
    _add_model_flags(p)
    _add_sampling_flags(p)
    p.set_defaults(func=_run_chat)


def _run_chat(a) -> int:
    from .cli_generate import wants_color
    from .paths import chat_history_file
    from .terminal_chat import ChatSettings, TerminalChat
    tools = _tools(a.tools)
    model, params = _load_model(a)
    settings = ChatSettings(system=a.system, show_thinking=not a.hide_thinking, reasoning_budget=a.reasoning_budget,
                            params=params, color=wants_color(sys.stdout), tools=tools,
                            max_context=a.ctx_size, history_file=chat_history_file())
    TerminalChat(model, settings).run()
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="chat with the built-in demo model, a tiny ERNIE trained for this "
                                       "repository (converted on first run; offline)")
    p.add_argument("--prompt", default=None, help="answer one prompt and exit (default when stdin is not a terminal)")
    p.add_argument("--rebuild", action="store_true", help="convert the demo model again")
    p.set_defaults(func=_run_demo)


def _run_demo(a) -> int:
    from .demo import DemoSettings, run_demo
    run_demo(DemoSettings(prompt=a.prompt, rebuild=a.rebuild, interactive=sys.stdin.isatty()))
    return 0


# ---- the models store: list / rm ----------------------------------------------------------------

def _add_list(sub) -> None:
    p = sub.add_parser("list", help="the models in the models store: name, size, recipe, path")
    p.add_argument("--json", action="store_true", help="print JSON: the store's path and its models")
    p.set_defaults(func=_run_list)


def _run_list(a) -> int:
    from .models_store import format_list, list_models
    from .paths import models_dir
    models = list_models()
    if a.json:
        print(json.dumps({"store": str(models_dir()), "models": [m.to_dict() for m in models]}, indent=2))
    else:
        print(format_list(models, models_dir()))
    return 0


def _add_rm(sub) -> None:
    p = sub.add_parser("rm", help="delete a model from the models store")
    p.add_argument("name", help="the model's name, as `ernie-edge list` shows it")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask (needed when stdin is not a terminal)")
    p.set_defaults(func=_run_rm)


def _run_rm(a) -> int:
    from .manifest import format_size
    from .models_store import find, remove
    from .demo import DEMO_NAME, shipped_demo_dir
    model = find(a.name)
    shipped = shipped_demo_dir()
    if shipped is not None and model.path.resolve() == shipped.resolve():
        raise ErnieEdgeError(f"rm {a.name}: {model.path} is the demo model's shipped checkpoint, part of "
                             f"ernie-edge; `ernie-edge rm {DEMO_NAME}` deletes its converted copy")
    what = f"{model.name} ({format_size(model.bytes)}, {model.path})"
    if not a.yes:
        if not sys.stdin.isatty():
            raise ErnieEdgeError(f"rm {a.name}: pass --yes to delete {what} without being asked")
        if input(f"delete {what}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("kept")
            return 0
    remove(model)
    print(f"deleted {what}")
    return 0


# ---- synth / convert / verify / info / eval ------------------------------------------------------

def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic HF-format ERNIE checkpoint (real names and shapes)")
    p.add_argument("out", type=Path, help="output folder (new or empty)")
    p.add_argument("--preset", choices=["tiny", "small", "full"], default="tiny",
                   help="tiny (default, ~1 MB), small (~40 MB), or full (the real shapes: ~44 GB)")
    p.add_argument("--layers", type=_int_at_least(1), default=None, help="number of layers (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.add_argument("--force", action="store_true", help="write into OUT even if it holds files")
    p.set_defaults(func=_run_synth)


def _run_synth(a) -> int:
    from .quant.synthetic import write_checkpoint
    out = write_checkpoint(a.out, a.preset, layers=a.layers, seed=a.seed, progress=sys.stderr.isatty(),
                           force=a.force)
    print(out)
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert an HF checkpoint (folder or cached repo id) to an int4 edge folder")
    p.add_argument("src", help="HF checkpoint folder, or a repo id in the local HF cache (`hf download REPO`)")
    p.add_argument("dst", nargs="?", type=Path, default=None,
                   help="output folder (default: the models store, as NAME-RECIPE)")
    p.add_argument("--recipe", default=None, metavar="NAME",
                   help="q{expert bits}g{group size}-d{dense bits}, then -{a|m|s|h}{bits}[g{group}] per role "
                        "(attention, layer-0 MLP, shared experts, head): q4g128-d6-s5g32 (default), q4g32-d4-h6 "
                        "(int4 but the head), q4g32-d8, q4g32-d4, ... (or the three flags below)")
    p.add_argument("--expert-bits", type=int, choices=EXPERT_BITS, default=None,
                   help="routed experts: 4 or 8 (a plain recipe: a flag not given takes 4 / 8 / 32)")
    p.add_argument("--dense-bits", type=int, choices=DENSE_BITS, default=None,
                   help="attention, layer-0 MLP, shared experts, embedding: 4, 5, 6, 8 or 16 (f16)")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                   help="weights per quantization scale: 32, 64 or 128")
    p.add_argument("--force", action="store_true", help="replace a finished DST")
    p.add_argument("--threads", type=_int_at_least(0), default=0, help="worker threads (0: all cores)")
    p.add_argument("--allow-nonfinite", action="store_true", help="zero NaN/Inf weights instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_convert)


def _recipe(a):
    """--recipe NAME; or the plain recipe the three flags describe (4, 8 and 32 for a flag not
    given, as before per-role recipes); or, with neither, the default recipe."""
    from .formats.recipe import Recipe
    bits = {"expert_bits": a.expert_bits, "dense_bits": a.dense_bits, "group_size": a.group_size}
    given = {k: v for k, v in bits.items() if v is not None}
    if a.recipe is None:
        return Recipe(**given) if given else Recipe.default()
    if given:
        raise ErnieEdgeError(f"give --recipe or --expert-bits/--dense-bits/--group-size, not both "
                             f"(--recipe {a.recipe} already sets all three)")
    return Recipe.from_name(a.recipe)


def _run_convert(a) -> int:
    from .model_dir import looks_like_path
    from .quant.convert import ConvertSettings, convert
    if looks_like_path(a.src) and not Path(a.src).expanduser().exists():
        raise ErnieEdgeError(f"{a.src}: folder not found (a repo id looks like OWNER/NAME; get one with "
                             "`hf download OWNER/NAME`)")
    settings = ConvertSettings(source=a.src, dest=a.dst, recipe=_recipe(a), force=a.force, threads=a.threads,
                               progress=not a.no_progress, allow_nonfinite=a.allow_nonfinite)
    print(convert(settings))
    return 0


def _converted(name: str):
    """The folder of a converted model (name or path), or an error saying what it is instead."""
    from .model_dir import resolve
    location = resolve(name)
    if location.kind != "edge":
        raise ErnieEdgeError(f"{name}: an unconverted HF checkpoint; this command reads converted models "
                             "(`ernie-edge convert` makes one)")
    return location.path


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check every file of a converted model against its sha256")
    p.add_argument("model", help="model name (`ernie-edge list`) or converted folder")
    p.set_defaults(func=_run_verify)


def _run_verify(a) -> int:
    from .manifest import verify
    problems = verify(_converted(a.model), progress=sys.stderr.isatty())
    for line in problems:
        print(line)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="recipe, sizes, bits per weight and memory estimate of a model")
    p.add_argument("model", help="model name (`ernie-edge list`) or converted folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run_info)


def _run_info(a) -> int:
    from .manifest import describe, format_description
    info = describe(_converted(a.model))
    print(json.dumps(info, indent=2) if a.json else format_description(info))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="KL divergence / top-1 agreement / perplexity of a quantized model vs its source")
    _add_model_arg(p)
    p.add_argument("--reference", required=True, metavar="PATH|REPO",
                   help="the unquantized model it came from: HF folder or cached repo id")
    p.add_argument("--prompts", type=_int_at_least(1), default=8, help="number of token sequences (default 8)")
    p.add_argument("--tokens", type=_int_at_least(2), default=128, help="tokens per sequence (default 128)")
    p.add_argument("--seed", type=int, default=0, help="picks the sequences")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_eval)


def _run_eval(a) -> int:
    from tqdm import tqdm
    from .quant.evaluate import EvalSettings, evaluate, format_report
    _check_writable(a.json, "--json")
    settings = EvalSettings(model=a.model, reference=a.reference, prompts=a.prompts, tokens=a.tokens, seed=a.seed)
    with tqdm(total=a.prompts, desc="eval", unit="seq", disable=a.no_progress) as bar:
        report = evaluate(settings, on_sequence=lambda done, total: bar.update(1))
    print(format_report(report))
    _save_json(a.json, report)
    return 0


# ---- bench ---------------------------------------------------------------------------------------

def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="prefill/decode speed, time to first token, memory, bandwidth fraction")
    _add_model_arg(p)
    p.add_argument("--prompt-tokens", type=_int_at_least(1), default=512, help="prefill length (default 512)")
    p.add_argument("--gen-tokens", type=_int_at_least(1), default=128, help="decode steps (default 128)")
    p.add_argument("--threads", type=_int_at_least(0), default=None, help="kernel threads (default: all cores)")
    p.add_argument("--ctx-size", type=_int_at_least(16), default=None, metavar="N",
                   help="context the model is loaded with (default: the model's); at least prompt + gen tokens")
    _add_kv_dtype_flag(p)
    _add_device_flags(p)
    p.add_argument("--seed", type=int, default=0, help="picks the random prompt")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=_run_bench)


def _run_bench(a) -> int:
    from .bench import BenchSettings, format_bench, run_bench
    _check_writable(a.json, "--json")
    result = run_bench(BenchSettings(model=a.model, prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens,
                                     threads=a.threads, seed=a.seed, max_context=a.ctx_size, kv_dtype=a.kv_dtype,
                                     device=a.device, gpu_experts=a.gpu_experts))
    print(format_bench(result))
    _save_json(a.json, result)
    return 0


# ---- serve ---------------------------------------------------------------------------------------

def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API on localhost (docs/API.md)")
    _add_model_flags(p, model_required=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; anything "
                                                      "else needs --api-key)")
    p.add_argument("--port", type=_int_at_least(1), default=8080, help="TCP port (default 8080)")
    p.add_argument("--unix-socket", type=Path, default=None, help="listen on this unix socket (mode 0600) instead")
    p.add_argument("--ctx", type=_int_at_least(16), default=None, metavar="N",
                   help="context per request, prompt + answer (default 8192; same as --ctx-size)")
    p.add_argument("--slots", type=_int_at_least(1), default=2, help="requests decoded together (default 2)")
    p.add_argument("--queue-size", type=_int_at_least(1), default=16, help="requests that may wait for a slot")
    p.add_argument("--prefill-chunk", type=_int_at_least(1), default=64, metavar="N",
                   help="prompt tokens a joining request feeds per step, so running streams keep flowing "
                        "(default 64)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or set ERNIE_EDGE_API_KEY)")
    p.add_argument("--api-key-file", type=Path, default=None, help="read the key from a file (mode 0600)")
    p.add_argument("--allow-origin", action="append", default=[], help="a browser origin allowed to call the API")
    p.add_argument("--allow-host", action="append", default=[], help="an extra Host header value to accept")
    p.add_argument("--reasoning-field", choices=["reasoning_content", "reasoning", "both"],
                   default="reasoning_content", help="where responses put the model's reasoning")
    p.add_argument("--model-name", default=None, help="the model id clients see (default: the folder name)")
    p.set_defaults(func=_run_serve)


def _run_serve(a) -> int:
    from dataclasses import replace

    from .model_dir import resolve
    from .models_store import conversion_advice
    from .server import ServeSettings, serve
    from .server.settings import DEFAULT_CONTEXT, read_api_key_file
    if a.ctx and a.ctx_size and a.ctx != a.ctx_size:
        raise ErnieEdgeError(f"--ctx {a.ctx} and --ctx-size {a.ctx_size} disagree; give one")
    key = read_api_key_file(a.api_key_file) if a.api_key_file else a.api_key or os.environ.get("ERNIE_EDGE_API_KEY")
    settings = ServeSettings(
        model=a.model, host=a.host, port=a.port, unix_socket=a.unix_socket, api_key=key,
        allow_origins=tuple(a.allow_origin), allow_hosts=tuple(a.allow_host),
        context=a.ctx or a.ctx_size or DEFAULT_CONTEXT, slots=a.slots, queue_size=a.queue_size,
        prefill_chunk=a.prefill_chunk, threads=a.threads, kv_dtype=a.kv_dtype, device=a.device,
        gpu_experts=a.gpu_experts, reasoning_field=a.reasoning_field, model_name=a.model_name)
    settings.check()  # unsafe exposure is refused before anything is loaded
    if a.model is None:
        from .demo import ensure_demo_model
        demo = ensure_demo_model()
        print(f"no --model given: serving the built-in demo model ({demo})", file=sys.stderr, flush=True)
        return serve(replace(settings, model=str(demo)))
    location = resolve(a.model)
    if location.kind == "hf" and a.backend != "reference":
        raise ErnieEdgeError(conversion_advice(a.model, location))
    return serve(replace(settings, model=str(location.path)))


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

COMMANDS = (_add_demo, _add_generate, _add_chat, _add_list, _add_rm, _add_convert, _add_verify, _add_info,
            _add_eval, _add_bench, _add_synth, _add_serve, _add_gui, _add_install_desktop)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(prog="ernie-edge", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"ernie-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = f"ernie-edge {args.command}"
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is seen below and not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`| head -1`): point stdout at devnull so the exit flush is silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except (ErnieEdgeError, FloatingPointError, OSError) as e:
        print(f"{name}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
