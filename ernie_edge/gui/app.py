"""`ernie-edge-gui [--model PATH|NAME]`: the desktop app's entry point (a gui-script: no console
window on Windows)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .launch import GuiSettings, run_gui


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie-edge-gui", description="Chat with ERNIE offline, in a window.")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `ernie-edge-gui`, shared with `ernie-edge gui`."""
    p.add_argument("--model", default=None, help="model folder, or the name of one in the models store")
    p.add_argument("--theme", choices=["system", "light", "dark"], default=None,
                   help="colours: follow the system (default), light or dark")
    p.add_argument("--data-dir", type=Path, default=None, help="where the chat history lives")
    p.add_argument("--config-dir", type=Path, default=None, help="where the settings live")


def settings_from(a: argparse.Namespace) -> GuiSettings:
    return GuiSettings(model=a.model, data_dir=a.data_dir, config_dir=a.config_dir, theme=a.theme,
                       demo_on_first_start=True)


def main(argv: list[str] | None = None) -> int:
    return run_gui(settings_from(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
