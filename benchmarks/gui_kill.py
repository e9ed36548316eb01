"""SIGKILL the desktop app mid-answer N times (default 100) and count what the history lost.

    python benchmarks/gui_kill.py [--trials 100] [--backend auto|reference] [--json OUT]

Each trial (tests/gui_kill_harness.py): start the app on the tiny model with scripted output, let
it show the history, finish a short answer, start a long one, kill -9 at a random moment while it
streams; then check every message committed before is unchanged, the killed answer is
'incomplete' (never 'complete') with a prefix of the right text, integrity_check is 'ok'. Also
times each restart (process start -> history on screen). Prints a summary and writes JSON
(default benchmarks/results/gui_kill.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from gui_helpers import tiny_edge_dir  # noqa: E402
from gui_kill_harness import run_trials  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--backend", default="auto", choices=["auto", "reference"])
    p.add_argument("--max-kill-s", type=float, default=1.0, help="kill at a uniform random time in [0, this]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "gui_kill.json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_edge_dir(Path(tmp))
        t0 = time.time()
        results = run_trials(model, Path(tmp) / "home", a.trials, a.seed, a.max_kill_s, a.backend,
                             log=lambda r: print(f"trial {r.trial:3d}: restart {r.restart_s:.2f} s, killed after "
                                                 f"{r.killed_after_s:.2f} s, in-flight {r.inflight_status}, "
                                                 f"lost {len(r.lost)}, problems {r.problems}", flush=True))
    restarts = sorted(r.restart_s for r in results)
    summary = {
        "trials": len(results), "backend": a.backend, "seconds": round(time.time() - t0, 1),
        "messages_lost": sum(len(r.lost) for r in results),
        "trials_with_problems": sum(bool(r.problems) for r in results),
        "killed_mid_stream": sum(r.inflight_status == "incomplete" for r in results),
        "killed_answer_stored_complete": sum(r.inflight_status == "complete" for r in results),
        "restart_to_history_s": {"median": round(statistics.median(restarts), 3),
                                 "p95": round(restarts[int(0.95 * (len(restarts) - 1))], 3),
                                 "max": round(restarts[-1], 3)},
        "problems": [f"trial {r.trial}: {r.problems}" for r in results if r.problems],
    }
    print(json.dumps(summary, indent=2))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["messages_lost"] == 0 and summary["trials_with_problems"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
