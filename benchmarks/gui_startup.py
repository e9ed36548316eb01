"""Time from launching `ernie-edge-gui` to its window's first paint (the goal: under 2 s; the
model then loads in the background).

    python benchmarks/gui_startup.py [--runs 5] [--model DIR] [--json OUT]

Runs `python -m ernie_edge.gui.app` with ERNIE_EDGE_GUI_TIMING=exit (it prints when the window
first paints, then quits) on a fresh history, under Qt's offscreen platform and, when xvfb-run is
installed, under a real X server (Xvfb, started once before the runs). Figures: seconds from process start, per run, and the median.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_xvfb() -> tuple[subprocess.Popen, str]:
    """An X server for the runs (started once: its own start-up is not the app's)."""
    proc = subprocess.Popen(["Xvfb", "-displayfd", "1", "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc, ":" + proc.stdout.readline().strip()


def one_run(platform: str, model: str | None, display: str | None = None) -> float:
    with tempfile.TemporaryDirectory() as home:
        cmd = [sys.executable, "-m", "ernie_edge.gui.app", "--data-dir", home, "--config-dir", home]
        if model:
            cmd += ["--model", model]
        env = dict(os.environ, ERNIE_EDGE_GUI_TIMING="exit", PYTHONPATH=str(ROOT))
        if platform == "offscreen":
            env["QT_QPA_PLATFORM"] = "offscreen"
        else:
            env.pop("QT_QPA_PLATFORM", None)
            env["DISPLAY"] = display
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        for line in proc.stdout:
            if line.startswith("painted"):
                elapsed = time.perf_counter() - t0
                break
        else:
            raise RuntimeError(f"the app never painted ({platform})")
        proc.wait(30)
        return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--model", default=None, help="also open this model (it loads in the background)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "gui_startup.json")
    a = p.parse_args()
    platforms = ["offscreen"] + (["xvfb"] if shutil.which("Xvfb") else [])
    result = {}
    xvfb, display = start_xvfb() if "xvfb" in platforms else (None, None)
    try:
        for platform in platforms:
            times = [round(one_run(platform, a.model, display), 3) for _ in range(a.runs)]
            result[platform] = {"runs_s": times, "median_s": round(statistics.median(times), 3)}
            print(f"{platform}: first paint {result[platform]['median_s']:.2f} s after launch "
                  f"(median of {a.runs}: {times})")
    finally:
        if xvfb is not None:
            xvfb.terminate()
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
