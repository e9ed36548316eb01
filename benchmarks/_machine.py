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


def machine() -> dict:
    """The CPU this figure was measured on (model name and SIMD features: the project's machines
    change type between sessions), cores, and how busy the machine was."""
    import os

    name, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {"cpu": name, "simd_features": simd, "cores": os.cpu_count(), "load_before": machine_load()}
