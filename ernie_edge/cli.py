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
    from .quant.recipe import Recipe
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
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))
    return 0


# ---- main ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ernie-edge", description=__doc__.split("\n")[0])
    from . import __version__
    parser.add_argument("--version", action="version", version=f"ernie-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_convert, _add_verify, _add_info, _add_eval):
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
