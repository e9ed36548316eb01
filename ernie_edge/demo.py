"""The built-in offline demo: a tiny synthetic ERNIE checkpoint (real names, tokenizer and chat
format; random weights), converted to the edge format on first run, then a chat with it.

Random weights write random text: the demo shows the whole pipeline working offline (template,
tokenizer, int4 model, thinking kept apart from the answer, speed), not language ability.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .paths import models_dir

DEMO_PROMPT = "Hello! What can you do offline?"


@dataclass(frozen=True)
class DemoSettings:
    prompt: str | None = None
    rebuild: bool = False
    interactive: bool = True
    reasoning_budget: int = 24
    max_tokens: int = 64


def ensure_demo_model(rebuild: bool = False) -> Path:
    """Build (once) and return the converted demo model folder in the models store."""
    from .formats.recipe import Recipe
    from .quant.convert import ConvertSettings, convert
    from .quant.synthetic import write_checkpoint

    store = models_dir()
    hf_dir, edge_dir = store / "demo-tiny-hf", store / "demo-tiny"
    if rebuild:
        for d in (edge_dir, hf_dir):
            shutil.rmtree(d, ignore_errors=True)
    if not (edge_dir / "manifest.json").is_file():
        if not (hf_dir / "config.json").is_file():
            print(f"building the demo checkpoint in {hf_dir} ...", file=sys.stderr)
            tmp = store / "demo-tiny-hf.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            write_checkpoint(tmp, "tiny", seed=0)
            tmp.rename(hf_dir)  # config.json appears only in a finished folder
        print(f"converting it to {edge_dir} ...", file=sys.stderr)
        # q4g32-d8 (int8 dense): the default recipe is sized against llama.cpp at the 21B shapes;
        # a tiny model keeps the closest one to its weights at no cost.
        convert(ConvertSettings(source=str(hf_dir), dest=edge_dir, recipe=Recipe(), progress=False, force=True))
    return edge_dir


def run_demo(settings: DemoSettings) -> None:
    from . import load
    from .sampling import SamplingParams
    from .terminal_chat import ChatSettings, TerminalChat

    model = load(ensure_demo_model(settings.rebuild))
    print("preparing kernels (the first run compiles them, later runs load them from the cache) ...",
          file=sys.stderr, flush=True)
    print(f"kernels ready in {model.warmup():.1f} s", file=sys.stderr, flush=True)
    # A little repetition penalty: random weights otherwise settle into repeating one token.
    params = SamplingParams.from_generation_config(model.path, max_tokens=settings.max_tokens, seed=0,
                                                   repetition_penalty=1.3)
    chat = TerminalChat(model, ChatSettings(reasoning_budget=settings.reasoning_budget, params=params))
    if settings.prompt is None and settings.interactive:
        chat.run()
        return
    prompt = settings.prompt or DEMO_PROMPT
    chat.write(f"demo model: {model.path} (random weights: expect random words)\nyou> {prompt}\n")
    chat.answer(prompt)
