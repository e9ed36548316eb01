"""Shared helpers of the benchmark scripts: timing, and how busy this (shared) machine is."""

from __future__ import annotations

import time


def machine_load() -> float:
    """Fraction of all CPUs busy over 0.5 s (other processes on a shared machine)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    try:
        t0, i0 = snap()
        time.sleep(0.5)
        t1, i1 = snap()
        return round(1.0 - (i1 - i0) / max(1, t1 - t0), 2)
    except OSError:
        return -1.0


def wait_quiet(seconds: float, threshold: float = 0.05) -> None:
    """Return once other processes use < threshold of the CPUs (or after `seconds`)."""
    end = time.time() + seconds
    while time.time() < end and machine_load() >= threshold:
        time.sleep(2.0)


def best_time(fn, reps: int) -> float:
    """Best wall time of fn() over reps calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
